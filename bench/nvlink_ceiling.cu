// NVLink write ceiling of one host: every GPU writes messages to every peer at once, the way the
// HT dispatch does (a message read once from local memory, written to each peer), with
//   store: 16-byte stores by all lanes of a warp, U vectors per lane loaded before their stores;
//   tma:   lane 0 of a warp stages the message in shared memory with a bulk copy, then writes it
//          to each peer with bulk copies (two stages per warp, so loads overlap stores);
//   store+flag: store, then a release flag per peer after every message (or every 4);
//   pull:  each GPU reads its messages from every peer and stores them locally;
//   ce:    cudaMemcpyPeerAsync, one stream per peer (the copy engines).
// Prints each GPU's outgoing NVLink GB/s (bytes written to peers / time), slowest GPU first.
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 bench/nvlink_ceiling.cu -o /tmp/nvlink_ceiling
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"

constexpr int kMaxPeers = 8;
struct Peers {
  char* dst[kMaxPeers];    // our region in each peer's receive buffer (pull: each peer's source)
  char* flags[kMaxPeers];  // our flag words at each peer
  int n;
};

// kFlagEvery > 0: after every kFlagEvery messages of a warp, a release store of a flag per peer
// (st.release.sys by one lane after __syncwarp, as the HT dispatch publishes its messages).
template <int U, int kFlagEvery = 0>
__global__ void __launch_bounds__(512, 1) storeKernel(const int4* src, Peers peers, int messages, int vectors) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int m = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5); m < messages; m += warps) {
    const int4* in = src + size_t(m) * vectors;
    for (int base = 0; base < vectors; base += 32 * U) {
      int4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + 32 * u + lane;
        if (i < vectors) v[u] = __ldg(in + i);
      }
#pragma unroll
      for (int p = 0; p < kMaxPeers; ++p) {
        if (p >= peers.n) break;
        int4* out = reinterpret_cast<int4*>(peers.dst[p]) + size_t(m) * vectors;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = base + 32 * u + lane;
          if (i < vectors) out[i] = v[u];
        }
      }
    }
    if (kFlagEvery > 0 && (m / warps) % kFlagEvery == kFlagEvery - 1) {
      __syncwarp();
      if (lane < peers.n) {
        uint64_t* flag = reinterpret_cast<uint64_t*>(peers.flags[lane]) + m;
        asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(uint64_t(m + 1)) : "memory");
      }
    }
  }
}

// Pull: every GPU reads its region of each peer's source over NVLink and stores it locally.
template <int U>
__global__ void __launch_bounds__(512, 1) pullKernel(Peers from, char* dst, int messages, int vectors) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int item = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5); item < messages * from.n; item += warps) {
    const int p = item % from.n, m = item / from.n;
    const int4* in = reinterpret_cast<const int4*>(from.dst[p]) + size_t(m) * vectors;
    int4* out = reinterpret_cast<int4*>(dst) + (size_t(p) * messages + m) * vectors;
    for (int base = 0; base < vectors; base += 32 * U) {
      int4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + 32 * u + lane;
        if (i < vectors) v[u] = __ldcg(in + i);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + 32 * u + lane;
        if (i < vectors) out[i] = v[u];
      }
    }
  }
}

__device__ __forceinline__ uint32_t smemAddr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__global__ void __launch_bounds__(128, 1) tmaKernel(const char* src, Peers peers, int messages, int bytes) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) uint64_t bars[4][2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warpsPerBlock = blockDim.x / 32;
  const int warps = gridDim.x * warpsPerBlock;
  if (lane != 0) return;
  char* const stages = smem + size_t(warp) * 2 * bytes;
  for (int s = 0; s < 2; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smemAddr(&bars[warp][s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  uint32_t phases = 0;  // bit s: the parity stage s waits for next
  int it = 0;
  for (int m = blockIdx.x * warpsPerBlock + warp; m < messages; m += warps, ++it) {
    const int s = it & 1;
    // The stores issued from this stage two messages ago must have read it.
    asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    const uint32_t bar = smemAddr(&bars[warp][s]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smemAddr(stages + s * bytes)),
        "l"(src + size_t(m) * bytes), "r"(bytes), "r"(bar)
        : "memory");
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(bar), "r"((phases >> s) & 1u)
          : "memory");
    }
    phases ^= 1u << s;
#pragma unroll
    for (int p = 0; p < kMaxPeers; ++p)
      if (p < peers.n)
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(peers.dst[p] + size_t(m) * bytes),
                   "r"(smemAddr(stages + s * bytes)), "r"(bytes)
                   : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

struct Gpu {
  char* src;
  char* recv;  // [peer][messages * bytes]
  char* flags;  // [peer][messages] u64
  cudaStream_t streams[kMaxPeers];
  cudaEvent_t start, stop;
};

int main(int argc, char** argv) {
  const int messages = argc > 1 ? std::atoi(argv[1]) : 8192;
  const int bytes = argc > 2 ? std::atoi(argv[2]) : 14336;
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::fprintf(stderr, "needs 2+ GPUs\n");
    return 1;
  }
  n = std::min(n, kMaxPeers);
  const size_t region = size_t(messages) * bytes;
  std::vector<Gpu> g(n);
  for (int d = 0; d < n; ++d) {
    CHECK(cudaSetDevice(d));
    for (int p = 0; p < n; ++p)
      if (p != d) CHECK(cudaDeviceEnablePeerAccess(p, 0));
    CHECK(cudaMalloc(&g[d].src, region));
    CHECK(cudaMalloc(&g[d].recv, region * n));
    CHECK(cudaMalloc(&g[d].flags, size_t(messages) * 8 * n));
    CHECK(cudaMemset(g[d].src, d + 1, region));
    for (int p = 0; p < n; ++p) CHECK(cudaStreamCreateWithFlags(&g[d].streams[p], cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&g[d].start));
    CHECK(cudaEventCreate(&g[d].stop));
    CHECK(cudaFuncSetAttribute(tmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 4 * 2 * bytes));
  }
  auto peersOf = [&](int d) {
    Peers P{};
    for (int p = 0; p < n; ++p)
      if (p != d) {
        P.flags[P.n] = g[p].flags + size_t(d) * messages * 8;
        P.dst[P.n++] = g[p].recv + size_t(d) * region;
      }
    return P;
  };
  auto sourcesOf = [&](int d) {
    Peers P{};
    for (int p = 0; p < n; ++p)
      if (p != d) P.dst[P.n++] = g[p].src;
    return P;
  };
  auto sync = [&] {
    for (int d = 0; d < n; ++d) {
      CHECK(cudaSetDevice(d));
      CHECK(cudaDeviceSynchronize());
    }
  };
  // Runs launch(d) on every GPU at once, 5 times; the median over runs of the slowest GPU's GB/s.
  auto measure = [&](const char* name, int blocks, auto launch) {
    std::vector<double> worst;
    for (int rep = 0; rep < 6; ++rep) {
      sync();
      for (int d = 0; d < n; ++d) {
        CHECK(cudaSetDevice(d));
        CHECK(cudaEventRecord(g[d].start, g[d].streams[0]));
        for (int p = 1; p < n; ++p) CHECK(cudaStreamWaitEvent(g[d].streams[p], g[d].start));
      }
      for (int d = 0; d < n; ++d) {
        CHECK(cudaSetDevice(d));
        launch(d);
        for (int p = 1; p < n; ++p) {
          cudaEvent_t e;
          CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
          CHECK(cudaEventRecord(e, g[d].streams[p]));
          CHECK(cudaStreamWaitEvent(g[d].streams[0], e));
          CHECK(cudaEventDestroy(e));
        }
        CHECK(cudaEventRecord(g[d].stop, g[d].streams[0]));
      }
      sync();
      CHECK(cudaGetLastError());
      double slow = 1e30;
      for (int d = 0; d < n; ++d) {
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, g[d].start, g[d].stop));
        slow = std::min(slow, double(region) * (n - 1) / (ms * 1e-3) / 1e9);
      }
      if (rep > 0) worst.push_back(slow);
    }
    std::sort(worst.begin(), worst.end());
    std::printf("%-10s blocks %3d  %7.1f GB/s out per GPU (%d GPUs, %d messages of %d B to each peer)\n", name,
                blocks, worst[worst.size() / 2], n, messages, bytes);
    std::fflush(stdout);
  };
  const int vectors = bytes / 16;
  for (int blocks : {8, 12, 16, 24, 32}) {
    measure("store U=8", blocks, [&](int d) {
      storeKernel<8><<<blocks, 512, 0, g[d].streams[0]>>>(reinterpret_cast<const int4*>(g[d].src), peersOf(d),
                                                           messages, vectors);
    });
    measure("store+flag", blocks, [&](int d) {
      storeKernel<8, 1><<<blocks, 512, 0, g[d].streams[0]>>>(reinterpret_cast<const int4*>(g[d].src), peersOf(d),
                                                              messages, vectors);
    });
    measure("store+flag/4", blocks, [&](int d) {
      storeKernel<8, 4><<<blocks, 512, 0, g[d].streams[0]>>>(reinterpret_cast<const int4*>(g[d].src), peersOf(d),
                                                              messages, vectors);
    });
    measure("tma", blocks, [&](int d) {
      tmaKernel<<<blocks, 128, 4 * 2 * bytes, g[d].streams[0]>>>(g[d].src, peersOf(d), messages, bytes);
    });
    measure("pull", blocks, [&](int d) {
      pullKernel<8><<<blocks, 512, 0, g[d].streams[0]>>>(sourcesOf(d), g[d].recv, messages, vectors);
    });
  }
  measure("ce", 0, [&](int d) {
    const Peers P = peersOf(d);
    for (int p = 0; p < P.n; ++p) {
      const int peer = p < d ? p : p + 1;
      CHECK(cudaMemcpyPeerAsync(P.dst[p], peer, g[d].src, d, region, g[d].streams[p]));
    }
  });
  return 0;
}
