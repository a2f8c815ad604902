// y = x W^T (+ b) with W kept in bf16 and every product and sum in fp32, on the CPU: what the generic translation
// unit (ops.cpp) and the per-ISA kernels share. No torch header (see decode_attention.h for why).
#pragma once

#include <cstdint>

namespace stage1::cpu {

struct LinearBf16wArgs {
  const float* x;     // [M, K], row stride ldx (elements)
  const uint16_t* w;  // [N, K] bf16 bits, row-major, dense (nn.Linear's layout: no repacking)
  const float* bias;  // [N] or nullptr
  float* y;           // [M, N], row stride ldy
  int64_t M, N, K, ldx, ldy;
};

// Rows of W are taken in blocks of kLinearRows; a work item is one block: items [begin, end) cover output
// features [begin * kLinearRows, min(end * kLinearRows, N)), for every row of x.
constexpr int64_t kLinearRows = 4;
// Rows of x per register tile; with more than one tile the kernel widens each weight block into `scratch` once.
constexpr int64_t kLinearTileM = 3;

using LinearBf16wFn = void (*)(const LinearBf16wArgs&, int64_t begin, int64_t end, float* scratch);

// scratch: kLinearRows * K floats for the calling thread, used when M > kLinearTileM.
void linear_bf16w_scalar(const LinearBf16wArgs& args, int64_t begin, int64_t end, float* scratch);
void linear_bf16w_avx2(const LinearBf16wArgs& args, int64_t begin, int64_t end, float* scratch);

}  // namespace stage1::cpu
