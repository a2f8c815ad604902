// Portable sampler: the same kernel over a plain 8-float struct. Runs where the CPU lacks AVX2/FMA, or when forced
// (stage1._C._set_cpu_isa).
#include <algorithm>
#include <cmath>
#include <vector>

#include "sampler.h"

namespace stage1::cpu {
namespace {

#include "vec_scalar.h"

#include "sampler_kernel.h"

}  // namespace

void sample_rows_scalar(const SamplerArgs& args, int64_t begin, int64_t end) { run_rows(args, begin, end); }

void sample_row_with_prefix_scalar(const SamplerArgs& args, int64_t row, const bool* prefix) {
  run_row_with_prefix(args, row, prefix);
}

void gumbel_noise_scalar(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n, float* out) {
  noise_for(seeds, steps, tokens, n, out);
}

}  // namespace stage1::cpu
