// LL dispatch: each token goes once to every rank holding one of its experts.
//
// Send (per source rank): block b ranks token b against our earlier tokens (a thread per earlier
// token; its slot at each destination = its index among our tokens going there, its row at each
// expert = its index among our tokens choosing that expert), then sends it: a header with its
// local expert ids, rows and weights, and the payload (bf16, or fp8 quantised here), to each
// destination: straight into the peer's window over NVLink, or staged and put over the network.
// The last block first counts our tokens per expert and per destination and sends each destination
// its counts; every block signals each destination the messages it sent there. A block issues the
// loads of its first step together (its token's ids, weights and row, the acknowledgements, the
// peers' window bases): at decode sizes the kernel's time is its chain of dependent memory round
// trips, not its bytes (bench/NOTES.md, session 16).
//
// Receive: wait for every source's counts; a local expert's rows start, for source r, after the
// rows of sources < r (prefix over the per-expert counts), so rows are ordered by source rank and
// then token index, the reference backend's order. Warps copy the messages into the rows of
// their local experts as each source's messages land, and record the handle; then each source is
// acknowledged: by each block for itself in a group with no network peer, else by the last block
// (ll_layout.h, kLLAckPerCall). Each block keeps its own call numbers (LLState). In a fused launch
// on one node with at most half as many tokens as blocks, the sending blocks leave the receive to
// the others (receivesIn).
//
// A rank that rejected the call (p.rejectCode) sends no token and, in place of its token total for
// each destination, the reject word (reject.h): a negative count, which its peers record as that
// rank's rejection and read as zero tokens. Its per-expert counts are zeros. Its own receive half
// waits and keeps count as usual (the marks stay exact) but writes no output.
#include <atomic>

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "common/device_error.cuh"
#include "common/expert_ids.cuh"
#include "common/memory_order.cuh"
#include "common/reject.h"
#include "kernels/ll/ll_params.h"
#include "kernels/ll/ll_receive.cuh"
#include "transport/peers.cuh"

namespace ncclep {
namespace {

using device::loadCg;

constexpr unsigned kFullMask = 0xffffffffu;

// Optional profiling: thread 0 of each block stamps %globaltimer at protocol steps (LLTraceStep).
__device__ __forceinline__ void stamp(const LLDispatchParams& p, int step) {
  if (p.trace != nullptr && threadIdx.x == 0)
    p.trace[size_t(blockIdx.x) * kLLTraceSteps + step] = device::globalTimerNs();
}

// ------------------------------------------------------------------------------------------ send

// Our per-expert and per-destination token totals (the counts block only), in shared memory.
struct Totals {
  int* expert;  // [E] our tokens choosing each expert
  int* dest;    // [R] our tokens going to each rank
};

// Where one token's messages go: per choice k, its checked expert (-1 for none, out of range or a
// repeat) and that expert's rank, its row among our tokens for that expert, and (first choice on a
// rank only, else -1) its slot among our tokens going to that rank.
struct TokenRanks {
  int expert[kLLMaxTopk];
  int rank[kLLMaxTopk];
  int pos[kLLMaxTopk];
  int slot[kLLMaxTopk];
  float weight[kLLMaxTopk];
};

// What a thread holds of the token its block sends next, loaded together so that the send waits
// for one memory round trip, not one per kind of input: thread tid < K its choice's id and weight,
// every thread the 32 bytes of the bf16 row at tid * 32 (the first pass over the row; a row longer
// than the block's 16 KB is loaded pass by pass as it is sent).
struct TokenInputs {
  int64_t id;
  float weight;
  int4 row[2];
};

__device__ __forceinline__ void loadToken(const LLDispatchParams& p, int b, TokenInputs& in) {
  const int tid = threadIdx.x;
  if (tid < p.topk) {
    in.id = device::loadExpertId(p.topkIdx, p.topkIdx64, int64_t(b) * p.topk + tid);
    in.weight = p.topkWeights[int64_t(b) * p.topk + tid];
  }
  const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(b) * p.hidden * 2);
  if (2 * tid < p.hidden / 8) {
    in.row[0] = row[2 * tid];
    in.row[1] = row[2 * tid + 1];
  }
}

__host__ __device__ inline size_t alignUp16(size_t x) { return (x + 15) / 16 * 16; }

__device__ __forceinline__ Totals carveTotals(char* smem, int numExperts) {
  return {reinterpret_cast<int*>(smem), reinterpret_cast<int*>(smem + alignUp16(size_t(numExperts) * 4))};
}

// Division by the local expert count without a division instruction sequence per call:
// __umulhi(e, ceil(2^32 / L)) is e / L exactly while e * L < 2^32 (experts and L are below 2^12).
struct ExpertRank {
  uint32_t magic;  // 0 for L = 1
  __device__ __forceinline__ explicit ExpertRank(int numLocalExperts)
      : magic(numLocalExperts > 1 ? 0xffffffffu / uint32_t(numLocalExperts) + 1 : 0) {}
  __device__ __forceinline__ int of(int expert) const {
    return magic ? int(__umulhi(uint32_t(expert), magic)) : expert;
  }
};

// Choice k of token t if it names an expert, else -1 (repeats kept).
__device__ __forceinline__ int choiceExpert(const LLDispatchParams& p, int t, int k) {
  const int64_t raw = device::loadExpertId(p.topkIdx, p.topkIdx64, int64_t(t) * p.topk + k);
  return raw >= 0 && raw < p.c.numExperts ? int(raw) : -1;
}

// Choice k of token t, checked: its expert, or -1 for none, an id out of range, or a repeat of an
// earlier choice of the token (reported when `report`). Earlier choices are reloaded (L1 hits):
// kept in registers, 16 of them per token made the kernel's code too large to run from cache.
__device__ __forceinline__ int checkedChoice(const LLDispatchParams& p, int t, int k, bool report,
                                             const device::ErrorSink& err) {
  const int64_t raw = device::loadExpertId(p.topkIdx, p.topkIdx64, int64_t(t) * p.topk + k);
  if (!device::isExpertId(raw, p.c.numExperts)) {
    if (report) device::reportError(err, kDeviceBadExpert, kPhaseLLDispatchSend, -1, int32_t(raw));
    return -1;
  }
  if (raw < 0) return -1;
  for (int j = 0; j < k; ++j) {
    if (choiceExpert(p, t, j) == int(raw)) {
      if (report) device::reportError(err, kDeviceDuplicateExpert, kPhaseLLDispatchSend, -1, t);
      return -1;
    }
  }
  return int(raw);
}

// Whether checked choice k (expert e >= 0) of token t is the token's first on e's rank. Raw ids
// suffice: a repeat is on the rank of the choice it repeats.
__device__ __forceinline__ bool firstOnRank(const LLDispatchParams& p, const ExpertRank& rankOf, int t, int k, int e) {
  const int d = rankOf.of(e);
  for (int j = 0; j < k; ++j) {
    const int other = choiceExpert(p, t, j);
    if (other >= 0 && rankOf.of(other) == d) return false;
  }
  return true;
}

// The counts block: our tokens per expert and per destination (a thread per top-k entry),
// reporting the ids it drops.
__device__ void countTotals(const LLDispatchParams& p, const Totals& totals, const device::ErrorSink& err) {
  const int tid = threadIdx.x, lane = tid & 31;
  const ExpertRank rankOf(p.c.layout.numLocalExperts);
  for (int i = tid; i < p.c.numExperts; i += blockDim.x) totals.expert[i] = 0;
  for (int i = tid; i < p.c.nRanks; i += blockDim.x) totals.dest[i] = 0;
  __syncthreads();
  const int entries = p.numTokens * p.topk;
  // Warp-uniform loop (the match below needs every lane).
  for (int i0 = tid - lane; i0 < entries; i0 += blockDim.x) {
    const int i = i0 + lane, t = i / p.topk, k = i - t * p.topk;
    const int e = i < entries ? checkedChoice(p, t, k, true, err) : -1;
    const int d = e >= 0 && firstOnRank(p, rankOf, t, k, e) ? rankOf.of(e) : -1;
    if (e >= 0) atomicAdd(&totals.expert[e], 1);
    // Few ranks: one atomic per distinct rank in the warp, not per lane.
    const unsigned same = __match_any_sync(kFullMask, d);
    if (d >= 0 && lane == __ffs(same) - 1) atomicAdd(&totals.dest[d], __popc(same));
  }
  __syncthreads();
}

// Ranks token b (its ids and weights in `in`) against our earlier tokens: a thread per earlier token
// marks which of b's experts and first ranks it shares (a repeat marks the same bit once), warps
// count the marks.
__device__ void rankToken(const LLDispatchParams& p, int b, const TokenInputs& in, TokenRanks& out) {
  const int tid = threadIdx.x, lane = tid & 31, K = p.topk;
  const ExpertRank rankOf(p.c.layout.numLocalExperts);
  if (tid < b) {
    // The first earlier token this thread scans: its ids on their way to L1 while the block's token's
    // ids load.
    const char* ids = static_cast<const char*>(p.topkIdx) + (int64_t(tid) * K << (p.topkIdx64 ? 3 : 2));
    const int bytes = K << (p.topkIdx64 ? 3 : 2);
    asm volatile("prefetch.global.L1 [%0];" ::"l"(ids));
    asm volatile("prefetch.global.L1 [%0];" ::"l"(ids + bytes - 1));
  }
  __syncthreads();  // the previous token's ranks are no longer read
  if (tid < 32) {
    // Lane k < K: choice k checked (an id out of range or a repeat is none; reported by the
    // counts block), its rank, and whether it is the token's first choice on that rank.
    const int e = device::warpCheckedChoice(tid < K ? in.id : -1, K, p.c.numExperts, lane);
    const int d = e >= 0 ? rankOf.of(e) : -1;
    bool first = d >= 0;
    for (int j = 0; j < K; ++j) {
      const int other = __shfl_sync(kFullMask, d, j);
      first &= !(j < lane && other == d);
    }
    if (tid < K) {
      out.expert[tid] = e;
      out.rank[tid] = d;
      out.slot[tid] = first ? d : -1;  // its rank, for now
      out.pos[tid] = 0;
      out.weight[tid] = in.weight;
    }
  }
  __syncthreads();
  int counted[2] = {0, 0};  // lanes < K: pos and slot of choice `lane`, summed over the warp's tokens
  // Lane k < K: choice k's expert and (first on its rank only) rank, broadcast in turn below.
  const int mineExpert = lane < K ? out.expert[lane] : -1, mineRank = lane < K ? out.slot[lane] : -1;
  for (int t0 = tid - lane; t0 < b; t0 += blockDim.x) {
    const int t = t0 + lane;
    // The lane's earlier token: its experts and their ranks (-1: none), its ids loaded at once.
    int theirExpert[kLLMaxTopk], theirRank[kLLMaxTopk];
#pragma unroll
    for (int j = 0; j < kLLMaxTopk; ++j) {
      const int64_t raw = t < b && j < K ? device::loadExpertId(p.topkIdx, p.topkIdx64, int64_t(t) * K + j) : -1;
      theirExpert[j] = raw >= 0 && raw < p.c.numExperts ? int(raw) : -1;
    }
#pragma unroll
    for (int j = 0; j < kLLMaxTopk; ++j) theirRank[j] = theirExpert[j] >= 0 ? rankOf.of(theirExpert[j]) : -1;
    for (int k = 0; k < K; ++k) {
      const int e = __shfl_sync(kFullMask, mineExpert, k), d = __shfl_sync(kFullMask, mineRank, k);
      bool sameExpert = false, sameRank = false;  // a repeat counts once
#pragma unroll
      for (int j = 0; j < kLLMaxTopk; ++j) {
        sameExpert |= e >= 0 && theirExpert[j] == e;
        sameRank |= d >= 0 && theirRank[j] == d;
      }
      const int nExpert = __popc(__ballot_sync(kFullMask, sameExpert));
      const int nRank = __popc(__ballot_sync(kFullMask, sameRank));
      if (lane == k) {
        counted[0] += nExpert;
        counted[1] += nRank;
      }
    }
  }
  __syncthreads();  // every warp read the ranks in out.slot
  if (tid < K) out.slot[tid] = out.slot[tid] >= 0 ? 0 : -1;
  __syncthreads();
  if (lane < K && counted[0]) atomicAdd(&out.pos[lane], counted[0]);
  if (lane < K && counted[1]) atomicAdd(&out.slot[lane], counted[1]);
  __syncthreads();
}

__device__ __forceinline__ float bf16ToFloat(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }

// fp8 per 128 channels, the arithmetic of ncclep/fp8.py: 8 lanes per group, 16 channels per lane
// (one 16-byte store of fp8 per lane). Every lane of the warp calls it; `active` lanes hold data.
// pow2: the scale rounded up to a power of two (UE8M0's), as the byte *scaleByte and as fp32 *scale.
__device__ __forceinline__ int4 quantize16(const int4 (&raw)[2], bool pow2, float* scale, uint8_t* scaleByte) {
  float v[16];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t words[4] = {uint32_t(raw[h].x), uint32_t(raw[h].y), uint32_t(raw[h].z), uint32_t(raw[h].w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[h * 8 + 2 * i] = bf16ToFloat(words[i] & 0xffff);
      v[h * 8 + 2 * i + 1] = bf16ToFloat(words[i] >> 16);
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, o));
  amax = fmaxf(amax, 1e-4f);
  // The arithmetic of ncclep/fp8.py, operation for operation (no division: see there).
  const float ratio = __fmul_rn(amax, 1.0f / 448.0f);
  float mult;
  if (pow2) {
    const uint32_t bits = __float_as_uint(ratio);
    const uint32_t biased = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u);
    mult = __uint_as_float((254u - biased) << 23);
    *scaleByte = uint8_t(biased);
    // torch's float8_e8m0fnu -> float32: 255 (only an inf in the block gives it) is this NaN
    *scale = __uint_as_float(biased == 255u ? 0x7f800001u : biased << 23);
  } else {
    mult = __fmul_rn(__frcp_rn(amax), 448.0f);
    *scale = ratio;
  }
  uint32_t out[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float q = fminf(fmaxf(__fmul_rn(v[i], mult), -448.0f), 448.0f);
    const __nv_fp8_storage_t f = __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
    out[i / 4] |= uint32_t(f) << (8 * (i % 4));
  }
  return make_int4(int(out[0]), int(out[1]), int(out[2]), int(out[3]));
}

// Bytes of a dispatched message that carry data (header + payload + scales), rounded to 16.
__device__ __forceinline__ size_t messageBytes(const LLDispatchParams& p) {
  const size_t payload = p.useFp8 ? size_t(p.hidden) + size_t(p.hidden / 128) * (p.ue8m0 ? 1 : 4)
                                  : size_t(p.hidden) * 2;
  return p.c.layout.headerBytes + alignUp16(payload);
}

// `lsaBases`: the window's base at each rank on our node (loaded at the kernel's start).
template <class Net>
__device__ void sendToken(const LLDispatchParams& p, const transport::Peers<Net>& peers, char* const* lsaBases,
                          uint32_t parity, int b, const TokenRanks& ranks, const TokenInputs& in, char** msgs) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts, T = l.maxTokens, KM = l.maxTopk, K = p.topk;
  const int tid = threadIdx.x;
  const int* slot = ranks.slot;
  const int* expert = ranks.expert;
  const int* rankOf = ranks.rank;
  auto dstOffset = [&](int s) {
    return l.dispatchSlots + ((size_t(parity) * R + c.rank) * T + size_t(s)) * l.dispatchMsgBytes;
  };
  auto stageOffset = [&](int d, int s) {
    return l.stageDispatch + ((size_t(parity) * R + d) * T + size_t(s)) * l.dispatchMsgBytes;
  };

  // msgs[k]: where choice k's message goes, if k is the token's first choice on its rank.
  if (tid < K) {
    const int d = rankOf[tid];
    msgs[tid] = slot[tid] >= 0 ? peers.template target<char>(d, dstOffset(slot[tid]), stageOffset(d, slot[tid]), lsaBases)
                               : nullptr;
  }
  for (int d = tid; d < R; d += blockDim.x) {
    int s = -1;
    for (int k = 0; k < K; ++k)
      if (slot[k] >= 0 && rankOf[k] == d) s = slot[k];
    p.sendSlots[int64_t(b) * R + d] = s;
  }
  __syncthreads();

  // Header words: token index, then (local expert, row, weight) per choice, for each destination.
  const int headerWords = 1 + 3 * KM;
  for (int i = tid; i < K * headerWords; i += blockDim.x) {
    const int k = i / headerWords, w = i % headerWords;
    if (msgs[k] == nullptr) continue;
    const int d = rankOf[k];
    int32_t word = b;
    if (w > 0) {
      const int j = (w - 1) / 3, field = (w - 1) % 3;
      const int e = j < K ? expert[j] : -1;
      const bool here = e >= 0 && rankOf[j] == d;
      if (field == 0) word = here ? e - d * L : -1;
      else if (field == 1) word = here ? ranks.pos[j] : 0;
      else word = __float_as_int(here ? ranks.weight[j] : 0.0f);
    }
    reinterpret_cast<int32_t*>(msgs[k])[w] = word;
  }

  // The row in passes of 32 bytes per thread (pair q of 16-byte chunks): the first from `in`.
  const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(b) * p.hidden * 2);
  const int pairs = p.hidden / 16;
  for (int q0 = 0; q0 < pairs; q0 += blockDim.x) {  // warp-uniform: the quantisation shuffles
    const int q = q0 + tid;
    const bool active = q < pairs;
    int4 raw[2] = {in.row[0], in.row[1]};
    if (q0 > 0 && active) {
      raw[0] = row[2 * q];
      raw[1] = row[2 * q + 1];
    }
    if (!p.useFp8) {
      for (int k = 0; active && k < K; ++k) {
        if (msgs[k] == nullptr) continue;
        int4* payload = reinterpret_cast<int4*>(msgs[k] + l.headerBytes);
        payload[2 * q] = raw[0];
        payload[2 * q + 1] = raw[1];
      }
      continue;
    }
    // fp8: 8 lanes per 128-channel group g = q / 8; lane sub = q % 8 packs its 16 channels.
    float scale = 0.f;
    uint8_t scaleByte = 0;
    const int4 packed = quantize16(raw, p.ue8m0 || p.pow2Scales, &scale, &scaleByte);
    if (!active) continue;
    const int g = q >> 3, sub = q & 7;
    for (int k = 0; k < K; ++k) {
      if (msgs[k] == nullptr) continue;
      char* payload = msgs[k] + l.headerBytes;
      reinterpret_cast<int4*>(payload)[q] = packed;
      if (sub == 0) {
        if (p.ue8m0) reinterpret_cast<uint8_t*>(payload + p.hidden)[g] = scaleByte;
        else reinterpret_cast<float*>(payload + p.hidden)[g] = scale;
      }
    }
  }
  __syncthreads();  // the messages are complete (and msgs may be overwritten by the next token)

  for (int k = 0; k < K; ++k) {
    if (slot[k] < 0) continue;
    const int d = rankOf[k];
    peers.put(d, dstOffset(slot[k]), stageOffset(d, slot[k]), messageBytes(p), tid, blockDim.x);
  }
}

static_assert(4 * kLLMaxRanks <= kLLThreads, "a thread per rank (four per rank in the receive's first step)");

struct SendFlags {
  bool last;
  uint64_t sendSeq;  // the send half's call number, ended by the receive half in a fused launch
  char* msgs[kLLMaxTopk];
  TokenRanks ranks;
  int sentTo[kLLMaxRanks];       // messages this block sent to each rank
  char* lsaBases[kLLMaxRanks];  // the window's base at each rank on our node
};

// `ends`: a send-only launch, where this half ends the block's call; in a launch with the receive
// half, that half ends both.
template <class Net>
__device__ void dispatchSend(const LLDispatchParams& p, char* smem, SendFlags& flags, bool ends) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {l.signals, l.nRanks});
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const int R = c.nRanks, L = l.numLocalExperts;
  const int tid = threadIdx.x;

  stamp(p, kTraceSendStart);
  // The block's first step issues every load it needs before any of them is waited for: the call
  // number, the block's first token (ids, weights, row), the window base of each peer on our node
  // (kept in a register: storing it to shared memory now would stall this thread's next loads
  // behind it), and last the acknowledgements (an acquire: the thread's later loads would wait
  // for it). Parity `parity` of a destination still holds our call seq-2 until it acknowledged it;
  // the acknowledgements are checked after the counting or the first token's ranking (neither
  // touches a peer), so the round trips overlap.
  const uint64_t seq = ll::blockCalls(c, kHalfDispatchSend);
  const uint32_t parity = uint32_t(seq) & 1u;
  TokenInputs in;
  if (int(blockIdx.x) < p.numTokens) loadToken(p, blockIdx.x, in);
  char* const lsaBase = tid < R && !peers.viaNet(tid) ? peers.net.lsa.peerBase(tid) : nullptr;
  const uint64_t ackSeen = tid < R ? peers.read(tid, kSigDispatchAck) : 0;
  // Waited for (when not yet seen) by a block before its first store to a peer; true when a
  // destination never acknowledged: the block then sends nothing. The barrier also orders each
  // acknowledgement before every thread's stores to that destination.
  auto ackFailed = [&] {
    bool acked = true;
    const uint64_t ackedCalls = uint64_t(seq - 1) * ll::ackPerCall<Net>();
    if (tid < R && seq >= 2 && ackSeen < ackedCalls)
      acked = peers.wait(tid, kSigDispatchAck, ackedCalls, c.timeoutNs, err, kPhaseLLDispatchSend);
    const bool failed = __syncthreads_or(!acked);
    stamp(p, kTraceAcked);
    return failed;
  };
  bool failed = false;
  // The last block counts and sends the totals: it has no token, or no more than the others, when
  // tokens do not fill the grid evenly (block 0, with a token always, was every call's slowest).
  const bool countsBlock = blockIdx.x == gridDim.x - 1;
  if (countsBlock) {
    const Totals totals = carveTotals(smem, c.numExperts);
    countTotals(p, totals, err);
    stamp(p, kTraceLoaded);
    if (tid < R) flags.lsaBases[tid] = lsaBase;  // read after ackFailed's barrier
    failed = ackFailed();
    if (!failed) {
      const size_t countsAt = l.dispatchCounts + (size_t(parity) * R + c.rank) * l.countsBytes;
      auto stageAt = [&](int d) { return l.stageCounts + (size_t(parity) * R + d) * l.countsBytes; };
      for (int i = tid; i < R * (L + 1); i += blockDim.x) {
        const int d = i / (L + 1), e = i % (L + 1);
        int32_t* entry = peers.template target<int32_t>(d, countsAt, stageAt(d), flags.lsaBases);
        entry[e] = e < L            ? totals.expert[d * L + e]
                   : p.rejectCode != 0 ? int32_t(rejectWord(p.rejectCode))
                                       : totals.dest[d];
      }
      __syncthreads();
      for (int d = 0; d < R; ++d) peers.put(d, countsAt, stageAt(d), l.countsBytes, tid, blockDim.x);
      __syncthreads();
      if (tid < R) peers.signal(tid, kSigDispatchCounts, 1);
    }
  }

  if (tid < R) {
    flags.sentTo[tid] = 0;
    flags.lsaBases[tid] = lsaBase;  // read after rankToken's barriers
  }
  for (int b = blockIdx.x; !failed && b < p.numTokens; b += gridDim.x) {
    rankToken(p, b, in, flags.ranks);
    TokenInputs next;  // loads while this token is sent
    if (b + int(gridDim.x) < p.numTokens) loadToken(p, b + gridDim.x, next);
    if (b == int(blockIdx.x)) {
      stamp(p, kTraceRouted);
      if (!countsBlock && ackFailed()) break;
    }
    sendToken(p, peers, flags.lsaBases, parity, b, flags.ranks, in, flags.msgs);
    in = next;
    if (tid < p.topk && flags.ranks.slot[tid] >= 0) flags.sentTo[flags.ranks.rank[tid]] += 1;
  }
  __syncthreads();
  stamp(p, kTraceSent);
  // Each block tells each destination how many of its messages landed (the signal's release makes
  // them visible first); the receiver waits for the total its counts announced.
  if (tid < R && flags.sentTo[tid] > 0) peers.signal(tid, kSigDispatchData + int(parity), flags.sentTo[tid]);
  if (tid == 0) flags.sendSeq = seq;
  __syncthreads();
  stamp(p, kTraceArrived);
  if (ends && tid == 0) ll::endBlockCall(c, kHalfDispatchSend, seq);
}

// ------------------------------------------------------------------------------------------ receive

struct RecvShared {
  uint64_t* want;  // [R] what the source's data signal reaches once all its messages landed
  uint64_t* seen;  // [R] the source's data signal when this block started (acquired)
  uint64_t* mark;  // [R] our received-data mark of the source in this parity
  int* count;      // [R] tokens from each source
  int* start;      // [R + 1] prefix of count
  int* offset;     // [L][R]: first row of that source's tokens at each local expert
};

__device__ __forceinline__ RecvShared carveRecv(char* smem, int nRanks) {
  RecvShared s;
  s.want = reinterpret_cast<uint64_t*>(smem);
  s.seen = s.want + nRanks;
  s.mark = s.seen + nRanks;
  s.count = reinterpret_cast<int*>(s.mark + nRanks);
  s.start = s.count + nRanks;
  s.offset = s.start + nRanks + 1;
  return s;
}

constexpr int kCopyUnroll = 4;  // 16-byte chunks in flight per lane
constexpr int kCountBatch = 8;  // sources' counts loaded at once per thread

// A message's rows are held one per lane: lane k < KM has choice k's row (-1: not here). The
// copies loop over them with a shuffle each (a runtime loop: an unrolled one per maximum top-k
// made the kernel's code too large to run from cache).

// Stores one batch of 16-byte chunks (starting at chunk i0 + lane, 32 apart) into every row.
__device__ __forceinline__ void storeChunks(const int4 (&v)[kCopyUnroll], int i0, int end, char* out, size_t rowBytes,
                                            int laneRow, int KM) {
  for (int k = 0; k < KM; ++k) {
    const int row = __shfl_sync(kFullMask, laneRow, k);
    if (row < 0) continue;
    int4* dst = reinterpret_cast<int4*>(out + int64_t(row) * rowBytes);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (i0 + u * 32 < end) dst[i0 + u * 32] = v[u];
  }
}

__device__ __forceinline__ void loadChunks(const int4* src, int i0, int end, int4 (&v)[kCopyUnroll]) {
#pragma unroll
  for (int u = 0; u < kCopyUnroll; ++u)
    if (i0 + u * 32 < end) v[u] = loadCg(src + i0 + u * 32);
}

// A message's scales into every row's scales: 4-byte words where sizes and the output allow,
// else bytes. The first two words per lane are loaded by the caller with the rest of the
// message (`first`), so that no load waits behind a store. Strided outputs (the host checked that
// they take whole words) put word w of row i of local expert e at e*s[0] + i*s[1] + w*s[2].
struct ScaleCopy {
  int words;  // 4-byte words per row, 0 when copied as bytes
  int bytes;
  bool strided;
  long long s0, s1, s2;
  __device__ __forceinline__ ScaleCopy(int scaleBytes, const LLDispatchParams& p)
      : words(scaleBytes % 4 == 0 && reinterpret_cast<uintptr_t>(p.recvScales) % 4 == 0 ? scaleBytes / 4 : 0),
        bytes(scaleBytes),
        strided(p.scalesStrided != 0),
        s0(p.scalesStrides[0]),
        s1(p.scalesStrides[1]),
        s2(p.scalesStrides[2]) {}

  __device__ __forceinline__ void load(const char* src, int lane, uint32_t (&first)[2]) const {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(src);
    first[0] = lane < words ? __ldcg(w + lane) : 0u;
    first[1] = lane + 32 < words ? __ldcg(w + lane + 32) : 0u;
  }

  // Lane k < KM holds choice k's output row (-1: none) in laneRow and its local expert in laneExpert.
  __device__ __forceinline__ void store(const char* src, const uint32_t (&first)[2], char* out, int laneRow,
                                        int laneExpert, int rowsPerExpert, int KM, int lane) const {
    const uint32_t* srcWords = reinterpret_cast<const uint32_t*>(src);
    for (int k = 0; k < KM; ++k) {
      const int row = __shfl_sync(kFullMask, laneRow, k);
      const int e = __shfl_sync(kFullMask, laneExpert, k);
      if (row < 0) continue;
      if (strided) {
        uint32_t* w = reinterpret_cast<uint32_t*>(out) + e * s0 + (row - e * rowsPerExpert) * s1;
        if (lane < words) w[lane * s2] = first[0];
        if (lane + 32 < words) w[(lane + 32) * s2] = first[1];
        for (int i = lane + 64; i < words; i += 32) w[i * s2] = __ldcg(srcWords + i);
        continue;
      }
      char* dst = out + int64_t(row) * bytes;
      if (words) {
        uint32_t* w = reinterpret_cast<uint32_t*>(dst);
        if (lane < words) w[lane] = first[0];
        if (lane + 32 < words) w[lane + 32] = first[1];
        for (int i = lane + 64; i < words; i += 32) w[i] = __ldcg(srcWords + i);
      } else {
        for (int i = lane; i < bytes; i += 32)
          reinterpret_cast<uint8_t*>(dst)[i] = __ldcg(reinterpret_cast<const uint8_t*>(src) + i);
      }
    }
  }
};

// `endsSend`: a fused launch, whose send half's call (flags.sendSeq) this half's arrival ends too.
// The receive runs on blocks [firstBlock, grid): 0, or the first block that sent no token where the
// senders leave the receive to the others (receivesIn). The first of them writes the outputs' counts
// and the marks.
template <class Net>
__device__ void dispatchRecv(const LLDispatchParams& p, char* smem, SendFlags& flags, bool endsSend, int firstBlock) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {l.signals, l.nRanks});
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const int R = c.nRanks, L = l.numLocalExperts, T = l.maxTokens, KM = l.maxTopk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, numWarps = blockDim.x >> 5;
  const int rowsPerExpert = R * T;
  const RecvShared s = carveRecv(smem, R);
  const int block = int(blockIdx.x) - firstBlock, G = int(gridDim.x) - firstBlock;
  const bool writer = block == 0;

  stamp(p, kTraceRecvStart);
  const uint64_t seq = ll::blockCalls(c, kHalfDispatchRecv);
  const uint32_t parity = uint32_t(seq) & 1u;
  auto counts = [&](int r) {
    return reinterpret_cast<const int*>(c.local + l.dispatchCounts + (size_t(parity) * R + r) * l.countsBytes);
  };
  // First step, in one round trip: thread r acquires source r's counts signal (the counts place
  // its rows); threads R + 2r + q read its data signal of parity q (each before the sequence
  // number is known), so that a warp whose source has landed skips its own wait; threads 3R + r
  // load our marks. A source's messages are otherwise awaited by the warps that copy them, so
  // early sources are copied while late ones are still sending.
  bool ok = true;
  if (tid < R) {
    ok = peers.wait(tid, kSigDispatchCounts, uint64_t(seq) + 1, c.timeoutNs, err, kPhaseLLDispatchRecv);
  } else if (tid < 3 * R) {
    ll::readDataSignal(peers, kSigDispatchData, R, parity, tid, s.seen);
  } else if (tid < 4 * R) {
    s.mark[tid - 3 * R] = *ll::receivedMark(c, 0, seq, tid - 3 * R);
  }
  if (__syncthreads_or(!ok)) return;
  stamp(p, kTraceFlagsSeen);

  // Second step: every source's counts. The last warp takes the token totals (a negative one: the
  // source rejected the call, no token from it) and their prefix; the other threads, a local
  // expert each, the prefix of its counts over sources.
  const bool keep = p.rejectCode == 0;  // a rejecting rank writes no output
  if (warp == numWarps - 1) {
    auto tokensFrom = [&](int r) {
      const int n = __ldcg(counts(r) + L);
      if (n >= 0) return n;
      if (writer && keep)
        device::reportError(err, kDevicePeerRejected, kPhaseLLDispatchRecv, r, rejectReason(uint32_t(n)));
      return 0;
    };
    const int total = ll::warpPrefix(R, tokensFrom, [&](int r, int n, int start) {
      s.count[r] = n;
      s.start[r] = start;
      s.want[r] = s.mark[r] + uint64_t(n);
      if (writer && keep) p.recvSlotCounts[r] = n;
    });
    if (lane == 0) s.start[R] = total;
  }
  for (int e = tid; warp < numWarps - 1 && e < L; e += blockDim.x - 32) {
    int acc = 0;
    for (int r0 = 0; r0 < R; r0 += kCountBatch) {
      int n[kCountBatch];
#pragma unroll
      for (int u = 0; u < kCountBatch; ++u) n[u] = r0 + u < R ? __ldcg(counts(r0 + u) + e) : 0;
#pragma unroll
      for (int u = 0; u < kCountBatch; ++u) {
        if (r0 + u < R) s.offset[e * R + r0 + u] = acc;
        acc += n[u];
      }
    }
    if (writer && keep) p.expertCounts[e] = acc;
  }
  __syncthreads();
  // Nothing is copied on a rejecting rank: its data is awaited here, keeping the marks exact.
  if (!keep && tid < R)
    ok = peers.wait(tid, kSigDispatchData + int(parity), s.want[tid], c.timeoutNs, err, kPhaseLLDispatchRecv);

  // Work items: (message, part); a warp each, spread over the SMs first.
  const int total = keep ? s.start[R] : 0;
  const size_t rowBytes = p.useFp8 ? size_t(p.hidden) : size_t(p.hidden) * 2;
  const int scaleBytes = p.useFp8 ? (p.hidden / 128) * (p.ue8m0 ? 1 : 4) : 0;
  const int chunks = int(rowBytes / 16);
  const int warps = G * numWarps;
  int parts = total > 0 ? warps / total : 1;
  parts = parts < 1 ? 1 : (parts > 8 ? 8 : parts);
  const int perPart = (chunks + parts - 1) / parts;
  const ScaleCopy scaleCopy(scaleBytes, p);
  const char* slots = c.local + l.dispatchSlots + size_t(parity) * R * T * l.dispatchMsgBytes;
  int landed = -1;  // the source whose messages this warp last saw land
  // Items go first to the blocks that sent fewest tokens (from block numTokens % grid on): in a
  // fused launch a block's receive starts after its send. Where the senders receive nothing, no
  // receiving block sent a token; the counts block, which sent the counts, is last in line.
  const int order = firstBlock > 0 ? block : (block + G - p.numTokens % G) % G;
  for (int item = warp * G + order; item < total * parts; item += warps) {
    const int m = item / parts, part = item % parts;
    const int r = ll::sourceOf(s.start, R, m);
    const int j = m - s.start[r];
    if (r != landed) {
      // Landed when the block started (acquired then, ordered by the block barriers since), or
      // lane 0 acquires the signal and the warp barrier orders the other lanes' loads after it.
      if (s.seen[r] < s.want[r]) {
        bool waited = true;
        if (lane == 0)
          waited = peers.wait(r, kSigDispatchData + int(parity), s.want[r], c.timeoutNs, err, kPhaseLLDispatchRecv);
        waited = __shfl_sync(kFullMask, waited, 0);
        __syncwarp();
        if (!waited) {
          ok = false;
          break;
        }
      }
      landed = r;
    }
    const char* msg = slots + (size_t(r) * T + j) * l.dispatchMsgBytes;
    const int4* payload = reinterpret_cast<const int4*>(msg + l.headerBytes);
    const int begin = part * perPart, end = begin + perPart < chunks ? begin + perPart : chunks;
    // Every load of the item's first batch (payload, scales, header) is issued before any store.
    int4 v[kCopyUnroll];
    loadChunks(payload, begin + lane, end, v);
    const bool scalesHere = scaleBytes && part == parts - 1;
    const char* scaleSrc = msg + l.headerBytes + rowBytes;
    uint32_t scaleWords[2] = {0u, 0u};
    if (scalesHere) scaleCopy.load(scaleSrc, lane, scaleWords);
    int e = -1, pos = 0;
    float w = 0.0f;
    if (lane < KM) {
      const int32_t* header = reinterpret_cast<const int32_t*>(msg);
      e = __ldcg(header + 1 + 3 * lane);
      pos = __ldcg(header + 2 + 3 * lane);
      w = __int_as_float(__ldcg(header + 3 + 3 * lane));
    }
    const int row = e >= 0 ? e * rowsPerExpert + s.offset[e * R + r] + pos : -1;
    if (lane < KM && part == 0) {
      const int64_t at = (int64_t(r) * T + j) * KM + lane;
      p.recvRows[at] = row;
      p.recvWeights[at] = e >= 0 ? w : 0.0f;
    }
    char* out = static_cast<char*>(p.recvX);
    storeChunks(v, begin + lane, end, out, rowBytes, row, KM);
    for (int i0 = begin + lane + 32 * kCopyUnroll; i0 - lane < end; i0 += 32 * kCopyUnroll) {
      loadChunks(payload, i0, end, v);
      storeChunks(v, i0, end, out, rowBytes, row, KM);
    }
    if (scalesHere)
      scaleCopy.store(scaleSrc, scaleWords, static_cast<char*>(p.recvScales), row, e, rowsPerExpert, KM, lane);
  }

  // Handle entries of unused slots (R * T * KM <= kLLMaxRanks * kLLMaxEntries: 32-bit arithmetic).
  const unsigned handleEntries = keep ? unsigned(R) * T * KM : 0u;
  for (unsigned i = unsigned(block) * blockDim.x + tid; i < handleEntries; i += unsigned(G) * blockDim.x) {
    const unsigned slot = i / unsigned(KM);
    const int r = int(slot / unsigned(T)), j = int(slot % unsigned(T));
    if (j >= s.count[r]) {
      p.recvRows[i] = -1;
      p.recvWeights[i] = 0.0f;
    }
  }

  // A failed wait left messages uncopied: no acknowledgement (the group is closed after it).
  const bool failed = __syncthreads_or(!ok);
  stamp(p, kTraceCopied);
  if (failed) return;
  if (tid == 0) {
    ll::endBlockCall(c, kHalfDispatchRecv, seq);
    if (endsSend) ll::endBlockCall(c, kHalfDispatchSend, flags.sendSeq);
  }
  // This block has read its messages (the barrier above followed its last loads of them).
  ll::acknowledgeSources(
      c, peers, kHalfDispatchRecv, kSigDispatchAck, flags.last, writer,
      [&](int r) { *ll::receivedMark(c, 0, seq + 2, r) = s.want[r]; }, [](int) { return false; });
}

// A sending block that takes no part in the receive of a fused launch: it ends both halves' calls
// and adds its share of each source's acknowledgement (ll_layout.h, kLLAckPerCall) at once, having
// read none of their messages; the sum reaches a call's total only when every receiving block has
// added its own after its reads.
template <class Net>
__device__ void dispatchRecvNothing(const LLDispatchParams& p, const SendFlags& flags) {
  const LLCommon& c = p.c;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {c.layout.signals, c.layout.nRanks});
  const int tid = threadIdx.x;
  if (tid == 0) {
    ll::endBlockCall(c, kHalfDispatchRecv, ll::blockCalls(c, kHalfDispatchRecv));
    ll::endBlockCall(c, kHalfDispatchSend, flags.sendSeq);
  }
  if (tid < c.nRanks) peers.signalRelaxed(tid, kSigDispatchAck, ll::ackShare());
}

// In a fused launch on one node with few tokens, the blocks that sent a token leave the receive to
// the blocks that sent none (at least half the grid): a sender's receive starts only after its send,
// and with no copies left for it, its receive's own steps (the counts, the handle's share, the end)
// would still be the launch's last (bench/NOTES.md, session 20). Across the network the last block
// to arrive ends the call, so every block receives there.
template <class Net>
__device__ __forceinline__ int receivesIn(const LLDispatchParams& p, bool fused) {
  if constexpr (Net::kCrossesNodes) return 0;
  return fused && p.numTokens > 0 && 2 * p.numTokens <= int(gridDim.x) ? p.numTokens : 0;
}

template <class Net>
__global__ void __launch_bounds__(kLLThreads, 1) llDispatchKernel(const __grid_constant__ LLDispatchParams p) {
  extern __shared__ __align__(16) char smem[];
  __shared__ SendFlags flags;
  const bool fused = (p.phases & kLLSend) && (p.phases & kLLRecv);
  if (p.phases & kLLSend) {
    dispatchSend<Net>(p, smem, flags, !fused);
    __syncthreads();
  }
  if (!(p.phases & kLLRecv)) return;
  const int firstBlock = receivesIn<Net>(p, fused);
  if (int(blockIdx.x) < firstBlock) dispatchRecvNothing<Net>(p, flags);
  else dispatchRecv<Net>(p, smem, flags, fused, firstBlock);
}

template <class Net>
int launch(const LLDispatchParams& p, int numBlocks, cudaStream_t stream) {
  const size_t bytes = llDispatchSharedBytes(p.c.layout, p.c.numExperts);
  // The attribute is per function and device, and a call costs host time: raised only when a
  // group needs more than any before it on this device.
  constexpr int kMaxDevices = 64;
  static std::atomic<size_t> granted[kMaxDevices];
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return int(e);
  if (device >= kMaxDevices || bytes > granted[device].load(std::memory_order_relaxed)) {
    e = cudaFuncSetAttribute(llDispatchKernel<Net>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (e != cudaSuccess) return int(e);
    if (device < kMaxDevices) granted[device].store(bytes, std::memory_order_relaxed);
  }
  llDispatchKernel<Net><<<numBlocks, kLLThreads, bytes, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace

size_t llDispatchSharedBytes(const LLLayout& l, int numExperts) {
  const size_t send = alignUp16(size_t(numExperts) * 4) + size_t(l.nRanks) * 4;
  const size_t recv =
      size_t(l.nRanks) * 3 * 8 + (size_t(l.nRanks) * 2 + 1 + size_t(l.numLocalExperts) * l.nRanks) * 4;
  return send > recv ? send : recv;
}

int launchLLDispatch(const LLDispatchParams& p, int numBlocks, cudaStream_t stream) {
  if (p.c.useGin) return launch<transport::NetGin>(p, numBlocks, stream);
  if (p.c.nodeSize >= p.c.nRanks) return launch<transport::NetNone>(p, numBlocks, stream);
  return launch<transport::NetEmulated>(p, numBlocks, stream);
}

}  // namespace ncclep
