// The paged decode attention kernel, written once over an 8-lane vector type `Vec` with the operations below.
// Each per-ISA file defines Vec and its operations in an anonymous namespace, then includes this file inside
// its own namespace, so every function here has internal linkage or an ISA-specific name.
//
// Per work item (sequence s, KV head h), for the group's query heads in chunks of up to 8 (a template argument,
// so their accumulators live in registers): tiles of kTile tokens; per token the K row is loaded once, chunk by
// chunk, and multiplied into every query head's accumulator (GQA); online softmax over the tile's scores (one
// running max and sum per head, vector exp); then per head-dim chunk the V rows of the tile are loaded once and
// accumulated into every head's output chunk, rescaled first by exp(old max - new max).
//
// Needs (defined by the includer): Vec, vzero(), vset1(float), vload(const float*), vload(const uint16_t*) (bf16),
// vstore(float*, Vec), vfma(a, b, c) = a*b + c, vmul, vmax, hsum(Vec), hmax(Vec), vexp(Vec).

namespace {

constexpr int kTile = 32;
constexpr int kMaxGroupChunk = 8;
constexpr float kNegInf = -__builtin_inff();

// The rows of tokens [t0, t0 + n) of one KV head: one division per tile, then the slot steps through its block
// (a division per row cost as much as the row's dot products).
template <typename T>
inline void tile_rows(const void* base, const DecodeAttentionArgs& a, const int32_t* table, int64_t t0, int n,
                      int64_t head, const T** rows) {
  int64_t block = t0 / a.block_size, slot = t0 % a.block_size;
  const T* first = static_cast<const T*>(base) + head * a.stride_head;
  const T* at = first + table[block] * a.stride_block;
  for (int i = 0; i < n; ++i) {
    rows[i] = at + slot * a.stride_slot;
    if (++slot == a.block_size && i + 1 < n) {
      slot = 0;
      at = first + table[++block] * a.stride_block;
    }
  }
}

// Asks for every cache line of `n` rows of `bytes` each. Decode reads K/V that the step's matmuls have evicted
// from the caches, and a work item's rows are 256-byte pieces of scattered blocks: without this the loop waits on
// each line in turn (5 GB/s of K/V measured at context 1024; DRAM streams ~8x that).
template <typename T>
inline void prefetch_rows(const T* const* rows, int n, int64_t bytes) {
  for (int i = 0; i < n; ++i)
    for (int64_t offset = 0; offset < bytes; offset += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(rows[i]) + offset);
}

// Query heads [first_head, first_head + G) of sequence s, which share KV head h.
template <typename T, int G>
void attend(const DecodeAttentionArgs& a, int64_t s, int64_t h, int64_t first_head) {
  const int64_t D = a.head_dim;
  const int64_t heads = a.num_kv_heads * a.group;
  const float* q = a.q + (s * heads + first_head) * D;
  float* out = a.out + (s * heads + first_head) * D;
  const int64_t length = a.context_lens[s];
  if (length <= 0) {  // nothing to attend to: zeros (the reference would give NaN)
    for (int64_t i = 0; i < G * D; ++i) out[i] = 0.0f;
    return;
  }
  const int32_t* table = a.block_tables + s * a.table_stride;

  alignas(64) float qs[G * kMaxHeadDim];   // q * scale
  alignas(64) float acc[G * kMaxHeadDim];  // unnormalised output
  alignas(64) float p[G][kTile];           // scores, then probabilities
  float m[G], l[G], alpha[G];
  const Vec scale = vset1(a.scale);
  for (int g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; d += 8) {
      vstore(qs + g * D + d, vmul(vload(q + g * D + d), scale));
      vstore(acc + g * D + d, vzero());
    }
    m[g] = kNegInf;
    l[g] = 0.0f;
  }
  // this tile's rows and the next one's (double-buffered): the next tile's lines are requested a row at a time
  // while this tile's scores are computed, so the requests stay within what the core can keep in flight
  const T* krows[2][kTile];
  const T* vrows[2][kTile];
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  auto rows_of = [&](int64_t t0, int buffer) {
    const int n = static_cast<int>(length - t0 < kTile ? length - t0 : kTile);
    tile_rows<T>(a.k_cache, a, table, t0, n, h, krows[buffer]);
    tile_rows<T>(a.v_cache, a, table, t0, n, h, vrows[buffer]);
    return n;
  };
  {
    const int n = rows_of(0, 0);
    prefetch_rows(krows[0], n, row_bytes);
    prefetch_rows(vrows[0], n, row_bytes);
  }

  for (int64_t t0 = 0, buffer = 0; t0 < length; t0 += kTile, buffer ^= 1) {
    const int n = static_cast<int>(length - t0 < kTile ? length - t0 : kTile);
    const int next = t0 + kTile < length ? rows_of(t0 + kTile, buffer ^ 1) : 0;  // <= n: only the last is shorter
    const T* const* krow = krows[buffer];
    const T* const* vrow = vrows[buffer];
    // scores: each K row once for the whole group
    for (int i = 0; i < n; ++i) {
      if (i < next) {
        prefetch_rows(krows[buffer ^ 1] + i, 1, row_bytes);
        prefetch_rows(vrows[buffer ^ 1] + i, 1, row_bytes);
      }
      Vec dot[G];
      for (int g = 0; g < G; ++g) dot[g] = vzero();
      for (int64_t d = 0; d < D; d += 8) {
        const Vec k = vload(krow[i] + d);
        for (int g = 0; g < G; ++g) dot[g] = vfma(vload(qs + g * D + d), k, dot[g]);
      }
      for (int g = 0; g < G; ++g) p[g][i] = hsum(dot[g]);
    }
    const int padded = (n + 7) & ~7;
    // online softmax over the tile
    for (int g = 0; g < G; ++g) {
      for (int i = n; i < padded; ++i) p[g][i] = kNegInf;
      Vec mx = vset1(kNegInf);
      for (int i = 0; i < padded; i += 8) mx = vmax(mx, vload(p[g] + i));
      const float tile_max = hmax(mx);
      const float new_max = m[g] > tile_max ? m[g] : tile_max;
      const Vec one = vset1(1.0f), neg_max = vset1(-new_max);
      Vec sum = vzero();
      for (int i = 0; i < padded; i += 8) {
        const Vec e = vexp(vfma(vload(p[g] + i), one, neg_max));
        vstore(p[g] + i, e);
      }
      for (int i = n; i < padded; ++i) p[g][i] = 0.0f;  // exp(-inf - max) is ~0 in vexp; make it exactly 0
      for (int i = 0; i < padded; i += 8) sum = vfma(vload(p[g] + i), one, sum);
      float rescale = 0.0f;
      if (m[g] != kNegInf) {
        alignas(32) float tmp[8];
        vstore(tmp, vexp(vset1(m[g] - new_max)));
        rescale = tmp[0];
      }
      alpha[g] = rescale;
      l[g] = l[g] * rescale + hsum(sum);
      m[g] = new_max;
    }
    // values: each V row chunk once for the whole group
    for (int64_t d = 0; d < D; d += 8) {
      Vec o[G];
      for (int g = 0; g < G; ++g) o[g] = vmul(vload(acc + g * D + d), vset1(alpha[g]));
      for (int i = 0; i < n; ++i) {
        const Vec v = vload(vrow[i] + d);
        for (int g = 0; g < G; ++g) o[g] = vfma(vset1(p[g][i]), v, o[g]);
      }
      for (int g = 0; g < G; ++g) vstore(acc + g * D + d, o[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const Vec inv = vset1(1.0f / l[g]);
    for (int64_t d = 0; d < D; d += 8) vstore(out + g * D + d, vmul(vload(acc + g * D + d), inv));
  }
}

template <typename T>
void attend_group(const DecodeAttentionArgs& a, int64_t s, int64_t h) {
  for (int64_t first = 0; first < a.group; first += kMaxGroupChunk) {
    const int64_t chunk = a.group - first < kMaxGroupChunk ? a.group - first : kMaxGroupChunk;
    const int64_t head = h * a.group + first;
    switch (chunk) {
      case 1: attend<T, 1>(a, s, h, head); break;
      case 2: attend<T, 2>(a, s, h, head); break;
      case 3: attend<T, 3>(a, s, h, head); break;
      case 4: attend<T, 4>(a, s, h, head); break;
      case 5: attend<T, 5>(a, s, h, head); break;
      case 6: attend<T, 6>(a, s, h, head); break;
      case 7: attend<T, 7>(a, s, h, head); break;
      default: attend<T, 8>(a, s, h, head); break;
    }
  }
}

void run_items(const DecodeAttentionArgs& a, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t s = item / a.num_kv_heads, h = item % a.num_kv_heads;
    if (a.cache_type == CacheType::kBFloat16) {
      attend_group<uint16_t>(a, s, h);
    } else {
      attend_group<float>(a, s, h);
    }
  }
}

}  // namespace
