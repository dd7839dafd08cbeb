// HT dispatch transfer: each token goes once to every rank holding one of its experts.
//
// Blocks [0, sendBlocks) send: a warp per token (tokens interleaved over all sender warps) reads
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
#include <cstddef>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_params.h"
#include "transport/lsa.cuh"

namespace ncclep {
namespace {

using ht::kFull;

constexpr int kHTMaxLocalExperts = kHTMaxExperts / 2;

struct RecvShared {
  int srcOffset[kHTMaxExperts];  // [local expert][source]: rows of e from earlier sources
  int expertStart[kHTMaxLocalExperts];
  int expertCount[kHTMaxLocalExperts];
  int count[kHTMaxRanks];  // tokens from each source
  int start[kHTMaxRanks];  // flat: first row of each source
  int used;
  bool last;
};

__device__ void dispatchSend(const HTDispatchParams& p, uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  const device::ErrorSink err = ht::sink(c);
  const int R = c.nRanks, L = l.numLocalExperts, K = p.topk, KM = l.maxTopk;
  const int lane = threadIdx.x & 31;
  const int warps = c.sendBlocks * kHTWarps;
  const int w = blockIdx.x * kHTWarps + (threadIdx.x >> 5);
  if (w >= p.numTokens) return;
  const uint64_t epoch = uint64_t(seq) + 1;

  // Our slots at d still hold call seq until d has read them.
  bool ready = true;
  if (lane < R)
    ready = ht::waitPeerDone(c, lsa.peerPtr<uint64_t>(lane, l.state + offsetof(HTState, done)), seq,
                             kPhaseHTDispatchSend, lane);
  if (!__all_sync(kFull, ready)) return;

  const int* expertPos = reinterpret_cast<const int*>(c.local + l.expertPos);
  const int vectors = p.rowBytes / 16;
  for (int b = w; b < p.numTokens; b += warps) {
    const int e = ht::warpTokenExpert(p.topkIdx, p.topkIdx64, b, K, c.numExperts, lane, false, err, 0);
    const float weight = (p.topkWeights != nullptr && lane < K) ? p.topkWeights[int64_t(b) * K + lane] : 0.0f;
    const int pos = e >= 0 ? expertPos[int64_t(b) * KM + lane] : 0;
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    const uint32_t dests = __ballot_sync(kFull, slot >= 0);
    const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(b) * p.rowBytes);
    const char* scales = static_cast<const char*>(p.xScales) + int64_t(b) * p.scaleRowBytes;
    // Lane d holds the message's address at destination d.
    char* mine =
        slot >= 0 ? lsa.peerPtr<char>(lane, l.slots + (size_t(c.rank) * l.maxTokens + size_t(slot)) * l.msgBytes)
                  : nullptr;
    ht::warpFanout16<false>(mine, dests, row, vectors, lane);
    for (uint32_t m = dests; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      char* msg = reinterpret_cast<char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(mine), d));
      if (p.scaleRowBytes) ht::warpCopyBytes<false>(msg + p.rowBytes, scales, p.scaleRowBytes, lane);
      if (lane < K) {
        const bool here = e >= 0 && e / L == d;
        int* meta = reinterpret_cast<int*>(msg + l.payloadBytes);
        meta[lane] = here ? e - d * L : -1;
        meta[KM + lane] = here ? pos : 0;
        reinterpret_cast<float*>(meta)[2 * KM + lane] = here ? weight : 0.0f;
      }
    }
    __syncwarp();
    if (slot >= 0) device::storeRelease(reinterpret_cast<uint64_t*>(mine + l.flagOffset), (epoch << 32) | uint32_t(b));
  }
}

// Rows no message lands on: topk_idx -1, weights 0, recv_slot -1 (x and scales stay as they were,
// like the reference's). Rows past the used ones, and each expert segment's alignment padding.
__device__ void fillUnusedRows(const HTDispatchParams& p, const RecvShared& s, int thread, int threads) {
  const int K = p.topk, L = p.c.layout.numLocalExperts;
  for (int64_t i = int64_t(s.used) * K + thread; i < int64_t(p.numRows) * K; i += threads) {
    p.recvTopkIdx[i] = -1;
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
      p.recvTopkIdx[int64_t(r) * K + k] = -1;
      if (p.recvTopkWeights != nullptr) p.recvTopkWeights[int64_t(r) * K + k] = 0.0f;
    }
  }
}

__device__ void dispatchRecv(const HTDispatchParams& p, uint32_t seq, RecvShared& s) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts, K = p.topk, KM = l.maxTopk, T = l.maxTokens;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int block = blockIdx.x - c.sendBlocks, blocks = gridDim.x - c.sendBlocks;
  const uint32_t parity = seq & 1u;
  const uint32_t epoch = seq + 1;

  if (warp == 0) {
    int n = 0;
    if (lane < R) {
      const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.local + l.countFlags + (size_t(parity) * R + lane) * 8);
      uint64_t v = 0;
      if (ht::waitEpoch(flag, epoch, &v, c, kPhaseHTDispatchRecv, lane)) n = int(uint32_t(v));
    }
    int incl = n;
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane < R) {
      s.count[lane] = n;
      s.start[lane] = incl - n;
    }
    if (lane == 31) s.used = incl;
  }
  __syncthreads();
  const int* counts = reinterpret_cast<const int*>(c.local + l.counts) + size_t(parity) * R * L;
  for (int e = tid; e < L; e += blockDim.x) {
    int acc = 0;
    for (int r = 0; r < R; ++r) {
      s.srcOffset[e * R + r] = acc;
      acc += s.count[r] ? __ldcg(counts + r * L + e) : 0;
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

  const ht::StreamShare share = ht::shareStreams(block * kHTWarps + warp, blocks * kHTWarps, R);
  const int vectors = p.rowBytes / 16;
  bool ok = true;
  for (int src = share.first; ok && src < R; src += share.step) {
    for (int j = share.h; j < s.count[src]; j += share.helpers) {
      const char* msg = ht::slotPtr(c.local, l, src, j);
      uint64_t flag = 0;
      if (lane == 0) ok = ht::waitEpoch(reinterpret_cast<const uint64_t*>(msg + l.flagOffset), epoch, &flag, c,
                                        kPhaseHTDispatchRecv, src);
      ok = __shfl_sync(kFull, ok, 0);
      if (!ok) break;
      __syncwarp();  // lane 0 acquired the flag: the message is visible to the warp
      int local = -1, pos = 0;
      float weight = 0.0f;
      if (lane < K) {
        const int* meta = reinterpret_cast<const int*>(msg + l.payloadBytes);
        local = __ldcg(meta + lane);
        pos = __ldcg(meta + KM + lane);
        weight = __ldcg(reinterpret_cast<const float*>(meta) + 2 * KM + lane);
      }
      int row;
      uint32_t targets;
      if (p.expertMajor) {
        const bool here = local >= 0 && local < L;
        row = here ? s.expertStart[local] + s.srcOffset[local * R + src] + pos : -1;
        targets = __ballot_sync(kFull, here);
      } else {
        row = s.start[src] + j;
        targets = 1u;
      }
      char* dst = row >= 0 ? static_cast<char*>(p.recvX) + int64_t(row) * p.rowBytes : nullptr;
      ht::warpFanout16<true>(dst, targets, reinterpret_cast<const int4*>(msg), vectors, lane);
      for (uint32_t m = targets; m != 0; m &= m - 1) {
        const int r = __shfl_sync(kFull, row, __ffs(m) - 1);
        if (p.scaleRowBytes)
          ht::warpCopyBytes<true>(static_cast<char*>(p.recvScales) + int64_t(r) * p.scaleRowBytes, msg + p.rowBytes,
                                  p.scaleRowBytes, lane);
        if (lane < K) {
          p.recvTopkIdx[int64_t(r) * K + lane] = local;
          if (p.recvTopkWeights != nullptr) p.recvTopkWeights[int64_t(r) * K + lane] = weight;
        }
        if (lane == 0) p.recvSlot[r] = src * T + j;
      }
    }
  }
}

__global__ void __launch_bounds__(kHTThreads, 1) htDispatchKernel(const __grid_constant__ HTDispatchParams p) {
  __shared__ RecvShared s;
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
