// Device helpers shared by the HT kernels: state and error sink, flag waits, warp copies, bf16
// accumulation.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>

#include "common/bf16.cuh"
#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "common/reject.h"
#include "common/spin_wait.cuh"
#include "kernels/ht/ht_params.h"
#include "transport/lsa.cuh"

namespace ncclep {
namespace ht {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ HTState* state(const HTCommon& c) {
  return reinterpret_cast<HTState*>(c.local + c.layout.state);
}

__device__ __forceinline__ device::ErrorSink sink(const HTCommon& c) { return {c.error, &state(c)->aborted}; }

// The sequence number of the running call (the previous call's last block wrote it).
__device__ __forceinline__ uint32_t callSeq(const HTCommon& c) {
  return *reinterpret_cast<const volatile uint32_t*>(&state(c)->seq);
}

// How a word with the call's epoch in its upper half is read: kAcquire for a flag a peer stored
// with release semantics to publish what it wrote before; kRelaxed for a word that carries its own
// data and publishes nothing else (the dispatch counts).
enum class EpochLoad { kAcquire, kRelaxed };

// Waits until the word at `flag`, written by `peer`, carries `epoch` in its upper half; `value`: the
// last word read.
template <EpochLoad kLoad = EpochLoad::kAcquire>
__device__ __forceinline__ bool waitEpoch(const uint64_t* flag, uint32_t epoch, uint64_t* value,
                                          const HTCommon& c, int phase, int peer) {
  uint64_t v = 0;
  const bool ok = device::waitUntil<device::FlagBackoff>(
      [&] {
        v = kLoad == EpochLoad::kAcquire ? device::loadAcquire(flag) : device::loadRelaxedSys(flag);
        return uint32_t(v >> 32) == epoch;
      },
      c.timeoutNs, sink(c), phase, peer, int(epoch));
  *value = v;
  return ok;
}

// Waits until `peer` (on our node) has read every message of call `seq` (its `done` reached it),
// so that our writes of call seq + 1 into its slots cannot overtake its reads.
__device__ __forceinline__ bool waitPeerDone(const HTCommon& c, const transport::Lsa& lsa, int peer, uint32_t seq,
                                             int phase) {
  const uint64_t* peerDone = lsa.peerPtr<uint64_t>(peer, c.layout.state + offsetof(HTState, done));
  return device::waitUntil<device::FlagBackoff>([&] { return device::loadAcquire(peerDone) >= uint64_t(seq); },
                                                c.timeoutNs, sink(c), phase, peer, int(seq));
}

// A warp: lane d < nRanks waits for peer d as waitPeerDone does; true in every lane once all have.
__device__ __forceinline__ bool warpWaitPeersDone(const HTCommon& c, const transport::Lsa& lsa, uint32_t seq,
                                                  int phase, int lane) {
  bool ready = true;
  if (lane < c.nRanks) ready = waitPeerDone(c, lsa, lane, seq, phase);
  return __all_sync(kFull, ready);
}

// Ends a transfer kernel: the last block to arrive advances the sequence and tells peers our slots
// are free again. Every block of the grid must call it (no early return before).
__device__ __forceinline__ void finishCall(const HTCommon& c, uint32_t seq, bool* lastShared) {
  __syncthreads();
  HTState* s = state(c);
  if (threadIdx.x == 0) {
    *lastShared = device::arriveLast(&s->blocksDone[1], gridDim.x);
    if (*lastShared) {
      s->blocksDone[1] = 0;
      s->claimed = 0;
      s->seq = seq + 1;
      device::storeRelease(&s->done, uint64_t(seq) + 1);
    }
  }
}

// Dispatch senders take tokens in order from HTState.claimed, a warp at a time, so that every warp
// finishes within about one token of the others (a fixed interleave left the warps whose tokens had
// the most destinations sending alone at the end of the call). A warp keeps its next claim in
// flight while it sends, and the row after that is prefetched into L2.
class TokenClaims {
 public:
  __device__ __forceinline__ TokenClaims(const HTCommon& c, int lane) : counter_(&state(c)->claimed), lane_(lane) {
    current_ = claimNow();
    next_ = claimNow();
  }
  __device__ __forceinline__ int current() const { return current_; }

  // Starts the claim after next and the prefetch of the next token's row; call once per token, then advance().
  __device__ __forceinline__ void start(const void* rows, int64_t rowBytes, int numTokens) {
    pending_ = lane_ == 0 ? int(atomicAdd(counter_, 1u)) : 0;
    if (lane_ == 0 && next_ < numTokens && (rowBytes & 15) == 0) {
      const char* row = static_cast<const char*>(rows) + next_ * rowBytes;
      if ((reinterpret_cast<uintptr_t>(row) & 15) == 0)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(row), "r"(uint32_t(rowBytes)) : "memory");
    }
  }
  __device__ __forceinline__ void advance() {
    current_ = next_;
    next_ = __shfl_sync(kFull, pending_, 0);
  }

 private:
  __device__ __forceinline__ int claimNow() {
    int v = 0;
    if (lane_ == 0) v = int(atomicAdd(counter_, 1u));
    return __shfl_sync(kFull, v, 0);
  }
  uint32_t* counter_;
  int lane_;
  int current_ = 0, next_ = 0, pending_ = 0;
};

// Warp copy of n 16-byte vectors; U loads in flight per lane before their stores. `kWindow`
// sources are written by peers: read through L2 (L1 is not coherent with NVLink writes).
template <bool kWindow, int U = 4>
__device__ __forceinline__ void warpCopy16(int4* __restrict__ dst, const int4* __restrict__ src, int n, int lane) {
  for (int base = lane; base < n; base += 32 * U) {
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + 32 * u;
      if (i < n) v[u] = kWindow ? __ldcg(src + i) : __ldg(src + i);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + 32 * u;
      if (i < n) dst[i] = v[u];
    }
  }
}

// Warp copy of n 16-byte vectors from src to several destinations: lane t of `targets` holds its
// destination in `dst`. Each vector is read once; its stores to all destinations go out together.
// U = 8: U = 14 (a 7168-wide bf16 row in one round of loads) measured the same for bf16 and 7%
// slower for fp8 dispatch on 4x H200 (bench/NOTES.md, session 4).
template <bool kWindow, int U = 8>
__device__ __forceinline__ void warpFanout16(char* dst, uint32_t targets, const int4* __restrict__ src, int n,
                                             int lane) {
  for (int base = 0; base < n; base += 32 * U) {  // same trip count in every lane
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + 32 * u + lane;
      if (i < n) v[u] = kWindow ? __ldcg(src + i) : __ldg(src + i);
    }
    for (uint32_t m = targets; m != 0; m &= m - 1) {
      int4* out = reinterpret_cast<int4*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(dst), __ffs(m) - 1));
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + 32 * u + lane;
        if (i < n) out[i] = v[u];
      }
    }
  }
}

// Warp copy of any byte count, in the widest words the count and both addresses allow.
template <bool kWindow>
__device__ __forceinline__ void warpCopyBytes(void* dst, const void* src, int bytes, int lane) {
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uintptr_t(bytes);
  if ((align & 15) == 0) {
    warpCopy16<kWindow>(static_cast<int4*>(dst), static_cast<const int4*>(src), bytes / 16, lane);
  } else if ((align & 3) == 0) {
    const int* s = static_cast<const int*>(src);
    int* d = static_cast<int*>(dst);
    for (int i = lane; i < bytes / 4; i += 32) d[i] = kWindow ? __ldcg(s + i) : __ldg(s + i);
  } else {
    const unsigned char* s = static_cast<const unsigned char*>(src);
    unsigned char* d = static_cast<unsigned char*>(dst);
    for (int i = lane; i < bytes; i += 32) d[i] = kWindow ? __ldcg(s + i) : __ldg(s + i);
  }
}

// A short row (the fp8 scales: at most 32 16-byte vectors, 16-byte aligned) held one vector per
// lane, so that a warp writing it to several places loads it once, together with other loads.
struct ShortRow {
  int4 v;
  int bytes;  // 0: not held (the row is absent, or too long or unaligned: copy it with warpCopyBytes)

  template <bool kWindow>
  __device__ __forceinline__ static ShortRow load(const void* src, int bytes, int lane) {
    ShortRow r{make_int4(0, 0, 0, 0), 0};
    if (bytes <= 0 || bytes > 32 * 16 || ((reinterpret_cast<uintptr_t>(src) | uintptr_t(bytes)) & 15) != 0) return r;
    r.bytes = bytes;
    if (lane * 16 < bytes) {
      const int4* s = static_cast<const int4*>(src) + lane;
      r.v = kWindow ? __ldcg(s) : __ldg(s);
    }
    return r;
  }
  // Stores the row at dst (16-byte aligned when held), or copies it from src when it is not held.
  template <bool kWindow>
  __device__ __forceinline__ void store(void* dst, const void* src, int srcBytes, int lane) const {
    if (bytes > 0 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
      if (lane * 16 < bytes) static_cast<int4*>(dst)[lane] = v;
    } else if (srcBytes > 0) {
      warpCopyBytes<kWindow>(dst, src, srcBytes, lane);
    }
  }
};

__device__ __forceinline__ void warpZeroBytes(void* dst, int bytes, int lane) {
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | uintptr_t(bytes);
  if ((align & 15) == 0) {
    for (int i = lane; i < bytes / 16; i += 32) static_cast<int4*>(dst)[i] = make_int4(0, 0, 0, 0);
  } else if ((align & 3) == 0) {
    for (int i = lane; i < bytes / 4; i += 32) static_cast<int*>(dst)[i] = 0;
  } else {
    for (int i = lane; i < bytes; i += 32) static_cast<unsigned char*>(dst)[i] = 0;
  }
}

using device::addBf16x8;
using device::packBf16x8;

// Warp sum of the bf16 rows whose addresses the lanes in `lanes` hold in `src`, taken in lane
// order with fp32 accumulation, stored as `vectors` 16-byte bf16 vectors at dst. The sums are
// bound by load latency, so loads are batched: one row is a plain copy (8 vectors in flight per
// lane; its bf16 -> fp32 -> bf16 round trip would be exact anyway), more rows are read two at a
// time (2 x 4 vectors in flight) and added in order, so the result does not depend on batching.
// kWindow: rows written by peers, read through L2.
template <bool kWindow>
__device__ __forceinline__ void warpSumRows(int4* dst, const int4* src, uint32_t lanes, int vectors, int lane) {
  const auto rowOf = [&](uint32_t m) {
    return reinterpret_cast<const int4*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(src), __ffs(m) - 1));
  };
  if (lanes != 0 && (lanes & (lanes - 1)) == 0) {
    warpCopy16<kWindow, 8>(dst, rowOf(lanes), vectors, lane);
    return;
  }
  constexpr int U = 4;
  const auto load = [&](const int4* row, int i) { return kWindow ? __ldcg(row + i) : __ldg(row + i); };
  for (int base = 0; base < vectors; base += 32 * U) {
    float acc[U][8] = {};
    uint32_t m = lanes;
    for (; m != 0 && (m & (m - 1)) != 0; m &= m - 1, m &= m - 1) {
      const int4* a = rowOf(m);
      const int4* b = rowOf(m & (m - 1));
      int4 va[U], vb[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + 32 * u + lane;
        if (i < vectors) {
          va[u] = load(a, i);
          vb[u] = load(b, i);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (base + 32 * u + lane < vectors) {
          addBf16x8(acc[u], va[u]);
          addBf16x8(acc[u], vb[u]);
        }
      }
    }
    if (m != 0) {
      const int4* a = rowOf(m);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + 32 * u + lane;
        if (i < vectors) addBf16x8(acc[u], load(a, i));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + 32 * u + lane;
      if (i < vectors) dst[i] = packBf16x8(acc[u]);
    }
  }
}

// Per-choice sums (lane < topk) of the float weights at `weightsAt` in the messages whose
// addresses the lanes in `lanes` hold in `src`, in lane order.
__device__ __forceinline__ float warpSumWeights(const char* src, uint32_t lanes, int weightsAt, int topk, int lane) {
  float acc = 0.0f;
  for (uint32_t m = lanes; m != 0; m &= m - 1) {
    const char* msg = reinterpret_cast<const char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(src), __ffs(m) - 1));
    if (lane < topk) acc += __ldcg(reinterpret_cast<const float*>(msg + weightsAt) + lane);
  }
  return acc;
}

// Splits warps into groups serving one stream each (a peer rank): warp w of `warps` serves
// stream first, first + step, ... and within a stream items h, h + helpers, ...
struct StreamShare {
  int first, step, h, helpers;
};

__device__ __forceinline__ StreamShare shareStreams(int w, int warps, int streams) {
  if (warps >= streams) return {w % streams, streams, w / streams, (warps - 1 - w % streams) / streams + 1};
  return {w, warps, 0, 1};
}

// Offset of source `source`'s L + 1 count words of parity `parity` in a window (ht_layout.h,
// `counts`): word e < L its tokens for local expert e, word L its tokens in all.
__device__ __forceinline__ size_t countsAt(const HTLayout& l, uint32_t parity, int source) {
  return l.counts + ((size_t(parity) * l.nRanks + size_t(source)) * (size_t(l.numLocalExperts) + 1)) * 8;
}

__device__ __forceinline__ char* slotPtr(char* base, const HTLayout& l, int src, int slot) {
  return base + l.slots + (size_t(src) * l.maxTokens + size_t(slot)) * l.msgBytes;
}

// Rejected calls (ncclep.h): a receiver that waited on `word` (a count, or a flag's low half)
// finds rank `peer`'s rejection there (reject.h): true, and recorded when `report` (first error
// wins; callers report once or a few times, not once per message).
__device__ __forceinline__ bool peerRejected(const HTCommon& c, uint32_t word, int phase, int peer, bool report) {
  if (!isRejectWord(word)) return false;
  if (report) device::reportError(sink(c), kDevicePeerRejected, phase, peer, rejectReason(word));
  return true;
}

// A rejecting rank's stand-in for its messages: every slot j < T of slot row `row` in the window at
// `base` gets `flag` = (epoch << 32) | reject word, so that a receiver waiting for any of them
// completes and reads the rejection. Warp w of `warps`, a slot per lane; the caller waited until
// that window's rank finished the previous call.
__device__ __forceinline__ void storeRejectFlags(const HTLayout& l, char* base, int row, uint64_t flag, int w,
                                                 int warps, int lane) {
  for (int j = w * 32 + lane; j < l.maxTokens; j += warps * 32)
    device::storeRelease(reinterpret_cast<uint64_t*>(slotPtr(base, l, row, j) + l.flagOffset), flag);
}

}  // namespace ht
}  // namespace ncclep
