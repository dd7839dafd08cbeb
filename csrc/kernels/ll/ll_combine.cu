// LL combine: the weighted sum over each token's experts, reduced in two steps.
//
// Send (on each expert rank): for every token received from source r in slot j, sum its local
// experts' rows times their weights in fp32 and put one bf16 row into slot j of r's combine area
// for us (a warp per part of a row; staged and put when r is across the network). The last block
// to finish signals every rank, tokens or not.
//
// Receive (on the token's rank): wait for every rank's signal, then out[b] = sum over ranks d of
// the row from d at slot send_slots[b, d], in rank order in fp32, written as bf16; the last block
// acknowledges each rank so it may reuse the parity.
#include "common/bf16.cuh"
#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "kernels/ll/ll_params.h"
#include "kernels/ll/ll_receive.cuh"
#include "transport/peers.cuh"

namespace ncclep {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

struct CombineShared {
  int start[kLLMaxRanks + 1];
  int chunksTo[kLLMaxRanks];  // send: 16-byte chunks this block stored for each rank
  int expected[kLLMaxRanks];  // receive: our tokens each rank returns (highest slot + 1)
  bool last;
};


template <class Net>
__device__ void combineSend(const LLCombineParams& p, CombineShared& s) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {l.signals, l.nRanks});
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint32_t seq = *reinterpret_cast<volatile uint32_t*>(&state->combineSendSeq);
  const uint32_t parity = seq & 1u;
  const int R = c.nRanks, T = l.maxTokens, KM = l.maxTopk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, numWarps = blockDim.x >> 5;

  if (seq >= 2) {
    for (int d = tid; d < R; d += blockDim.x)
      peers.wait(d, kSigCombineAck, seq - 1, c.timeoutNs, err, kPhaseLLCombineSend);
  }
  if (tid == 0) {
    s.start[0] = 0;
    for (int r = 0; r < R; ++r) s.start[r + 1] = s.start[r] + p.recvSlotCounts[r];
  }
  for (int r = tid; r < R; r += blockDim.x) s.chunksTo[r] = 0;
  __syncthreads();
  const bool failed = device::hasError(err);

  // Work items: (message, part), a warp each, spread over the SMs first.
  const int total = failed ? 0 : s.start[R];
  const int chunks = p.hidden / 8;
  const int warps = int(gridDim.x) * numWarps;
  int parts = total > 0 ? warps / total : 1;
  parts = parts < 1 ? 1 : (parts > 8 ? 8 : parts);
  const int perPart = (chunks + parts - 1) / parts;
  const int4* rows = static_cast<const int4*>(p.expertOut);
  for (int item = warp * gridDim.x + blockIdx.x; item < total * parts; item += warps) {
    const int m = item / parts, part = item % parts;
    const int r = ll::sourceOf(s.start, R, m);
    const int j = m - s.start[r];
    const int64_t at = (int64_t(r) * T + j) * KM;
    const int myRow = lane < KM ? p.recvRows[at + lane] : -1;
    const float myWeight = lane < KM ? p.recvWeights[at + lane] : 0.0f;
    int rowK[kLLMaxTopk];
    float weightK[kLLMaxTopk];
#pragma unroll
    for (int k = 0; k < kLLMaxTopk; ++k) {
      rowK[k] = __shfl_sync(kFullMask, myRow, k);
      weightK[k] = __shfl_sync(kFullMask, myWeight, k);
    }
    const size_t dstOffset = l.combineSlots + ((size_t(parity) * R + c.rank) * T + size_t(j)) * l.combineMsgBytes;
    const size_t stageOffset = l.stageCombine + ((size_t(parity) * R + r) * T + size_t(j)) * l.combineMsgBytes;
    int4* dst = peers.template target<int4>(r, dstOffset, stageOffset);
    const int begin = part * perPart, end = begin + perPart < chunks ? begin + perPart : chunks;
    // kUnroll chunks per lane at once, so that many loads are in flight.
    constexpr int kUnroll = 4;
    for (int i = begin + lane; i < end; i += 32 * kUnroll) {
      float acc[kUnroll][8] = {};
#pragma unroll
      for (int k = 0; k < kLLMaxTopk; ++k) {
        if (k >= KM || rowK[k] < 0) continue;
        const int4* src = rows + int64_t(rowK[k]) * chunks + i;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i + u * 32 < end) device::fmaBf16x8(acc[u], src[u * 32], weightK[k]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * 32 < end) dst[i + u * 32] = device::packBf16x8(acc[u]);
    }
    if (lane == 0 && end > begin) atomicAdd(&s.chunksTo[r], end - begin);
    if (peers.viaNet(r) && begin < end) {
      __syncwarp();
      peers.put(r, dstOffset + size_t(begin) * 16, stageOffset + size_t(begin) * 16, size_t(end - begin) * 16,
                 lane, 32);
    }
  }

  // Each block tells each rank how many chunks of its rows landed (after the signal's fence).
  __syncthreads();
  for (int d = tid; d < R; d += blockDim.x)
    if (s.chunksTo[d] > 0) peers.signal(d, kSigCombineData + int(parity), s.chunksTo[d]);
  if (tid == 0) s.last = device::arriveLast(&state->blocksDone[2], gridDim.x);
  __syncthreads();
  if (s.last && tid == 0) {
    state->blocksDone[2] = 0;
    state->combineSendSeq = seq + 1;
  }
}

template <class Net>
__device__ void combineRecv(const LLCombineParams& p, CombineShared& s) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {l.signals, l.nRanks});
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint32_t seq = *reinterpret_cast<volatile uint32_t*>(&state->combineRecvSeq);
  const uint32_t parity = seq & 1u;
  const int R = c.nRanks, T = l.maxTokens;
  const int tid = threadIdx.x;

  const int chunks = p.hidden / 8;
  // Rank d returns one row per token we sent it: slots 0..n-1, so n = highest slot + 1.
  const int lane = tid & 31, warp = tid >> 5, numWarps = blockDim.x >> 5;
  for (int d = warp; d < R; d += numWarps) {
    int highest = -1;
    for (int b = lane; b < p.numTokens; b += 32) highest = max(highest, p.sendSlots[int64_t(b) * R + d]);
    highest = __reduce_max_sync(kFullMask, highest);
    if (lane == 0) s.expected[d] = highest + 1;
  }
  __syncthreads();
  for (int r = tid; r < R; r += blockDim.x)
    peers.wait(r, kSigCombineData + int(parity),
               *ll::receivedMark(c, 1, parity, r) + uint64_t(s.expected[r]) * uint64_t(chunks), c.timeoutNs, err,
               kPhaseLLCombineRecv);
  __syncthreads();
  if (device::hasError(err)) return;

  const char* slots = c.local + l.combineSlots + size_t(parity) * R * T * l.combineMsgBytes;
  for (int b = blockIdx.x; b < p.numTokens; b += gridDim.x) {
    const int* sendSlots = p.sendSlots + int64_t(b) * R;
    for (int i = tid; i < chunks; i += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int d = 0; d < R; ++d) {
        const int slot = sendSlots[d];
        if (slot < 0) continue;
        const int4* src = reinterpret_cast<const int4*>(slots + (size_t(d) * T + slot) * l.combineMsgBytes);
        device::fmaBf16x8(acc, device::loadCg(src + i), 1.0f);
      }
      static_cast<int4*>(p.out)[int64_t(b) * chunks + i] = device::packBf16x8(acc);
    }
  }

  __syncthreads();
  if (tid == 0) {
    __threadfence();
    s.last = device::arriveLast(&state->blocksDone[3], gridDim.x);
  }
  __syncthreads();
  if (!s.last) return;
  if (tid == 0) {
    state->blocksDone[3] = 0;
    state->combineRecvSeq = seq + 1;
  }
  for (int r = tid; r < R; r += blockDim.x) {
    *ll::receivedMark(c, 1, parity, r) += uint64_t(s.expected[r]) * uint64_t(chunks);
    peers.signal(r, kSigCombineAck, 1);
  }
}

template <class Net>
__global__ void __launch_bounds__(kLLThreads, 1) llCombineKernel(const __grid_constant__ LLCombineParams p) {
  __shared__ CombineShared shared;
  if (p.phases & kLLSend) {
    combineSend<Net>(p, shared);
    __syncthreads();
  }
  if (p.phases & kLLRecv) combineRecv<Net>(p, shared);
}

}  // namespace

int launchLLCombine(const LLCombineParams& p, int numBlocks, cudaStream_t stream) {
  if (p.c.useGin) llCombineKernel<transport::NetGin><<<numBlocks, kLLThreads, 0, stream>>>(p);
  else llCombineKernel<transport::NetEmulated><<<numBlocks, kLLThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
