// The fused elementwise ops of a decoder layer, registered as torch.ops.stage1.* (schemas, CPU and Meta kernels;
// the CUDA kernels are cuda/fused_ops.cu's): RMSNorm with and without the residual add, SiLU(gate) * up, and
// rotary of q|k heads with the KV-cache write. Each one computes what the model's unfused PyTorch ops compute, in
// the run dtype: fp32 math, rounded to the dtype wherever the unfused ops round (plain-PyTorch references beside
// the Python wrappers, stage1/engine/layers/norm.py, activation.py and stage1/engine/attention.py).
//
// On the CPU these passes are small next to a layer's matmuls; they are plain loops in the baseline ISA, parallel
// over rows (silu_and_mul: ATen's vectorized silu and mul). Their point is the GPU, where each replaces several
// kernel launches (cuda/fused_ops.cuh).
#include "fused_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace stage1 {

// ------------------------------------------------------------------------------------------------------ checks

void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must be [..., hidden], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [hidden] (", x.size(-1),
              "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight (", weight.scalar_type(), ") and x (",
              x.scalar_type(), ") must have one dtype");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual (", residual->scalar_type(),
                ") and x (", x.scalar_type(), ") must have one dtype");
    TORCH_CHECK(residual->is_contiguous(), op, ": residual must be contiguous");
  }
}

void check_silu_and_mul_args(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_and_mul: x must be [..., 2 * d], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "silu_and_mul: x must be floating point, got ", x.scalar_type());
}

void check_rotary_write_kv_args(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(qk.dim() == 3 && qk.size(2) % 2 == 0, "rotary_write_kv: qk must be [tokens, heads + kv_heads, "
              "head_dim] with an even head_dim, got ", qk.sizes());
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(4) == qk.size(2),
              "rotary_write_kv: kv_cache must be [2, num_blocks, block_size, kv_heads, head_dim = ", qk.size(2),
              "], got ", kv_cache.sizes());
  const int64_t tokens = qk.size(0), kv_heads = kv_cache.size(3), half = qk.size(2) / 2;
  TORCH_CHECK(qk.size(1) > kv_heads, "rotary_write_kv: qk holds ", qk.size(1), " heads, not the cache's ", kv_heads,
              " KV heads plus at least one query head");
  TORCH_CHECK(v.dim() == 3 && v.size(0) == tokens && v.size(1) == kv_heads && v.size(2) == qk.size(2),
              "rotary_write_kv: v must be [tokens, kv_heads, head_dim] = [", tokens, ", ", kv_heads, ", ",
              qk.size(2), "], got ", v.sizes());
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() >= 1 && t->size(0) == tokens && t->size(-1) == half && t->numel() == tokens * half,
                "rotary_write_kv: cos and sin must hold one row of head_dim / 2 = ", half, " angles per token (",
                tokens, " tokens), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->stride(-1) == 1,
                "rotary_write_kv: cos and sin must be float32 with dense rows");
  }
  TORCH_CHECK(qk.scalar_type() == v.scalar_type() && qk.scalar_type() == kv_cache.scalar_type(),
              "rotary_write_kv: qk (", qk.scalar_type(), "), v (", v.scalar_type(), ") and kv_cache (",
              kv_cache.scalar_type(), ") must have one dtype");
  TORCH_CHECK(at::isFloatingType(qk.scalar_type()), "rotary_write_kv: qk must be floating point");
  TORCH_CHECK(qk.stride(2) == 1 && v.stride(2) == 1 && kv_cache.stride(4) == 1,
              "rotary_write_kv: qk, v and kv_cache must be dense along head_dim");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens && !at::isFloatingType(slot_mapping.scalar_type()),
              "rotary_write_kv: slot_mapping must be [tokens] integers, got ", slot_mapping.sizes());
}

namespace {

// ------------------------------------------------------------------------------------------------- RMSNorm (CPU)

// Rows per task: ~64k elements, so a decode step's few rows do not pay for threads.
int64_t row_grain(int64_t row_elements) { return std::max<int64_t>(1, (int64_t{1} << 16) / row_elements); }

// out <- weight * T(h * rsqrt(mean(h^2) + eps)) per row, h = residual <- T(x + residual) with a residual, else x.
// out may be x (the fused op): x is read before out is written.
template <typename T>
void rms_norm_rows(T* out, const T* x, T* residual, const T* weight, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      float sums[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // independent lanes: vectorizable, and accurate
      if (residual != nullptr) {
        T* rr = residual + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
          const T sum = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          rr[i] = sum;
          h[i] = static_cast<float>(sum);
        }
      } else {
        for (int64_t i = 0; i < hidden; ++i) h[i] = static_cast<float>(xr[i]);
      }
      int64_t i = 0;
      for (; i + 8 <= hidden; i += 8) {
        for (int j = 0; j < 8; ++j) sums[j] += h[i + j] * h[i + j];
      }
      for (; i < hidden; ++i) sums[i % 8] += h[i] * h[i];
      const float total = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
      const float inv_rms = 1.0f / std::sqrt(total / static_cast<float>(hidden) + eps);
      T* o = out + r * hidden;
      for (i = 0; i < hidden; ++i) {
        o[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(static_cast<T>(h[i] * inv_rms)));
      }
    }
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args("rms_norm", x, nullptr, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), nullptr, w.data_ptr<scalar_t>(), rows,
                            hidden, static_cast<float>(eps));
  });
  return out;
}

void fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rms_norm_args("fused_add_rms_norm", x, &residual, weight);
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                            w.data_ptr<scalar_t>(), rows, hidden, static_cast<float>(eps));
  });
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) { return at::empty_like(x); }

void fused_add_rms_norm_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) {}

// -------------------------------------------------------------------------------------------- silu_and_mul (CPU)

// ATen's silu, then the product into the same output: ATen's CPU kernels vectorize exp with the machine's widest
// ISA (a scalar expf loop here measured 2-8x slower than the unfused ops at M = 1 and 32 on the 0.5B's 4864
// channels), and the result rounds as F.silu(gate).mul_(up) does. The fused single pass is the CUDA kernel's.
at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  check_silu_and_mul_args(x);
  const int64_t d = x.size(-1) / 2;
  at::Tensor out = at::silu(x.narrow(-1, 0, d));
  return out.mul_(x.narrow(-1, d, d));
}

at::Tensor silu_and_mul_meta(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_and_mul: x must be [..., 2 * d], got ", x.sizes());
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end());
  shape.back() = shape.back() / 2;
  return at::empty_symint(shape, x.options());
}

// ----------------------------------------------------------------------------------------- rotary_write_kv (CPU)

void rotary_write_kv_cpu(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  check_rotary_write_kv_args(qk, v, cos, sin, kv_cache, slot_mapping);
  const int64_t tokens = qk.size(0), all_heads = qk.size(1), head_dim = qk.size(2), half = head_dim / 2;
  const int64_t kv_heads = kv_cache.size(3), heads = all_heads - kv_heads, block_size = kv_cache.size(2);
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t capacity = kv_cache.size(1) * block_size;
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot[t] < capacity, "rotary_write_kv: slot ", slot[t], " is outside the cache's ", capacity,
                " slots");
  }
  const float* cos_base = cos.data_ptr<float>();
  const float* sin_base = sin.data_ptr<float>();
  const int64_t cos_stride = cos.stride(0), sin_stride = sin.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "rotary_write_kv", [&] {
    scalar_t* qk_base = qk.data_ptr<scalar_t>();
    const scalar_t* v_base = v.data_ptr<scalar_t>();
    scalar_t* k_cache = kv_cache.data_ptr<scalar_t>();
    scalar_t* v_cache = k_cache + kv_cache.stride(0);
    at::parallel_for(0, tokens, row_grain(all_heads * head_dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cos_base + t * cos_stride;
        const float* s = sin_base + t * sin_stride;
        for (int64_t h = 0; h < all_heads; ++h) {
          scalar_t* x = qk_base + t * qk.stride(0) + h * qk.stride(1);
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
            x[i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
            x[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
          }
        }
        if (slot[t] < 0) continue;  // padding
        const int64_t offset = (slot[t] / block_size) * kv_cache.stride(1) + (slot[t] % block_size) * kv_cache.stride(2);
        for (int64_t h = 0; h < kv_heads; ++h) {
          const scalar_t* k = qk_base + t * qk.stride(0) + (heads + h) * qk.stride(1);
          const scalar_t* vr = v_base + t * v.stride(0) + h * v.stride(1);
          std::copy(k, k + head_dim, k_cache + offset + h * kv_cache.stride(3));
          std::copy(vr, vr + head_dim, v_cache + offset + h * kv_cache.stride(3));
        }
      }
    });
  });
}

void rotary_write_kv_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&) {}

}  // namespace
}  // namespace stage1

TORCH_LIBRARY_FRAGMENT(stage1, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_write_kv(Tensor(a!) qk, Tensor v, Tensor cos, Tensor sin, Tensor(b!) kv_cache, Tensor slot_mapping)"
        " -> ()");
}

TORCH_LIBRARY_IMPL(stage1, CPU, m) {
  m.impl("rms_norm", &stage1::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &stage1::fused_add_rms_norm_cpu);
  m.impl("silu_and_mul", &stage1::silu_and_mul_cpu);
  m.impl("rotary_write_kv", &stage1::rotary_write_kv_cpu);
}

TORCH_LIBRARY_IMPL(stage1, Meta, m) {
  m.impl("rms_norm", &stage1::rms_norm_meta);
  m.impl("fused_add_rms_norm", &stage1::fused_add_rms_norm_meta);
  m.impl("silu_and_mul", &stage1::silu_and_mul_meta);
  m.impl("rotary_write_kv", &stage1::rotary_write_kv_meta);
}
