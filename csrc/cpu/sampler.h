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

// Rows [begin, end), each whole on the calling thread (its scratch is thread-local).
using SampleRowsFn = void (*)(const SamplerArgs&, int64_t begin, int64_t end);
void sample_rows_scalar(const SamplerArgs& args, int64_t begin, int64_t end);
void sample_rows_avx2(const SamplerArgs& args, int64_t begin, int64_t end);

// The race's noise -log(-log(U)) for n (seed, step, token) triples, as stage1.contract.gumbel_noise (tests).
using GumbelNoiseFn = void (*)(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n,
                               float* out);
void gumbel_noise_scalar(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n, float* out);
void gumbel_noise_avx2(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n, float* out);

}  // namespace stage1::cpu
