// Memory-order helpers for flags shared between GPUs over NVLink.
//
// Payload stores are plain; a writer publishes them with a release store of a flag at system scope
// (the peer is another GPU), and a reader acquires that flag before reading. Reads of buffers that
// peers write go through L2 (ld.global.cg): L1 is not coherent with NVLink writes.
#pragma once

#include <cstdint>

namespace ncclep {
namespace device {

__device__ __forceinline__ void storeRelease(uint64_t* ptr, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t loadAcquire(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

// Words shared by the blocks of one kernel that carry their own data (nothing else is published
// with them): relaxed at GPU scope, so a load sees the whole word and never a stale L1 copy.
__device__ __forceinline__ void storeRelaxedGpu(uint64_t* ptr, uint64_t value) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t loadRelaxedGpu(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

// Words another GPU reads (or writes) that carry their own data and their call's epoch, with
// nothing else published with them: relaxed at system scope, so the 64-bit word is single-copy
// atomic, a load never sees a stale L1 copy, and no fence is paid (st.release.sys is a MEMBAR.SYS,
// a wait for every earlier store to land, then the store).
__device__ __forceinline__ void storeRelaxedSys(uint64_t* ptr, uint64_t value) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t loadRelaxedSys(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

// Adds to a counter another GPU reads; ordered after this thread's earlier stores (release).
__device__ __forceinline__ void addRelease(uint64_t* ptr, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Adds to a counter another GPU reads, ordered after nothing: for a count that publishes no data.
__device__ __forceinline__ void addRelaxed(uint64_t* ptr, uint64_t value) {
  asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Counts blocks that finished a phase; true in exactly one (the last) block's caller thread.
// Acquire-release at GPU scope, so the last block sees everything the others did before arriving:
// release is cumulative, so one thread's arrival after a barrier covers its block (no fence first).
__device__ __forceinline__ bool arriveLast(unsigned int* counter, unsigned int expected) {
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
  return old == expected - 1;
}

__device__ __forceinline__ int4 loadCg(const int4* ptr) { return __ldcg(ptr); }

__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace device
}  // namespace ncclep
