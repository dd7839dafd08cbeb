// LL combine: the weighted sum over each token's experts, reduced in two steps.
//
// Send (on each expert rank): for every token received from source r in slot j, sum its local
// experts' rows times their weights in fp32 and put one bf16 row into slot j of r's combine area
// for us. The last block to finish flags every rank (epoch << 32), tokens or not.
//
// Receive (on the token's rank): wait for every rank's flag, then out[b] = Σ_d row from rank d at
// slot send_slots[b, d], summed in rank order in fp32, written as bf16.
#include <cuda_bf16.h>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "kernels/ll/ll_params.h"
#include "transport/lsa.cuh"

namespace ncclep {
namespace {

struct CombineShared {
  int start[kLLMaxRanks + 1];
  int rows[kLLMaxTopk];
  float weights[kLLMaxTopk];
  int slots[kLLMaxRanks];
  bool last;
};

__device__ __forceinline__ void accumulate(float (&acc)[8], const int4& v, float w) {
  const uint32_t words[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = fmaf(w, __uint_as_float(words[i] << 16), acc[2 * i]);
    acc[2 * i + 1] = fmaf(w, __uint_as_float(words[i] & 0xffff0000u), acc[2 * i + 1]);
  }
}

__device__ __forceinline__ int4 packBf16(const float (&acc)[8]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    words[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_int4(int(words[0]), int(words[1]), int(words[2]), int(words[3]));
}

__device__ void combineSend(const LLCombineParams& p, CombineShared& s) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint32_t seq = *reinterpret_cast<volatile uint32_t*>(&state->combineSendSeq);
  const uint32_t parity = seq & 1u;
  const int R = c.nRanks, T = l.maxTokens, KM = l.maxTopk;
  const int tid = threadIdx.x;

  if (seq >= 2) {
    for (int d = tid; d < R; d += blockDim.x) {
      const uint64_t* done = lsa.peerPtr<uint64_t>(d, l.state + offsetof(LLState, combineRecvDone));
      lsa.waitAtLeast(done, seq - 1, c.timeoutNs, err, kPhaseLLCombineSend, d);
    }
  }
  if (tid == 0) {
    s.start[0] = 0;
    for (int r = 0; r < R; ++r) s.start[r + 1] = s.start[r] + p.recvSlotCounts[r];
  }
  __syncthreads();

  const int total = s.start[R];
  const int chunks = p.hidden / 8;
  const int4* rows = static_cast<const int4*>(p.expertOut);
  for (int m = blockIdx.x; m < total; m += gridDim.x) {
    int r = 0;
    while (s.start[r + 1] <= m) ++r;
    const int j = m - s.start[r];
    if (tid < KM) {
      const int64_t at = (int64_t(r) * T + j) * KM + tid;
      s.rows[tid] = p.recvRows[at];
      s.weights[tid] = p.recvWeights[at];
    }
    __syncthreads();
    int4* dst = lsa.peerPtr<int4>(
        r, l.combineSlots + ((size_t(parity) * R + c.rank) * T + size_t(j)) * l.combineMsgBytes);
    for (int i = tid; i < chunks; i += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < KM; ++k) {
        const int row = s.rows[k];
        if (row >= 0) accumulate(acc, rows[int64_t(row) * chunks + i], s.weights[k]);
      }
      dst[i] = packBf16(acc);
    }
    __syncthreads();
  }

  __syncthreads();
  if (tid == 0) {
    if (int(blockIdx.x) < total) device::fenceSystem();  // only blocks that stored to peers
    s.last = device::arriveLast(&state->blocksDone[2], gridDim.x);
  }
  __syncthreads();
  if (!s.last) return;
  const uint64_t epoch = uint64_t(seq) + 1;
  for (int d = tid; d < R; d += blockDim.x) {
    device::fenceSystem();
    lsa.signal(d, l.combineFlags + (size_t(parity) * R + c.rank) * 8, epoch << 32);
  }
  if (tid == 0) {
    state->blocksDone[2] = 0;
    state->combineSendSeq = seq + 1;
  }
}

__device__ void combineRecv(const LLCombineParams& p, CombineShared& s) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint32_t seq = *reinterpret_cast<volatile uint32_t*>(&state->combineRecvSeq);
  const uint32_t parity = seq & 1u;
  const int R = c.nRanks, T = l.maxTokens;
  const int tid = threadIdx.x;

  for (int r = tid; r < R; r += blockDim.x) {
    const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.local + l.combineFlags + (size_t(parity) * R + r) * 8);
    lsa.waitEpoch(flag, seq + 1, c.timeoutNs, err, kPhaseLLCombineRecv, r);
  }
  __syncthreads();
  if (device::hasError(err)) return;

  const int chunks = p.hidden / 8;
  const char* slots = c.local + l.combineSlots + size_t(parity) * R * T * l.combineMsgBytes;
  for (int b = blockIdx.x; b < p.numTokens; b += gridDim.x) {
    for (int d = tid; d < R; d += blockDim.x) s.slots[d] = p.sendSlots[int64_t(b) * R + d];
    __syncthreads();
    for (int i = tid; i < chunks; i += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int d = 0; d < R; ++d) {
        const int slot = s.slots[d];
        if (slot < 0) continue;
        const int4* src = reinterpret_cast<const int4*>(slots + (size_t(d) * T + slot) * l.combineMsgBytes);
        accumulate(acc, device::loadCg(src + i), 1.0f);
      }
      static_cast<int4*>(p.out)[int64_t(b) * chunks + i] = packBf16(acc);
    }
    __syncthreads();
  }

  __syncthreads();
  if (tid == 0) {
    __threadfence();
    s.last = device::arriveLast(&state->blocksDone[3], gridDim.x);
  }
  __syncthreads();
  if (s.last && tid == 0) {
    state->blocksDone[3] = 0;
    state->combineRecvSeq = seq + 1;
    device::storeRelease(&state->combineRecvDone, uint64_t(seq) + 1);
  }
}

__global__ void __launch_bounds__(kLLThreads, 1) llCombineKernel(const __grid_constant__ LLCombineParams p) {
  __shared__ CombineShared shared;
  if (p.phases & kLLSend) {
    combineSend(p, shared);
    __syncthreads();
  }
  if (p.phases & kLLRecv) combineRecv(p, shared);
}

}  // namespace

int launchLLCombine(const LLCombineParams& p, int numBlocks, cudaStream_t stream) {
  llCombineKernel<<<numBlocks, kLLThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
