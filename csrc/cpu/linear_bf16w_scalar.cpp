// Portable bf16-weight linear: the same kernel over a plain 8-float struct (the compiler vectorises what it can
// with the baseline ISA). Runs where the CPU lacks AVX2/FMA, or when forced (stage1._C._set_cpu_isa).
#include "linear_bf16w.h"

namespace stage1::cpu {
namespace {

struct Vec {
  float x[8];
};

inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.x[i] = p[i];
  return r;
}
inline Vec vload(const uint16_t* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    __builtin_memcpy(&r.x[i], &bits, 4);
  }
  return r;
}
inline void vstore(float* p, Vec v) {
  for (int i = 0; i < 8; ++i) p[i] = v.x[i];
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < 8; ++i) c.x[i] = a.x[i] * b.x[i] + c.x[i];
  return c;
}
inline float hsum(Vec v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v.x[i];
  return s;
}

#include "linear_bf16w_kernel.h"

}  // namespace

void linear_bf16w_scalar(const LinearBf16wArgs& args, int64_t begin, int64_t end, float* scratch) {
  run_blocks(args, begin, end, scratch);
}

}  // namespace stage1::cpu
