/*
 * ncclep — expert-parallel MoE dispatch/combine on NCCL's Device API.
 *
 * C API. Usable from C (C99) and C++ without torch or Python. Every function
 * returns an ncclepResult_t; on failure a detailed message is available from
 * ncclepGetLastError() in the calling thread. No function exits, aborts or
 * throws on bad input.
 */
#ifndef NCCLEP_H_
#define NCCLEP_H_

#include <stddef.h>
#include <cuda_runtime_api.h>

#define NCCLEP_MAJOR 0
#define NCCLEP_MINOR 1
#define NCCLEP_PATCH 0
#define NCCLEP_VERSION(X, Y, Z) ((X) * 10000 + (Y) * 100 + (Z))
#define NCCLEP_VERSION_CODE NCCLEP_VERSION(NCCLEP_MAJOR, NCCLEP_MINOR, NCCLEP_PATCH)

#if defined(__GNUC__)
#define NCCLEP_API __attribute__((visibility("default")))
#else
#define NCCLEP_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  ncclepSuccess = 0,
  ncclepInvalidArgument = 1, /* bad argument or config field; the group (if any) is unchanged */
  ncclepCudaError = 2,       /* a CUDA runtime call failed */
  ncclepNcclError = 3,       /* an NCCL call failed */
  ncclepInternalError = 4,   /* a bug in ncclep */
  ncclepUnsupported = 5,     /* not available here (e.g. no NCCL Device API on this comm) */
  ncclepTimeout = 6,         /* a wait passed its deadline; the group is no longer usable */
  ncclepOutOfMemory = 7,     /* device or host allocation failed */
  ncclepInvalidUsage = 8,    /* call not allowed in this state (closed/broken group, stream capture) */
  ncclepDeviceError = 9,     /* reserved: error recorded by a kernel in the group's error word */
  ncclepNumResults = 10
} ncclepResult_t;

#define NCCLEP_MODE_LL 0 /* low latency (decode) */
#define NCCLEP_MODE_HT 1 /* high throughput (training, prefill) */

/* Opaque id shared by all ranks of a group (same size as ncclUniqueId). */
#define NCCLEP_UNIQUE_ID_BYTES 128
typedef struct {
  char internal[NCCLEP_UNIQUE_ID_BYTES];
} ncclepUniqueId;

/* A group belongs to one CUDA device; use it from one thread at a time. */
typedef struct ncclepGroup* ncclepGroup_t;

/*
 * Group configuration. Always start from NCCLEP_GROUP_CONFIG_INITIALIZER; the
 * leading size/magic/version let later releases extend the struct. A config
 * whose size, magic or version this library does not know is rejected.
 * All ranks of a group must pass the same values.
 */
#define NCCLEP_GROUP_CONFIG_MAGIC 0x6e63eb01u
#define NCCLEP_GROUP_CONFIG_VERSION 1u

typedef struct ncclepGroupConfig_v1 {
  size_t size;          /* sizeof(ncclepGroupConfig_t) */
  unsigned int magic;   /* NCCLEP_GROUP_CONFIG_MAGIC */
  unsigned int version; /* NCCLEP_GROUP_CONFIG_VERSION */
  int mode;             /* NCCLEP_MODE_LL or NCCLEP_MODE_HT */
  int numExperts;       /* total experts; a positive multiple of nRanks */
  int maxTokensPerRank; /* most tokens any rank passes to one dispatch */
  int hidden;           /* hidden size (bf16 elements); a positive multiple of 8 */
  int maxTopk;          /* largest top-k used; 1..numExperts */
  int numSms;           /* SMs the kernels may use; 0 = library default */
  double timeoutSeconds;/* deadline of every device-side (and host-side) wait; > 0 */
  size_t windowBytes;   /* symmetric window size; 0 = the buffer plan's; else >= the plan, rounded up to 2 MiB */
  int virtualNodes;     /* 0 or 1 = off (then NCCLEP_VIRTUAL_NODES is read); n > 1 splits the
                           NVLink team into n virtual nodes: peers on other ones take the
                           network path, emulated over LSA */
} ncclepGroupConfig_t;

#define NCCLEP_GROUP_CONFIG_INITIALIZER {                                  \
  sizeof(ncclepGroupConfig_t), /* size */                                  \
  NCCLEP_GROUP_CONFIG_MAGIC,   /* magic */                                 \
  NCCLEP_GROUP_CONFIG_VERSION, /* version */                               \
  NCCLEP_MODE_LL,              /* mode */                                  \
  0,                           /* numExperts (must be set) */              \
  0,                           /* maxTokensPerRank (must be set) */        \
  0,                           /* hidden (must be set) */                  \
  8,                           /* maxTopk */                               \
  0,                           /* numSms */                                \
  100.0,                       /* timeoutSeconds */                        \
  0,                           /* windowBytes */                           \
  0                            /* virtualNodes */                          \
}

/*
 * Group information. Initialise with NCCLEP_GROUP_INFO_INITIALIZER (the
 * library checks size and version) before calling ncclepGroupGetInfo.
 */
#define NCCLEP_GROUP_INFO_VERSION 2u

typedef struct ncclepGroupInfo_v2 {
  size_t size;            /* sizeof(ncclepGroupInfo_t) */
  unsigned int version;   /* NCCLEP_GROUP_INFO_VERSION */
  int rank;
  int nRanks;
  int cudaDevice;
  int lsaRank;            /* rank inside our LSA (NVLink load/store) team; -1 if unknown */
  int lsaSize;            /* ranks in our LSA team; 0 if unknown (device API unavailable) */
  int nLsaTeams;          /* number of LSA teams (= nodes); 0 if unknown */
  int deviceApiAvailable; /* 1 if the NCCL device communicator was created */
  int ginEnabled;         /* 1 if GIN (network) resources were created (nLsaTeams > 1 only) */
  size_t windowBytes;     /* bytes of the symmetric window on every rank */
  int ncclVersion;        /* ncclGetVersion() of the loaded NCCL */
  int nodeSize;           /* ranks per node as the kernels see it: lsaSize, divided by
                             NCCLEP_VIRTUAL_NODES on one host; peers off our node take the
                             network path (GIN, or its emulation over LSA) */
  int kernelSms;          /* SMs the group's kernels use (numSms, the mode's default, the device's) */
  int ncclHeaderVersion;  /* NCCL_VERSION_CODE of the headers ncclep was built against */
} ncclepGroupInfo_t;

#define NCCLEP_GROUP_INFO_INITIALIZER \
  { sizeof(ncclepGroupInfo_t), NCCLEP_GROUP_INFO_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }

/* NCCLEP_VERSION_CODE of the library (may differ from the header's). */
NCCLEP_API ncclepResult_t ncclepGetVersion(int* version);

/* Static name-like description of a status code; never NULL. */
NCCLEP_API const char* ncclepGetErrorString(ncclepResult_t result);

/* Detailed message of the last failure in this thread ("" if none). The
 * pointer stays valid until the next ncclep call in this thread. */
NCCLEP_API const char* ncclepGetLastError(void);

/* Fresh id, to be created by one rank and sent to all others. */
NCCLEP_API ncclepResult_t ncclepGetUniqueId(ncclepUniqueId* uniqueId);

/* Bytes of the symmetric window the buffer plan asks for (a multiple of 2 MiB). */
NCCLEP_API ncclepResult_t ncclepComputeWindowBytes(const ncclepGroupConfig_t* config, int nRanks,
                                                   size_t* bytes);

/*
 * Collective over all nRanks ranks: creates the NCCL communicator on
 * cudaDevice, the symmetric window and the NCCL device communicator.
 * If only the device communicator cannot be created, the group is still
 * created (ncclepSuccess) with deviceApiAvailable = 0, and the reason is left
 * in ncclepGetLastError(). On any failure everything created is torn down and
 * *group is NULL. The calling thread's current CUDA device is preserved.
 */
NCCLEP_API ncclepResult_t ncclepGroupCreate(ncclepGroup_t* group, ncclepUniqueId uniqueId,
                                            int nRanks, int rank, int cudaDevice,
                                            const ncclepGroupConfig_t* config);

/* Collective. Releases everything; NULL is a no-op. The handle is invalid
 * afterwards even if an error is returned. */
NCCLEP_API ncclepResult_t ncclepGroupDestroy(ncclepGroup_t group);

NCCLEP_API ncclepResult_t ncclepGroupGetInfo(ncclepGroup_t group, ncclepGroupInfo_t* info);

/*
 * Collective bring-up check of LSA (NVLink load/store) transfers: every rank
 * stores a call-specific pattern into each LSA peer's window, an LSA barrier
 * orders them, and every rank verifies what its peers wrote. Synchronises
 * `stream`. *ok = 1 if every word matched; otherwise *ok = 0 and the first
 * mismatch is described in ncclepGetLastError() (the call itself succeeds).
 * Waits at most timeoutSeconds; on timeout returns ncclepTimeout and the group
 * can only be destroyed.
 */
NCCLEP_API ncclepResult_t ncclepGroupCheckLsa(ncclepGroup_t group, cudaStream_t stream, int* ok);

/*
 * Every rank of a group, in this process and on one device, without NCCL: for testing the
 * kernels' protocols where one GPU is all there is. groups[r] (nRanks entries) is rank r's group,
 * made as ncclepGroupCreate would make it on one NVLink host of nRanks GPUs; config->virtualNodes
 * or NCCLEP_VIRTUAL_NODES splits it into nodes as there. Every rank's kernels must run at once:
 * issue each rank's calls on a stream of its own, before waiting on any. So that they fit, the
 * ranks' kernels together may use at most the device's SMs (config->numSms; ncclepInvalidArgument
 * otherwise). The ranks' streams need hardware queues of their own: CUDA_DEVICE_MAX_CONNECTIONS
 * (default 8) above nRanks, or a rank may queue behind a peer that waits for it. Not for speed:
 * every peer is this GPU's own memory. ncclepGroupCheckLsa is not available on these groups.
 * Destroy each with ncclepGroupDestroy (not collective here).
 */
NCCLEP_API ncclepResult_t ncclepLoopbackCreate(ncclepGroup_t* groups, int nRanks, int cudaDevice,
                                               const ncclepGroupConfig_t* config);

/* ------------------------------------------------------------------------------------------
 * What the kernels can serve. These need no group, device or NCCL call: bindings and launchers
 * ask here instead of restating the limits (the Python package reads them through ncclep._C).
 * ------------------------------------------------------------------------------------------ */
#define NCCLEP_LIMITS_VERSION 1u

typedef struct ncclepLimits_v1 {
  size_t size;              /* sizeof(ncclepLimits_t) */
  unsigned int version;     /* NCCLEP_LIMITS_VERSION */
  int maxTopk;              /* largest maxTopk a config may name (a sanity bound) */
  int fp8Block;             /* channels per fp8 scale */
  int llMaxRanks;
  int llMaxExperts;
  int llMaxTopk;
  int llMaxEntries;         /* maxTokensPerRank * maxTopk */
  int llHiddenMultiple;
  int htMaxRanks;
  int htMaxExperts;
  int htMaxLocalExperts;
  int htMaxTopk;
  int htHiddenMultiple;
  int htDefaultSms;         /* SMs of the HT kernels when the config's numSms is 0 */
  int htMinSms;             /* fewest SMs of the HT kernels on one node */
  int htMinSmsHierarchical; /* and across (virtual) nodes */
} ncclepLimits_t;

#define NCCLEP_LIMITS_INITIALIZER { sizeof(ncclepLimits_t), NCCLEP_LIMITS_VERSION }

NCCLEP_API ncclepResult_t ncclepGetLimits(ncclepLimits_t* limits);

/* The topology a group runs on, as ncclepGroupGetInfo reports it once the group exists. */
#define NCCLEP_TOPOLOGY_VERSION 1u

typedef struct ncclepTopology_v1 {
  size_t size;            /* sizeof(ncclepTopology_t) */
  unsigned int version;   /* NCCLEP_TOPOLOGY_VERSION */
  int nRanks;
  int nLsaTeams;          /* NVLink (LSA) teams the ranks form: the real nodes */
  int ginEnabled;         /* network resources for peers off our LSA team (nLsaTeams > 1) */
  int deviceApiAvailable; /* the NCCL device communicator exists */
} ncclepTopology_t;

#define NCCLEP_TOPOLOGY_INITIALIZER { sizeof(ncclepTopology_t), NCCLEP_TOPOLOGY_VERSION, 0, 0, 0, 0 }

/* *supported = 1 when the kernels of config->mode can serve a group of this config on this
 * topology; otherwise 0, and `why` (whyBytes long, may be NULL when whyBytes is 0) says why.
 * `why` is "" when supported. */
NCCLEP_API ncclepResult_t ncclepQueryKernelSupport(const ncclepGroupConfig_t* config,
                                                   const ncclepTopology_t* topology, int* supported,
                                                   char* why, size_t whyBytes);
/* The same for an existing group: its topology, device API state and window plan. */
NCCLEP_API ncclepResult_t ncclepGroupQueryKernelSupport(ncclepGroup_t group, int* supported, char* why,
                                                        size_t whyBytes);

/* Name of a device-error phase (ncclepDeviceError_t.phase), e.g. "ht_dispatch send"; never NULL. */
NCCLEP_API const char* ncclepPhaseName(int phase);

/* ------------------------------------------------------------------------------------------
 * Rejected calls. A rank that finds its own arguments of a call bad (on the host) still takes part
 * in the call, with `rejectCode` in the op args set to one of the reasons below: it moves no
 * payload, and the code reaches every peer in the words the peers wait on anyway (counts, message
 * flags, signals), so nobody waits for a deadline. A peer that reads it records device error 5
 * (peer = the rejecting rank, value = the code), treats that rank's part of the call as empty and
 * completes; that call's outputs there lack the rejecting rank's part and must be discarded. Good
 * calls are unchanged: no host synchronisation, no extra wait.
 * ------------------------------------------------------------------------------------------ */
typedef enum {
  ncclepRejectNone = 0,             /* a normal call */
  ncclepRejectBadInput = 1,         /* "bad_input": an invalid argument */
  ncclepRejectType = 2,             /* "type": an argument of the wrong type */
  ncclepRejectDtype = 3,            /* "dtype": a tensor of the wrong dtype */
  ncclepRejectShape = 4,            /* "shape": a tensor of the wrong shape */
  ncclepRejectDevice = 5,           /* "device": a tensor on the wrong device */
  ncclepRejectLayout = 6,           /* "layout": a non-contiguous tensor */
  ncclepRejectTokens = 7,           /* "tokens": more tokens than maxTokensPerRank */
  ncclepRejectHidden = 8,           /* "hidden": a hidden size the group cannot take */
  ncclepRejectTopk = 9,             /* "topk": a top-k the group cannot take */
  ncclepRejectExpertId = 10,        /* "expert_id": an expert id out of range */
  ncclepRejectDuplicateExpert = 11, /* "duplicate_expert": a token naming one expert twice */
  ncclepRejectHandle = 12,          /* "handle": a handle that does not belong to this call */
  ncclepRejectMode = 13,            /* "mode": an op of the other mode */
  ncclepRejectOption = 14,          /* "option": an invalid option */
  ncclepNumRejectReasons = 15
} ncclepRejectReason_t;

/* Name of a reject reason, e.g. "shape" (the quoted names above); "unknown" outside them. */
NCCLEP_API const char* ncclepRejectReasonName(int reason);

/* ------------------------------------------------------------------------------------------
 * LL mode (low latency): dispatch and combine kernels. Every call is collective over the group
 * and enqueued on `stream` without host synchronisation (CUDA-graph capturable). A call may be
 * split into its send half and its receive half (phases), launched separately; the receive half
 * of call n must follow its send half, and calls of one kind follow each other in order.
 * ------------------------------------------------------------------------------------------ */
#define NCCLEP_PHASE_SEND 1
#define NCCLEP_PHASE_RECV 2
#define NCCLEP_PHASE_ALL 3
/* Version 2 added rejectCode, version 3 the dispatch's recvScalesStrides, version 4 the combine's
 * topkWeights, version 5 the dispatch's pow2Scales. The launchers also take earlier versions
 * (sizeof up to the first field the version lacks, which they read as 0); the combine's struct is
 * the same in versions 2 and 3 and in versions 4 and 5, the dispatch's in versions 3 and 4. */
#define NCCLEP_LL_ARGS_VERSION 5u

typedef struct ncclepLLDispatchArgs_v5 {
  size_t size;              /* sizeof(ncclepLLDispatchArgs_t) */
  unsigned int version;     /* NCCLEP_LL_ARGS_VERSION */
  int phases;               /* NCCLEP_PHASE_* */
  int numTokens;            /* B <= maxTokensPerRank (0 allowed) */
  int hidden;               /* H: a multiple of 128, <= the group's hidden */
  int topk;                 /* K: 1..min(maxTopk, 16) */
  const void* x;            /* bf16 [B, H] */
  const void* topkIdx;      /* [B, K] expert ids, -1 = none */
  int topkIdxBits;          /* 32 or 64 */
  const float* topkWeights; /* [B, K] */
  int useFp8;               /* payload: 0 bf16, 1 fp8 e4m3 with one scale per 128 channels */
  int ue8m0;                /* with useFp8: power-of-two scales as UE8M0 bytes instead of fp32 */
  void* recvX;              /* out: [L, R*T, H] bf16 or fp8 */
  void* recvScales;         /* out (fp8): [L, R*T, H/128] fp32 or uint8 */
  int* expertCounts;        /* out: [L] */
  int* sendSlots;           /* out (handle): [B, R] */
  int* recvRows;            /* out (handle): [R, T, maxTopk] */
  float* recvWeights;       /* out (handle): [R, T, maxTopk] */
  int* recvSlotCounts;      /* out (handle): [R] */
  unsigned long long* trace;/* optional, for profiling: [numBlocks][16] %globaltimer stamps (ns)
                               of protocol steps per block, see kernels/ll/ll_params.h; NULL = off */
  int rejectCode;           /* 0, or an ncclepRejectReason_t: this rank rejected the call. phases must
                               be NCCLEP_PHASE_ALL; every other field is ignored: no token is sent,
                               nothing is received, no output is written */
  long long recvScalesStrides[3]; /* (fp8) where the scales go, in 4-byte words: word w of row i of
                               local expert e at (int32_t*)recvScales + e*s[0] + i*s[1] + w*s[2]. A
                               word is one fp32 scale, or with ue8m0 four UE8M0 exponents (groups 4w
                               to 4w+3, lowest byte first; hidden a multiple of 512). All zero: dense
                               [L, R*T, H/128] as above. E.g. {R*T*S, 1, R*T} (S words a row) stores
                               them column-major per expert, the layout grouped GEMMs read with TMA */
  int pow2Scales;           /* with useFp8 and not ue8m0: the scales rounded up to powers of two as
                               with ue8m0 (same fp8 values) but stored as fp32, the values torch's
                               float8_e8m0fnu -> float32 conversion gives the UE8M0 bytes */
} ncclepLLDispatchArgs_t;

typedef struct ncclepLLCombineArgs_v5 {
  size_t size;              /* sizeof(ncclepLLCombineArgs_t) */
  unsigned int version;     /* NCCLEP_LL_ARGS_VERSION */
  int phases;               /* NCCLEP_PHASE_* */
  int numTokens;            /* B of the matching dispatch */
  int hidden;               /* a multiple of 128, <= the group's hidden */
  const void* expertOut;    /* bf16 [L, R*T, hidden] */
  const int* sendSlots;     /* the dispatch's handle */
  const int* recvRows;
  const float* recvWeights;
  const int* recvSlotCounts;
  void* out;                /* out: bf16 [B, hidden] */
  int rejectCode;           /* 0, or an ncclepRejectReason_t: this rank rejected the call. phases must
                               be NCCLEP_PHASE_ALL; every other field is ignored: no row is sent,
                               nothing is written. Without a handle this rank cannot tell what its
                               peers send it, so the kernel finishes once every peer has received its
                               part of this call: no peer may put this call's receive half after a
                               later call of another kind */
  const float* topkWeights; /* with topk > 0: [B, topk] fp32 on this (the token's) rank; choice k of
                               token b is weighted by topkWeights[b, k] instead of the dispatch's
                               weight (k >= topk: 0). The kernel sends them to the expert ranks first
                               (one more step of latency, no host work). May be NULL when B = 0 */
  int topk;                 /* 0: each row is weighted as the dispatch's topkWeights said; else
                               1..maxTopk, the columns of topkWeights. Collective: every rank gives
                               weights in the call (topk > 0, B = 0 included), or none does */
} ncclepLLCombineArgs_t;

/* What a kernel reported instead of trapping: code 0 = nothing. Codes: 1 a wait timed out (phase,
 * peer), 2 an expert id out of range (value), 3 a token named one expert twice (value = token),
 * 4 a protocol error, 5 rank `peer` rejected its arguments of the call (value = its
 * ncclepRejectReason_t; see "Rejected calls"). Phases: 1 LL dispatch send, 2 LL dispatch receive,
 * 3 LL combine send, 4 LL combine receive (ncclepPhaseName). Read without synchronising; see
 * ncclepGroupGetDeviceError. */
typedef struct ncclepDeviceError_v1 {
  int code;
  int phase;
  int peer;
  int value;
} ncclepDeviceError_t;

NCCLEP_API ncclepResult_t ncclepLLDispatch(ncclepGroup_t group, const ncclepLLDispatchArgs_t* args,
                                           cudaStream_t stream);
NCCLEP_API ncclepResult_t ncclepLLCombine(ncclepGroup_t group, const ncclepLLCombineArgs_t* args,
                                          cudaStream_t stream);

/* Copies the group's error word. Bad-input codes (2, 3) and a peer's rejection (5) are cleared by
 * the read (the group stays usable); a timeout or protocol error stays, and every later call
 * returns ncclepTimeout or ncclepInvalidUsage: the group can only be destroyed. */
NCCLEP_API ncclepResult_t ncclepGroupGetDeviceError(ncclepGroup_t group, ncclepDeviceError_t* error);

/* ------------------------------------------------------------------------------------------
 * HT mode (high throughput): layout, dispatch, combine and cached dispatch. Every call is collective over the group, enqueued on `stream` without host
 * synchronisation (CUDA-graph capturable), and part of one sequence shared by the three kinds of
 * call: every rank must make the same HT calls in the same order. Outputs have the worst-case
 * shapes below; counts stay on the device. The kernels use the group's numSms SMs (default 24
 * in HT mode). Device errors (see ncclepDeviceError_t) use phases 5 HT layout, 6/7 HT dispatch
 * send/receive, 8/9 HT combine send/receive, 10/11 HT cached dispatch send/receive, 12 the
 * forwarder of the hierarchical path.
 *
 * Across (virtual) nodes (nodeSize < nRanks, e.g. NCCLEP_VIRTUAL_NODES=n) the same calls take the
 * hierarchical path: a token crosses the network once per destination node, to the rank with
 * the same local index there, which forwards it over NVLink; combine reduces at that rank before
 * the network hop back. Same outputs and handles; combine sums another node's ranks first (fp32,
 * rounded to bf16 once), so it matches the one-node order within bf16 rounding. Its window
 * regions are planned from virtualNodes (or NCCLEP_VIRTUAL_NODES); across real nodes the group
 * re-plans its window for the node count once the topology is known (a caller-sized windowBytes
 * too small for that makes the HT calls return ncclepUnsupported).
 *
 * Rows: N = numRows = R*T for the flat layout, R*T*min(topk, L) + L*(alignment-1) for
 * expert_major (ncclepHTNumRows). Flat: one row per received token, by source rank then token
 * order. Expert_major: each token copied into the segment of every local expert it chose (same
 * order inside a segment), segments padded to `alignment` rows. Rows no token uses have
 * recvTopkIdx -1, recvTopkWeights 0, recvSlot -1, and unspecified recvX / recvScales.
 * ------------------------------------------------------------------------------------------ */
/* Version 2 added rejectCode, version 3 the dispatch's and the combine's recvTopkIdxBits (the
 * cached dispatch's struct is the same in versions 2 and 3). The launchers also take earlier
 * versions, fields a version lacks reading as 0: a version 1 struct ends where rejectCode begins;
 * version 2's has version 3's size (recvTopkIdxBits took its tail padding). */
#define NCCLEP_HT_ARGS_VERSION 3u
#define NCCLEP_HT_LAYOUT_FLAT 0
#define NCCLEP_HT_LAYOUT_EXPERT_MAJOR 1

typedef struct ncclepHTDispatchArgs_v3 {
  size_t size;              /* sizeof(ncclepHTDispatchArgs_t) */
  unsigned int version;     /* NCCLEP_HT_ARGS_VERSION */
  int phases;               /* NCCLEP_PHASE_ALL (the halves cannot be launched apart yet) */
  int numTokens;            /* B <= maxTokensPerRank (0 allowed) */
  int hidden;               /* H <= the group's hidden: a multiple of 8 (bf16) or 128 (fp8) */
  int topk;                 /* K: 1..maxTopk (<= 32) */
  int useFp8;               /* 0: x is bf16; 1: x is fp8 e4m3 bytes with per-128 scales, moved as is */
  int scaleBytes;           /* fp8: bytes of one scale, 4 (fp32) or 1 (UE8M0) */
  const void* x;            /* [B, H] */
  const void* xScales;      /* fp8: [B, H/128] */
  const void* topkIdx;      /* [B, K] expert ids, -1 = none */
  int topkIdxBits;          /* 32 or 64 */
  const float* topkWeights; /* [B, K] or NULL */
  int layout;               /* NCCLEP_HT_LAYOUT_* */
  int alignment;            /* expert_major: rows per segment are padded to a multiple of it; flat: 1 */
  long long numRows;        /* N (must be ncclepHTNumRows of this layout) */
  void* recvX;              /* out: [N, H] */
  void* recvScales;         /* out (fp8): [N, H/128] */
  void* recvTopkIdx;        /* out: [N, K] local expert ids (recvTopkIdxBits wide), -1 where the
                               expert is elsewhere */
  float* recvTopkWeights;   /* out (with topkWeights): [N, K], 0 where recvTopkIdx is -1 */
  int* numRecv;             /* out: [1] rows used */
  int* expertCounts;        /* out: [L] rows of each local expert (before padding) */
  int* sendPos;             /* out (handle): [B, R] slot of token b among our tokens for rank d, -1 */
  int* recvSlot;            /* out (handle): [N] source rank * T + slot of each row's token, -1 */
  int* recvCounts;          /* out (handle): [R] tokens received from each rank */
  int rejectCode;           /* 0, or an ncclepRejectReason_t: this rank rejected the call; every other
                               field but phases is ignored (no token sent, no output written) */
  int recvTopkIdxBits;      /* 32 or 64: recvTopkIdx holds int32 or int64 ids; 0 (earlier versions) = 32 */
} ncclepHTDispatchArgs_t;

typedef struct ncclepHTCombineArgs_v3 {
  size_t size;              /* sizeof(ncclepHTCombineArgs_t) */
  unsigned int version;     /* NCCLEP_HT_ARGS_VERSION */
  int phases;               /* NCCLEP_PHASE_ALL */
  int numTokens;            /* B of the matching dispatch */
  int hidden;               /* a multiple of 8, <= the group's hidden */
  int topk;                 /* K of the matching dispatch */
  long long numRows;        /* rows of x: N of the matching dispatch, or fewer when the rows past
                               them hold no token (e.g. its first numRecv rows, flat layout) */
  const void* x;            /* bf16 [numRows, hidden] */
  const float* topkWeights; /* [numRows, K] or NULL: summed like the rows (entries with recvTopkIdx -1
                               skipped); given on every rank or on none (NULL is allowed with
                               numRows 0, where there is no row to weigh) */
  const int* sendPos;       /* the dispatch's handle */
  const int* recvSlot;
  const int* recvCounts;
  const void* recvTopkIdx;  /* [N, K] the dispatch's, recvTopkIdxBits wide */
  void* out;                /* out: bf16 [B, hidden]: per token, the fp32 sum of its rows */
  float* outWeights;        /* out (when the call carries topkWeights): [B, K]; NULL: no weights */
  int rejectCode;           /* as in ncclepHTDispatchArgs_t (no handle needed) */
  int recvTopkIdxBits;      /* 32 or 64, as the dispatch wrote recvTopkIdx; 0 (earlier versions) = 32 */
} ncclepHTCombineArgs_t;

typedef struct ncclepHTCachedDispatchArgs_v3 {
  size_t size;              /* sizeof(ncclepHTCachedDispatchArgs_t) */
  unsigned int version;     /* NCCLEP_HT_ARGS_VERSION */
  int phases;               /* NCCLEP_PHASE_ALL */
  int numTokens;            /* B of the matching dispatch */
  int rowBytes;             /* bytes of one row of x (any type), <= ncclepHTMaxRowBytes */
  long long numRows;        /* N of the matching dispatch */
  const void* x;            /* [B, rowBytes] */
  const int* sendPos;       /* the dispatch's handle */
  const int* recvSlot;
  void* out;                /* out: [N, rowBytes]: the row of the token each row holds, zeros elsewhere */
  int rejectCode;           /* as in ncclepHTDispatchArgs_t (no handle needed) */
} ncclepHTCachedDispatchArgs_t;

/* Worst-case rows of an HT dispatch output (layout NCCLEP_HT_LAYOUT_*). */
NCCLEP_API ncclepResult_t ncclepHTNumRows(ncclepGroup_t group, int topk, int layout, int alignment,
                                          long long* rows);
/* The same from a config and a rank count, before any group exists. */
NCCLEP_API ncclepResult_t ncclepHTNumRowsFor(const ncclepGroupConfig_t* config, int nRanks, int topk, int layout,
                                             int alignment, long long* rows);
/* The largest row ncclepHTCachedDispatch moves. */
NCCLEP_API ncclepResult_t ncclepHTMaxRowBytes(ncclepGroup_t group, int* bytes);

NCCLEP_API ncclepResult_t ncclepHTDispatch(ncclepGroup_t group, const ncclepHTDispatchArgs_t* args,
                                           cudaStream_t stream);
NCCLEP_API ncclepResult_t ncclepHTCombine(ncclepGroup_t group, const ncclepHTCombineArgs_t* args,
                                          cudaStream_t stream);
NCCLEP_API ncclepResult_t ncclepHTCachedDispatch(ncclepGroup_t group, const ncclepHTCachedDispatchArgs_t* args,
                                                 cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* NCCLEP_H_ */
