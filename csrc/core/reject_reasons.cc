// Names of the reasons a rank rejects a call (ncclepRejectReason_t): the words Python's
// InvalidArgument.reason uses, and the peers' CommError names.
#include "ncclep.h"

extern "C" const char* ncclepRejectReasonName(int reason) {
  switch (reason) {
    case ncclepRejectNone: return "none";
    case ncclepRejectBadInput: return "bad_input";
    case ncclepRejectType: return "type";
    case ncclepRejectDtype: return "dtype";
    case ncclepRejectShape: return "shape";
    case ncclepRejectDevice: return "device";
    case ncclepRejectLayout: return "layout";
    case ncclepRejectTokens: return "tokens";
    case ncclepRejectHidden: return "hidden";
    case ncclepRejectTopk: return "topk";
    case ncclepRejectExpertId: return "expert_id";
    case ncclepRejectDuplicateExpert: return "duplicate_expert";
    case ncclepRejectHandle: return "handle";
    case ncclepRejectMode: return "mode";
    case ncclepRejectOption: return "option";
    default: return "unknown";
  }
}
