// Device-side latency floors of the steps an LL (decode) kernel's fixed cost is made of, for the
// same PTX instructions the kernels use (csrc/common/memory_order.cuh), on GPU 0 and, when GPU 0
// and GPU 1 can reach each other's memory, across NVLink:
//   launch:    an empty kernel of 132 blocks x 512 threads: CUDA-event time per launch, and the
//              spread of its blocks' %globaltimer stamps (first start to last end);
//   load:      one thread's dependent loads: pointer chasing through L2, through DRAM, and polls
//              of one word with ld.cg / ld.volatile / ld.relaxed.sys / ld.acquire.{gpu,sys};
//   release:   the time a thread spends in a release (st/red .release.{gpu,sys}, or a fence.sys
//              then a relaxed store) after its block stored nothing or 8 KB;
//   ping-pong: one-way flag latency (round trip / 2) between two blocks of one GPU, .gpu and .sys,
//              without and with an 8 KB payload written by the whole block before the flag;
//   arrival:   132 blocks each add once to one counter (atom.acq_rel.gpu): first arrival to the
//              last block knowing it is last, and one atomic's latency as a block sees it;
//   barrier:   __syncthreads of 512 threads; a block's 8 KB copy (L2 to L2) and its barrier;
//   2 GPUs:    polls of a peer's word, release after 8 KB stored to the peer, and ping-pong with
//              the flags (and payload) in the peer's memory, .sys scope.
// Intervals inside one SM are clock64 ticks converted with the SM clock measured against
// %globaltimer (cudaDevAttrClockRate is printed beside it); intervals across SMs are %globaltimer
// ns, quantized to its tick (printed). Each row: median, p10, p90, mean, samples (ns).
// Every spin wait gives up after 1 s; a row that timed out says so and the exit status is 2.
// Build: /usr/local/cuda/bin/nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 bench/latency_floor.cu -o /tmp/latency_floor
// Run:   /tmp/latency_floor [samples]   (default 1000; a few seconds on an H200)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_check.h"

constexpr int kLLBlocks = 132;         // the LL kernels' grid (one block per SM of an H100/H200)
constexpr int kThreads = 512;          // and their block size
constexpr int kPayloadVectors = kThreads;  // 16 B per thread: 8 KB per block
constexpr uint64_t kSpinLimitNs = 1000000000ull;
constexpr int kChaseSteps = 16;        // dependent loads per sample
constexpr int kBarriersPerSample = 64;
constexpr int kLineBytes = 128;

// ---------------------------------------------------------------------------------------------
// Device helpers: the scoped operations under test.

__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Makes the warp wait until v has arrived before it reads the clock that follows: the shared
// store needs v, and a warp issues in order, so the clock read cannot run ahead of the load.
__device__ __forceinline__ void waitForValue(uint64_t v) {
  __shared__ volatile uint64_t sink;
  sink = v;
}

enum class Load { Cached, Cg, Volatile, RelaxedSys, AcquireGpu, AcquireSys };

template <Load L>
__device__ __forceinline__ uint64_t load(const uint64_t* p) {
  uint64_t v;
  if constexpr (L == Load::Cached)
    asm volatile("ld.global.ca.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else if constexpr (L == Load::Cg)
    asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else if constexpr (L == Load::Volatile)
    asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else if constexpr (L == Load::RelaxedSys)
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else if constexpr (L == Load::AcquireGpu)
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Signals publish this block's earlier stores (after a barrier: release is cumulative) by setting
// a flag to `value`; the Add forms add 1 instead, so a flag that starts at 0 also reads `value`
// after the value-th signal. RelaxedStoreGpu orders nothing: the baseline of a plain flag store.
enum class Signal {
  RelaxedStoreGpu,
  ReleaseStoreGpu,
  ReleaseAddGpu,
  ReleaseStoreSys,
  ReleaseAddSys,
  FenceSysRelaxedStore,
};

template <Signal S>
__device__ __forceinline__ void signal(uint64_t* flag, uint64_t value) {
  if constexpr (S == Signal::RelaxedStoreGpu)
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
  else if constexpr (S == Signal::ReleaseStoreGpu)
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
  else if constexpr (S == Signal::ReleaseAddGpu)
    asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(flag) : "memory");
  else if constexpr (S == Signal::ReleaseStoreSys)
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
  else if constexpr (S == Signal::ReleaseAddSys)
    asm volatile("red.release.sys.global.add.u64 [%0], 1;" ::"l"(flag) : "memory");
  else
    asm volatile("fence.acq_rel.sys; st.relaxed.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
}

// Polls *flag until it reaches `value` or kSpinLimitNs passes (the timer is read every 1024
// polls, so it does not slow the poll); false on timeout.
template <Load L>
__device__ __forceinline__ bool pollUntil(const uint64_t* flag, uint64_t value) {
  const uint64_t deadline = globalTimerNs() + kSpinLimitNs;
  for (uint32_t polls = 1;; ++polls) {
    if (load<L>(flag) >= value) return true;
    if ((polls & 1023) == 0 && globalTimerNs() > deadline) return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Clocks.

__global__ void clockRateKernel(uint64_t spanNs, double* ticksPerNs) {
  const uint64_t t0 = globalTimerNs();
  const uint64_t c0 = clock64();
  uint64_t t1 = t0;
  while (t1 - t0 < spanNs) t1 = globalTimerNs();
  const uint64_t c1 = clock64();
  *ticksPerNs = double(c1 - c0) / double(t1 - t0);
}

// The smallest step %globaltimer takes (it may advance in steps of 32 ns or of 1 µs).
__global__ void globalTimerTickKernel(uint64_t* tickNs) {
  uint64_t smallest = ~0ull, last = globalTimerNs();
  const uint64_t deadline = last + 10000000;  // 10 ms
  for (int changes = 0; changes < 1000;) {
    const uint64_t now = globalTimerNs();
    if (now != last) {
      if (now - last < smallest) smallest = now - last;
      last = now;
      ++changes;
    }
    if (now > deadline) break;
  }
  *tickNs = smallest;
}

// ---------------------------------------------------------------------------------------------
// 1. Launch: the fixed cost of starting and finishing the LL kernels' grid.

__global__ void __launch_bounds__(kThreads, 1) emptyKernel() {}

// Thread 0 of each block stamps its block's start and, after the block's barrier, its end.
__global__ void __launch_bounds__(kThreads, 1) blockStampKernel(uint64_t* startNs, uint64_t* endNs) {
  if (threadIdx.x == 0) startNs[blockIdx.x] = globalTimerNs();
  __syncthreads();
  if (threadIdx.x == 0) endNs[blockIdx.x] = globalTimerNs();
}

// ---------------------------------------------------------------------------------------------
// 2. Dependent loads: the routing and token reads at the start of a kernel (L2 or DRAM), and
// one iteration of a poll on a flag (a word that holds its own address, so each load depends on
// the one before, as each poll does).

template <Load L>
__global__ void chaseKernel(const uint64_t* start, int warmupSteps, int samples, uint64_t* ticks, uint64_t* end) {
  const uint64_t* p = start;
  for (int i = 0; i < warmupSteps; ++i) p = reinterpret_cast<const uint64_t*>(load<L>(p));
  for (int s = 0; s < samples; ++s) {
    waitForValue(reinterpret_cast<uint64_t>(p));
    const uint64_t t0 = clock64();
#pragma unroll
    for (int i = 0; i < kChaseSteps; ++i) p = reinterpret_cast<const uint64_t*>(load<L>(p));
    waitForValue(reinterpret_cast<uint64_t>(p));
    ticks[s] = clock64() - t0;
  }
  *end = reinterpret_cast<uint64_t>(p);
}

// chain[order[i]] holds the address of chain[order[i + 1]] (strided by kLineBytes), a cycle.
__global__ void linkChainKernel(char* chain, const uint32_t* order, size_t nodes) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < nodes; i += size_t(gridDim.x) * blockDim.x) {
    char* node = chain + size_t(order[i]) * kLineBytes;
    char* next = chain + size_t(order[(i + 1) % nodes]) * kLineBytes;
    *reinterpret_cast<char**>(node) = next;
  }
}

__global__ void selfPointKernel(uint64_t* word) { *word = reinterpret_cast<uint64_t>(word); }

// ---------------------------------------------------------------------------------------------
// 3. Release: a block's data signal (its stores, a barrier, then one thread's release of a flag
// the receiver polls). The releasing thread's time is what the signal costs the sender.

template <Signal S>
__global__ void __launch_bounds__(kThreads, 1)
    releaseKernel(int4* payload, uint64_t* flag, int samples, uint64_t* ticks) {
  for (int s = 0; s < samples; ++s) {
    // The previous sample's flag and tick stores complete here, so the timed release waits only
    // for this sample's payload.
    if (threadIdx.x == 0) __threadfence_system();
    if (payload != nullptr) payload[threadIdx.x] = make_int4(s, threadIdx.x, 0, 0);
    __syncthreads();
    if (threadIdx.x == 0) {
      const uint64_t t0 = clock64();
      signal<S>(flag, s + 1);
      ticks[s] = clock64() - t0;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// 4, 5. Ping-pong: the data signal of one side seen by the other, which answers. Each side polls
// its own (local) flag and writes the other's; with a payload, the whole block first writes 8 KB
// next to the other's flag, as a dispatch block writes a token before signalling it.

struct PingPongSide {
  const uint64_t* ownFlag;  // polled by this side
  uint64_t* otherFlag;      // signalled by this side
  int4* otherPayload;       // written by this block before each signal, or null (thread 0 alone)
  bool initiator;           // sends first and times the round trips
};

struct PingPong {
  PingPongSide side[2];
  uint64_t* roundTripTicks;  // [rounds], written by the initiator
  int* timeouts;
};

// Block b plays side[firstSide + b]: one GPU runs both sides (2 blocks), or each of two GPUs one.
template <Signal S, Load L>
__global__ void __launch_bounds__(kThreads, 1) pingPongKernel(PingPong pp, int firstSide, int rounds) {
  const PingPongSide me = pp.side[firstSide + blockIdx.x];
  const bool wholeBlock = me.otherPayload != nullptr;
  if (!wholeBlock && threadIdx.x != 0) return;
  __shared__ int timedOut;
  if (threadIdx.x == 0) timedOut = 0;
  auto send = [&](int round) {
    if (wholeBlock) {
      me.otherPayload[threadIdx.x] = make_int4(round, threadIdx.x, 0, 0);
      __syncthreads();
    }
    if (threadIdx.x == 0) signal<S>(me.otherFlag, round);
  };
  auto receive = [&](int round) {
    if (threadIdx.x == 0 && !pollUntil<L>(me.ownFlag, round)) {
      timedOut = 1;
      atomicAdd(pp.timeouts, 1);
    }
    if (wholeBlock) __syncthreads();
  };
  for (int round = 1; round <= rounds; ++round) {
    const uint64_t t0 = clock64();
    if (me.initiator) {
      send(round);
      receive(round);
    } else {
      receive(round);
      if (!timedOut) send(round);
    }
    if (timedOut) break;
    if (me.initiator && threadIdx.x == 0) pp.roundTripTicks[round - 1] = clock64() - t0;
  }
}

// ---------------------------------------------------------------------------------------------
// 6. Arrival: the end of each LL kernel, where every block adds to a counter and the last one
// (seeing count - 1) goes on to signal. With alignStart the blocks first meet at a grid barrier,
// so all arrive at once (the contended case) rather than spread by their launch.

struct Arrival {
  unsigned int* counter;     // never reset: launch k expects base k * blocks
  unsigned int* gridMeet;    // likewise, for alignStart
  uint64_t* arriveNs;        // [blocks] per launch
  uint64_t* atomicTicks;     // [blocks] per launch
  uint64_t* lastKnowsNs;     // [1] per launch
  int* timeouts;
};

__global__ void __launch_bounds__(kThreads, 1) arrivalKernel(Arrival a, unsigned int base, bool alignStart) {
  // Once a grid barrier timed out (blocks not all resident), the launches after it give up at once.
  if (alignStart && *reinterpret_cast<volatile int*>(a.timeouts) != 0) return;
  if (alignStart && threadIdx.x == 0) {
    // Relaxed: the meeting orders nothing, it only lines up the start times.
    atomicAdd(a.gridMeet, 1u);
    const uint64_t deadline = globalTimerNs() + kSpinLimitNs;
    while (*reinterpret_cast<volatile unsigned int*>(a.gridMeet) < base + gridDim.x)
      if (globalTimerNs() > deadline) {
        atomicAdd(a.timeouts, 1);
        break;
      }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  a.arriveNs[blockIdx.x] = globalTimerNs();
  const uint64_t t0 = clock64();
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(a.counter) : "memory");
  waitForValue(old);
  a.atomicTicks[blockIdx.x] = clock64() - t0;
  if (old == base + gridDim.x - 1) *a.lastKnowsNs = globalTimerNs();
}

// ---------------------------------------------------------------------------------------------
// 7. Barriers: the __syncthreads between the LL kernels' steps, and a block's 8 KB copy (a
// received token copied to its output) with the barrier after it.

__global__ void __launch_bounds__(kThreads, 1) barrierKernel(int samples, uint64_t* ticks) {
  for (int s = 0; s < samples; ++s) {
    __syncthreads();
    const uint64_t t0 = clock64();
#pragma unroll 1
    for (int i = 0; i < kBarriersPerSample; ++i) __syncthreads();
    if (threadIdx.x == 0) ticks[s] = clock64() - t0;
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    blockCopyKernel(const int4* src, int4* dst, int samples, uint64_t* ticks) {
  for (int s = 0; s < samples; ++s) {
    __syncthreads();
    const uint64_t t0 = clock64();
    int4 v = __ldcg(src + threadIdx.x);
    v.w += s;
    dst[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) ticks[s] = clock64() - t0;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct Stats {
  double median, p10, p90, mean;
};

Stats statsOf(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  auto at = [&](double q) { return v[std::min(v.size() - 1, size_t(q * (v.size() - 1) + 0.5))]; };
  return {at(0.5), at(0.1), at(0.9), std::accumulate(v.begin(), v.end(), 0.0) / v.size()};
}

bool anyTimeout = false;

void printHeader(const std::string& section) { std::printf("\n-- %s\n", section.c_str()); }

void printRow(const std::string& test, const char* clock, const std::vector<double>& ns, int timeouts = 0) {
  if (timeouts > 0 || ns.empty()) {
    anyTimeout = anyTimeout || timeouts > 0;
    std::printf("%-58s  TIMED OUT (%d spin waits gave up after 1 s)\n", test.c_str(), timeouts);
  } else {
    const Stats s = statsOf(ns);
    std::printf("%-58s %9.1f %9.1f %9.1f %9.1f %8zu  %s\n", test.c_str(), s.median, s.p10, s.p90, s.mean, ns.size(),
                clock);
  }
  std::fflush(stdout);
}

struct Device {
  int id;
  int sms;
  double ticksPerNs;      // measured SM clock
  uint64_t timerTickNs;   // %globaltimer step
  uint64_t* ticks;        // [samples * kLLBlocks] scratch for kernels' results
  int* timeouts;
  cudaStream_t stream;
};

constexpr const char* kClock = "clock64";
constexpr const char* kTimer = "globaltimer";
constexpr const char* kEvents = "cuda events";

std::vector<uint64_t> readBack(const uint64_t* d, size_t n) {
  std::vector<uint64_t> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  return h;
}

std::vector<double> ticksToNs(const Device& dev, size_t n, double divisor = 1.0) {
  std::vector<double> ns;
  for (uint64_t t : readBack(dev.ticks, n)) ns.push_back(double(t) / dev.ticksPerNs / divisor);
  return ns;
}

int takeTimeouts(const Device& dev) {
  int n = 0;
  CHECK(cudaMemcpy(&n, dev.timeouts, sizeof(int), cudaMemcpyDeviceToHost));
  CHECK(cudaMemset(dev.timeouts, 0, sizeof(int)));
  return n;
}

Device openDevice(int id, int samples) {
  Device dev{};
  dev.id = id;
  CHECK(cudaSetDevice(id));
  CHECK(cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, id));
  CHECK(cudaMalloc(&dev.ticks, size_t(samples) * kLLBlocks * sizeof(uint64_t)));
  CHECK(cudaMalloc(&dev.timeouts, sizeof(int)));
  CHECK(cudaMemset(dev.timeouts, 0, sizeof(int)));
  CHECK(cudaStreamCreateWithFlags(&dev.stream, cudaStreamNonBlocking));
  double* rate;
  uint64_t* tick;
  CHECK(cudaMalloc(&rate, sizeof(double)));
  CHECK(cudaMalloc(&tick, sizeof(uint64_t)));
  clockRateKernel<<<1, 1>>>(20000000, rate);  // 20 ms
  globalTimerTickKernel<<<1, 1>>>(tick);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(&dev.ticksPerNs, rate, sizeof(double), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(&dev.timerTickNs, tick, sizeof(uint64_t), cudaMemcpyDeviceToHost));
  CHECK(cudaFree(rate));
  CHECK(cudaFree(tick));
  return dev;
}

// A random cycle through `bytes` of device memory, one node per kLineBytes.
struct Chain {
  char* base;
  const uint64_t* start;
};

Chain makeChain(size_t bytes, uint32_t seed) {
  const size_t nodes = bytes / kLineBytes;
  std::vector<uint32_t> order(nodes);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  char* chain;
  uint32_t* dOrder;
  CHECK(cudaMalloc(&chain, bytes));
  CHECK(cudaMalloc(&dOrder, nodes * sizeof(uint32_t)));
  CHECK(cudaMemcpy(dOrder, order.data(), nodes * sizeof(uint32_t), cudaMemcpyHostToDevice));
  linkChainKernel<<<256, 256>>>(chain, dOrder, nodes);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaFree(dOrder));
  return {chain, reinterpret_cast<const uint64_t*>(chain + size_t(order[0]) * kLineBytes)};
}

template <Load L>
void chaseRow(const Device& dev, const std::string& test, const uint64_t* start, int warmupSteps, int samples,
              uint64_t* end) {
  chaseKernel<L><<<1, 1>>>(start, warmupSteps, samples, dev.ticks, end);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  printRow(test, kClock, ticksToNs(dev, samples, kChaseSteps));
}

template <Signal S>
void releaseRow(const Device& dev, const std::string& test, int4* payload, uint64_t* flag, int samples) {
  releaseKernel<S><<<1, kThreads>>>(payload, flag, samples, dev.ticks);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  printRow(test, kClock, ticksToNs(dev, samples));
}

constexpr int kWarmupRounds = 20;

// One GPU: two blocks of one kernel. Flags on separate lines of `flags` (zeroed first).
template <Signal S, Load L>
void pingPongLocalRow(const Device& dev, const std::string& test, uint64_t* flags, int4* payloads, bool withPayload,
                      int samples) {
  const int rounds = samples + kWarmupRounds;
  std::vector<uint64_t*> flag = {flags, flags + kLineBytes / 8};
  CHECK(cudaMemset(flags, 0, 2 * kLineBytes));
  PingPong pp{};
  for (int s = 0; s < 2; ++s)
    pp.side[s] = {flag[s], flag[1 - s], withPayload ? payloads + (1 - s) * kPayloadVectors : nullptr, s == 0};
  pp.roundTripTicks = dev.ticks;
  pp.timeouts = dev.timeouts;
  pingPongKernel<S, L><<<2, kThreads>>>(pp, 0, rounds);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  const int timeouts = takeTimeouts(dev);
  std::vector<double> ns = ticksToNs(dev, rounds, 2.0);
  ns.erase(ns.begin(), ns.begin() + kWarmupRounds);
  printRow(test, kClock, ns, timeouts);
}

// Two GPUs: side 0 on `a`, side 1 on `b`, each polling a flag in its own memory that the other
// writes over NVLink (and receiving the other's payload in its own memory).
struct PeerBuffers {
  uint64_t* flag;  // one line
  int4* payload;   // kPayloadVectors
};

template <Signal S, Load L>
void pingPongPeerRow(const Device& a, const Device& b, const PeerBuffers& onA, const PeerBuffers& onB,
                     const std::string& test, bool withPayload, int samples) {
  const int rounds = samples + kWarmupRounds;
  for (const Device* d : {&a, &b}) {
    CHECK(cudaSetDevice(d->id));
    CHECK(cudaMemset(d == &a ? onA.flag : onB.flag, 0, kLineBytes));
    CHECK(cudaDeviceSynchronize());  // the kernels run on non-blocking streams
  }
  PingPong pp{};
  pp.side[0] = {onA.flag, onB.flag, withPayload ? onB.payload : nullptr, true};
  pp.side[1] = {onB.flag, onA.flag, withPayload ? onA.payload : nullptr, false};
  pp.roundTripTicks = a.ticks;
  pp.timeouts = a.timeouts;  // device memory of a, reachable from b over peer access
  CHECK(cudaSetDevice(a.id));
  pingPongKernel<S, L><<<1, kThreads, 0, a.stream>>>(pp, 0, rounds);
  CHECK(cudaGetLastError());
  CHECK(cudaSetDevice(b.id));
  pingPongKernel<S, L><<<1, kThreads, 0, b.stream>>>(pp, 1, rounds);
  CHECK(cudaGetLastError());
  CHECK(cudaStreamSynchronize(b.stream));
  CHECK(cudaSetDevice(a.id));
  CHECK(cudaStreamSynchronize(a.stream));
  const int timeouts = takeTimeouts(a);
  std::vector<double> ns = ticksToNs(a, rounds, 2.0);
  ns.erase(ns.begin(), ns.begin() + kWarmupRounds);
  printRow(test, kClock, ns, timeouts);
}

void arrivalRows(const Device& dev, int blocks, int samples) {
  Arrival a{};
  CHECK(cudaMalloc(&a.counter, kLineBytes));
  CHECK(cudaMalloc(&a.gridMeet, kLineBytes));
  CHECK(cudaMalloc(&a.arriveNs, size_t(samples) * blocks * sizeof(uint64_t)));
  CHECK(cudaMalloc(&a.lastKnowsNs, size_t(samples) * sizeof(uint64_t)));
  a.atomicTicks = dev.ticks;
  a.timeouts = dev.timeouts;
  for (bool alignStart : {false, true}) {
    CHECK(cudaMemset(a.counter, 0, kLineBytes));
    CHECK(cudaMemset(a.gridMeet, 0, kLineBytes));
    CHECK(cudaMemset(a.lastKnowsNs, 0, size_t(samples) * sizeof(uint64_t)));
    for (int s = 0; s < samples; ++s) {
      Arrival k = a;
      k.arriveNs += size_t(s) * blocks;
      k.atomicTicks += size_t(s) * blocks;
      k.lastKnowsNs += s;
      arrivalKernel<<<blocks, kThreads>>>(k, unsigned(s) * blocks, alignStart);
    }
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    const int timeouts = takeTimeouts(dev);
    const std::vector<uint64_t> arrive = readBack(a.arriveNs, size_t(samples) * blocks);
    const std::vector<uint64_t> last = readBack(a.lastKnowsNs, samples);
    std::vector<double> firstToLast, lastArrivalToKnown;
    for (int s = 0; s < samples; ++s) {
      const auto first = arrive.begin() + size_t(s) * blocks;
      firstToLast.push_back(double(last[s]) - double(*std::min_element(first, first + blocks)));
      lastArrivalToKnown.push_back(double(last[s]) - double(*std::max_element(first, first + blocks)));
    }
    const std::string how = alignStart ? ", after a grid barrier" : ", as launched";
    printRow("arrival: first arrival -> last knows it is last" + how, kTimer, firstToLast, timeouts);
    printRow("arrival: last arrival -> last knows it is last" + how, kTimer, lastArrivalToKnown, timeouts);
    printRow("arrival: one atom.acq_rel.gpu, per block" + how, kClock, ticksToNs(dev, size_t(samples) * blocks),
             timeouts);
  }
  CHECK(cudaFree(a.counter));
  CHECK(cudaFree(a.gridMeet));
  CHECK(cudaFree(a.arriveNs));
  CHECK(cudaFree(a.lastKnowsNs));
}

void launchRows(const Device& dev, int blocks, int samples) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 100; ++i) emptyKernel<<<blocks, kThreads, 0, dev.stream>>>();
  const int launchesPerRound = 100;
  const int rounds = std::max(10, samples / 10);
  std::vector<double> backToBack, single;
  for (int r = 0; r < rounds; ++r) {
    CHECK(cudaEventRecord(start, dev.stream));
    for (int i = 0; i < launchesPerRound; ++i) emptyKernel<<<blocks, kThreads, 0, dev.stream>>>();
    CHECK(cudaEventRecord(stop, dev.stream));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    backToBack.push_back(ms * 1e6 / launchesPerRound);
  }
  for (int s = 0; s < samples; ++s) {
    CHECK(cudaEventRecord(start, dev.stream));
    emptyKernel<<<blocks, kThreads, 0, dev.stream>>>();
    CHECK(cudaEventRecord(stop, dev.stream));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    single.push_back(ms * 1e6);
  }
  CHECK(cudaGetLastError());
  const std::string grid = std::to_string(blocks) + "x" + std::to_string(kThreads);
  printRow("launch: empty " + grid + ", back to back (per launch of 100)", kEvents, backToBack);
  printRow("launch: empty " + grid + ", alone between two events", kEvents, single);

  uint64_t *startNs, *endNs;
  CHECK(cudaMalloc(&startNs, size_t(samples) * blocks * sizeof(uint64_t)));
  CHECK(cudaMalloc(&endNs, size_t(samples) * blocks * sizeof(uint64_t)));
  for (int s = 0; s < samples; ++s)
    blockStampKernel<<<blocks, kThreads, 0, dev.stream>>>(startNs + size_t(s) * blocks, endNs + size_t(s) * blocks);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  const std::vector<uint64_t> starts = readBack(startNs, size_t(samples) * blocks);
  const std::vector<uint64_t> ends = readBack(endNs, size_t(samples) * blocks);
  std::vector<double> span, startSkew;
  for (int s = 0; s < samples; ++s) {
    const auto b = starts.begin() + size_t(s) * blocks;
    const auto e = ends.begin() + size_t(s) * blocks;
    span.push_back(double(*std::max_element(e, e + blocks)) - double(*std::min_element(b, b + blocks)));
    startSkew.push_back(double(*std::max_element(b, b + blocks)) - double(*std::min_element(b, b + blocks)));
  }
  printRow("launch: first block start -> last block end (one barrier)", kTimer, span);
  printRow("launch: first block start -> last block start", kTimer, startSkew);
  CHECK(cudaFree(startNs));
  CHECK(cudaFree(endNs));
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
}

void loadRows(const Device& dev, int samples) {
  int l2Bytes = 0;
  CHECK(cudaDeviceGetAttribute(&l2Bytes, cudaDevAttrL2CacheSize, dev.id));
  uint64_t* end;
  CHECK(cudaMalloc(&end, sizeof(uint64_t)));

  const size_t l2ChainBytes = size_t(1) << 20;
  const Chain l2Chain = makeChain(l2ChainBytes, 1);
  chaseRow<Load::Cg>(dev, "load: ld.cg, random lines of 1 MiB (L2 hits)", l2Chain.start,
                     int(l2ChainBytes / kLineBytes), samples, end);
  CHECK(cudaFree(l2Chain.base));

  // Random lines of a buffer 8x L2, visited once each after a 4x-L2 write has evicted the chain
  // from L2: every load goes to DRAM, as the first read of a token or of the routing does.
  const size_t dramChainBytes = std::max(size_t(256) << 20, size_t(l2Bytes) * 8);
  const Chain dramChain = makeChain(dramChainBytes, 2);
  void* evict;
  CHECK(cudaMalloc(&evict, size_t(l2Bytes) * 4));
  CHECK(cudaMemset(evict, 1, size_t(l2Bytes) * 4));
  CHECK(cudaDeviceSynchronize());
  chaseRow<Load::Cg>(dev, "load: ld.cg, random lines of " + std::to_string(dramChainBytes >> 20) + " MiB (DRAM)",
                     dramChain.start, 0, samples, end);
  CHECK(cudaFree(evict));
  CHECK(cudaFree(dramChain.base));

  uint64_t* word;
  CHECK(cudaMalloc(&word, kLineBytes));
  selfPointKernel<<<1, 1>>>(word);
  CHECK(cudaDeviceSynchronize());
  chaseRow<Load::Cached>(dev, "load: ld.ca, one local word (L1 hits)", word, 16, samples, end);
  chaseRow<Load::Cg>(dev, "load: ld.cg, one local word (a poll)", word, 16, samples, end);
  chaseRow<Load::Volatile>(dev, "load: ld.volatile, one local word", word, 16, samples, end);
  chaseRow<Load::RelaxedSys>(dev, "load: ld.relaxed.sys, one local word", word, 16, samples, end);
  chaseRow<Load::AcquireGpu>(dev, "load: ld.acquire.gpu, one local word", word, 16, samples, end);
  chaseRow<Load::AcquireSys>(dev, "load: ld.acquire.sys, one local word", word, 16, samples, end);
  CHECK(cudaFree(word));
  CHECK(cudaFree(end));
}

void releaseRows(const Device& dev, int samples) {
  int4* payload;
  uint64_t* flag;
  CHECK(cudaMalloc(&payload, kPayloadVectors * sizeof(int4)));
  CHECK(cudaMalloc(&flag, kLineBytes));
  for (int4* stored : {static_cast<int4*>(nullptr), payload}) {
    const std::string after = stored ? ", after 8 KB stored" : ", nothing stored";
    releaseRow<Signal::RelaxedStoreGpu>(dev, "release: st.relaxed.gpu (no release)" + after, stored, flag, samples);
    releaseRow<Signal::ReleaseStoreGpu>(dev, "release: st.release.gpu" + after, stored, flag, samples);
    releaseRow<Signal::ReleaseAddGpu>(dev, "release: red.release.gpu.add" + after, stored, flag, samples);
    releaseRow<Signal::ReleaseStoreSys>(dev, "release: st.release.sys" + after, stored, flag, samples);
    releaseRow<Signal::ReleaseAddSys>(dev, "release: red.release.sys.add" + after, stored, flag, samples);
    releaseRow<Signal::FenceSysRelaxedStore>(dev, "release: fence.acq_rel.sys + st.relaxed.sys" + after, stored, flag,
                                             samples);
  }
  CHECK(cudaFree(payload));
  CHECK(cudaFree(flag));
}

void pingPongLocalRows(const Device& dev, int samples) {
  uint64_t* flags;
  int4* payloads;
  CHECK(cudaMalloc(&flags, 2 * kLineBytes));
  CHECK(cudaMalloc(&payloads, 2 * kPayloadVectors * sizeof(int4)));
  pingPongLocalRow<Signal::ReleaseStoreGpu, Load::AcquireGpu>(dev, "ping-pong 1 GPU: st.release.gpu / ld.acquire.gpu",
                                                              flags, payloads, false, samples);
  pingPongLocalRow<Signal::ReleaseStoreSys, Load::AcquireSys>(dev, "ping-pong 1 GPU: st.release.sys / ld.acquire.sys",
                                                              flags, payloads, false, samples);
  pingPongLocalRow<Signal::ReleaseAddSys, Load::AcquireSys>(dev, "ping-pong 1 GPU: red.release.sys / ld.acquire.sys",
                                                            flags, payloads, false, samples);
  pingPongLocalRow<Signal::ReleaseStoreGpu, Load::AcquireGpu>(
      dev, "ping-pong 1 GPU: 8 KB + st.release.gpu / ld.acquire.gpu", flags, payloads, true, samples);
  pingPongLocalRow<Signal::ReleaseStoreSys, Load::AcquireSys>(
      dev, "ping-pong 1 GPU: 8 KB + st.release.sys / ld.acquire.sys", flags, payloads, true, samples);
  CHECK(cudaFree(flags));
  CHECK(cudaFree(payloads));
}

void barrierRows(const Device& dev, int samples) {
  barrierKernel<<<1, kThreads>>>(samples, dev.ticks);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  printRow("barrier: __syncthreads, 512 threads, per barrier", kClock, ticksToNs(dev, samples, kBarriersPerSample));
  int4 *src, *dst;
  CHECK(cudaMalloc(&src, kPayloadVectors * sizeof(int4)));
  CHECK(cudaMalloc(&dst, kPayloadVectors * sizeof(int4)));
  CHECK(cudaMemset(src, 0, kPayloadVectors * sizeof(int4)));
  blockCopyKernel<<<1, kThreads>>>(src, dst, samples, dev.ticks);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  printRow("barrier: 8 KB block copy (ld.cg, L2 hits) + __syncthreads", kClock, ticksToNs(dev, samples));
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
}

// GPU a reads, signals and writes into GPU b's memory, and (ping-pong) b into a's.
void peerRows(const Device& a, const Device& b, int samples) {
  PeerBuffers onA{}, onB{};
  uint64_t *peerWord, *end;
  CHECK(cudaSetDevice(b.id));
  CHECK(cudaMalloc(&onB.flag, kLineBytes));
  CHECK(cudaMalloc(&onB.payload, kPayloadVectors * sizeof(int4)));
  CHECK(cudaMalloc(&peerWord, kLineBytes));
  selfPointKernel<<<1, 1>>>(peerWord);
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaSetDevice(a.id));
  CHECK(cudaMalloc(&onA.flag, kLineBytes));
  CHECK(cudaMalloc(&onA.payload, kPayloadVectors * sizeof(int4)));
  CHECK(cudaMalloc(&end, sizeof(uint64_t)));

  chaseRow<Load::Cg>(a, "2 GPUs: ld.cg, one peer word", peerWord, 16, samples, end);
  chaseRow<Load::AcquireSys>(a, "2 GPUs: ld.acquire.sys, one peer word (a remote poll)", peerWord, 16, samples, end);

  releaseRow<Signal::ReleaseStoreSys>(a, "2 GPUs: st.release.sys to peer, nothing stored", nullptr, onB.flag, samples);
  releaseRow<Signal::ReleaseStoreSys>(a, "2 GPUs: st.release.sys to peer, after 8 KB to peer", onB.payload, onB.flag,
                                      samples);
  releaseRow<Signal::ReleaseAddSys>(a, "2 GPUs: red.release.sys.add to peer, after 8 KB to peer", onB.payload,
                                    onB.flag, samples);
  releaseRow<Signal::FenceSysRelaxedStore>(a, "2 GPUs: fence.acq_rel.sys + st.relaxed.sys, after 8 KB to peer",
                                           onB.payload, onB.flag, samples);

  pingPongPeerRow<Signal::ReleaseStoreSys, Load::AcquireSys>(
      a, b, onA, onB, "ping-pong 2 GPUs: st.release.sys / ld.acquire.sys", false, samples);
  pingPongPeerRow<Signal::ReleaseAddSys, Load::AcquireSys>(
      a, b, onA, onB, "ping-pong 2 GPUs: red.release.sys / ld.acquire.sys", false, samples);
  pingPongPeerRow<Signal::ReleaseStoreSys, Load::AcquireSys>(
      a, b, onA, onB, "ping-pong 2 GPUs: 8 KB + st.release.sys / ld.acquire.sys", true, samples);

  CHECK(cudaFree(onA.flag));
  CHECK(cudaFree(onA.payload));
  CHECK(cudaFree(end));
  CHECK(cudaSetDevice(b.id));
  CHECK(cudaFree(onB.flag));
  CHECK(cudaFree(onB.payload));
  CHECK(cudaFree(peerWord));
  CHECK(cudaSetDevice(a.id));
}

// Peer access both ways between GPUs 0 and 1; false (and why) when not possible.
bool enablePeers(int gpus, std::string& why) {
  if (gpus < 2) {
    why = "one GPU visible";
    return false;
  }
  int ab = 0, ba = 0;
  CHECK(cudaDeviceCanAccessPeer(&ab, 0, 1));
  CHECK(cudaDeviceCanAccessPeer(&ba, 1, 0));
  if (!ab || !ba) {
    why = "GPUs 0 and 1 cannot access each other's memory";
    return false;
  }
  for (int d : {0, 1}) {
    CHECK(cudaSetDevice(d));
    const cudaError_t e = cudaDeviceEnablePeerAccess(1 - d, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled)
      (void)cudaGetLastError();
    else
      CHECK(e);
  }
  CHECK(cudaSetDevice(0));
  return true;
}

int main(int argc, char** argv) {
  const int samples = argc > 1 ? std::atoi(argv[1]) : 1000;
  if (samples < 10) {
    std::fprintf(stderr, "usage: %s [samples >= 10]\n", argv[0]);
    return 1;
  }
  int gpus = 0;
  CHECK(cudaGetDeviceCount(&gpus));
  Device dev = openDevice(0, samples);
  const int blocks = std::min(kLLBlocks, dev.sms);
  int clockKHz = 0;
  CHECK(cudaDeviceGetAttribute(&clockKHz, cudaDevAttrClockRate, 0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("GPU 0: %s, %d SMs; SM clock %.0f MHz measured (cudaDevAttrClockRate %d MHz); "
              "%%globaltimer tick %llu ns\n",
              prop.name, dev.sms, dev.ticksPerNs * 1e3, clockKHz / 1000, (unsigned long long)dev.timerTickNs);
  std::printf("%-58s %9s %9s %9s %9s %8s  %s\n", "test (ns)", "median", "p10", "p90", "mean", "samples", "clock");

  printHeader("1. launch");
  launchRows(dev, blocks, samples);

  printHeader("2. dependent loads, one thread, per load");
  loadRows(dev, samples);

  printHeader("3. release, the releasing thread's time (one block of 512)");
  releaseRows(dev, samples);

  printHeader("4. one-way flag latency between two blocks of GPU 0 (round trip / 2)");
  pingPongLocalRows(dev, samples);

  printHeader("5. two GPUs over NVLink (GPU 0 -> GPU 1; ping-pong one-way = round trip / 2)");
  std::string why;
  if (enablePeers(gpus, why)) {
    const Device peer = openDevice(1, samples);
    CHECK(cudaSetDevice(0));
    peerRows(dev, peer, samples);
  } else {
    std::printf("skipped: %s\n", why.c_str());
  }

  printHeader("6. arrival counter, " + std::to_string(blocks) + " blocks x 512");
  arrivalRows(dev, blocks, samples);

  printHeader("7. barriers");
  barrierRows(dev, samples);

  if (anyTimeout) std::printf("\nSome spin waits timed out: the rows that say so are not measurements.\n");
  return anyTimeout ? 2 : 0;
}
