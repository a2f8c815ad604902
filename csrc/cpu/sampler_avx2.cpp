// AVX2 + FMA sampler; this file alone is compiled with -mavx2 -mfma (CMakeLists.txt) and runs only where the CPU
// reports both (ops.cpp checks at run time).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "sampler.h"

namespace stage1::cpu {
namespace {

#include "vec_avx2.h"

#include "sampler_kernel.h"

}  // namespace

void sample_rows_avx2(const SamplerArgs& args, int64_t begin, int64_t end) { run_rows(args, begin, end); }

void sample_row_with_prefix_avx2(const SamplerArgs& args, int64_t row, const bool* prefix) {
  run_row_with_prefix(args, row, prefix);
}

void gumbel_noise_avx2(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n, float* out) {
  noise_for(seeds, steps, tokens, n, out);
}

}  // namespace stage1::cpu
