// The HT message steps both paths share (intranode kernels, and the hierarchical ones for the
// ranks of our own node): writing a dispatch message into a slot of a rank on our node, laying out
// and placing the received dispatch messages, the cached dispatch's receive, and the expert side's
// combine message. Message format (one slot): payload (row, then fp8 scales), then per choice k <
// maxTopk the local expert id at the destination (-1: not there), the token's position within that
// expert, its weight; the flag (epoch << 32 | token) is stored last, with release semantics.
#pragma once

#include <cstdint>

#include "common/device_error.cuh"
#include "common/expert_ids.cuh"
#include "common/memory_order.cuh"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_params.h"

namespace ncclep {
namespace ht {

// Choice k of a dispatch message's metadata, held by lane k < topk: the expert (-1: none; local to
// the slot's rank, global in a network message), the token's position within that expert among the
// source's tokens, and its weight.
struct Choice {
  int expert = -1;
  int pos = 0;
  float weight = 0.0f;

  // From the message at msg, which a peer wrote (read through L2).
  __device__ __forceinline__ static Choice load(const char* msg, const HTLayout& l, int lane) {
    const int* meta = reinterpret_cast<const int*>(msg + l.payloadBytes);
    return {__ldcg(meta + lane), __ldcg(meta + l.maxTopk + lane),
            __ldcg(reinterpret_cast<const float*>(meta) + 2 * l.maxTopk + lane)};
  }

  __device__ __forceinline__ void store(char* msg, const HTLayout& l, int lane) const {
    int* meta = reinterpret_cast<int*>(msg + l.payloadBytes);
    meta[lane] = expert;
    meta[l.maxTopk + lane] = pos;
    reinterpret_cast<float*>(meta)[2 * l.maxTopk + lane] = weight;
  }

  // This choice (a global expert) as rank d's slot holds it: the local expert there, or none.
  __device__ __forceinline__ Choice on(int d, const HTLayout& l) const {
    const bool here = expert >= 0 && expert / l.numLocalExperts == d;
    return {here ? expert - d * l.numLocalExperts : -1, here ? pos : 0, here ? weight : 0.0f};
  }
};

// Choice `lane` (< topk) of token b as the dispatch senders read it: the checked global expert
// (the layout step reported bad ids), the token's position within it (from the layout step), its
// weight.
__device__ __forceinline__ Choice tokenChoice(const HTDispatchParams& p, int b, int lane) {
  const HTCommon& c = p.c;
  const int K = p.topk;
  const int* expertPos = reinterpret_cast<const int*>(c.local + c.layout.expertPos);
  const int e = device::warpTokenExpert(p.topkIdx, p.topkIdx64, b, K, c.numExperts, lane);
  const float weight = (p.topkWeights != nullptr && lane < K) ? p.topkWeights[int64_t(b) * K + lane] : 0.0f;
  const int pos = e >= 0 ? expertPos[int64_t(b) * c.layout.maxTopk + lane] : 0;
  return {e, pos, weight};
}

// Token b's dispatch message to the ranks in `dests`; lane d holds the slot's address at rank d in
// `mine`. Lane k < topk holds the token's choice k (global expert).
__device__ __forceinline__ void writeDispatchMessages(const HTDispatchParams& p, char* mine, uint32_t dests, int b,
                                                      const Choice& choice, uint64_t epoch, int lane) {
  const HTLayout& l = p.c.layout;
  const int K = p.topk;
  const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(b) * p.rowBytes);
  const char* scales = static_cast<const char*>(p.xScales) + int64_t(b) * p.scaleRowBytes;
  const ShortRow heldScales = ShortRow::load<false>(scales, p.scaleRowBytes, lane);
  warpFanout16<false>(mine, dests, row, p.rowBytes / 16, lane);
  for (uint32_t m = dests; m != 0; m &= m - 1) {
    const int d = __ffs(m) - 1;
    char* msg = reinterpret_cast<char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(mine), d));
    heldScales.store<false>(msg + p.rowBytes, scales, p.scaleRowBytes, lane);
    if (lane < K) choice.on(d, l).store(msg, l, lane);
  }
  __syncwarp();
  if ((dests >> lane) & 1u)
    device::storeRelease(reinterpret_cast<uint64_t*>(mine + l.flagOffset), (epoch << 32) | uint32_t(b));
}

constexpr int kMaxLocalExperts = kHTMaxExperts / 2;

// Where the received rows go (shared memory of a receiving block).
struct RecvPlan {
  int srcOffset[kHTMaxExperts];  // [local expert][source]: rows of e from earlier sources
  int expertStart[kMaxLocalExperts];
  int expertCount[kMaxLocalExperts];
  int count[kHTMaxRanks];  // tokens from each source
  int start[kHTMaxRanks];  // flat: first row of each source
  int used;
};

// Rows no message lands on: topk_idx -1, weights 0, recv_slot -1 (x and scales stay as they were,
// like the reference's). Rows past the used ones, and each expert segment's alignment padding.
__device__ __forceinline__ void fillUnusedRows(const HTDispatchParams& p, const RecvPlan& s, int thread, int threads) {
  const int K = p.topk, L = p.c.layout.numLocalExperts;
  for (int64_t i = int64_t(s.used) * K + thread; i < int64_t(p.numRows) * K; i += threads) {
    device::storeExpertId(p.recvTopkIdx, p.recvTopkIdx64, i, -1);
    if (p.recvTopkWeights != nullptr) p.recvTopkWeights[i] = 0.0f;
  }
  for (int r = s.used + thread; r < p.numRows; r += threads) p.recvSlot[r] = -1;
  if (!p.expertMajor || p.alignment <= 1) return;
  const int pads = p.alignment - 1;
  for (int q = thread; q < L * pads; q += threads) {
    const int e = q / pads, i = q % pads;
    const int count = s.expertCount[e];
    const int padded = (count + p.alignment - 1) / p.alignment * p.alignment;
    if (count + i >= padded) continue;
    const int r = s.expertStart[e] + count + i;
    p.recvSlot[r] = -1;
    for (int k = 0; k < K; ++k) {
      device::storeExpertId(p.recvTopkIdx, p.recvTopkIdx64, int64_t(r) * K + k, -1);
      if (p.recvTopkWeights != nullptr) p.recvTopkWeights[int64_t(r) * K + k] = 0.0f;
    }
  }
}

// Lays out the received rows, writes the counts outputs (block 0) and fills the unused rows.
// Lane r < R of warp 0 holds source r's token count in `tokens`; rowsOf(r, e) reads the rows of
// local expert e that source r sends (only called for sources that send tokens).
template <class RowsOf>
__device__ __forceinline__ void planRows(const HTDispatchParams& p, RecvPlan& s, int tokens, const RowsOf& rowsOf,
                                         int block, int blocks) {
  const int R = p.c.nRanks, L = p.c.layout.numLocalExperts;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (warp == 0) {
    int incl = tokens;
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane < R) {
      s.count[lane] = tokens;
      s.start[lane] = incl - tokens;
    }
    if (lane == 31) s.used = incl;
  }
  __syncthreads();
  for (int e = tid; e < L; e += blockDim.x) {
    int acc = 0;
    for (int r = 0; r < R; ++r) {
      s.srcOffset[e * R + r] = acc;
      acc += s.count[r] ? rowsOf(r, e) : 0;
    }
    s.expertCount[e] = acc;
  }
  __syncthreads();
  if (warp == 0) {  // segment starts: exclusive prefix of the aligned counts
    const int align = p.expertMajor ? p.alignment : 1;
    int carry = 0;
    for (int base = 0; base < L; base += 32) {
      const int e = base + lane;
      const int padded = e < L ? (s.expertCount[e] + align - 1) / align * align : 0;
      int incl = padded;
      for (int o = 1; o < 32; o <<= 1) {
        const int up = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += up;
      }
      if (e < L) s.expertStart[e] = carry + incl - padded;
      carry += __shfl_sync(kFull, incl, 31);
    }
    if (p.expertMajor && lane == 0) s.used = carry;
  }
  __syncthreads();
  if (block == 0) {
    for (int r = tid; r < R; r += blockDim.x) p.recvCounts[r] = s.count[r];
    for (int e = tid; e < L; e += blockDim.x) p.expertCounts[e] = s.expertCount[e];
    if (tid == 0) p.numRecv[0] = s.used;
  }
  fillUnusedRows(p, s, block * blockDim.x + tid, blocks * blockDim.x);
}

// Warps (spread over the sources so that all links drain at once) poll each message's flag and
// copy it into its output rows: flat, row = rows of earlier sources + slot; expert_major, per local
// expert e of the message, row = start of e's segment + rows of e from earlier sources + position.
__device__ __forceinline__ void receiveDispatchMessages(const HTDispatchParams& p, const RecvPlan& s, int block,
                                                        int blocks, uint32_t epoch) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts, K = p.topk, T = l.maxTokens;
  const int lane = threadIdx.x & 31;
  const StreamShare share = shareStreams(block * kHTWarps + (threadIdx.x >> 5), blocks * kHTWarps, R);
  const int vectors = p.rowBytes / 16;
  bool ok = true;
  for (int src = share.first; ok && src < R; src += share.step) {
    for (int j = share.h; j < s.count[src]; j += share.helpers) {
      const char* msg = slotPtr(c.local, l, src, j);
      uint64_t flag = 0;
      if (lane == 0)
        ok = waitEpoch(reinterpret_cast<const uint64_t*>(msg + l.flagOffset), epoch, &flag, c, kPhaseHTDispatchRecv,
                       src);
      ok = __shfl_sync(kFull, ok, 0);
      if (!ok) break;
      __syncwarp();  // lane 0 acquired the flag: the message is visible to the warp
      Choice choice;
      if (lane < K) choice = Choice::load(msg, l, lane);
      const int local = choice.expert;
      const ShortRow heldScales = ShortRow::load<true>(msg + p.rowBytes, p.scaleRowBytes, lane);
      int row;
      uint32_t targets;
      if (p.expertMajor) {
        const bool here = local >= 0 && local < L;
        row = here ? s.expertStart[local] + s.srcOffset[local * R + src] + choice.pos : -1;
        targets = __ballot_sync(kFull, here);
      } else {
        row = s.start[src] + j;
        targets = 1u;
      }
      char* dst = row >= 0 ? static_cast<char*>(p.recvX) + int64_t(row) * p.rowBytes : nullptr;
      warpFanout16<true>(dst, targets, reinterpret_cast<const int4*>(msg), vectors, lane);
      for (uint32_t m = targets; m != 0; m &= m - 1) {
        const int r = __shfl_sync(kFull, row, __ffs(m) - 1);
        heldScales.store<true>(static_cast<char*>(p.recvScales) + int64_t(r) * p.scaleRowBytes, msg + p.rowBytes,
                               p.scaleRowBytes, lane);
        if (lane < K) {
          device::storeExpertId(p.recvTopkIdx, p.recvTopkIdx64, int64_t(r) * K + lane, local);
          if (p.recvTopkWeights != nullptr) p.recvTopkWeights[int64_t(r) * K + lane] = choice.weight;
        }
        if (lane == 0) p.recvSlot[r] = src * T + j;
      }
    }
  }
}

// Cached dispatch, receive side: warp w of `warps` fills output rows w, w + warps, ... with the
// row of the slot recv_slot[r] names (zeros where it names none, or where its source rejected the
// call: recorded by the warp's first such row).
__device__ __forceinline__ void receiveCachedRows(const HTCachedParams& p, int w, int warps, uint32_t epoch) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int T = l.maxTokens, slots = c.nRanks * T;
  const int lane = threadIdx.x & 31;
  bool reported = false;
  for (int r = w; r < p.numRows; r += warps) {
    char* dst = static_cast<char*>(p.out) + int64_t(r) * p.rowBytes;
    const int slot = p.recvSlot[r];
    if (slot < 0 || slot >= slots) {
      warpZeroBytes(dst, p.rowBytes, lane);
      continue;
    }
    const int src = slot / T;
    const char* msg = slotPtr(c.local, l, src, slot % T);
    bool ok = true, rejected = false;
    if (lane == 0) {
      uint64_t flag = 0;
      ok = waitEpoch(reinterpret_cast<const uint64_t*>(msg + l.flagOffset), epoch, &flag, c, kPhaseHTCachedRecv, src);
      rejected = ok && peerRejected(c, uint32_t(flag), kPhaseHTCachedRecv, src, !reported);
      reported = reported || rejected;
    }
    if (!__shfl_sync(kFull, ok, 0)) return;
    __syncwarp();
    if (__shfl_sync(kFull, rejected, 0)) warpZeroBytes(dst, p.rowBytes, lane);
    else warpCopyBytes<true>(dst, msg, p.rowBytes, lane);
  }
}

// Combine, expert side: the payload of slot (owner, j)'s message at `msg`: the sum of the rows
// that hold the slot, in ascending row order (so it does not depend on the prepare kernel's
// atomics), and with topk_weights the per-choice sums of their weights. The caller stores the flag.
__device__ __forceinline__ void writeCombineMessage(const HTCombineParams& p, char* msg, int slot, int lane) {
  const HTLayout& l = p.c.layout;
  const int KM = l.maxTopk, K = p.topk;
  const int* rowCount = reinterpret_cast<const int*>(p.c.local + l.rowCount);
  const int* rowsOf = reinterpret_cast<const int*>(p.c.local + l.rowsOf);
  const int vectors = p.hidden / 8;
  const int n = min(rowCount[slot], KM);
  const int mine = lane < n ? rowsOf[int64_t(slot) * KM + lane] : 0x7fffffff;
  int rank = 0;
  for (int q = 0; q < n; ++q) rank += __shfl_sync(kFull, mine, q) < mine ? 1 : 0;
  int sorted = 0;
  for (int q = 0; q < n; ++q) {
    const int r = __shfl_sync(kFull, mine, q), at = __shfl_sync(kFull, rank, q);
    if (at == lane) sorted = r;
  }
  const int4* src = static_cast<const int4*>(p.x) + int64_t(sorted) * vectors;
  warpSumRows<false>(reinterpret_cast<int4*>(msg), src, n >= 32 ? kFull : (1u << n) - 1, vectors, lane);
  if (p.topkWeights != nullptr) {
    float acc = 0.0f;
    for (int q = 0; q < n; ++q) {
      const int64_t row = __shfl_sync(kFull, sorted, q);
      if (lane < K && device::loadExpertId(p.recvTopkIdx, p.recvTopkIdx64, row * K + lane) >= 0)
        acc += p.topkWeights[row * K + lane];
    }
    if (lane < K) reinterpret_cast<float*>(msg + l.payloadBytes)[lane] = acc;
  }
}

}  // namespace ht
}  // namespace ncclep
