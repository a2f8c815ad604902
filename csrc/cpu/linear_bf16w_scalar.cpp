// Portable bf16-weight linear: the same kernel over a plain 8-float struct (the compiler vectorises what it can
// with the baseline ISA). Runs where the CPU lacks AVX2/FMA, or when forced (stage1._C._set_cpu_isa).
#include <cmath>

#include "linear_bf16w.h"

namespace stage1::cpu {
namespace {

#include "vec_scalar.h"

#include "linear_bf16w_kernel.h"

}  // namespace

void linear_bf16w_scalar(const LinearBf16wArgs& args, int64_t begin, int64_t end, float* scratch) {
  run_blocks(args, begin, end, scratch);
}

}  // namespace stage1::cpu
