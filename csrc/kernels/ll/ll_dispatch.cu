// LL dispatch: each token goes once to every rank holding one of its experts.
//
// Send (per source rank): a token's message goes to slot j of the destination's area for us, j
// being the token's index among our tokens for that destination, so slots follow token order. The
// header carries, per choice, the local expert there and the token's row among our tokens for that
// expert. The last block to finish writes our per-expert counts to each destination and then a
// flag (epoch << 32 | tokens) with release semantics.
//
// Receive: wait for every source's flag; a local expert's rows start, for source r, after the
// rows of sources < r (prefix over the per-expert counts), so rows are ordered by source rank and
// then token index, the same order as the reference backend. Copy each message into the rows of
// its local experts and record the handle.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "kernels/ll/ll_params.h"
#include "kernels/ll/ll_routing.cuh"
#include "transport/lsa.cuh"

namespace ncclep {
namespace {

using device::loadCg;

struct SendShared {
  int experts[kLLMaxTopk];
  int dests[kLLMaxTopk];  // distinct destination ranks of the token, ascending
  int numDests;
  int slot[kLLMaxTopk];   // per destination
  int pos[kLLMaxTopk];    // per choice: row among our earlier tokens for that expert
  char* msg[kLLMaxTopk];  // per destination: where the message goes
  bool last;
};

// Optional profiling: thread 0 of each block stamps %globaltimer at protocol steps (LLTraceStep).
__device__ __forceinline__ void stamp(const LLDispatchParams& p, int step) {
  if (p.trace != nullptr && threadIdx.x == 0)
    p.trace[size_t(blockIdx.x) * kLLTraceSteps + step] = device::globalTimerNs();
}

__device__ __forceinline__ float bf16ToFloat(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }

// fp8 per 128 channels, the arithmetic of ncclep/fp8.py: a warp per group, 4 channels per lane.
__device__ __forceinline__ void quantizeGroup(const uint16_t* src, int lane, bool ue8m0, uint32_t* packed,
                                              float* scale, uint8_t* scaleByte) {
  const uint2 raw = *reinterpret_cast<const uint2*>(src + lane * 4);
  float v[4] = {bf16ToFloat(raw.x & 0xffff), bf16ToFloat(raw.x >> 16), bf16ToFloat(raw.y & 0xffff),
                bf16ToFloat(raw.y >> 16)};
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  amax = fmaxf(amax, 1e-4f);
  // The arithmetic of ncclep/fp8.py, operation for operation (no division: see there).
  const float ratio = __fmul_rn(amax, 1.0f / 448.0f);
  float mult;
  if (ue8m0) {
    const uint32_t bits = __float_as_uint(ratio);
    const uint32_t biased = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u);
    mult = __uint_as_float((254u - biased) << 23);
    *scaleByte = uint8_t(biased);
  } else {
    mult = __fmul_rn(__frcp_rn(amax), 448.0f);
    *scale = ratio;
  }
  uint32_t out = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float q = fminf(fmaxf(__fmul_rn(v[i], mult), -448.0f), 448.0f);
    const __nv_fp8_storage_t f = __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
    out |= uint32_t(f) << (8 * i);
  }
  *packed = out;
}

__device__ void dispatchSend(const LLDispatchParams& p, SendShared& s) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint32_t seq = *reinterpret_cast<volatile uint32_t*>(&state->dispatchSendSeq);
  const uint32_t parity = seq & 1u;
  const int R = c.nRanks, L = l.numLocalExperts, T = l.maxTokens, KM = l.maxTopk, K = p.topk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, numWarps = blockDim.x >> 5;

  const int sendBlocks = p.sendBlocks < int(gridDim.x) ? p.sendBlocks : int(gridDim.x);
  const bool sends = int(blockIdx.x) < sendBlocks && int(blockIdx.x) < p.numTokens;
  stamp(p, kTraceSendStart);
  // Parity `parity` of a destination's area still holds our call seq-2 until it has received it.
  if (sends && seq >= 2) {
    for (int d = tid; d < R; d += blockDim.x) {
      const uint64_t* done = lsa.peerPtr<uint64_t>(d, l.state + offsetof(LLState, dispatchRecvDone));
      lsa.waitAtLeast(done, seq - 1, c.timeoutNs, err, kPhaseLLDispatchSend, d);
    }
    __syncthreads();
  }
  stamp(p, kTraceAcked);

  const uint32_t payloadOffset = l.headerBytes;
  for (int b = blockIdx.x; sends && b < p.numTokens; b += sendBlocks) {
    if (tid == 0) {
      int e[kLLMaxTopk];
      ll::loadTokenExperts(p.topkIdx, p.topkIdx64, b, K, c.numExperts, e, err, true, kPhaseLLDispatchSend);
      int n = 0;
      for (int k = 0; k < kLLMaxTopk; ++k) {
        s.experts[k] = e[k];
        if (e[k] < 0) continue;
        const int d = e[k] / L;
        int at = n;
        bool seen = false;
        for (int j = 0; j < n; ++j) seen |= s.dests[j] == d;
        if (seen) continue;
        while (at > 0 && s.dests[at - 1] > d) {  // keep ascending order
          s.dests[at] = s.dests[at - 1];
          --at;
        }
        s.dests[at] = d;
        ++n;
      }
      s.numDests = n;
    }
    if (tid < kLLMaxTopk) {
      s.slot[tid] = 0;
      s.pos[tid] = 0;
    }
    __syncthreads();
    if (b == int(blockIdx.x)) stamp(p, kTraceRouted);
    const int numDests = s.numDests;

    // Slots and rows come from our earlier tokens: count, per destination of b, the earlier
    // tokens going there, and per choice of b, the earlier tokens that chose the same expert.
    int destHits[kLLMaxTopk], expertHits[kLLMaxTopk];
#pragma unroll
    for (int k = 0; k < kLLMaxTopk; ++k) destHits[k] = expertHits[k] = 0;
    for (int prev = tid; prev < b; prev += blockDim.x) {
      int e[kLLMaxTopk];
      ll::loadTokenExperts(p.topkIdx, p.topkIdx64, prev, K, c.numExperts, e, err, false, 0);
      int dest[kLLMaxTopk];
#pragma unroll
      for (int k = 0; k < kLLMaxTopk; ++k) dest[k] = e[k] >= 0 ? e[k] / L : -1;
#pragma unroll
      for (int j = 0; j < kLLMaxTopk; ++j) {
        bool toDest = false, sameExpert = false;
        const int dj = j < numDests ? s.dests[j] : -2;
        const int ej = s.experts[j];
#pragma unroll
        for (int k = 0; k < kLLMaxTopk; ++k) {
          toDest |= dest[k] == dj;
          sameExpert |= e[k] >= 0 && e[k] == ej;
        }
        destHits[j] += toDest;
        expertHits[j] += sameExpert;
      }
    }
#pragma unroll
    for (int j = 0; j < kLLMaxTopk; ++j) {
      int a = destHits[j], e = expertHits[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        e += __shfl_xor_sync(0xffffffffu, e, o);
      }
      if (lane == 0) {
        if (a) atomicAdd(&s.slot[j], a);
        if (e) atomicAdd(&s.pos[j], e);
      }
    }
    __syncthreads();
    if (b == int(blockIdx.x)) stamp(p, kTraceCounted);

    for (int d = tid; d < R; d += blockDim.x) {
      int slot = -1;
      for (int j = 0; j < numDests; ++j)
        if (s.dests[j] == d) slot = s.slot[j];
      p.sendSlots[int64_t(b) * R + d] = slot;
    }
    if (tid < numDests) {
      const int d = s.dests[tid];
      const size_t at = l.dispatchSlots +
                        ((size_t(parity) * R + c.rank) * T + size_t(s.slot[tid])) * l.dispatchMsgBytes;
      s.msg[tid] = lsa.peerPtr<char>(d, at);
    }
    __syncthreads();
    if (b == int(blockIdx.x)) stamp(p, kTraceAddressed);

    // Header words: token index, then (local expert, row, weight) per choice, for each destination.
    const int headerWords = 1 + 3 * KM;
    for (int i = tid; i < numDests * headerWords; i += blockDim.x) {
      const int j = i / headerWords, w = i % headerWords;
      const int d = s.dests[j];
      int32_t word;
      if (w == 0) {
        word = b;
      } else {
        const int k = (w - 1) / 3, field = (w - 1) % 3;
        const int e = k < kLLMaxTopk ? s.experts[k] : -1;
        const bool here = e >= 0 && e / L == d;
        if (field == 0) word = here ? e - d * L : -1;
        else if (field == 1) word = here ? s.pos[k] : 0;
        else word = __float_as_int(here ? p.topkWeights[int64_t(b) * K + k] : 0.0f);
      }
      reinterpret_cast<int32_t*>(s.msg[j])[w] = word;
    }

    const char* row = static_cast<const char*>(p.x) + int64_t(b) * p.hidden * 2;
    if (!p.useFp8) {
      const int chunks = p.hidden / 8;
      for (int i = tid; i < chunks; i += blockDim.x) {
        const int4 v = reinterpret_cast<const int4*>(row)[i];
        for (int j = 0; j < numDests; ++j) reinterpret_cast<int4*>(s.msg[j] + payloadOffset)[i] = v;
      }
    } else {
      const int groups = p.hidden / 128;
      for (int g = warp; g < groups; g += numWarps) {
        uint32_t packed;
        float scale = 0.f;
        uint8_t scaleByte = 0;
        quantizeGroup(reinterpret_cast<const uint16_t*>(row) + g * 128, lane, p.ue8m0, &packed, &scale, &scaleByte);
        for (int j = 0; j < numDests; ++j) {
          char* payload = s.msg[j] + payloadOffset;
          reinterpret_cast<uint32_t*>(payload + g * 128)[lane] = packed;
          if (lane == 0) {
            if (p.ue8m0) reinterpret_cast<uint8_t*>(payload + p.hidden)[g] = scaleByte;
            else reinterpret_cast<float*>(payload + p.hidden)[g] = scale;
          }
        }
      }
    }
    __syncthreads();
  }

  // Completion: blocks that stored to peers publish them at system scope (an expensive fence, so
  // only they do); the last block to arrive sends counts and flags.
  __syncthreads();
  stamp(p, kTraceSent);
  if (tid == 0) {
    if (sends) device::fenceSystem();
    s.last = device::arriveLast(&state->blocksDone[0], gridDim.x);
  }
  __syncthreads();
  stamp(p, kTraceArrived);
  if (!s.last) return;

  __shared__ int expertTotals[kLLMaxExperts];
  __shared__ int destTotals[kLLMaxRanks];
  for (int i = tid; i < c.numExperts; i += blockDim.x) expertTotals[i] = 0;
  for (int i = tid; i < R; i += blockDim.x) destTotals[i] = 0;
  __syncthreads();
  for (int b = tid; b < p.numTokens; b += blockDim.x) {
    int e[kLLMaxTopk];
    ll::loadTokenExperts(p.topkIdx, p.topkIdx64, b, K, c.numExperts, e, err, false, 0);
#pragma unroll
    for (int k = 0; k < kLLMaxTopk; ++k) {
      if (e[k] < 0) continue;
      atomicAdd(&expertTotals[e[k]], 1);
      bool first = true;
#pragma unroll
      for (int j = 0; j < k; ++j) first &= !(e[j] >= 0 && e[j] / L == e[k] / L);
      if (first) atomicAdd(&destTotals[e[k] / L], 1);
    }
  }
  __syncthreads();
  for (int i = tid; i < R * L; i += blockDim.x) {
    const int d = i / L, e = i % L;
    const size_t at = l.dispatchCounts + ((size_t(parity) * R + c.rank) * L + e) * 4;
    *lsa.peerPtr<int32_t>(d, at) = expertTotals[i];
  }
  __syncthreads();
  stamp(p, kTraceCounts);
  const uint64_t epoch = uint64_t(seq) + 1;
  for (int d = tid; d < R; d += blockDim.x) {
    device::fenceSystem();
    lsa.signal(d, l.dispatchFlags + (size_t(parity) * R + c.rank) * 8, (epoch << 32) | uint32_t(destTotals[d]));
  }
  if (tid == 0) {
    state->blocksDone[0] = 0;
    state->dispatchSendSeq = seq + 1;
  }
  stamp(p, kTraceSignaled);
}

struct RecvShared {
  int count[kLLMaxRanks];
  int start[kLLMaxRanks + 1];
  int offset[kLLMaxExperts];  // [local expert][source]: first row of that source's tokens
  int rows[kLLMaxTopk];
  float weights[kLLMaxTopk];
  bool last;
};

__device__ void dispatchRecv(const LLDispatchParams& p, RecvShared& s) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint32_t seq = *reinterpret_cast<volatile uint32_t*>(&state->dispatchRecvSeq);
  const uint32_t parity = seq & 1u;
  const int R = c.nRanks, L = l.numLocalExperts, T = l.maxTokens, KM = l.maxTopk;
  const int tid = threadIdx.x;
  const int rowsPerExpert = R * T;

  stamp(p, kTraceRecvStart);
  for (int r = tid; r < R; r += blockDim.x) {
    const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.local + l.dispatchFlags + (size_t(parity) * R + r) * 8);
    const uint64_t v = lsa.waitEpoch(flag, seq + 1, c.timeoutNs, err, kPhaseLLDispatchRecv, r);
    s.count[r] = int(uint32_t(v));
  }
  __syncthreads();
  stamp(p, kTraceFlagsSeen);
  if (device::hasError(err)) return;
  if (tid == 0) {
    s.start[0] = 0;
    for (int r = 0; r < R; ++r) s.start[r + 1] = s.start[r] + s.count[r];
  }
  const int* counts = reinterpret_cast<const int*>(c.local + l.dispatchCounts) + size_t(parity) * R * L;
  for (int e = tid; e < L; e += blockDim.x) {
    int acc = 0;
    for (int r = 0; r < R; ++r) {
      s.offset[e * R + r] = acc;
      acc += __ldcg(counts + r * L + e);
    }
    if (blockIdx.x == 0) p.expertCounts[e] = acc;
  }
  if (blockIdx.x == 0)
    for (int r = tid; r < R; r += blockDim.x) p.recvSlotCounts[r] = s.count[r];
  __syncthreads();

  const int total = s.start[R];
  const char* slots = c.local + l.dispatchSlots + size_t(parity) * R * T * l.dispatchMsgBytes;
  const size_t rowBytes = p.useFp8 ? size_t(p.hidden) : size_t(p.hidden) * 2;
  const int scaleBytes = p.useFp8 ? (p.hidden / 128) * (p.ue8m0 ? 1 : 4) : 0;
  for (int m = blockIdx.x; m < total; m += gridDim.x) {
    int r = 0;
    while (s.start[r + 1] <= m) ++r;
    const int j = m - s.start[r];
    const char* msg = slots + (size_t(r) * T + j) * l.dispatchMsgBytes;
    if (tid < KM) {
      const int32_t* header = reinterpret_cast<const int32_t*>(msg);
      const int e = __ldcg(header + 1 + 3 * tid);
      const int pos = __ldcg(header + 2 + 3 * tid);
      const float w = __int_as_float(__ldcg(header + 3 + 3 * tid));
      const int row = e >= 0 ? e * rowsPerExpert + s.offset[e * R + r] + pos : -1;
      s.rows[tid] = row;
      s.weights[tid] = e >= 0 ? w : 0.0f;
      const int64_t at = (int64_t(r) * T + j) * KM + tid;
      p.recvRows[at] = row;
      p.recvWeights[at] = e >= 0 ? w : 0.0f;
    }
    __syncthreads();
    const int4* payload = reinterpret_cast<const int4*>(msg + l.headerBytes);
    const int chunks = int(rowBytes / 16);
    for (int i = tid; i < chunks; i += blockDim.x) {
      const int4 v = loadCg(payload + i);
      for (int k = 0; k < KM; ++k) {
        const int row = s.rows[k];
        if (row >= 0) reinterpret_cast<int4*>(static_cast<char*>(p.recvX) + int64_t(row) * rowBytes)[i] = v;
      }
    }
    if (scaleBytes) {
      const uint8_t* scales = reinterpret_cast<const uint8_t*>(msg + l.headerBytes + rowBytes);
      for (int i = tid; i < scaleBytes; i += blockDim.x) {
        const uint8_t v = __ldcg(scales + i);
        for (int k = 0; k < KM; ++k) {
          const int row = s.rows[k];
          if (row >= 0) static_cast<uint8_t*>(p.recvScales)[int64_t(row) * scaleBytes + i] = v;
        }
      }
    }
    __syncthreads();
  }

  // Handle entries of unused slots.
  const int64_t handleEntries = int64_t(R) * T * KM;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + tid; i < handleEntries; i += int64_t(gridDim.x) * blockDim.x) {
    const int r = int(i / (int64_t(T) * KM)), j = int((i / KM) % T);
    if (j >= s.count[r]) {
      p.recvRows[i] = -1;
      p.recvWeights[i] = 0.0f;
    }
  }

  __syncthreads();
  stamp(p, kTraceCopied);
  if (tid == 0) {
    __threadfence();
    s.last = device::arriveLast(&state->blocksDone[1], gridDim.x);
  }
  __syncthreads();
  if (s.last && tid == 0) {
    state->blocksDone[1] = 0;
    state->dispatchRecvSeq = seq + 1;
    // Every block has read its messages: the sources may reuse this parity.
    device::storeRelease(&state->dispatchRecvDone, uint64_t(seq) + 1);
  }
}

__global__ void __launch_bounds__(kLLThreads, 1) llDispatchKernel(const __grid_constant__ LLDispatchParams p) {
  __shared__ union {
    SendShared send;
    RecvShared recv;
  } shared;
  if (p.phases & kLLSend) {
    dispatchSend(p, shared.send);
    __syncthreads();
  }
  if (p.phases & kLLRecv) dispatchRecv(p, shared.recv);
}

}  // namespace

int launchLLDispatch(const LLDispatchParams& p, int numBlocks, cudaStream_t stream) {
  llDispatchKernel<<<numBlocks, kLLThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
