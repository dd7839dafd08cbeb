/* Shared by the LL and HT C API examples: sizes, inputs that are a pure function of (round, rank,
 * token, channel) so every rank can rebuild every other rank's tokens, and bf16 conversions. */
#ifndef NCCLEP_EXAMPLE_INPUTS_H_
#define NCCLEP_EXAMPLE_INPUTS_H_

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "ncclep.h"

enum { kTokens = 48, kHidden = 1024, kTopk = 4, kExpertsPerRank = 4, kRounds = 2 };

/* bf16 from float, round to nearest even (inputs here are finite). */
static uint16_t toBf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

static float fromBf16(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* Token b of rank r in round `round`: its channels and its experts. */
static uint16_t inputValue(int round, int r, int b, int h) {
  return toBf16((float)((r * 131 + b * 17 + h * 7 + round * 5) % 257) / 64.0f - 2.0f);
}

static int tokensOf(int round, int r) { return (r + round) % 3 == 1 ? 0 : kTokens - 5 * r; }

static int64_t expertOf(int round, int r, int b, int k, int numExperts) {
  if ((b + k + round) % 7 == 3) return -1; /* some choices are masked */
  return (int64_t)((r * 13 + b * 5 + round + k) % numExperts);
}

/* Fills this rank's tokens of round `round` (x [kTokens, kHidden] bf16, idx [kTokens, kTopk]). */
static void fillInputs(int round, int r, int numExperts, uint16_t* x, int64_t* idx) {
  int b, h, k;
  for (b = 0; b < tokensOf(round, r); ++b) {
    for (h = 0; h < kHidden; ++h) x[b * kHidden + h] = inputValue(round, r, b, h);
    for (k = 0; k < kTopk; ++k) idx[b * kTopk + k] = expertOf(round, r, b, k, numExperts);
  }
}

/* After a synchronised call: prints and returns nonzero if a kernel reported an error. */
static int deviceErrorReported(ncclepGroup_t group, int r) {
  ncclepDeviceError_t derr;
  if (ncclepGroupGetDeviceError(group, &derr) != ncclepSuccess) return 1;
  if (derr.code == 0) return 0;
  fprintf(stderr, "[rank %d] device error %d (phase %d, peer %d)\n", r, derr.code, derr.phase, derr.peer);
  return 1;
}

#endif /* NCCLEP_EXAMPLE_INPUTS_H_ */
