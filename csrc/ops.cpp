// stage1._C: the native ops, registered with the dispatcher as torch.ops.stage1.* (CPU and Meta kernels here; the
// CUDA kernels register in cuda/*.cu when STAGE1_WITH_CUDA is defined). Importing stage1._C loads this library,
// whose static TORCH_LIBRARY blocks register the ops; its Python functions (the CPU kernel set, build information)
// are a plain pybind11 module in python/module.cpp, which includes no torch header and does not link torch_python.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu/decode_attention.h"
#include "cpu/linear_bf16w.h"
#include "cpu/sampler.h"
#include "isa.h"

namespace stage1 {
namespace {

// ------------------------------------------------------------------------------------------ ISA dispatch (CPU)

cpu::DecodeAttentionFn decode_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (active_isa() == Isa::kAvx2) return cpu::decode_attention_avx2;
#endif
  return cpu::decode_attention_scalar;
}

cpu::LinearBf16wFn linear_bf16w_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (active_isa() == Isa::kAvx2) return cpu::linear_bf16w_avx2;
#endif
  return cpu::linear_bf16w_scalar;
}

cpu::SampleRowsFn sample_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (active_isa() == Isa::kAvx2) return cpu::sample_rows_avx2;
#endif
  return cpu::sample_rows_scalar;
}

cpu::SampleRowWithPrefixFn sample_with_prefix_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (active_isa() == Isa::kAvx2) return cpu::sample_row_with_prefix_avx2;
#endif
  return cpu::sample_row_with_prefix_scalar;
}

cpu::GumbelNoiseFn gumbel_noise_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (active_isa() == Isa::kAvx2) return cpu::gumbel_noise_avx2;
#endif
  return cpu::gumbel_noise_scalar;
}

// -------------------------------------------------------------------------------------- paged decode attention

void check_decode_args(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                       const at::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [seqs, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "paged_decode_attention: kv_cache must be [2, num_blocks, block_size, kv_heads, head_dim], got ",
              kv_cache.sizes());
  TORCH_CHECK(kv_cache.size(4) == q.size(2), "paged_decode_attention: head_dim of q (", q.size(2),
              ") and kv_cache (", kv_cache.size(4), ") differ");
  TORCH_CHECK(kv_cache.size(3) > 0 && q.size(1) % kv_cache.size(3) == 0, "paged_decode_attention: heads (",
              q.size(1), ") must be a multiple of kv_heads (", kv_cache.size(3), ")");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
              "paged_decode_attention: block_tables must be [seqs, max_blocks], got ", block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == q.size(0),
              "paged_decode_attention: context_lens must be [seqs], got ", context_lens.sizes());
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& kv_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                                      double scale) {
  check_decode_args(q, kv_cache, block_tables, context_lens);
  const int64_t seqs = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = kv_cache.size(3), block_size = kv_cache.size(2);
  TORCH_CHECK(head_dim % 8 == 0 && head_dim <= cpu::kMaxHeadDim,
              "paged_decode_attention (CPU): head_dim must be a multiple of 8 and at most ", cpu::kMaxHeadDim,
              ", got ", head_dim);
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat || kv_cache.scalar_type() == at::kBFloat16,
              "paged_decode_attention (CPU): kv_cache must be float32 or bfloat16, got ", kv_cache.scalar_type());
  TORCH_CHECK(kv_cache.stride(4) == 1, "paged_decode_attention (CPU): kv_cache's last dimension must be dense");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "paged_decode_attention: q must be floating point");

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  at::Tensor out = at::empty({seqs, heads, head_dim}, q.options().dtype(at::kFloat));
  {
    const int32_t* len = lens.data_ptr<int32_t>();
    const int64_t capacity = tables.size(1) * block_size;
    const int64_t num_blocks = kv_cache.size(1);
    const int32_t* table = tables.data_ptr<int32_t>();
    for (int64_t s = 0; s < seqs; ++s) {
      TORCH_CHECK(len[s] <= capacity, "paged_decode_attention: context_lens[", s, "] = ", len[s],
                  " exceeds the block table's ", capacity, " slots");
      for (int64_t b = 0; b < (len[s] + block_size - 1) / block_size; ++b) {
        const int32_t block = table[s * tables.size(1) + b];
        TORCH_CHECK(block >= 0 && block < num_blocks, "paged_decode_attention: block_tables[", s, ", ", b,
                    "] = ", block, " is outside the cache's ", num_blocks, " blocks");
      }
    }
  }
  const int64_t elem = kv_cache.element_size();
  cpu::DecodeAttentionArgs args;
  args.q = qf.data_ptr<float>();
  args.out = out.data_ptr<float>();
  args.k_cache = kv_cache.data_ptr();
  args.v_cache = static_cast<const char*>(kv_cache.data_ptr()) + kv_cache.stride(0) * elem;
  args.stride_block = kv_cache.stride(1);
  args.stride_slot = kv_cache.stride(2);
  args.stride_head = kv_cache.stride(3);
  args.block_tables = tables.data_ptr<int32_t>();
  args.table_stride = tables.size(1);
  args.context_lens = lens.data_ptr<int32_t>();
  args.num_kv_heads = kv_heads;
  args.group = heads / kv_heads;
  args.head_dim = head_dim;
  args.block_size = block_size;
  args.scale = static_cast<float>(scale);
  args.cache_type = kv_cache.scalar_type() == at::kBFloat16 ? cpu::CacheType::kBFloat16 : cpu::CacheType::kFloat32;
  const cpu::DecodeAttentionFn kernel = decode_kernel();
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

at::Tensor paged_decode_attention_meta(const at::Tensor& q, const at::Tensor& kv_cache,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                                       double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5, "paged_decode_attention: q must be 3-d and kv_cache 5-d");
  return at::empty_symint(q.sym_sizes(), q.options());
}

// ------------------------------------------------------------------------------------------------------ write_kv

void write_kv_cpu(const at::Tensor& kv_cache, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2, "write_kv: kv_cache must be 5-d [2, ...]");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "write_kv: k and v must be [tokens, kv_heads, head_dim]");
  TORCH_CHECK(k.size(1) == kv_cache.size(3) && k.size(2) == kv_cache.size(4),
              "write_kv: k/v heads and head_dim must match the cache's");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), "write_kv: slot_mapping must be [tokens]");
  const int64_t row = kv_cache.size(3) * kv_cache.size(4);
  TORCH_CHECK(kv_cache.stride(4) == 1 && kv_cache.stride(3) == kv_cache.size(4) && kv_cache.stride(2) == row,
              "write_kv (CPU): each cache slot's [kv_heads, head_dim] must be dense");
  const at::Tensor kc = k.to(kv_cache.scalar_type()).contiguous();
  const at::Tensor vc = v.to(kv_cache.scalar_type()).contiguous();
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t block_size = kv_cache.size(2), capacity = kv_cache.size(1) * block_size;
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.size(0); ++t) {
    TORCH_CHECK(slot[t] < capacity, "write_kv: slot ", slot[t], " is outside the cache's ", capacity, " slots");
  }
  const int64_t elem = kv_cache.element_size(), bytes = row * elem;
  char* k_base = static_cast<char*>(kv_cache.data_ptr());
  char* v_base = k_base + kv_cache.stride(0) * elem;
  const char* k_src = static_cast<const char*>(kc.data_ptr());
  const char* v_src = static_cast<const char*>(vc.data_ptr());
  const int64_t stride_block = kv_cache.stride(1) * elem, stride_slot = kv_cache.stride(2) * elem;
  at::parallel_for(0, slots.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slot[t] < 0) continue;  // padding
      const int64_t offset = (slot[t] / block_size) * stride_block + (slot[t] % block_size) * stride_slot;
      std::memcpy(k_base + offset, k_src + t * bytes, bytes);
      std::memcpy(v_base + offset, v_src + t * bytes, bytes);
    }
  });
}

void write_kv_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {}

// -------------------------------------------------------------------------------------------------- linear_bf16w

void check_linear_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "linear_bf16w: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "linear_bf16w: w must be [N, K] with K = x.size(1) (",
              x.size(1), "), got ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "linear_bf16w: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "linear_bf16w: w must be bfloat16, got ", w.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "linear_bf16w: bias must be [N] (", w.size(0),
                "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "linear_bf16w: bias must be float32, got ", bias->scalar_type());
  }
}

// Rows of x from which the op widens W to fp32 a chunk of rows at a time and multiplies with ATen's GEMM
// (compute-bound there: the widening is N*K element copies against M*N*K multiply-adds).
constexpr int64_t kGemmMinRows = 256;
constexpr int64_t kGemmChunkRows = 1024;

at::Tensor linear_bf16w_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_linear_args(x, w, bias);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor wc = w.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  if (M >= kGemmMinRows) {
    for (int64_t n0 = 0; n0 < N; n0 += kGemmChunkRows) {
      const int64_t rows = std::min(kGemmChunkRows, N - n0);
      const at::Tensor wf = wc.narrow(0, n0, rows).to(at::kFloat);
      at::Tensor out = y.narrow(1, n0, rows);
      if (bc.has_value()) {
        at::addmm_out(out, bc->narrow(0, n0, rows), xc, wf.t());
      } else {
        at::mm_out(out, xc, wf.t());
      }
    }
    return y;
  }
  cpu::LinearBf16wArgs args;
  args.x = xc.data_ptr<float>();
  args.w = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  args.bias = bc.has_value() ? bc->data_ptr<float>() : nullptr;
  args.y = y.data_ptr<float>();
  args.M = M;
  args.N = N;
  args.K = K;
  args.ldx = xc.stride(0);
  args.ldy = N;
  const cpu::LinearBf16wFn kernel = linear_bf16w_kernel();
  const int64_t blocks = (N + cpu::kLinearRows - 1) / cpu::kLinearRows;
  // ~64k multiply-adds per task at least, so small layers do not pay for threads they cannot use
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (cpu::kLinearRows * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(M > cpu::kLinearTileM ? cpu::kLinearRows * K : 0);
    kernel(args, begin, end, scratch.data());
  });
  return y;
}

at::Tensor linear_bf16w_meta(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear_bf16w: x and w must be 2-d");
  return at::empty_symint({x.sym_size(0), w.sym_size(0)}, x.options());
}

// -------------------------------------------------------------------------------------------------------- sample

void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds,
                       const at::Tensor& steps) {
  TORCH_CHECK(logits.dim() == 2, "sample: logits must be [rows, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "sample: logits must be float32, got ", logits.scalar_type());
  const int64_t rows = logits.size(0);
  const std::pair<const char*, const at::Tensor*> floats[] = {{"temperature", &temperature}, {"top_p", &top_p},
                                                              {"min_p", &min_p}};
  const std::pair<const char*, const at::Tensor*> ints[] = {{"top_k", &top_k}, {"seeds", &seeds}, {"steps", &steps}};
  for (const auto& [name, t] : floats) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, "sample: ", name, " must be [rows] (", rows, "), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "sample: ", name, " must be float32, got ", t->scalar_type());
  }
  for (const auto& [name, t] : ints) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, "sample: ", name, " must be [rows] (", rows, "), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kLong, "sample: ", name, " must be int64, got ", t->scalar_type());
  }
}

// The reference's top-k / top-p keep mask for one row (stage1/engine/sampler.py, filtered_probs and
// _prefix_keep), op for op in ATen: torch's softmax and topk are the only source of its order of tied
// probabilities. Top-k keeps every rank tied with the k-th; top-p's mass is measured over top-k's survivors
// (transformers' order). row: [1, vocab] logits; t: [1, 1] the temperature as the reference divides by it; k: the
// row's top-k (vocab: off); top_p: [1].
at::Tensor reference_prefix_keep(const at::Tensor& row, const at::Tensor& t, int64_t k, const at::Tensor& top_p) {
  constexpr int64_t kCandidates = 1024;  // the reference's _PREFIX_CANDIDATES
  const int64_t vocab = row.size(1);
  const bool top_k_on = k < vocab;
  const float p = top_p.item<float>();
  const at::Tensor probs = (row / t).softmax(-1);
  const auto keep_among = [&](int64_t candidates, bool* reached) {
    const auto [top, order] = probs.topk(candidates, -1);
    const at::Tensor cumsum = top.cumsum(-1);
    const at::Tensor mass_before = cumsum - top;
    const at::Tensor kth = top.select(1, std::min(k, candidates) - 1).unsqueeze(1);
    const at::Tensor in_top_k = top.ge(kth);
    const int64_t kept_by_k = in_top_k.sum().item<int64_t>();
    const at::Tensor survivors_mass = cumsum.select(1, kept_by_k - 1);
    const at::Tensor cap = p >= 1.0f ? at::full_like(top_p, INFINITY) : top_k_on ? top_p * survivors_mass : top_p;
    const at::Tensor drop = in_top_k.logical_not().logical_or(mass_before.ge(cap.unsqueeze(1)));
    drop.select(1, 0).fill_(false);
    if (reached != nullptr) {
      const bool k_inside = !top_k_on || (k <= candidates && !in_top_k.select(1, candidates - 1).item<bool>());
      const bool p_inside = p >= 1.0f || top_k_on || top.sum(-1).ge(top_p).item<bool>();
      *reached = candidates >= vocab || (k_inside && p_inside);
    }
    return at::zeros_like(probs, probs.options().dtype(at::kBool)).scatter_(-1, order, drop.logical_not());
  };
  bool reached = false;
  const at::Tensor keep = keep_among(std::min(vocab, kCandidates), &reached);
  return (reached ? keep : keep_among(vocab, nullptr)).contiguous();
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds,
                      const at::Tensor& steps) {
  check_sample_args(logits, temperature, top_k, top_p, min_p, seeds, steps);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 || rows == 0, "sample: the vocabulary is empty");
  TORCH_CHECK(vocab < (int64_t{1} << 31), "sample (CPU): at most 2^31 - 1 tokens per row, got ", vocab);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  const at::Tensor lc = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor tc = temperature.contiguous(), kc = top_k.contiguous(), pc = top_p.contiguous();
  const at::Tensor mc = min_p.contiguous(), sc = seeds.contiguous(), stc = steps.contiguous();
  cpu::SamplerArgs args;
  args.logits = lc.data_ptr<float>();
  args.vocab = vocab;
  args.ld = lc.stride(0);
  args.temperature = tc.data_ptr<float>();
  args.top_k = kc.data_ptr<int64_t>();
  args.top_p = pc.data_ptr<float>();
  args.min_p = mc.data_ptr<float>();
  args.seeds = sc.data_ptr<int64_t>();
  args.steps = stc.data_ptr<int64_t>();
  args.tokens = tokens.data_ptr<int64_t>();
  const cpu::SampleRowsFn kernel = sample_kernel();
  // Rows cost what their candidates cost (a few hundred tokens to most of the vocabulary): each thread takes the
  // next group of rows as it finishes one, rather than a fixed share. A group: ~64k tokens' work.
  const int64_t group = std::max<int64_t>(1, (int64_t{1} << 16) / vocab);
  const int64_t groups = (rows + group - 1) / group;
  std::atomic<int64_t> next_group{0};
  at::parallel_for(0, std::min<int64_t>(groups, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t g = next_group++; g < groups; g = next_group++) {
      kernel(args, g * group, std::min(rows, (g + 1) * group));
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (args.tokens[r] != cpu::kNeedsTorchOrder) continue;
    const at::Tensor t = at::where(tc.narrow(0, r, 1).gt(0), tc.narrow(0, r, 1), 1.0).unsqueeze(1);
    const int64_t k = args.top_k[r] > 0 && args.top_k[r] < vocab ? args.top_k[r] : vocab;
    const at::Tensor prefix = reference_prefix_keep(lc.narrow(0, r, 1), t, k, pc.narrow(0, r, 1));
    sample_with_prefix_kernel()(args, r, prefix.data_ptr<bool>());
  }
  return tokens;
}

at::Tensor sample_meta(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds,
                       const at::Tensor& steps) {
  TORCH_CHECK(logits.dim() == 2, "sample: logits must be [rows, vocab], got ", logits.sizes());
  return at::empty_symint({logits.sym_size(0)}, logits.options().dtype(at::kLong));
}

at::Tensor gumbel_noise_cpu(const at::Tensor& seeds, const at::Tensor& steps, const at::Tensor& tokens) {
  TORCH_CHECK(seeds.sizes() == tokens.sizes() && steps.sizes() == tokens.sizes(),
              "gumbel_noise: seeds, steps and tokens must have one shape, got ", seeds.sizes(), ", ", steps.sizes(),
              ", ", tokens.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong && steps.scalar_type() == at::kLong &&
                  tokens.scalar_type() == at::kLong,
              "gumbel_noise: seeds, steps and tokens must be int64");
  const at::Tensor sc = seeds.contiguous(), stc = steps.contiguous(), tc = tokens.contiguous();
  at::Tensor out = at::empty(tokens.sizes(), tokens.options().dtype(at::kFloat));
  gumbel_noise_kernel()(sc.data_ptr<int64_t>(), stc.data_ptr<int64_t>(), tc.data_ptr<int64_t>(), tc.numel(),
                        out.data_ptr<float>());
  return out;
}

at::Tensor gumbel_noise_meta(const at::Tensor& seeds, const at::Tensor& steps, const at::Tensor& tokens) {
  return at::empty_symint(tokens.sym_sizes(), tokens.options().dtype(at::kFloat));
}

}  // namespace
}  // namespace stage1

TORCH_LIBRARY(stage1, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, float scale)"
        " -> Tensor");
  m.def("write_kv(Tensor(a!) kv_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.def("linear_bf16w(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seeds,"
        " Tensor steps) -> Tensor");
  m.def("gumbel_noise(Tensor seeds, Tensor steps, Tensor tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(stage1, CPU, m) {
  m.impl("paged_decode_attention", &stage1::paged_decode_attention_cpu);
  m.impl("write_kv", &stage1::write_kv_cpu);
  m.impl("linear_bf16w", &stage1::linear_bf16w_cpu);
  m.impl("sample", &stage1::sample_cpu);
  m.impl("gumbel_noise", &stage1::gumbel_noise_cpu);
}

TORCH_LIBRARY_IMPL(stage1, Meta, m) {
  m.impl("paged_decode_attention", &stage1::paged_decode_attention_meta);
  m.impl("write_kv", &stage1::write_kv_meta);
  m.impl("linear_bf16w", &stage1::linear_bf16w_meta);
  m.impl("sample", &stage1::sample_meta);
  m.impl("gumbel_noise", &stage1::gumbel_noise_meta);
}
