/*
 * HT dispatch (flat layout) and combine through the C API alone, checked on every rank.
 *
 * Build:  make                 Run:  mpirun -np 4 build/ht_example /tmp/ncclep_id.$$
 *
 * Same inputs as ll_example.c (a pure function of round, rank, token and channel). Each rank
 * rebuilds the tokens it must receive: one row per (source rank, token) that chose one of its
 * experts, in that order, with the local expert ids (-1 elsewhere) and weights; then the per-rank
 * and per-expert counts. The experts are the identity, so combine must give back each token times
 * the number of ranks it went to (within bf16 rounding). Two rounds. Exits nonzero on a mismatch.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "ncclep.h"

static int rank = -1;

#include "example_bootstrap.h"
#include "example_inputs.h"

/* Ranks that token b of rank r goes to (one bit each), and its weight for choice k. */
static unsigned destinations(int round, int r, int b, int numExperts) {
  unsigned mask = 0;
  int k;
  for (k = 0; k < kTopk; ++k) {
    const int64_t e = expertOf(round, r, b, k, numExperts);
    if (e >= 0) mask |= 1u << (e / kExpertsPerRank);
  }
  return mask;
}

static float weightOf(int round, int r, int b, int k) { return (float)(1 + (r + b + k + round) % 5) / 8.0f; }

int main(int argc, char** argv) {
  int size = envInt("OMPI_COMM_WORLD_SIZE", 1), localRank = envInt("OMPI_COMM_WORLD_LOCAL_RANK", 0);
  int status = 1, wroteId = 0, round;
  const int numExperts = kExpertsPerRank * size;
  long long rows = 0;
  ncclepGroup_t group = NULL;
  ncclepUniqueId id;
  uint16_t *hx = NULL, *hy = NULL, *hrecv = NULL;
  int64_t *hidx = NULL, *hridx = NULL;
  float *hw = NULL, *hrw = NULL;
  int *hrecvCounts = NULL, hnum = 0, hcounts[kExpertsPerRank];
  void *dx = NULL, *didx = NULL, *dw = NULL, *drecv = NULL, *dridx = NULL, *drw = NULL, *dnum = NULL,
       *dcounts = NULL, *dpos = NULL, *dslot = NULL, *drecvCounts = NULL, *dy = NULL;
  cudaStream_t stream = NULL;
  long bad = 0;

  rank = envInt("OMPI_COMM_WORLD_RANK", 0);
  if (argc != 2) {
    fprintf(stderr, "usage: mpirun -np N %s <unique-id file path (must not exist)>\n", argv[0]);
    return 2;
  }
  if (size > 32) {
    fprintf(stderr, "this example checks at most 32 ranks\n");
    return 2;
  }
  if (shareUniqueId(rank, argv[1], &id, &wroteId) != 0) return 1;
  if (openExampleGroup(NCCLEP_MODE_HT, id, size, rank, localRank, &group, &stream) != 0) goto done;
  CHECK(ncclepHTNumRows(group, kTopk, NCCLEP_HT_LAYOUT_FLAT, 1, &rows));

  hx = malloc(sizeof(uint16_t) * kTokens * kHidden);
  hy = malloc(sizeof(uint16_t) * kTokens * kHidden);
  hrecv = malloc(sizeof(uint16_t) * (size_t)rows * kHidden);
  hidx = malloc(sizeof(int64_t) * kTokens * kTopk);
  hw = malloc(sizeof(float) * kTokens * kTopk);
  hrw = malloc(sizeof(float) * (size_t)rows * kTopk);
  hridx = malloc(sizeof(int64_t) * (size_t)rows * kTopk);
  hrecvCounts = malloc(sizeof(int) * size);
  if (!hx || !hy || !hrecv || !hidx || !hw || !hrw || !hridx || !hrecvCounts) goto done;
  CUDA(cudaMalloc(&dx, sizeof(uint16_t) * kTokens * kHidden));
  CUDA(cudaMalloc(&dy, sizeof(uint16_t) * kTokens * kHidden));
  CUDA(cudaMalloc(&didx, sizeof(int64_t) * kTokens * kTopk));
  CUDA(cudaMalloc(&dw, sizeof(float) * kTokens * kTopk));
  CUDA(cudaMalloc(&drecv, sizeof(uint16_t) * (size_t)rows * kHidden));
  CUDA(cudaMalloc(&dridx, sizeof(int64_t) * (size_t)rows * kTopk));
  CUDA(cudaMalloc(&drw, sizeof(float) * (size_t)rows * kTopk));
  CUDA(cudaMalloc(&dnum, sizeof(int)));
  CUDA(cudaMalloc(&dcounts, sizeof(int) * kExpertsPerRank));
  CUDA(cudaMalloc(&dpos, sizeof(int) * kTokens * size));
  CUDA(cudaMalloc(&dslot, sizeof(int) * (size_t)rows));
  CUDA(cudaMalloc(&drecvCounts, sizeof(int) * size));

  for (round = 0; round < kRounds; ++round) {
    const int tokens = tokensOf(round, rank);
    int b, h, k, r, row = 0, expertRows[kExpertsPerRank] = {0};
    ncclepHTDispatchArgs_t d;
    ncclepHTCombineArgs_t c;
    fillInputs(round, rank, numExperts, hx, hidx);
    for (b = 0; b < tokens; ++b)
      for (k = 0; k < kTopk; ++k) hw[b * kTopk + k] = weightOf(round, rank, b, k);
    CUDA(copyInputs(dx, didx, dw, hx, hidx, hw));

    INIT_ARGS(d, NCCLEP_HT_ARGS_VERSION);
    d.numTokens = tokens;
    d.hidden = kHidden;
    d.topk = kTopk;
    d.x = dx;
    d.topkIdx = didx;
    d.topkIdxBits = 64;
    d.topkWeights = dw;
    d.layout = NCCLEP_HT_LAYOUT_FLAT;
    d.alignment = 1;
    d.numRows = rows;
    d.recvX = drecv;
    d.recvTopkIdx = dridx;
    d.recvTopkIdxBits = 64; /* int64, like topkIdx */
    d.recvTopkWeights = drw;
    d.numRecv = dnum;
    d.expertCounts = dcounts;
    d.sendPos = dpos;
    d.recvSlot = dslot;
    d.recvCounts = drecvCounts;
    CHECK(ncclepHTDispatch(group, &d, stream));

    /* Identity experts: combine the received rows themselves. */
    INIT_ARGS(c, NCCLEP_HT_ARGS_VERSION);
    c.numTokens = tokens;
    c.hidden = kHidden;
    c.topk = kTopk;
    c.numRows = rows;
    c.x = drecv;
    c.sendPos = dpos;
    c.recvSlot = dslot;
    c.recvCounts = drecvCounts;
    c.recvTopkIdx = dridx;
    c.recvTopkIdxBits = 64;
    c.out = dy;
    CHECK(ncclepHTCombine(group, &c, stream));
    CUDA(cudaStreamSynchronize(stream));
    if (deviceErrorReported(group, rank)) goto done;
    CUDA(cudaMemcpy(&hnum, dnum, sizeof(int), cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hcounts, dcounts, sizeof(hcounts), cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hrecvCounts, drecvCounts, sizeof(int) * size, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hrecv, drecv, sizeof(uint16_t) * (size_t)rows * kHidden, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hridx, dridx, sizeof(int64_t) * (size_t)rows * kTopk, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hrw, drw, sizeof(float) * (size_t)rows * kTopk, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hy, dy, sizeof(uint16_t) * kTokens * kHidden, cudaMemcpyDeviceToHost));

    /* Rows: (source rank, token) ascending over the tokens that chose one of our experts. */
    for (r = 0; r < size; ++r) {
      int fromR = 0;
      for (b = 0; b < tokensOf(round, r); ++b) {
        if (!(destinations(round, r, b, numExperts) >> rank & 1u)) continue;
        for (h = 0; h < kHidden; ++h) bad += hrecv[(size_t)row * kHidden + h] != inputValue(round, r, b, h);
        for (k = 0; k < kTopk; ++k) {
          const int64_t e = expertOf(round, r, b, k, numExperts);
          const int local = e >= 0 && e / kExpertsPerRank == rank ? (int)(e % kExpertsPerRank) : -1;
          bad += hridx[(size_t)row * kTopk + k] != local;
          bad += hrw[(size_t)row * kTopk + k] != (local >= 0 ? weightOf(round, r, b, k) : 0.0f);
          if (local >= 0) ++expertRows[local];
        }
        ++row;
        ++fromR;
      }
      if (hrecvCounts[r] != fromR) {
        fprintf(stderr, "[rank %d] round %d: %d tokens from rank %d, expected %d\n", rank, round, hrecvCounts[r], r,
                fromR);
        ++bad;
      }
    }
    if (hnum != row) {
      fprintf(stderr, "[rank %d] round %d: num_recv %d, expected %d\n", rank, round, hnum, row);
      ++bad;
    }
    for (k = 0; k < kExpertsPerRank; ++k) bad += hcounts[k] != expertRows[k];
    /* Combine: each token comes back once from every rank it went to. */
    for (b = 0; b < tokens; ++b) {
      const unsigned dests = destinations(round, rank, b, numExperts);
      const float copies = (float)__builtin_popcount(dests);
      for (h = 0; h < kHidden; ++h) {
        const float want = copies * fromBf16(hx[b * kHidden + h]);
        const float got = fromBf16(hy[b * kHidden + h]);
        if (fabsf(got - want) > 1e-2f * (fabsf(want) + 1e-2f)) ++bad;
      }
    }
  }
  if (bad == 0) {
    printf("[rank %d] HT dispatch and combine: %d rounds, every row, id, weight and count as expected\n", rank,
           kRounds);
    status = 0;
  } else {
    fprintf(stderr, "[rank %d] HT check FAILED: %ld mismatches\n", rank, bad);
  }

done:
  if (group != NULL && ncclepGroupDestroy(group) != ncclepSuccess) status = 1;
  cudaFree(dx);
  cudaFree(dy);
  cudaFree(didx);
  cudaFree(dw);
  cudaFree(drecv);
  cudaFree(dridx);
  cudaFree(drw);
  cudaFree(dnum);
  cudaFree(dcounts);
  cudaFree(dpos);
  cudaFree(dslot);
  cudaFree(drecvCounts);
  if (stream != NULL) cudaStreamDestroy(stream);
  free(hx);
  free(hy);
  free(hrecv);
  free(hidx);
  free(hw);
  free(hrw);
  free(hridx);
  free(hrecvCounts);
  if (wroteId) unlink(argv[1]);
  return status;
}
