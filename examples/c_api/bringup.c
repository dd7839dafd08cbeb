/*
 * Bring-up check of the ncclep C API, without Python or torch: creates a group,
 * prints its info, runs the LSA check three times, destroys the group.
 * Exits nonzero on any failure (including "device API unavailable").
 *
 * Build (see Makefile):   make            (builds build/libncclep.so and build/bringup)
 * Run:                    mpirun -np 4 build/bringup /tmp/ncclep_id.$$
 *
 * Rank and size come from Open MPI's environment (OMPI_COMM_WORLD_RANK/SIZE,
 * OMPI_COMM_WORLD_LOCAL_RANK picks the GPU). The unique id travels through the
 * file named on the command line: rank 0 writes it, the others poll for it. Use a
 * path that does not exist yet (e.g. with $$ as above); rank 0 removes it.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ncclep.h"

static int rank = -1;

#include "example_bootstrap.h"

int main(int argc, char** argv) {
  int status = 1, nRanks, device, i, ok, wroteId = 0;
  ncclepUniqueId id;
  ncclepGroup_t group = NULL;
  ncclepGroupConfig_t config = NCCLEP_GROUP_CONFIG_INITIALIZER;
  ncclepGroupInfo_t info = NCCLEP_GROUP_INFO_INITIALIZER;

  if (argc != 2) {
    fprintf(stderr, "usage: mpirun -np N %s <unique-id file path (must not exist)>\n", argv[0]);
    return 2;
  }
  rank = envInt("OMPI_COMM_WORLD_RANK", envInt("RANK", 0));
  nRanks = envInt("OMPI_COMM_WORLD_SIZE", envInt("WORLD_SIZE", 1));
  device = envInt("OMPI_COMM_WORLD_LOCAL_RANK", envInt("LOCAL_RANK", rank));

  if (shareUniqueId(rank, argv[1], &id, &wroteId) != 0) return 1;

  config.mode = NCCLEP_MODE_LL;
  config.numExperts = 32 * nRanks;
  config.maxTokensPerRank = 128;
  config.hidden = 7168;
  config.maxTopk = 8;
  config.timeoutSeconds = 100.0;

  CHECK(ncclepGroupCreate(&group, id, nRanks, rank, device, &config));
  CHECK(ncclepGroupGetInfo(group, &info));
  printf("[rank %d] nRanks %d device %d lsaRank %d lsaSize %d nLsaTeams %d deviceApi %d gin %d "
         "windowBytes %zu nccl %d\n",
         info.rank, info.nRanks, info.cudaDevice, info.lsaRank, info.lsaSize, info.nLsaTeams,
         info.deviceApiAvailable, info.ginEnabled, info.windowBytes, info.ncclVersion);
  if (!info.deviceApiAvailable) {
    fprintf(stderr, "[rank %d] device API unavailable: %s\n", rank, ncclepGetLastError());
    goto done;
  }
  for (i = 0; i < 3; ++i) {
    CHECK(ncclepGroupCheckLsa(group, (cudaStream_t)0, &ok));
    printf("[rank %d] LSA check %d: %s\n", rank, i, ok ? "ok" : "FAILED");
    if (!ok) {
      fprintf(stderr, "[rank %d] %s\n", rank, ncclepGetLastError());
      goto done;
    }
  }
  status = 0;

done:
  /* After a successful (collective) create every rank has read the id. */
  if (wroteId) unlink(argv[1]);
  if (group != NULL && ncclepGroupDestroy(group) != ncclepSuccess) {
    fprintf(stderr, "[rank %d] ncclepGroupDestroy: %s\n", rank, ncclepGetLastError());
    status = 1;
  }
  return status;
}
