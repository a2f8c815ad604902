// The 8-lane fp32 vector primitives of the scalar kernels, shared by every op's scalar translation unit.
// Included inside each TU's anonymous namespace, after <immintrin.h>/<cmath> at the top of the TU, so each TU
// compiles them with its own ISA flags.

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
inline Vec vadd(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.x[i] += b.x[i];
  return a;
}
inline Vec vsub(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.x[i] -= b.x[i];
  return a;
}
inline Vec vmul(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.x[i] *= b.x[i];
  return a;
}
inline Vec vdiv(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.x[i] /= b.x[i];
  return a;
}
inline int vmask_gt(Vec a, Vec b) {
  int mask = 0;
  for (int i = 0; i < 8; ++i) mask |= (a.x[i] > b.x[i]) << i;
  return mask;
}
inline int vmask_eq(Vec a, Vec b) {
  int mask = 0;
  for (int i = 0; i < 8; ++i) mask |= (a.x[i] == b.x[i]) << i;
  return mask;
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
