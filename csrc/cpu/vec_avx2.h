// The 8-lane fp32 vector primitives of the AVX2/FMA kernels, shared by every op's AVX2/FMA translation unit.
// Included inside each TU's anonymous namespace, after <immintrin.h>/<cmath> at the top of the TU, so each TU
// compiles them with its own ISA flags.

using Vec = __m256;

inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {  // 8 bf16 -> fp32: the bf16 bits are the fp32's high half
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }  // IEEE division, rounded as torch's
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
// Bit i set where lane i of a > b (== b): compare, then the lanes' sign bits.
inline int vmask_gt(Vec a, Vec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
inline int vmask_eq(Vec a, Vec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
inline float hsum(Vec v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 shuf = _mm_movehdup_ps(x);
  x = _mm_add_ps(x, shuf);
  shuf = _mm_movehl_ps(shuf, x);
  return _mm_cvtss_f32(_mm_add_ss(x, shuf));
}
inline float hmax(Vec v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
// exp(x), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, times 2^n (about 1 ulp). Inputs
// below -88.38 (and -inf) give 0.
inline Vec vexp(Vec x) {
  const Vec lo = vset1(-88.3762626647949f);
  x = _mm256_min_ps(x, vset1(88.3762626647949f));
  const Vec too_small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const Vec n = _mm256_round_ps(_mm256_mul_ps(x, vset1(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  Vec r = _mm256_fnmadd_ps(n, vset1(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, vset1(-2.12194440e-4f), r);
  Vec y = vset1(1.9875691500e-4f);
  y = vfma(y, r, vset1(1.3981999507e-3f));
  y = vfma(y, r, vset1(8.3334519073e-3f));
  y = vfma(y, r, vset1(4.1665795894e-2f));
  y = vfma(y, r, vset1(1.6666665459e-1f));
  y = vfma(y, r, vset1(5.0000001201e-1f));
  y = vfma(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, vset1(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(too_small, y);
}
