// How a rejected call's reason travels to the peers (ncclep.h, "Rejected calls"): in a 32-bit word
// the peers read anyway, where counts and token indexes stay below 2^31 -- bit 31 set, then the
// rank it names (where the reader cannot tell by itself) and the reason code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NCCLEP_HOST_DEVICE __host__ __device__
#else
#define NCCLEP_HOST_DEVICE
#endif

namespace ncclep {

constexpr uint32_t kRejectMark = 0x80000000u;

NCCLEP_HOST_DEVICE constexpr uint32_t rejectWord(int reason, int peer = 0) {
  return kRejectMark | (uint32_t(peer) & 0x7fffffu) << 8 | (uint32_t(reason) & 0xffu);
}
NCCLEP_HOST_DEVICE constexpr bool isRejectWord(uint32_t word) { return (word & kRejectMark) != 0; }
NCCLEP_HOST_DEVICE constexpr int rejectReason(uint32_t word) { return int(word & 0xffu); }
NCCLEP_HOST_DEVICE constexpr int rejectPeer(uint32_t word) { return int((word >> 8) & 0x7fffffu); }

}  // namespace ncclep
