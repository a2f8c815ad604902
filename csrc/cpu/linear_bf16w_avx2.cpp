// AVX2 + FMA bf16-weight linear; this file alone is compiled with -mavx2 -mfma (CMakeLists.txt) and runs only
// where the CPU reports both (ops.cpp checks at run time).
#include <immintrin.h>

#include "linear_bf16w.h"

namespace stage1::cpu {
namespace {

#include "vec_avx2.h"

#include "linear_bf16w_kernel.h"

}  // namespace

void linear_bf16w_avx2(const LinearBf16wArgs& args, int64_t begin, int64_t end, float* scratch) {
  run_blocks(args, begin, end, scratch);
}

}  // namespace stage1::cpu
