// The fused elementwise ops (rms_norm, fused_add_rms_norm, silu_and_mul, rotary_write_kv): the argument checks
// the CPU kernels (fused_ops.cpp) and the CUDA kernels (cuda/fused_ops.cu) share, so both reject the same calls
// with the same messages. Defined in fused_ops.cpp.
#pragma once

#include <ATen/ATen.h>

namespace stage1 {

// x [..., hidden] and (fused) residual of x's shape, both contiguous; weight [hidden]; one floating dtype.
void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight);

// x [..., 2 * d], last dimension dense.
void check_silu_and_mul_args(const at::Tensor& x);

// qk [tokens, heads + kv_heads, head_dim] (head_dim dense), v [tokens, kv_heads, head_dim] (head_dim dense),
// cos/sin one fp32 row of head_dim / 2 per token (any token stride), kv_cache [2, blocks, block_size, kv_heads,
// head_dim] (head_dim dense) in qk's dtype, slot_mapping [tokens] int64.
void check_rotary_write_kv_args(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& kv_cache, const at::Tensor& slot_mapping);

}  // namespace stage1
