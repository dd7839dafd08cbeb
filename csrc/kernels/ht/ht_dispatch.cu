// HT dispatch transfer: each token goes once to every rank holding one of its experts.
//
// Blocks [0, sendBlocks) send: a warp per token (claimed in token order, ht::TokenClaims) reads
// the token's row once and stores it, with the token's metadata (local expert ids there, the
// token's position within each of those experts, weights), into slot send_pos[b, d] of our
// region in each destination d's window, 16-byte stores over NVLink. After a __syncwarp, one lane
// per destination stores the slot's flag (epoch << 32 | token) with release semantics: the
// message is complete when its flag carries the call's epoch.
//
// The other blocks receive: they wait for every source's count words (from the layout step), work
// out where each source's rows go, fill the rows no token will use, then warps (spread over the
// sources so that all links drain at once) poll each message's flag and copy it into its output
// rows: flat, row = rows of earlier sources + slot; expert_major, per local expert e of the
// message, row = start of e's segment + rows of e from earlier sources + the message's position.
// The copy of each message overlaps the transfer of later ones.
//
// A source that rejected the call sends no message and its reject word as its tokens word (the
// layout step): the receivers record it and take zero tokens from it. The rejecting rank's receivers do
// nothing (every count word and flag carries its call's epoch, so what it leaves unread is harmless).
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

constexpr int kWordsAtOnce = 8;  // count words a receiving thread loads before it checks them

struct Shared {
  ht::RecvPlan plan;
  uint32_t missing[kHTWarps];  // per warp: the sources of which a count word did not arrive
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

// Every receiving block waits for all count words of every source (ht_layout.h, `counts`), a few
// per thread, all loaded at once: thread r < R takes source r's tokens word, the others its
// per-expert words. The loads are relaxed, not acquiring: each word carries its own data and its
// call's epoch, stored relaxed by the source with nothing published with it (ht_layout.cu), so a
// word with our epoch is complete and there is nothing to order after it. A word of an older epoch
// is the same parity's from two calls ago (the source waited for our `done` of that call before it
// stored this one): wait for this call's. A source of which a word did not arrive (the wait timed
// out and reported it) counts as sending nothing.
__device__ void dispatchRecv(const HTDispatchParams& p, uint32_t seq, Shared& sh) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int block = blockIdx.x - c.sendBlocks, blocks = gridDim.x - c.sendBlocks;
  const uint32_t parity = seq & 1u;
  const uint32_t epoch = seq + 1;

  if (p.rejectCode != 0) return;
  const uint64_t* counts = reinterpret_cast<const uint64_t*>(c.local + ht::countsAt(l, parity, 0));
  const int words = R * (L + 1);
  const auto wordAt = [&](int i) {  // i < R: source i's tokens word; then the per-expert words in order
    return i < R ? counts + size_t(i) * (L + 1) + L : counts + size_t((i - R) / L) * (L + 1) + (i - R) % L;
  };
  const auto sourceOf = [&](int i) { return i < R ? i : (i - R) / L; };
  uint32_t missing = 0;
  uint64_t tokensWord = 0;  // thread r < R: source r's
  for (int first = threadIdx.x; first < words; first += kWordsAtOnce * blockDim.x) {
    uint64_t w[kWordsAtOnce];
#pragma unroll
    for (int u = 0; u < kWordsAtOnce; ++u) {
      const int i = first + u * blockDim.x;
      w[u] = i < words ? device::loadRelaxedSys(wordAt(i)) : 0;
    }
#pragma unroll
    for (int u = 0; u < kWordsAtOnce; ++u) {
      const int i = first + u * blockDim.x;
      if (i >= words || uint32_t(w[u] >> 32) == epoch) continue;
      if (!ht::waitEpoch<ht::EpochLoad::kRelaxed>(wordAt(i), epoch, &w[u], c, kPhaseHTDispatchRecv, sourceOf(i)))
        missing |= 1u << sourceOf(i);
    }
    if (first < R) tokensWord = w[0];
  }
  missing = __reduce_or_sync(kFull, missing);
  if (lane == 0) sh.missing[warp] = missing;
  __syncthreads();
  int tokens = 0;  // warp 0, lane r: tokens from source r
  if (warp == 0) {
    missing = __reduce_or_sync(kFull, lane < kHTWarps ? sh.missing[lane] : 0u);
    if (lane < R && !((missing >> lane) & 1u) &&
        !ht::peerRejected(c, uint32_t(tokensWord), kPhaseHTDispatchRecv, lane, block == 0))
      tokens = int(uint32_t(tokensWord));
  }
  // Words this block saw with our epoch (another thread's load, before the barrier, observed each
  // one): a later load cannot return an older value.
  ht::planRows(p, sh.plan, tokens,
               [&](int r, int e) { return int(uint32_t(device::loadRelaxedSys(counts + size_t(r) * (L + 1) + e))); },
               block, blocks);
  ht::receiveDispatchMessages(p, sh.plan, block, blocks, epoch);
}

__global__ void __launch_bounds__(kHTThreads, 1) htDispatchKernel(const __grid_constant__ HTDispatchParams p) {
  __shared__ Shared s;
  const uint32_t seq = ht::callSeq(p.c);
  if (int(blockIdx.x) < p.c.sendBlocks) dispatchSend(p, seq);
  else dispatchRecv(p, seq, s);
  ht::finishCall(p.c, seq, &s.last);
}

}  // namespace

int launchHTDispatch(const HTDispatchParams& p, int numBlocks, cudaStream_t stream) {
  htDispatchKernel<<<numBlocks, kHTThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
