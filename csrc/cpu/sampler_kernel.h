// The sampler kernel, written once over an 8-lane fp32 vector type `Vec`; each per-ISA file defines Vec and the
// operations below in an anonymous namespace and includes this file inside it (as decode_attention does).
//
// It draws exactly the token the reference draws (stage1/engine/sampler.py): the same survivors, the same noise,
// the same tie rule. Per row:
// 1. Greedy rows (T == 0): argmax of the logits, the first index on ties (torch.argmax).
// 2. One vector pass: x = logits / T (IEEE division, as torch), e = exp(x - x_max), their sum, and the candidates:
//    tokens with x above the first top token's race score minus GUMBEL_MAX, all that can win once that token
//    survives (min-p keeps p_max; the prefix's rank 0 is a token at p_max, this one unless a tie went elsewhere).
//    Where it does not survive, or the cut may lie past the candidates, the pass runs again with the floor at
//    x_max - kRaceReach (a survivor at p_max scores at least x_max - 2.82; no noise exceeds 16.64).
//    Probabilities as the reference's softmax forms them: p = e * (1 / sum). Min-p drops p < min_p * p_max.
// 3. Top-p keeps a prefix of the distribution sorted by p: rank r survives iff r == 0, or
//    mass_before(r) < top_p, where mass_before is the reference's fp32 `cumsum - p` (torch's CPU cumsum adds in
//    double). No sort of the row: a histogram by p's exponent drops the bands wholly past the cut, then a
//    quickselect on the rest's mass (nth_element halves, O(n)) finds the ranks that surely survive (the mass before
//    them is below top_p - kMassMargin) and those that surely do not (above top_p + kMassMargin); only the few
//    ranks in between are sorted and get the exact fp32 rule.
//    Where equal probabilities straddle the cut, which of them survive depends on the order torch.topk gives ties
//    (a partial_sort or nth_element over the whole row's (p, token) pairs, TopKImpl.h), which only torch's own
//    softmax and topk reproduce: the row then returns kNeedsTorchOrder, ops.cpp computes the reference's prefix
//    with ATen, and the row is drawn again with that mask (`prefix`). Rows with top-k on take that path too: their
//    top-p mass is measured over top-k's survivors, ties with the k-th included (transformers' order of warpers).
// 4. The race (Gumbel-max): argmax over survivors of x + g, g = -log(-log(U)) in fp32, U from Philox4x32-10 keyed by
//    the row's seed at counter (token / 4, step, 0, 0), word token % 4 (stage1.contract); ties go to the lower
//    token. Survivors more than GUMBEL_MAX under a survivor's score are skipped, and the logs are only taken where
//    the Philox word leaves the token a chance to beat the best score so far (see sample_row).
//
// What is not bit-exact: exp and the softmax sum's order differ from torch's (~1 ulp in p), and glibc's logf from
// torch's vectorised log (within 2^-23 (1 + |g|) of its noise; 85% of draws identical). A survivor decision can then
// differ only where p sits within ~1e-7 of the min-p threshold, the prefix mass within ~1e-7 of top_p, or two
// distinct logits round to one p right at the cut; the drawn token only if that marginal token wins the race, or if
// two race scores fall within an ulp. tests/native/test_native_sampler.py shows equality on realistic logits (random
// normal at several scales, LLM-like, vocabularies of 1000 and 151,936, exact ties, bf16 values, peaked, flat and
// masked rows).
//
// NaN logits are not supported (nor are they in the reference, whose argmax then returns the NaN).
//
// std algorithms and containers are used on this file's own types only: their instantiations then stay local to
// the translation unit (one compiled with AVX2 could otherwise be picked by the linker for the whole library).
//
// Needs: Vec, vset1, vload(const float*), vstore, vadd, vsub, vdiv, vmax, hmax, hsum, vexp, vzero,
// vmask_gt(a, b) / vmask_eq(a, b) (bit i: lane i of a > / == b).

namespace {

// stage1.contract: Philox4x32-10 constants, the uniform's bits, the largest noise (rounded up).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kUniformBits = 23;
constexpr float kGumbelMax = 16.7f;
// Tokens with x <= x_max - kRaceReach cannot win: 2.8116 (-log(-log(2^-24)), the least noise) + 16.64 (the most),
// rounded up with room for fp32 rounding of x.
constexpr float kRaceReach = 19.6f;
// Prefix masses within this of top_p get the reference's exact fp32 rule; the rest are decided by a double sum
// (its error, ~1e-12, and that of the fp32 cumsum, ~1e-7, are far below it).
constexpr double kMassMargin = 1e-5;
// What the race's no-log test allows for rounding (scaled-logit units; plus 1e-6 of the score's magnitude).
constexpr double kRaceSlack = 0.05;

// Not std::max: its float instantiation would be shared with other translation units (see above).
inline float most(float a, float b) { return b > a ? b : a; }

struct PhiloxWords {
  uint32_t w[4];
};

inline PhiloxWords philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t b = static_cast<uint64_t>(kPhiloxM1) * c2, a = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint32_t hi_b = static_cast<uint32_t>(b >> 32), lo_b = static_cast<uint32_t>(b);
    const uint32_t hi_a = static_cast<uint32_t>(a >> 32), lo_a = static_cast<uint32_t>(a);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

inline float uniform_from_word(uint32_t word) {
  return (static_cast<float>(word >> (32 - kUniformBits)) + 0.5f) * (1.0f / (1 << kUniformBits));
}

inline float gumbel_from_word(uint32_t word) {
  const float u = uniform_from_word(word);
  return -logf(-logf(u));  // fp32 logs, as the reference's torch.log
}

// The noise of one row's tokens; consecutive tokens of one group of 4 share a Philox call.
class RowNoise {
 public:
  RowNoise(int64_t seed, int64_t step)
      : k0_(static_cast<uint32_t>(seed)), k1_(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        step_(static_cast<uint32_t>(step)) {}

  uint32_t word(int64_t token) {
    const uint32_t counter = static_cast<uint32_t>(token >> 2);
    if (!valid_ || counter != counter_) {
      words_ = philox4x32(counter, step_, 0, 0, k0_, k1_);
      counter_ = counter;
      valid_ = true;
    }
    return words_.w[token & 3];
  }

  float operator()(int64_t token) { return gumbel_from_word(word(token)); }

 private:
  uint32_t k0_, k1_, step_, counter_ = 0;
  bool valid_ = false;
  PhiloxWords words_{};
};

void noise_for(const int64_t* seeds, const int64_t* steps, const int64_t* tokens, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = RowNoise(seeds[i], steps[i])(tokens[i]);
}

// ------------------------------------------------------------------------------------------------ vector passes

// The first index of the largest value (torch.argmax's tie rule); 0 where none compares (all NaN).
inline int64_t argmax_first(const float* v, int64_t n) {
  const int64_t n8 = n & ~int64_t{7};
  Vec m = vset1(-INFINITY);
  for (int64_t i = 0; i < n8; i += 8) m = vmax(m, vload(v + i));
  float best = hmax(m);
  for (int64_t i = n8; i < n; ++i) best = v[i] > best ? v[i] : best;
  const Vec b = vset1(best);
  for (int64_t i = 0; i < n8; i += 8) {
    const int hit = vmask_eq(vload(v + i), b);
    if (hit != 0) return i + __builtin_ctz(static_cast<unsigned>(hit));
  }
  for (int64_t i = n8; i < n; ++i)
    if (v[i] == best) return i;
  return 0;
}

struct Candidate {
  float x, e;     // logit / T, exp(x - x_max)
  int32_t token;  // candidates are gathered in token order
  bool keep;
};

// Calls f(base, x, e) for each 8 tokens from base (a tail padded with -inf: x = -inf, e = 0), so every token's
// exp comes from the same vexp.
template <typename F>
inline void for_scaled(const float* logits, int64_t n, float t, float x_max, F&& f) {
  const Vec vt = vset1(t), vmax_x = vset1(x_max);
  const int64_t n8 = n & ~int64_t{7};
  for (int64_t i = 0; i < n8; i += 8) {
    const Vec x = vdiv(vload(logits + i), vt);
    f(i, x, vexp(vsub(x, vmax_x)));
  }
  if (n8 < n) {
    float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = n8 + i < n ? logits[n8 + i] : -INFINITY;
    const Vec x = vdiv(vload(tail), vt);
    f(n8, x, vexp(vsub(x, vmax_x)));
  }
}

// The softmax's sum of e, and the candidates (x > floor) appended in token order.
inline float gather_candidates(const float* logits, int64_t n, float t, float x_max, float floor,
                               std::vector<Candidate>& out) {
  Vec sum = vzero();
  const Vec vfloor = vset1(floor);
  for_scaled(logits, n, t, x_max, [&](int64_t base, Vec x, Vec e) {
    sum = vadd(sum, e);
    int hit = vmask_gt(x, vfloor);
    if (hit == 0) return;
    float xs[8], es[8];
    vstore(xs, x);
    vstore(es, e);
    while (hit != 0) {
      const int lane = __builtin_ctz(static_cast<unsigned>(hit));
      hit &= hit - 1;
      out.push_back(Candidate{xs[lane], es[lane], static_cast<int32_t>(base + lane), false});
    }
  });
  return hsum(sum);
}

// ------------------------------------------------------------------------------------------ top-k / top-p prefix

struct Ranked {
  float p;
  int32_t pos;  // index into the candidates
};

struct ByProbDesc {
  bool operator()(const Ranked& a, const Ranked& b) const { return a.p > b.p; }
};

// After partitioning a (descending, as nth_element does), the largest L in [lo, hi] such that the top L ranks
// number at most k and hold mass < tau (a monotone condition); `mass` comes in as that of a[0, lo) and leaves as
// that of a[0, L). a[lo, L) are then the ranks lo..L-1 (as a set).
inline int64_t select_prefix(Ranked* a, int64_t lo, int64_t hi, int64_t k, double tau, double& mass) {
  while (hi - lo > 32) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(a + lo, a + mid, a + hi, ByProbDesc{});
    double m = mass;
    for (int64_t j = lo; j < mid; ++j) m += a[j].p;
    if (mid <= k && m < tau) {
      lo = mid;
      mass = m;
    } else {
      hi = mid;
    }
  }
  std::sort(a + lo, a + hi, ByProbDesc{});
  while (lo < hi && lo + 1 <= k && mass + a[lo].p < tau) mass += a[lo++].p;
  return lo;
}

// The reference's rule at one rank, given the double cumsum through it.
inline bool prefix_keeps(int64_t rank, double cumsum, float p, int64_t k, float top_p) {
  return rank == 0 || (rank < k && static_cast<float>(cumsum) - p < top_p);
}

// Marks the candidates in `ranked` (the most likely ones: every token outside has a lower p, so the ranks inside
// are the row's) that the top-k / top-p prefix keeps. Returns false where equal probabilities straddle the cut:
// the survivors then depend on torch.topk's order of ties. `reaches_end`: whether the ranks the exact rule decided
// run to the last of `ranked` (the cut may then lie past it).
inline bool mark_prefix(std::vector<Ranked>& ranked, std::vector<Candidate>& cand, int64_t k, float top_p,
                        bool& reaches_end) {
  Ranked* a = ranked.data();
  const int64_t n = static_cast<int64_t>(ranked.size());
  double mass_lo = 0.0;
  const int64_t sure = select_prefix(a, 0, n, k, top_p - kMassMargin, mass_lo);
  double mass_hi = mass_lo;
  const int64_t unsure = select_prefix(a, sure, n, k, top_p + kMassMargin, mass_hi);
  const int64_t end = unsure < n ? unsure + 1 : n;  // ranks from `end` on surely fall outside
  reaches_end = end == n && sure < n;
  if (end > sure) {
    std::nth_element(a + sure, a + end - 1, a + n, ByProbDesc{});
    std::sort(a + sure, a + end - 1, ByProbDesc{});
  }
  for (int64_t r = 0; r < sure; ++r) cand[a[r].pos].keep = true;
  double cumsum = mass_lo;
  bool previous = sure > 0, split_tie = false;
  for (int64_t r = sure; r < end; ++r) {
    cumsum += a[r].p;
    const bool keep = prefix_keeps(r, cumsum, a[r].p, k, top_p);
    if (r > 0 && keep != previous) {
      if (r > sure) {
        split_tie |= a[r - 1].p == a[r].p;
      } else {  // the smallest surely kept one sits anywhere in a[0, sure)
        for (int64_t j = 0; j < sure; ++j) split_tie |= a[j].p == a[r].p;
      }
    }
    cand[a[r].pos].keep = keep;
    previous = keep;
  }
  if (previous && end < n) {  // the last evaluated rank survives, the next does not
    const float last = a[end - 1].p;
    for (int64_t j = end; j < n; ++j) split_tie |= a[j].p == last;
  }
  return !split_tie;
}

struct Scratch {
  std::vector<Candidate> candidates;
  std::vector<Ranked> ranked;
};

// ------------------------------------------------------------------------------------------------------- a row

inline float prob_exponent(float p) {
  uint32_t bits;
  __builtin_memcpy(&bits, &p, 4);
  return static_cast<float>(bits >> 23);  // p >= 0: the biased exponent
}

enum class Cut { kMarked, kGatherMore, kNeedsTorchOrder };

// Marks the candidates that min-p and the top-k / top-p prefix keep. The prefix is only ranked among the tokens
// that can reach it: a histogram by p's exponent finds the first power-of-two band that lies wholly past the cut
// (top_p + kMassMargin of the mass, or k tokens, above it), and only the bands above it are ranked. kGatherMore
// where the candidates end at `gathered_floor` and the cut may lie past them.
inline Cut mark_cut(std::vector<Candidate>& cand, float inv, float min_p_floor, int64_t k, float top_p,
                    bool gathered_floor, Scratch& s) {
  double band_mass[256] = {};
  int64_t band_count[256] = {};
  bool all_ranked = true;
  for (const Candidate& c : cand) {
    const float p = c.e * inv;
    if (p < min_p_floor) {
      all_ranked = false;  // min-p drops it, and every token with a lower p
      continue;
    }
    const int band = static_cast<int>(prob_exponent(p));
    band_mass[band] += p;
    ++band_count[band];
  }
  int past = -1;  // bands <= past are outside the prefix
  double above = 0.0;
  int64_t above_count = 0;
  for (int band = 255; band >= 0; --band) {
    if (above >= static_cast<double>(top_p) + kMassMargin || above_count >= k) {
      past = band;
      break;
    }
    above += band_mass[band];
    above_count += band_count[band];
  }
  s.ranked.clear();
  for (size_t i = 0; i < cand.size(); ++i) {
    cand[i].keep = false;
    const float p = cand[i].e * inv;
    if (p < min_p_floor) continue;
    if (static_cast<int>(prob_exponent(p)) <= past) {
      all_ranked = false;
      continue;
    }
    s.ranked.push_back(Ranked{p, static_cast<int32_t>(i)});
  }
  bool reaches_end = false;
  if (!mark_prefix(s.ranked, cand, k, top_p, reaches_end)) return Cut::kNeedsTorchOrder;
  return gathered_floor && all_ranked && reaches_end ? Cut::kGatherMore : Cut::kMarked;
}

inline bool survives(const std::vector<Candidate>& cand, int64_t token) {
  size_t lo = 0, hi = cand.size();  // candidates are in token order
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (cand[mid].token < token) lo = mid + 1; else hi = mid;
  }
  return lo < cand.size() && cand[lo].token == token && cand[lo].keep;
}

// One row's token; kNeedsTorchOrder where ties straddle the cut and `prefix` (the reference's top-k / top-p keep
// mask, [vocab]) is null.
inline int64_t sample_row(const float* logits, int64_t vocab, float temperature, int64_t top_k, float top_p,
                          float min_p, int64_t seed, int64_t step, const bool* prefix, Scratch& s) {
  if (temperature == 0.0f) return argmax_first(logits, vocab);
  const float t = temperature > 0.0f ? temperature : 1.0f;
  const int64_t first_top = argmax_first(logits, vocab);
  const float x_max = logits[first_top] / t;  // division by t > 0 keeps the order
  if (!(x_max > -INFINITY)) return 0;  // no finite logit: the reference has no survivor, and argmax gives 0
  const int64_t k = top_k > 0 && top_k < vocab ? top_k : vocab;
  const bool cut = k < vocab || top_p < 1.0f;
  // With top-k on, top-p's mass is measured over top-k's survivors (every token tied with the k-th included):
  // ops.cpp computes that prefix with ATen and the row is drawn again with it.
  if (k < vocab && prefix == nullptr) return kNeedsTorchOrder;
  RowNoise noise(seed, step);
  std::vector<Candidate>& cand = s.candidates;
  const float first_score = x_max + noise(first_top);
  // First the tokens within GUMBEL_MAX of the first top token's race score: all that can win if it survives
  // (min-p keeps p_max; the prefix's rank 0 is a token at p_max, this one unless a tie went to another). Else
  // every token within kRaceReach of x_max.
  for (int attempt = 0;; ++attempt) {
    const bool tight = attempt == 0;
    cand.clear();
    const float floor = tight ? first_score - kGumbelMax : x_max - kRaceReach;
    const float inv = 1.0f / gather_candidates(logits, vocab, t, x_max, floor, cand);
    float p_max = 0.0f;
    for (const Candidate& c : cand) p_max = most(p_max, c.e * inv);
    const float min_p_floor = min_p * p_max;
    if (cut && prefix != nullptr) {
      for (Candidate& c : cand) c.keep = prefix[c.token] && c.e * inv >= min_p_floor;
    } else if (cut) {
      const Cut marked = mark_cut(cand, inv, min_p_floor, k, top_p, tight, s);
      if (marked == Cut::kNeedsTorchOrder) return kNeedsTorchOrder;
      if (marked == Cut::kGatherMore) continue;
    } else {
      for (Candidate& c : cand) c.keep = c.e * inv >= min_p_floor;
    }
    float best = -INFINITY;
    int64_t winner = 0;
    if (survives(cand, first_top)) {
      best = first_score;
      winner = first_top;
    } else if (tight) {
      continue;
    } else {
      const Candidate* top = nullptr;
      for (const Candidate& c : cand)
        if (c.keep && (top == nullptr || c.x > top->x)) top = &c;
      if (top == nullptr) return 0;  // no survivor (min_p > 1): the reference's argmax over -inf scores
      best = top->x + noise(top->token);
      winner = top->token;
    }
    // The race, from a survivor's score. Since -log(U) >= 1 - U, a token's noise is at most -log(1 - U): it can
    // reach the best score so far only if 1 - U <= exp(x - best) = e * exp(x_max - best). That test takes no log,
    // and few tokens pass it (about sum(exp(x - best)): a handful), so most draw only their Philox word.
    // kRaceSlack covers the fp32 rounding of x + g.
    const float race_floor = best - kGumbelMax;
    const auto reach_factor = [&] { return exp(static_cast<double>(x_max) - best + kRaceSlack + fabsf(best) * 1e-6); };
    double factor = reach_factor();
    for (const Candidate& c : cand) {
      if (!c.keep || !(c.x > race_floor) || c.token == winner) continue;
      const uint32_t word = noise.word(c.token);
      if (1.0 - static_cast<double>(uniform_from_word(word)) > c.e * factor) continue;
      const float score = c.x + gumbel_from_word(word);
      if (score > best || (score == best && c.token < winner)) {  // ties go to the lower token
        best = score;
        winner = c.token;
        factor = reach_factor();
      }
    }
    return winner;
  }
}

void run_rows(const SamplerArgs& a, int64_t begin, int64_t end) {
  static thread_local Scratch scratch;
  for (int64_t row = begin; row < end; ++row) {
    a.tokens[row] = sample_row(a.logits + row * a.ld, a.vocab, a.temperature[row], a.top_k[row], a.top_p[row],
                               a.min_p[row], a.seeds[row], a.steps[row], nullptr, scratch);
  }
}

void run_row_with_prefix(const SamplerArgs& a, int64_t row, const bool* prefix) {
  static thread_local Scratch scratch;
  a.tokens[row] = sample_row(a.logits + row * a.ld, a.vocab, a.temperature[row], a.top_k[row], a.top_p[row],
                             a.min_p[row], a.seeds[row], a.steps[row], prefix, scratch);
}

}  // namespace
