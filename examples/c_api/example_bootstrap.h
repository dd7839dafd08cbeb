/* Shared by the C API examples: rank and size from Open MPI's environment, and the unique id
 * passed through a file (rank 0 writes it atomically, the others poll for it). */
#ifndef NCCLEP_EXAMPLE_BOOTSTRAP_H_
#define NCCLEP_EXAMPLE_BOOTSTRAP_H_

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ncclep.h"

static int envInt(const char* name, int fallback) {
  const char* v = getenv(name);
  return (v != NULL && v[0] != '\0') ? atoi(v) : fallback;
}

static void sleepMs(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

static int writeId(const char* path, const ncclepUniqueId* id) {
  char tmp[4096];
  FILE* f;
  snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
  f = fopen(tmp, "wb");
  if (f == NULL) return -1;
  if (fwrite(id, sizeof(*id), 1, f) != 1) {
    fclose(f);
    return -1;
  }
  if (fclose(f) != 0) return -1;
  return rename(tmp, path); /* atomic: readers never see a partial id */
}

static int readId(const char* path, ncclepUniqueId* id, int timeoutMs) {
  int waited;
  for (waited = 0; waited < timeoutMs; waited += 10) {
    FILE* f = fopen(path, "rb");
    if (f != NULL) {
      size_t n = fread(id, sizeof(*id), 1, f);
      fclose(f);
      if (n == 1) return 0;
    }
    sleepMs(10);
  }
  return -1;
}

/* Rank 0 creates the unique id and writes it to `path`; the others wait for it there. */
static int shareUniqueId(int myRank, const char* path, ncclepUniqueId* id, int* wroteId) {
  if (myRank == 0) {
    if (ncclepGetUniqueId(id) != ncclepSuccess || writeId(path, id) != 0) {
      fprintf(stderr, "[rank 0] cannot create or write the unique id to %s\n", path);
      return -1;
    }
    *wroteId = 1;
    return 0;
  }
  if (readId(path, id, 120000) != 0) {
    fprintf(stderr, "[rank %d] no unique id in %s\n", myRank, path);
    return -1;
  }
  return 0;
}

/* A versioned args struct of the C API, zeroed, for a whole call (both phases). */
#define INIT_ARGS(a, argsVersion)   \
  do {                              \
    memset(&(a), 0, sizeof(a));     \
    (a).size = sizeof(a);           \
    (a).version = (argsVersion);    \
    (a).phases = NCCLEP_PHASE_ALL;  \
  } while (0)

/* CHECK / CUDA: on failure, print the call and jump to the caller's `done:` label (`rank` must be
 * in scope). */
#define CHECK(call)                                                                          \
  do {                                                                                       \
    ncclepResult_t res_ = (call);                                                            \
    if (res_ != ncclepSuccess) {                                                             \
      fprintf(stderr, "[rank %d] %s: %s\n  %s\n", rank, #call, ncclepGetErrorString(res_),   \
              ncclepGetLastError());                                                         \
      goto done;                                                                             \
    }                                                                                        \
  } while (0)

#define CUDA(call)                                                                           \
  do {                                                                                       \
    cudaError_t err_ = (call);                                                               \
    if (err_ != cudaSuccess) {                                                               \
      fprintf(stderr, "[rank %d] %s: %s\n", rank, #call, cudaGetErrorString(err_));           \
      goto done;                                                                             \
    }                                                                                        \
  } while (0)

#endif /* NCCLEP_EXAMPLE_BOOTSTRAP_H_ */
