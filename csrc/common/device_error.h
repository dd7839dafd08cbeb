// The error word: where a kernel reports a failed wait or bad input instead of trapping.
// Lives in pinned, device-mapped host memory so the host reads it without synchronising.
#pragma once

#include <cstdint>

namespace ncclep {

enum DeviceErrorCode : int32_t {
  kDeviceOk = 0,
  kDeviceTimeout = 1,        // a wait passed its deadline: phase, peer say which
  kDeviceBadExpert = 2,      // an expert id out of [-1, numExperts): value holds it
  kDeviceDuplicateExpert = 3,  // a token named one expert twice: value holds the token
  kDeviceProtocol = 4,       // a flag carried an unexpected epoch
  kDevicePeerRejected = 5,   // rank `peer` rejected its arguments of the call: value = its reason
};

enum DevicePhase : int32_t {
  kPhaseNone = 0,
  kPhaseLLDispatchSend = 1,
  kPhaseLLDispatchRecv = 2,
  kPhaseLLCombineSend = 3,
  kPhaseLLCombineRecv = 4,
  kPhaseHTLayout = 5,
  kPhaseHTDispatchSend = 6,
  kPhaseHTDispatchRecv = 7,
  kPhaseHTCombineSend = 8,
  kPhaseHTCombineRecv = 9,
  kPhaseHTCachedSend = 10,
  kPhaseHTCachedRecv = 11,
  kPhaseHTForward = 12,  // hierarchical path: a forwarder waiting for a source's network messages
  kNumPhases,
};

struct DeviceError {
  int32_t code;   // DeviceErrorCode; the first error wins
  int32_t phase;  // DevicePhase
  int32_t peer;   // the rank waited for, -1 if none
  int32_t value;  // code-specific detail
};

}  // namespace ncclep
