// The CUDA kernels of the fused elementwise ops (cuda/fused_ops.cuh), registered for torch.ops.stage1.* on CUDA
// tensors. The schemas, the CPU and Meta kernels and the argument checks are fused_ops.cpp's; this file only maps
// tensors to raw pointers on the current stream (capturable in a CUDA graph: no host sync, no allocation
// besides the outputs). Compiled only under STAGE1_CUDA (a CUDA torch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/fused_ops.cuh"
#include "fused_ops.h"

namespace stage1 {
namespace {

// fn(T{}) with T the CUDA storage type of `type`
template <typename Fn>
void with_cuda_type(at::ScalarType type, const char* op, Fn&& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(__half{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, " (CUDA): float32, float16 or bfloat16 only, got ", type);
  }
}

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check_on_cuda(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const at::Device device = (*tensors.begin())->device();
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == device, op, ": all tensors must be on one CUDA device");
  }
}

int checked_int(int64_t n, const char* op) {
  TORCH_CHECK(n <= std::numeric_limits<int>::max(), op, ": a row of ", n, " elements is too long");
  return static_cast<int>(n);
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args("rms_norm", x, nullptr, weight);
  check_on_cuda("rms_norm", {&x, &weight});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const at::Tensor w = weight.contiguous();
  const int64_t hidden = x.size(-1);
  with_cuda_type(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    cuda::launch_rms_norm<T>(ptr<T>(out), ptr<T>(x), nullptr, ptr<T>(w), x.numel() / hidden,
                             checked_int(hidden, "rms_norm"), static_cast<float>(eps),
                             c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                             double eps) {
  check_rms_norm_args("fused_add_rms_norm", x, &residual, weight);
  check_on_cuda("fused_add_rms_norm", {&x, &residual, &weight});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.contiguous();
  const int64_t hidden = x.size(-1);
  with_cuda_type(x.scalar_type(), "fused_add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    cuda::launch_rms_norm<T>(ptr<T>(x), ptr<T>(x), ptr<T>(residual), ptr<T>(w), x.numel() / hidden,
                             checked_int(hidden, "fused_add_rms_norm"), static_cast<float>(eps),
                             c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor silu_and_mul_cuda(const at::Tensor& x) {
  check_silu_and_mul_args(x);
  check_on_cuda("silu_and_mul", {&x});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  with_cuda_type(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    cuda::launch_silu_and_mul<T>(ptr<T>(out), ptr<T>(xc), xc.numel() / (2 * d), checked_int(d, "silu_and_mul"),
                                 c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void rotary_write_kv_cuda(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  check_rotary_write_kv_args(qk, v, cos, sin, kv_cache, slot_mapping);
  check_on_cuda("rotary_write_kv", {&qk, &v, &cos, &sin, &kv_cache, &slot_mapping});
  const c10::cuda::CUDAGuard guard(qk.device());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();  // no copy for the engine's int64 slots
  cuda::RotaryKVArgs a;
  a.qk_stride_token = qk.stride(0);
  a.qk_stride_head = qk.stride(1);
  a.v_stride_token = v.stride(0);
  a.v_stride_head = v.stride(1);
  a.cos_stride = cos.stride(0);
  a.sin_stride = sin.stride(0);
  a.cache_stride_block = kv_cache.stride(1);
  a.cache_stride_slot = kv_cache.stride(2);
  a.cache_stride_head = kv_cache.stride(3);
  a.kv_heads = static_cast<int>(kv_cache.size(3));
  a.heads = static_cast<int>(qk.size(1)) - a.kv_heads;
  a.head_dim = static_cast<int>(qk.size(2));
  a.block_size = static_cast<int>(kv_cache.size(2));
  with_cuda_type(qk.scalar_type(), "rotary_write_kv", [&](auto tag) {
    using T = decltype(tag);
    T* k_cache = ptr<T>(kv_cache);
    cuda::launch_rotary_write_kv<T>(ptr<T>(qk), ptr<T>(v), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache,
                                    k_cache + kv_cache.stride(0), slots.data_ptr<int64_t>(), qk.size(0), a,
                                    c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace stage1

TORCH_LIBRARY_IMPL(stage1, CUDA, m) {
  m.impl("rms_norm", &stage1::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &stage1::fused_add_rms_norm_cuda);
  m.impl("silu_and_mul", &stage1::silu_and_mul_cuda);
  m.impl("rotary_write_kv", &stage1::rotary_write_kv_cuda);
}
