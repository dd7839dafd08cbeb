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

/* Picks this rank's GPU, makes a stream, and creates the group for the examples' sizes. */
static int openExampleGroup(int mode, ncclepUniqueId id, int size, int r, int localRank, ncclepGroup_t* group,
                            cudaStream_t* stream) {
  ncclepGroupConfig_t config = NCCLEP_GROUP_CONFIG_INITIALIZER;
  int devices = 0;
  ncclepResult_t res;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0 ||
      cudaSetDevice(localRank % devices) != cudaSuccess || cudaStreamCreate(stream) != cudaSuccess) {
    fprintf(stderr, "[rank %d] no usable CUDA device\n", r);
    return -1;
  }
  config.mode = mode;
  config.numExperts = kExpertsPerRank * size;
  config.maxTokensPerRank = kTokens;
  config.hidden = kHidden;
  config.maxTopk = kTopk;
  config.timeoutSeconds = 30.0;
  res = ncclepGroupCreate(group, id, size, r, localRank % devices, &config);
  if (res != ncclepSuccess) {
    fprintf(stderr, "[rank %d] ncclepGroupCreate: %s\n  %s\n", r, ncclepGetErrorString(res), ncclepGetLastError());
    return -1;
  }
  return 0;
}

/* Copies this rank's inputs (x, top-k ids, weights) to the device. */
static cudaError_t copyInputs(void* dx, void* didx, void* dw, const uint16_t* hx, const int64_t* hidx,
                              const float* hw) {
  cudaError_t e = cudaMemcpy(dx, hx, sizeof(uint16_t) * kTokens * kHidden, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaMemcpy(didx, hidx, sizeof(int64_t) * kTokens * kTopk, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaMemcpy(dw, hw, sizeof(float) * kTokens * kTopk, cudaMemcpyHostToDevice);
  return e;
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
