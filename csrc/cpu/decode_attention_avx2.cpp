// AVX2 + FMA paged decode attention; this file alone is compiled with -mavx2 -mfma (CMakeLists.txt) and runs
// only where the CPU reports both (ops.cpp checks at run time).
#include <immintrin.h>

#include "decode_attention.h"

namespace stage1::cpu {
namespace {

#include "vec_avx2.h"

#include "decode_attention_kernel.h"

}  // namespace

void decode_attention_avx2(const DecodeAttentionArgs& args, int64_t begin, int64_t end) {
  run_items(args, begin, end);
}

}  // namespace stage1::cpu
