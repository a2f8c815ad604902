// Portable paged decode attention: the same kernel over a plain 8-float struct (the compiler vectorises what it
// can with the baseline ISA). Runs where the CPU lacks AVX2/FMA, or when forced (stage1._C._set_cpu_isa).
#include <cmath>

#include "decode_attention.h"

namespace stage1::cpu {
namespace {

struct Vec {
  float x[8];
};

inline Vec vzero() { return Vec{}; }
inline Vec vset1(float v) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.x[i] = v;
  return r;
}
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
inline Vec vmul(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.x[i] *= b.x[i];
  return a;
}
inline Vec vmax(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
  return a;
}
inline float hsum(Vec v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v.x[i];
  return s;
}
inline float hmax(Vec v) {
  float m = v.x[0];
  for (int i = 1; i < 8; ++i) m = v.x[i] > m ? v.x[i] : m;
  return m;
}
inline Vec vexp(Vec v) {
  for (int i = 0; i < 8; ++i) v.x[i] = expf(v.x[i]);
  return v;
}

#include "decode_attention_kernel.h"

}  // namespace

void decode_attention_scalar(const DecodeAttentionArgs& args, int64_t begin, int64_t end) {
  run_items(args, begin, end);
}

}  // namespace stage1::cpu
