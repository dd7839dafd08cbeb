// Where the HT protocol keeps its data in the symmetric window (same offsets on every rank), and
// the format of one message. Host code plans it; kernels read it.
//
// Window regions (offsets from the window base, each 256-byte aligned):
//   state       HTState: the call sequence number, block arrival counters, the abort flag, and
//               `done`, which peers read before they write into our slots again
//   countFlags  uint64 [2 parities][R sources]: (epoch << 32) | tokens the source sends us
//   counts      int32  [2][R sources][L local experts]: the source's tokens per local expert
//   tileCounts  int32  [maxTiles][R + E]   local scratch: per 32-token tile, tokens per destination
//               rank and per expert, turned into exclusive prefixes over tiles by the layout step
//   expertPos   int32  [T][maxTopk]        local scratch: row of (token, choice) among our tokens
//               for that expert
//   rowCount    int32  [R * T]             local scratch (combine): rows holding each slot
//   rowsOf      int32  [R * T][maxTopk]    local scratch (combine): those rows
//   slots       [R sources][T slots][msgBytes]: one message per (source, slot)
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

struct HTState {
  uint32_t seq;            // HT calls this rank completed (all HT ops share one sequence)
  uint32_t blocksDone[3];  // arrival counters: [0] layout, [1] transfer kernels
  uint32_t aborted;        // set with the error word; spinning waiters poll this device word
  uint32_t pad;
  uint64_t done;           // = seq once our receivers have read every message of that call
};

struct HTLayout {
  size_t state;
  size_t countFlags;
  size_t counts;
  size_t tileCounts;
  size_t expertPos;
  size_t rowCount;
  size_t rowsOf;
  size_t slots;
  size_t end;
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
inline bool planHTLayout(size_t base, int nRanks, int maxTokens, int numExperts, int maxTopk, int hidden,
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
  take(&l.countFlags, 2 * R, 8);
  take(&l.counts, 2 * R * size_t(l.numLocalExperts), 4);
  take(&l.tileCounts, size_t(l.maxTiles) * (R + size_t(numExperts)), 4);
  take(&l.expertPos, T * K, 4);
  take(&l.rowCount, R * T, 4);
  take(&l.rowsOf, R * T * K, 4);
  if (ok && R * T > SIZE_MAX / l.msgBytes) ok = false;
  if (ok) take(&l.slots, R * T, l.msgBytes);
  l.end = at;
  *out = l;
  return ok;
}

}  // namespace ncclep
