// The bf16-weight linear kernel, written once over an 8-lane fp32 vector type `Vec`; each per-ISA file defines Vec
// and the operations below in an anonymous namespace and includes this file inside it (as decode_attention does).
//
// Dot-product form on nn.Linear's [N, K] layout: a block of R <= 4 weight rows times a tile of up to kTileM rows
// of x, R x kTileM vector accumulators over K (8 lanes each, one horizontal sum at the end), so each loaded weight
// vector serves kTileM rows of x and each x vector R weight rows. With one x tile (decode, M <= kTileM) the bf16
// rows are widened in registers as they stream (a 16-bit shift: bf16 is the high half of an fp32). With more rows
// of x the block's R rows are widened once into an fp32 scratch (R * K floats, L1/L2-resident) that every tile
// then reads, so the widening is paid once per weight element, not once per tile. The K % 8 tail is summed in
// scalar fp32 after the vector lanes. fp32 products and fp32 sums throughout: only the order of the sum differs
// from x @ W.float().T.
//
// Needs: Vec, vzero(), vload(const float*), vload(const uint16_t*) (8 bf16 -> fp32), vstore(float*, Vec),
// vfma(a, b, c) = a*b + c, hsum(Vec).

namespace {

constexpr int kTileM = kLinearTileM;  // 3 x 4 accumulators + 3 x vectors + 1 weight vector: 16 AVX2 registers

// Streaming bf16 rows (one tile): prefetch the same columns kPrefetchBlocks blocks ahead, so the next blocks'
// rows are in flight while this one is multiplied (4 interleaved short row streams defeat the hardware's).
template <typename T>
constexpr bool kPrefetch = false;
template <>
constexpr bool kPrefetch<uint16_t> = true;
constexpr int64_t kPrefetchBlocks = 4;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  __builtin_memcpy(&out, &wide, 4);
  return out;
}
inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const uint16_t* p) { return bf16_to_float(*p); }

// y[m0 + i, n0 + r] for i < TM, r < R; w rows at w + r * ldw (T = uint16_t: bf16, float: the widened scratch).
template <typename T, int R, int TM>
inline void tile(const LinearBf16wArgs& a, const T* w, int64_t ldw, int64_t m0, int64_t n0) {
  const int64_t K = a.K, K8 = K & ~int64_t{7};
  const float* x[TM];
  for (int i = 0; i < TM; ++i) x[i] = a.x + (m0 + i) * a.ldx;
  Vec acc[TM][R];
  for (int i = 0; i < TM; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = vzero();
  for (int64_t k = 0; k < K8; k += 8) {
    Vec xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = vload(x[i] + k);
    for (int r = 0; r < R; ++r) {
      if (kPrefetch<T>) __builtin_prefetch(w + (r + kLinearRows * kPrefetchBlocks) * ldw + k);
      const Vec wv = vload(w + r * ldw + k);
      for (int i = 0; i < TM; ++i) acc[i][r] = vfma(xv[i], wv, acc[i][r]);
    }
  }
  for (int i = 0; i < TM; ++i) {
    float* y = a.y + (m0 + i) * a.ldy + n0;
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[i][r]);
      for (int64_t k = K8; k < K; ++k) s += x[i][k] * load_scalar(w + r * ldw + k);
      y[r] = a.bias != nullptr ? s + a.bias[n0 + r] : s;
    }
  }
}

template <typename T, int R>
inline void rows(const LinearBf16wArgs& a, const T* w, int64_t ldw, int64_t n0) {
  int64_t m = 0;
  for (; m + kTileM <= a.M; m += kTileM) tile<T, R, kTileM>(a, w, ldw, m, n0);
  switch (a.M - m) {
    case 2: tile<T, R, 2>(a, w, ldw, m, n0); break;
    case 1: tile<T, R, 1>(a, w, ldw, m, n0); break;
    default: break;
  }
}

template <int R>
inline void block(const LinearBf16wArgs& a, int64_t n0, float* scratch) {
  const uint16_t* w = a.w + n0 * a.K;
  if (a.M <= kTileM) {  // one tile: stream the bf16 rows, widened in registers
    rows<uint16_t, R>(a, w, a.K, n0);
    return;
  }
  const int64_t K8 = a.K & ~int64_t{7};
  for (int r = 0; r < R; ++r) {  // widen once, then every tile reads fp32
    for (int64_t k = 0; k < K8; k += 8) vstore(scratch + r * a.K + k, vload(w + r * a.K + k));
    for (int64_t k = K8; k < a.K; ++k) scratch[r * a.K + k] = bf16_to_float(w[r * a.K + k]);
  }
  rows<float, R>(a, scratch, a.K, n0);
}

// scratch: kLinearRows * K floats, owned by the caller (one per thread).
void run_blocks(const LinearBf16wArgs& a, int64_t begin, int64_t end, float* scratch) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n0 = b * kLinearRows;
    const int64_t r = a.N - n0 < kLinearRows ? a.N - n0 : kLinearRows;
    switch (r) {
      case 4: block<4>(a, n0, scratch); break;
      case 3: block<3>(a, n0, scratch); break;
      case 2: block<2>(a, n0, scratch); break;
      case 1: block<1>(a, n0, scratch); break;
      default: break;
    }
  }
}

}  // namespace
