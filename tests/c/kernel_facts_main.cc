// Drives the C library's kernel facts (ncclepQueryKernelSupport, ncclepHTNumRowsFor, ncclepGetLimits,
// ncclepRejectReasonName) for tests/test_kernel_facts.py, without a GPU or NCCL: reads one query
// per line on stdin,
//   support MODE EXPERTS TOKENS HIDDEN TOPK RANKS LSA_TEAMS GIN DEVICE_API
//   rows EXPERTS TOKENS HIDDEN TOPK RANKS K LAYOUT ALIGNMENT
//   limits
//   rejects
// and prints one line per query: "ok <supported> <why>", "ok <rows>", "ok <name>=<value> ...",
// "ok <name of reject code 0> <name of code 1> ... <name of code ncclepNumRejectReasons>" (the
// last one past the list), or "error <status> <message>".
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "ncclep.h"

namespace {

ncclepGroupConfig_t config(int mode, int experts, int tokens, int hidden, int topk) {
  ncclepGroupConfig_t c = NCCLEP_GROUP_CONFIG_INITIALIZER;
  c.mode = mode;
  c.numExperts = experts;
  c.maxTokensPerRank = tokens;
  c.hidden = hidden;
  c.maxTopk = topk;
  return c;
}

void fail(ncclepResult_t res) { std::printf("error %d %s\n", int(res), ncclepGetLastError()); }

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string what;
    in >> what;
    if (what == "support") {
      int mode, experts, tokens, hidden, topk, ranks, teams, gin, api;
      in >> mode >> experts >> tokens >> hidden >> topk >> ranks >> teams >> gin >> api;
      ncclepGroupConfig_t c = config(mode, experts, tokens, hidden, topk);
      ncclepTopology_t t = NCCLEP_TOPOLOGY_INITIALIZER;
      t.nRanks = ranks;
      t.nLsaTeams = teams;
      t.ginEnabled = gin;
      t.deviceApiAvailable = api;
      int supported = -1;
      char why[512];
      ncclepResult_t res = ncclepQueryKernelSupport(&c, &t, &supported, why, sizeof(why));
      if (res != ncclepSuccess) fail(res); else std::printf("ok %d %s\n", supported, why);
    } else if (what == "rows") {
      int experts, tokens, hidden, topk, ranks, k, layout, alignment;
      in >> experts >> tokens >> hidden >> topk >> ranks >> k >> layout >> alignment;
      ncclepGroupConfig_t c = config(NCCLEP_MODE_HT, experts, tokens, hidden, topk);
      long long rows = -1;
      ncclepResult_t res = ncclepHTNumRowsFor(&c, ranks, k, layout, alignment, &rows);
      if (res != ncclepSuccess) fail(res); else std::printf("ok %lld\n", rows);
    } else if (what == "limits") {
      ncclepLimits_t l = NCCLEP_LIMITS_INITIALIZER;
      ncclepResult_t res = ncclepGetLimits(&l);
      if (res != ncclepSuccess) {
        fail(res);
      } else {
        std::printf("ok ll_max_topk=%d ll_max_ranks=%d ll_max_entries=%d ht_max_topk=%d ht_max_ranks=%d "
                    "ht_default_sms=%d fp8_block=%d\n",
                    l.llMaxTopk, l.llMaxRanks, l.llMaxEntries, l.htMaxTopk, l.htMaxRanks, l.htDefaultSms, l.fp8Block);
      }
    } else if (what == "rejects") {
      std::printf("ok");
      for (int code = 0; code <= ncclepNumRejectReasons; ++code) std::printf(" %s", ncclepRejectReasonName(code));
      std::printf("\n");
    } else {
      std::printf("error -1 unknown query %s\n", what.c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}
