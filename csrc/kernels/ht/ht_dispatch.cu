// HT dispatch transfer: each token goes once to every rank holding one of its experts.
//
// Blocks [0, sendBlocks) send: a warp per token (claimed in token order, ht::TokenClaims) reads
// the token's row once and stores it, with the token's metadata (local expert ids there, the
// token's position within each of those experts, weights), into slot send_pos[b, d] of our
// region in each destination d's window, 16-byte stores over NVLink. After a __syncwarp, one lane
// per destination stores the slot's flag (epoch << 32 | token) with release semantics: the
// message is complete when its flag carries the call's epoch.
//
// The other blocks receive: they wait for every source's count flag (from the layout step), work
// out where each source's rows go, fill the rows no token will use, then warps (spread over the
// sources so that all links drain at once) poll each message's flag and copy it into its output
// rows: flat, row = rows of earlier sources + slot; expert_major, per local expert e of the
// message, row = start of e's segment + rows of e from earlier sources + the message's position.
// The copy of each message overlaps the transfer of later ones.
//
// A source that rejected the call sends no message and its reject word as its count (the layout
// step): the receivers record it and take zero tokens from it. The rejecting rank's receivers do
// nothing (every flag and count carries its call's epoch, so what it leaves unread is harmless).
#include <cstddef>

#include "common/device_error.cuh"
#include "common/expert_ids.cuh"
#include "common/memory_order.cuh"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_messages.cuh"
#include "kernels/ht/ht_params.h"
#include "transport/lsa.cuh"

namespace ncclep {
namespace {

using ht::kFull;

struct Shared {
  ht::RecvPlan plan;
  bool last;
};

__device__ void dispatchSend(const HTDispatchParams& p, uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  const int R = c.nRanks;
  const int lane = threadIdx.x & 31;
  const int w = blockIdx.x * kHTWarps + (threadIdx.x >> 5);
  if (w >= p.numTokens) return;
  const uint64_t epoch = uint64_t(seq) + 1;

  // Our slots at d still hold call seq until d has read them.
  if (!ht::warpWaitPeersDone(c, lsa, seq, kPhaseHTDispatchSend, lane)) return;

  for (ht::TokenClaims claims(c, lane); claims.current() < p.numTokens; claims.advance()) {
    const int b = claims.current();
    claims.start(p.x, p.rowBytes, p.numTokens);
    const ht::Choice choice = ht::tokenChoice(p, b, lane);
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    const uint32_t dests = __ballot_sync(kFull, slot >= 0);
    // Lane d holds the message's address at destination d.
    char* mine =
        slot >= 0 ? lsa.peerPtr<char>(lane, l.slots + (size_t(c.rank) * l.maxTokens + size_t(slot)) * l.msgBytes)
                  : nullptr;
    ht::writeDispatchMessages(p, mine, dests, b, choice, epoch, lane);
  }
}

__device__ void dispatchRecv(const HTDispatchParams& p, uint32_t seq, ht::RecvPlan& s) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts;
  const int lane = threadIdx.x & 31;
  const int block = blockIdx.x - c.sendBlocks, blocks = gridDim.x - c.sendBlocks;
  const uint32_t parity = seq & 1u;
  const uint32_t epoch = seq + 1;

  if (p.rejectCode != 0) return;
  int tokens = 0;  // warp 0, lane r: tokens from source r, from its count flag
  if (threadIdx.x < 32 && lane < R) {
    const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.local + l.countFlags + (size_t(parity) * R + lane) * 8);
    uint64_t v = 0;
    if (ht::waitEpoch(flag, epoch, &v, c, kPhaseHTDispatchRecv, lane) &&
        !ht::peerRejected(c, uint32_t(v), kPhaseHTDispatchRecv, lane, block == 0))
      tokens = int(uint32_t(v));
  }
  const int* counts = reinterpret_cast<const int*>(c.local + l.counts) + size_t(parity) * R * L;
  ht::planRows(p, s, tokens, [&](int r, int e) { return __ldcg(counts + r * L + e); }, block, blocks);
  ht::receiveDispatchMessages(p, s, block, blocks, epoch);
}

__global__ void __launch_bounds__(kHTThreads, 1) htDispatchKernel(const __grid_constant__ HTDispatchParams p) {
  __shared__ Shared s;
  const uint32_t seq = ht::callSeq(p.c);
  if (int(blockIdx.x) < p.c.sendBlocks) dispatchSend(p, seq);
  else dispatchRecv(p, seq, s.plan);
  ht::finishCall(p.c, seq, &s.last);
}

}  // namespace

int launchHTDispatch(const HTDispatchParams& p, int numBlocks, cudaStream_t stream) {
  htDispatchKernel<<<numBlocks, kHTThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
