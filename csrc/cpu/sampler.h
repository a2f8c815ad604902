// The sampler on the CPU (torch.ops.stage1.sample): what the generic translation unit (ops.cpp) and the per-ISA
// kernels share. No torch header (see decode_attention.h for why).
#pragma once

#include <cstdint>

namespace stage1::cpu {

struct SamplerArgs {
  const float* logits;  // [rows, vocab], row stride ld (elements), fp32
  int64_t vocab, ld;
  const float* temperature;  // [rows]: 0 = greedy
  const int64_t* top_k;      // [rows]: <= 0 or >= vocab = off
  const float* top_p;        // [rows]: >= 1 = off
  const float* min_p;        // [rows]: 0 = off
  const int64_t* seeds;      // [rows]: the Philox key
  const int64_t* steps;      // [rows]: the counter's high word
  int64_t* tokens;           // [rows] out
};

// A row's token where equal probabilities straddle its top-k / top-p cut: which of them survive is torch.topk's
// order of ties, which only torch's own softmax and topk give. ops.cpp then computes the reference's keep mask
// with ATen and draws the row again with it.
constexpr int64_t kNeedsTorchOrder = -1;

// Rows [begin, end), each whole on the calling thread (its scratch is thread-local).
using SampleRowsFn = void (*)(const SamplerArgs&, int64_t begin, int64_t end);
void sample_rows_scalar(const SamplerArgs& args, int64_t begin, int64_t end);
void sample_rows_avx2(const SamplerArgs& args, int64_t begin, int64_t end);

// One row again, with the reference's top-k / top-p keep mask (`prefix`, [vocab]) instead of its own cut.
using SampleRowWithPrefixFn = void (*)(const SamplerArgs&, int64_t row, const bool* prefix);
void sample_row_with_prefix_scalar(const SamplerArgs& args, int64_t row, const bool* prefix);
void sample_row_with_prefix_avx2(const SamplerArgs& args, int64_t row, const bool* prefix);

// The race's noise -log(-log(U)) for n (seed, step, token) triples, as stage1.contract.gumbel_noise (tests).
using GumbelNoiseFn = void (*)(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n,
                               float* out);
void gumbel_noise_scalar(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n, float* out);
void gumbel_noise_avx2(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n, float* out);

}  // namespace stage1::cpu
