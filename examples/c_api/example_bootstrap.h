/* Shared by the C API examples: rank and size from Open MPI's environment, and the unique id
 * passed through a file (rank 0 writes it atomically, the others poll for it). */
#ifndef NCCLEP_EXAMPLE_BOOTSTRAP_H_
#define NCCLEP_EXAMPLE_BOOTSTRAP_H_

#include <stdio.h>
#include <stdlib.h>
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

#endif /* NCCLEP_EXAMPLE_BOOTSTRAP_H_ */
