// Where the HT protocol keeps its data in the symmetric window (same offsets on every rank), and
// the format of one message. Host code plans it; kernels read it.
//
// Window regions (offsets from the window base, each 256-byte aligned):
//   state       HTState: the call sequence number, block arrival counters, the abort flag, and
//               `done`, which peers read before they write into our slots again
//   counts      uint64 [2 parities][R sources][L + 1]: what the source sends us in its dispatch of
//               that parity, every word (epoch << 32) | value and complete by itself (no flag):
//               word e < L its tokens for our local expert e, word L its tokens for us, or its
//               reject word (reject.h) when it rejected the call (see ht_layout.cu)
//   groupScan   uint64 [maxGroups][R + E]  local: per group of kHTTileGroup tiles and column (tokens
//               per destination rank, then per expert), (epoch << 32) | the group's count, or, with
//               bit 31 set, the count of groups 0..g: the count kernel's look-back scan over groups
//   expertPos   int32  [T][maxTopk]        local scratch: row of (token, choice) among our tokens
//               for that expert
//   rowCount    int32  [R * T]             local scratch (combine): rows holding each slot
//   rowsOf      int32  [R * T][maxTopk]    local scratch (combine): those rows
//   slots       [R sources][T slots][msgBytes]: one message per (source, slot)
//
// Hierarchical regions (planned only when the group spans several (virtual) nodes, `nodes` > 1;
// zero-sized otherwise; see ht_internode.cuh for the protocol). N = nodes, S = R / N:
//   totals      int32  [R + E]             local: the count kernel's column totals (tokens per
//               destination rank, per expert), read by the internode kernels
//   netSignals  uint64 [kHTSignalKinds][R] counters peers add to (LSA and the emulated network;
//               GIN keeps its own signals, same indices)
//   netCounts   [R sources][countBytes]    dispatch counts: int32 per local expert, then tokens
//   countStage  [R dests][countBytes]      staging of our counts for peers across the network
//   header      [N source nodes][16]       per call from each source we forward for: int32 tokens,
//               int32 epoch
//   headerStage [16]                       staging of our header
//   netStage    dispatch / cached: [T][netMsgBytes] one network message per token (by token
//               index); combine (token owner side): infoStage [N][infoStride] (our send_pos
//               columns of each node's ranks), then at backOffset backIn [N][T][msgBytes] (each
//               node's reduced row of each of our tokens)
//   netRecv     dispatch / cached only: [N source nodes][T][netMsgBytes] (by the source's token
//               index). Never aliased: the forwarder tells which tokens arrived by the epoch in
//               each message's token word, so nothing but older token words may lie there
//   combineFwd  combine (forwarder side): infoIn [N][infoStride], then at backOffset backStage
//               [N][T][msgBytes]
//   chunkArrivals uint32 [N][kHTMaxChunks] local: tokens of each chunk of a stream we send that
//               are done (row n: the combine stream back to the source on node n; row of our
//               node: our dispatch / cached stream); the warp that completes a chunk resets its
//               entry to 0 and signals the chunk
//
// A network message (netMsgBytes): [0, flagOffset) as a slot message, except that the metadata
// holds global expert ids; then int32 send_pos[R] of the token, then uint64 (epoch << 32) | token
// at netTokenOffset, which tells the forwarder which token indexes this call sent.
//
// Every HT op (dispatch, combine, cached dispatch) is one call of the group's sequence: call n has
// epoch n, writes the slots of peer d only after d's `done` reached n - 1 (d has read call n - 1),
// and its receivers release `done` = n when they have read everything.
//
// A message (slot), msgBytes long:
//   [0, payloadBytes)             dispatch: x row (bf16, or fp8 then its scales); combine: the
//                                 bf16 partial sum; cached dispatch: the caller's row
//   [metaOffset, flagOffset)      dispatch: int32 local expert [maxTopk], int32 position within
//                                 that expert among the source's tokens [maxTopk], float weight
//                                 [maxTopk]; combine: float weight sums [maxTopk]
//   [flagOffset, msgBytes)        uint64 (epoch << 32) | token, stored last with release semantics
#pragma once

#include <cstddef>
#include <cstdint>

namespace ncclep {

constexpr int kHTTile = 32;  // tokens per layout tile (one warp, one token per lane)
constexpr int kHTTileGroup = 16;  // consecutive tiles one count block counts and scans together

// Streams across the network move in chunks of consecutive token indexes (chunk c = tokens
// [c * chunkTokens, (c + 1) * chunkTokens)), each covered by its own signal, so that the receiving
// side starts on a chunk while later ones are still in flight. The chunk size is planned from the
// token bound (HTLayout.chunkTokens): at least kHTMinChunkTokens, and at most kHTMaxChunks chunks,
// which bounds the signals (GIN signals requested: kHTSignalKinds * R).
constexpr int kHTMaxChunks = 32;
constexpr int kHTMinChunkTokens = 64;

// Signal kinds of the hierarchical path: signal (kind, peer) is a counter in our window that
// `peer` adds to (GIN signal index kind * R + peer). Each is +1 per call of the kinds that use it,
// so a call's mark is known to every rank without a message.
enum HTSignalKind : int {
  kHTSigCounts = 0,  // +1 per dispatch: the peer's counts for us are in place
  kHTSigHeader = 1,  // +1 per call: a source's header (and, in combine, its info) for us (its forwarder) landed
  kHTSigDone = 2,    // +1 per call: the peer finished the call (our regions there are free)
  kHTSigChunk = 3,   // kHTSigChunk + c, +1 per call: chunk c of the peer's stream to us landed (dispatch and
                     // cached: a source's messages at its forwarder; combine: a forwarder's reduced rows
                     // at the token owner); chunks past the stream's tokens are signalled empty
  kHTSignalKinds = kHTSigChunk + kHTMaxChunks,
};

struct HTState {
  uint32_t seq;            // HT calls this rank completed (all HT ops share one sequence)
  uint32_t blocksDone[4];  // arrival counters: [1] transfer kernels, [0] [2] [3] spare
  uint32_t aborted;        // set with the error word; spinning waiters poll this device word
  uint32_t dispatches;     // hierarchical path: dispatch calls completed (kHTSigCounts marks)
  uint64_t done;           // = seq once our receivers have read every message of that call
  uint32_t claimed;        // dispatch senders: tokens claimed in the running call (0 between calls)
};

struct HTLayout {
  size_t state;
  size_t counts;
  size_t groupScan;
  size_t expertPos;
  size_t rowCount;
  size_t rowsOf;
  size_t slots;
  // hierarchical path (zero-sized when nodes == 1)
  size_t totals;
  size_t netSignals;
  size_t netCounts;
  size_t countStage;
  size_t header;
  size_t headerStage;
  size_t netStage;
  size_t netRecv;
  size_t combineFwd;
  size_t chunkArrivals;
  size_t backOffset;  // offset of backIn / backStage inside netStage / netRecv
  size_t end;
  uint32_t netMsgBytes;
  uint32_t netTokenOffset;
  uint32_t countBytes;
  uint32_t infoStride;  // bytes of one node's info block: T * S int32, 16-byte aligned
  int nodes;            // nodes the hierarchical regions were planned for (1: none)
  int chunkTokens;      // tokens per chunk of a network stream (see kHTMaxChunks)
  int chunks;           // chunks of maxTokens tokens (<= kHTMaxChunks)
  uint32_t msgBytes;
  uint32_t payloadBytes;  // = metaOffset
  uint32_t flagOffset;
  int nRanks;
  int maxTokens;
  int numExperts;
  int numLocalExperts;
  int maxTopk;
  int hidden;
  int maxTiles;
};

inline size_t htAlignUp(size_t x, size_t to) { return (x + to - 1) / to * to; }

// Plans the regions starting at `base`; returns false on overflow.
// `nodes` > 1 (dividing nRanks) also plans the hierarchical regions.
inline bool planHTLayout(size_t base, int nRanks, int maxTokens, int numExperts, int maxTopk, int hidden, int nodes,
                         HTLayout* out) {
  HTLayout l{};
  l.nRanks = nRanks;
  l.maxTokens = maxTokens;
  l.numExperts = numExperts;
  l.numLocalExperts = numExperts / nRanks;
  l.maxTopk = maxTopk;
  l.hidden = hidden;
  l.maxTiles = (maxTokens + kHTTile - 1) / kHTTile;
  l.payloadBytes = uint32_t(htAlignUp(size_t(hidden) * 2, 16));
  l.flagOffset = l.payloadBytes + uint32_t(htAlignUp(size_t(maxTopk) * 12, 16));
  l.msgBytes = l.flagOffset + 16;
  const size_t R = size_t(nRanks), T = size_t(maxTokens), K = size_t(maxTopk);
  size_t at = htAlignUp(base, 256);
  bool ok = true;
  auto take = [&](size_t* field, size_t count, size_t bytes) {
    *field = at;
    if (bytes != 0 && count > (SIZE_MAX - at - 256) / bytes) {
      ok = false;
      return;
    }
    at = htAlignUp(at + count * bytes, 256);
  };
  take(&l.state, 1, sizeof(HTState));
  take(&l.counts, 2 * R * (size_t(l.numLocalExperts) + 1), 8);
  take(&l.groupScan, size_t((l.maxTiles + kHTTileGroup - 1) / kHTTileGroup) * (R + size_t(numExperts)), 8);
  take(&l.expertPos, T * K, 4);
  take(&l.rowCount, R * T, 4);
  take(&l.rowsOf, R * T * K, 4);
  if (ok && R * T > SIZE_MAX / l.msgBytes) ok = false;
  if (ok) take(&l.slots, R * T, l.msgBytes);
  l.nodes = nodes > 1 && nRanks % nodes == 0 ? nodes : 1;
  if (ok && l.nodes > 1) {
    const size_t N = size_t(l.nodes), S = R / N, E = size_t(numExperts);
    l.netTokenOffset = l.flagOffset + uint32_t(htAlignUp(R * 4, 8));
    l.netMsgBytes = uint32_t(htAlignUp(l.netTokenOffset + 8, 16));
    l.countBytes = uint32_t(htAlignUp((size_t(l.numLocalExperts) + 1) * 4, 16));
    l.infoStride = uint32_t(htAlignUp(T * S * 4, 16));
    l.backOffset = htAlignUp(N * l.infoStride, 256);
    const size_t combineBytes = l.backOffset + N * T * l.msgBytes;
    const size_t stageBytes = T * l.netMsgBytes > combineBytes ? T * l.netMsgBytes : combineBytes;
    take(&l.totals, R + E, 4);
    take(&l.netSignals, size_t(kHTSignalKinds) * R, 8);
    take(&l.netCounts, R, l.countBytes);
    take(&l.countStage, R, l.countBytes);
    take(&l.header, N, 16);
    take(&l.headerStage, 1, 16);
    take(&l.netStage, 1, stageBytes);
    take(&l.netRecv, N * T, l.netMsgBytes);
    take(&l.combineFwd, 1, combineBytes);
    take(&l.chunkArrivals, N * size_t(kHTMaxChunks), 4);
    const int perChunk = (maxTokens + kHTMaxChunks - 1) / kHTMaxChunks;
    l.chunkTokens = perChunk > kHTMinChunkTokens ? perChunk : kHTMinChunkTokens;
    l.chunks = (maxTokens + l.chunkTokens - 1) / l.chunkTokens;
  }
  l.end = at;
  *out = l;
  return ok;
}

}  // namespace ncclep
