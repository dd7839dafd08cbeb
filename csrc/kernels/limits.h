// What the LL and HT kernels can serve. Plain constants (no CUDA or NCCL headers): the host core,
// the kernels and ncclepGetLimits (the one place Python reads them from) share this header.
#pragma once

namespace ncclep {

constexpr int kMaxTopk = 1024;  // config sanity bound; the kernels impose the tighter ones below
constexpr int kFp8Block = 128;  // channels per fp8 scale

constexpr int kLLMaxTopk = 16;
constexpr int kLLMaxRanks = 128;
constexpr int kLLMaxExperts = 4096;
// Top-k entries (tokens x top-k) of one dispatch: maxTokens * maxTopk <= this (the dispatch counts a
// token's ranks in 16-bit halves of one word, so the token count must stay below 2^16).
constexpr int kLLMaxEntries = 16384;
constexpr int kLLHiddenMultiple = 128;  // one fp8 scale block
constexpr int kLLMaxBlocks = 1024;      // the LL kernels' grid (each block keeps its own call numbers)

constexpr int kHTMaxTopk = 32;   // one warp lane per top-k choice
constexpr int kHTMaxRanks = 32;  // one warp lane per rank
constexpr int kHTMaxExperts = 4096;
constexpr int kHTMaxLocalExperts = kHTMaxExperts / 2;
constexpr int kHTHiddenMultiple = 8;  // 16-byte bf16 rows
constexpr int kHTDefaultSms = 24;
constexpr int kHTMinSms = 2;              // one block sends, one receives
constexpr int kHTMinSmsHierarchical = 3;  // and one forwards

}  // namespace ncclep
