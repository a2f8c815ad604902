// Portable paged decode attention: the same kernel over a plain 8-float struct (the compiler vectorises what it
// can with the baseline ISA). Runs where the CPU lacks AVX2/FMA, or when forced (stage1._C._set_cpu_isa).
#include <cmath>

#include "decode_attention.h"

namespace stage1::cpu {
namespace {

#include "vec_scalar.h"

#include "decode_attention_kernel.h"

}  // namespace

void decode_attention_scalar(const DecodeAttentionArgs& args, int64_t begin, int64_t end) {
  run_items(args, begin, end);
}

}  // namespace stage1::cpu
