/*
 * LL dispatch and combine through the C API alone (no Python, no torch), checked on every rank.
 *
 * Build:  make                 Run:  mpirun -np 4 build/ll_example /tmp/ncclep_id.$$
 *
 * Inputs are a pure function of (rank, token, channel), so every rank can rebuild every other
 * rank's tokens and check what it received without exchanging anything: expert counts, the row
 * order (source rank, then token), every payload byte. The experts are the identity and the
 * weights sum to 1, so combine must give back each token (within bf16 rounding). Two rounds of
 * calls run (both buffer parities). Exits nonzero on any mismatch.
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

int main(int argc, char** argv) {
  int size = envInt("OMPI_COMM_WORLD_SIZE", 1), localRank = envInt("OMPI_COMM_WORLD_LOCAL_RANK", 0);
  int status = 1, wroteId = 0, round;
  const int numExperts = kExpertsPerRank * size, rows = size * kTokens;
  ncclepGroup_t group = NULL;
  ncclepUniqueId id;
  uint16_t *hx = NULL, *hy = NULL, *hrecv = NULL;
  int64_t* hidx = NULL;
  float* hw = NULL;
  int hcounts[kExpertsPerRank];
  void *dx = NULL, *didx = NULL, *dw = NULL, *drecv = NULL, *dcounts = NULL, *dslots = NULL, *drows = NULL,
       *drweights = NULL, *dslotCounts = NULL, *dy = NULL;
  cudaStream_t stream = NULL;
  long bad = 0;

  rank = envInt("OMPI_COMM_WORLD_RANK", 0);
  if (argc != 2) {
    fprintf(stderr, "usage: mpirun -np N %s <unique-id file path (must not exist)>\n", argv[0]);
    return 2;
  }
  if (shareUniqueId(rank, argv[1], &id, &wroteId) != 0) return 1;
  if (openExampleGroup(NCCLEP_MODE_LL, id, size, rank, localRank, &group, &stream) != 0) goto done;

  hx = malloc(sizeof(uint16_t) * kTokens * kHidden);
  hy = malloc(sizeof(uint16_t) * kTokens * kHidden);
  hrecv = malloc(sizeof(uint16_t) * (size_t)kExpertsPerRank * rows * kHidden);
  hidx = malloc(sizeof(int64_t) * kTokens * kTopk);
  hw = malloc(sizeof(float) * kTokens * kTopk);
  if (!hx || !hy || !hrecv || !hidx || !hw) goto done;
  CUDA(cudaMalloc(&dx, sizeof(uint16_t) * kTokens * kHidden));
  CUDA(cudaMalloc(&dy, sizeof(uint16_t) * kTokens * kHidden));
  CUDA(cudaMalloc(&didx, sizeof(int64_t) * kTokens * kTopk));
  CUDA(cudaMalloc(&dw, sizeof(float) * kTokens * kTopk));
  CUDA(cudaMalloc(&drecv, sizeof(uint16_t) * (size_t)kExpertsPerRank * rows * kHidden));
  CUDA(cudaMalloc(&dcounts, sizeof(int) * kExpertsPerRank));
  CUDA(cudaMalloc(&dslots, sizeof(int) * kTokens * size));
  CUDA(cudaMalloc(&drows, sizeof(int) * rows * kTopk));
  CUDA(cudaMalloc(&drweights, sizeof(float) * rows * kTopk));
  CUDA(cudaMalloc(&dslotCounts, sizeof(int) * size));

  for (round = 0; round < kRounds; ++round) {
    const int tokens = tokensOf(round, rank);
    int b, h, k, e, r;
    ncclepLLDispatchArgs_t d;
    ncclepLLCombineArgs_t c;
    fillInputs(round, rank, numExperts, hx, hidx);
    for (b = 0; b < tokens; ++b) {
      int valid = 0;
      for (k = 0; k < kTopk; ++k) valid += hidx[b * kTopk + k] >= 0;
      for (k = 0; k < kTopk; ++k) hw[b * kTopk + k] = hidx[b * kTopk + k] >= 0 ? 1.0f / (float)valid : 0.0f;
    }
    CUDA(copyInputs(dx, didx, dw, hx, hidx, hw));

    INIT_ARGS(d, NCCLEP_LL_ARGS_VERSION);
    d.numTokens = tokens;
    d.hidden = kHidden;
    d.topk = kTopk;
    d.x = dx;
    d.topkIdx = didx;
    d.topkIdxBits = 64;
    d.topkWeights = dw;
    d.recvX = drecv;
    d.expertCounts = dcounts;
    d.sendSlots = dslots;
    d.recvRows = drows;
    d.recvWeights = drweights;
    d.recvSlotCounts = dslotCounts;
    CHECK(ncclepLLDispatch(group, &d, stream));

    /* Identity experts: combine the received rows themselves. */
    INIT_ARGS(c, NCCLEP_LL_ARGS_VERSION);
    c.numTokens = tokens;
    c.hidden = kHidden;
    c.expertOut = drecv;
    c.sendSlots = dslots;
    c.recvRows = drows;
    c.recvWeights = drweights;
    c.recvSlotCounts = dslotCounts;
    c.out = dy;
    CHECK(ncclepLLCombine(group, &c, stream));
    CUDA(cudaStreamSynchronize(stream));
    if (deviceErrorReported(group, rank)) goto done;
    CUDA(cudaMemcpy(hcounts, dcounts, sizeof(hcounts), cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hrecv, drecv, sizeof(uint16_t) * (size_t)kExpertsPerRank * rows * kHidden,
                    cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hy, dy, sizeof(uint16_t) * kTokens * kHidden, cudaMemcpyDeviceToHost));

    /* Rebuild, for each local expert, the rows it must hold: (source rank, token) ascending. */
    for (e = 0; e < kExpertsPerRank; ++e) {
      const int global = rank * kExpertsPerRank + e;
      int row = 0;
      for (r = 0; r < size; ++r)
        for (b = 0; b < tokensOf(round, r); ++b)
          for (k = 0; k < kTopk; ++k)
            if (expertOf(round, r, b, k, numExperts) == global) {
              const uint16_t* got = hrecv + ((size_t)e * rows + row) * kHidden;
              for (h = 0; h < kHidden; ++h) bad += got[h] != inputValue(round, r, b, h);
              ++row;
            }
      if (hcounts[e] != row) {
        fprintf(stderr, "[rank %d] round %d: expert %d holds %d rows, expected %d\n", rank, round, e, hcounts[e],
                row);
        ++bad;
      }
    }
    for (b = 0; b < tokens; ++b) {
      int any = 0;
      for (k = 0; k < kTopk; ++k) any |= hidx[b * kTopk + k] >= 0;
      for (h = 0; h < kHidden; ++h) {
        const float want = any ? fromBf16(hx[b * kHidden + h]) : 0.0f;
        const float got = fromBf16(hy[b * kHidden + h]);
        if (fabsf(got - want) > 1e-2f * (fabsf(want) + 1e-2f)) ++bad;
      }
    }
  }
  if (bad == 0) {
    printf("[rank %d] LL dispatch and combine: %d rounds, every row and count as expected\n", rank, kRounds);
    status = 0;
  } else {
    fprintf(stderr, "[rank %d] LL check FAILED: %ld mismatches\n", rank, bad);
  }

done:
  if (group != NULL && ncclepGroupDestroy(group) != ncclepSuccess) status = 1;
  cudaFree(dx);
  cudaFree(dy);
  cudaFree(didx);
  cudaFree(dw);
  cudaFree(drecv);
  cudaFree(dcounts);
  cudaFree(dslots);
  cudaFree(drows);
  cudaFree(drweights);
  cudaFree(dslotCounts);
  if (stream != NULL) cudaStreamDestroy(stream);
  free(hx);
  free(hy);
  free(hrecv);
  free(hidx);
  free(hw);
  if (wroteId) unlink(argv[1]);
  return status;
}
