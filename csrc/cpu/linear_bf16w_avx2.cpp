// AVX2 + FMA bf16-weight linear; this file alone is compiled with -mavx2 -mfma (CMakeLists.txt) and runs only
// where the CPU reports both (ops.cpp checks at run time).
#include <immintrin.h>

#include "linear_bf16w.h"

namespace stage1::cpu {
namespace {

using Vec = __m256;

inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {  // 8 bf16 -> fp32: the bf16 bits are the fp32's high half
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(Vec v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 shuf = _mm_movehdup_ps(x);
  x = _mm_add_ps(x, shuf);
  shuf = _mm_movehl_ps(shuf, x);
  return _mm_cvtss_f32(_mm_add_ss(x, shuf));
}

#include "linear_bf16w_kernel.h"

}  // namespace

void linear_bf16w_avx2(const LinearBf16wArgs& args, int64_t begin, int64_t end, float* scratch) {
  run_blocks(args, begin, end, scratch);
}

}  // namespace stage1::cpu
