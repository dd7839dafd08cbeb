// Differences between the NCCL releases ncclep builds against, in one place: 2.28 (from 2.28.7,
// the first with GIN), 2.29, 2.30 and 2.32 (torch 2.11 ships 2.28.9, 2.12/2.13 ship 2.29.7, 2.14
// ships 2.30.7; 2.32.3 is the newest wheel). Code calls these helpers instead of testing
// NCCL_VERSION_CODE. scripts/check_nccl_headers.sh compiles the C library against each release.
//
// What differs in what ncclep uses, and what ncclep does about it:
//   ncclDevCommRequirements  2.29 puts size/magic/version in front and adds
//                            NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER; a 2.29+ library refuses a struct
//                            without the magic. The initialiser's defaults are not zero (2.29:
//                            ginContextCount 4; 2.30: ginStrongSignalsRequired true, which keeps the
//                            deprecated ncclGin_SignalAdd that the transport uses a strong signal:
//                            visible only after the puts before it): devCommRequirements().
//   enabling GIN             ginForceEnable, deprecated in 2.29.7 for ginConnectionType, where it
//                            meant NCCL_GIN_CONNECTION_FULL: requestGinToEveryPeer().
//   version checks           From 2.29 on the requirements carry the headers' version, and the library
//                            runs kernels built against older (>= 2.29.2) headers by converting its
//                            structs, for LSA but not GIN; 2.28 structs are unversioned:
//                            kDeviceCodeVersioned (the rule is at the check, in group.cc).
//   ncclDevComm              2.30 adds magic/version in front, fields are added in every release;
//                            what ncclep reads (rank, lsaRank, lsaSize, ginContextCount) is in all.
//   ncclWindow_vidmem        grows in 2.30 and 2.32 (ginWins renamed ginWinsDefaultBackend), keeping
//                            the LSA fields in place; ncclep reads it only through
//                            ncclGet{Lsa,Peer,Local}Pointer, unchanged.
//   nccl_device.h            2.32 moves its host API to nccl_device/host.h; <nccl_device.h> includes
//                            it, so ncclep includes only <nccl.h> and <nccl_device.h>.
// Unchanged: ncclGin(comm, context) (2.30 adds a defaulted sharing mode), put, signal, readSignal,
// ncclLsaBarrierSession over ncclTeamTagLsa, ncclCoopCta, ncclTeam and its host and device
// helpers, ncclCommWindowRegister with NCCL_WIN_COLL_SYMMETRIC, NCCL_WIN_REQUIRED_ALIGNMENT.
#pragma once

#include <cstring>

#include <nccl.h>
#include <nccl_device.h>

static_assert(NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 7),
              "ncclep needs NCCL >= 2.28.7 headers (the device API with GIN)");

namespace ncclep {
namespace compat {

#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
constexpr bool kDeviceCodeVersioned = true;
#else
constexpr bool kDeviceCodeVersioned = false;
#endif

// An NCCL version code (ncclGetVersion, NCCL_VERSION_CODE) taken apart; codes of 2.9 and later.
struct Version {
  int major, minor, patch;
};

inline Version decodeVersion(int code) { return Version{code / 10000, code / 100 % 100, code % 100}; }

inline ncclDevCommRequirements devCommRequirements() {
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  ncclDevCommRequirements reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  ncclDevCommRequirements reqs;
  std::memset(&reqs, 0, sizeof(reqs));
#endif
  return reqs;
}

// GIN connections from every rank to every other (ncclep puts to any peer of the world team).
inline void requestGinToEveryPeer(ncclDevCommRequirements* reqs) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 29, 7)
  reqs->ginConnectionType = NCCL_GIN_CONNECTION_FULL;
#else
  reqs->ginForceEnable = true;
#endif
}

}  // namespace compat
}  // namespace ncclep
