// The fused elementwise ops as CUDA kernels on raw pointers: RMSNorm (with the residual add fused or without),
// SiLU(gate) * up, and neox rotary of q|k heads with the KV-cache write. Templated over the storage type (float,
// __half, __nv_bfloat16); math in fp32, rounded to the storage type exactly where the unfused PyTorch ops round
// (the references: stage1/engine/layers/norm.py, activation.py, stage1/engine/attention.py), so fp32 runs match
// them to the last bit or nearly. Each thread moves 16 bytes at a time when every pointer and stride allows it
// (8 bf16/fp16 or 4 fp32 elements), one element at a time otherwise.
//
// No torch header here: cuda/fused_ops.cu includes this and registers the launchers as the ops' CUDA kernels;
// tests/native/cuda_compile_check.cu includes it alone and instantiates every launcher, so the kernels compile
// for sm_80 and sm_90 with nvcc on a machine without a GPU or a CUDA torch (tests/native/test_cuda_compile.py).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace stage1::cuda {

// ----------------------------------------------------------------------------------------------------- helpers

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to T and widened again: an intermediate the unfused ops store in the run dtype
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// N elements loaded and stored as one access (16 bytes at N = 16 / sizeof(T))
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline int threads_for(int64_t items, int max_threads) {
  const int64_t warps = (items + 31) / 32;
  return static_cast<int>(warps < 1 ? 32 : (warps * 32 < max_threads ? warps * 32 : max_threads));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024), in every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// ----------------------------------------------------------------------------------------------------- RMSNorm

// One block per row of `hidden` elements. kResidual: residual <- T(x + residual), out <- norm(residual);
// else out <- norm(x). norm(h) = T(weight * T(h * rsqrt(mean(h^2) + eps))). out may be x: each thread reads its
// own elements of x before writing them.
template <typename T, int N, bool kResidual>
__global__ void rms_norm_kernel(T* out, const T* x, T* residual, const T* __restrict__ weight, int hidden,
                                float eps) {
  using V = Vec<T, N>;
  const int64_t row = blockIdx.x;
  const int vectors = hidden / N;
  const V* xv = reinterpret_cast<const V*>(x + row * hidden);
  V* rv = reinterpret_cast<V*>(residual + (kResidual ? row * hidden : 0));
  float sum = 0.0f;
  for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
    V h = xv[i];
    if constexpr (kResidual) {
      const V r = rv[i];
#pragma unroll
      for (int j = 0; j < N; ++j) h.v[j] = from_float<T>(to_float(h.v[j]) + to_float(r.v[j]));
      rv[i] = h;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) sum += to_float(h.v[j]) * to_float(h.v[j]);
  }
  const float inv_rms = rsqrtf(block_sum(sum) / static_cast<float>(hidden) + eps);
  const V* hv = kResidual ? rv : xv;
  const V* wv = reinterpret_cast<const V*>(weight);
  V* ov = reinterpret_cast<V*>(out + row * hidden);
  for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V h = hv[i], w = wv[i];
    V o;
#pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(__fmul_rn(to_float(w.v[j]), round_to<T>(to_float(h.v[j]) * inv_rms)));
    ov[i] = o;
  }
}

template <typename T, int N>
void launch_rms_norm_width(T* out, const T* x, T* residual, const T* weight, int64_t rows, int hidden, float eps,
                           cudaStream_t stream) {
  const int threads = threads_for(hidden / N, 1024);
  if (residual != nullptr) {
    rms_norm_kernel<T, N, true><<<rows, threads, 0, stream>>>(out, x, residual, weight, hidden, eps);
  } else {
    rms_norm_kernel<T, N, false><<<rows, threads, 0, stream>>>(out, x, residual, weight, hidden, eps);
  }
}

// rows x hidden, contiguous. residual == nullptr: out <- rms_norm(x); else the fused op (out = x, in place).
template <typename T>
void launch_rms_norm(T* out, const T* x, T* residual, const T* weight, int64_t rows, int hidden, float eps,
                     cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int W = kVecWidth<T>;
  const bool wide = hidden % W == 0 && aligned16(out) && aligned16(x) && aligned16(weight) &&
                    (residual == nullptr || aligned16(residual));
  if (wide) {
    launch_rms_norm_width<T, W>(out, x, residual, weight, rows, hidden, eps, stream);
  } else {
    launch_rms_norm_width<T, 1>(out, x, residual, weight, rows, hidden, eps, stream);
  }
}

// ------------------------------------------------------------------------------------------------ silu_and_mul

// One block per row: out[r, i] = T(T(silu(x[r, i])) * x[r, d + i]) (F.silu(gate).mul_(up) rounds in between).
template <typename T, int N>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int d) {
  using V = Vec<T, N>;
  const int64_t row = blockIdx.x;
  const V* gate = reinterpret_cast<const V*>(x + row * 2 * d);
  const V* up = reinterpret_cast<const V*>(x + row * 2 * d + d);
  V* o = reinterpret_cast<V*>(out + row * d);
  for (int i = threadIdx.x; i < d / N; i += blockDim.x) {
    const V g = gate[i], u = up[i];
    V r;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float a = to_float(g.v[j]);
      r.v[j] = from_float<T>(__fmul_rn(round_to<T>(a / (1.0f + expf(-a))), to_float(u.v[j])));
    }
    o[i] = r;
  }
}

// x rows x 2d, out rows x d, both contiguous.
template <typename T>
void launch_silu_and_mul(T* out, const T* x, int64_t rows, int d, cudaStream_t stream) {
  if (rows == 0 || d == 0) return;
  constexpr int W = kVecWidth<T>;
  if (d % W == 0 && aligned16(out) && aligned16(x)) {
    silu_and_mul_kernel<T, W><<<rows, threads_for(d / W, 512), 0, stream>>>(out, x, d);
  } else {
    silu_and_mul_kernel<T, 1><<<rows, threads_for(d, 512), 0, stream>>>(out, x, d);
  }
}

// --------------------------------------------------------------------------------------------- rotary_write_kv

struct RotaryKVArgs {
  int64_t qk_stride_token, qk_stride_head;  // elements; head_dim dense
  int64_t v_stride_token, v_stride_head;
  int64_t cos_stride, sin_stride;           // per token
  int64_t cache_stride_block, cache_stride_slot, cache_stride_head;
  int heads, kv_heads, head_dim, block_size;
};

// One block per token: rotates its q and k heads in place (x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin on the two
// halves, each product and sum rounded as PyTorch's separate ops round them), and unless its slot is negative
// (padding) stores the rotated k heads and v in that cache slot.
template <typename T, int N>
__global__ void rotary_write_kv_kernel(T* qk, const T* __restrict__ v, const float* __restrict__ cos,
                                       const float* __restrict__ sin, T* __restrict__ k_cache,
                                       T* __restrict__ v_cache, const int64_t* __restrict__ slot_mapping,
                                       RotaryKVArgs a) {
  using V = Vec<T, N>;
  const int64_t t = blockIdx.x;
  const int half = a.head_dim / 2, per_half = half / N;
  const int64_t slot = slot_mapping[t];
  const int64_t cache_offset =
      slot < 0 ? 0 : (slot / a.block_size) * a.cache_stride_block + (slot % a.block_size) * a.cache_stride_slot;
  const float* c = cos + t * a.cos_stride;
  const float* s = sin + t * a.sin_stride;
  for (int item = threadIdx.x; item < (a.heads + a.kv_heads) * per_half; item += blockDim.x) {
    const int h = item / per_half, i = (item % per_half) * N;
    T* x = qk + t * a.qk_stride_token + h * a.qk_stride_head;
    V* lo = reinterpret_cast<V*>(x + i);
    V* hi = reinterpret_cast<V*>(x + i + half);
    const V x1 = *lo, x2 = *hi;
    V r1, r2;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float a1 = to_float(x1.v[j]), a2 = to_float(x2.v[j]), cj = c[i + j], sj = s[i + j];
      r1.v[j] = from_float<T>(__fsub_rn(__fmul_rn(a1, cj), __fmul_rn(a2, sj)));
      r2.v[j] = from_float<T>(__fadd_rn(__fmul_rn(a2, cj), __fmul_rn(a1, sj)));
    }
    *lo = r1;
    *hi = r2;
    if (h >= a.heads && slot >= 0) {
      T* dst = k_cache + cache_offset + (h - a.heads) * a.cache_stride_head;
      *reinterpret_cast<V*>(dst + i) = r1;
      *reinterpret_cast<V*>(dst + i + half) = r2;
    }
  }
  if (slot < 0) return;
  const int per_row = a.head_dim / N;
  for (int item = threadIdx.x; item < a.kv_heads * per_row; item += blockDim.x) {
    const int h = item / per_row, i = (item % per_row) * N;
    *reinterpret_cast<V*>(v_cache + cache_offset + h * a.cache_stride_head + i) =
        *reinterpret_cast<const V*>(v + t * a.v_stride_token + h * a.v_stride_head + i);
  }
}

// qk [tokens, heads + kv_heads, head_dim], v [tokens, kv_heads, head_dim]; k_cache / v_cache: the layer cache's
// K and V halves [blocks, block_size, kv_heads, head_dim] (strides in `a`); slot_mapping [tokens] int64.
template <typename T>
void launch_rotary_write_kv(T* qk, const T* v, const float* cos, const float* sin, T* k_cache, T* v_cache,
                            const int64_t* slot_mapping, int64_t tokens, const RotaryKVArgs& a, cudaStream_t stream) {
  if (tokens == 0) return;
  constexpr int W = kVecWidth<T>;
  const int64_t strides[] = {a.qk_stride_token, a.qk_stride_head, a.v_stride_token, a.v_stride_head,
                             a.cache_stride_block, a.cache_stride_slot, a.cache_stride_head};
  bool wide = (a.head_dim / 2) % W == 0 && aligned16(qk) && aligned16(v) && aligned16(k_cache) && aligned16(v_cache);
  for (const int64_t stride : strides) wide = wide && stride % W == 0;
  const int64_t items = (a.heads + a.kv_heads) * (a.head_dim / 2);
  if (wide) {
    rotary_write_kv_kernel<T, W><<<tokens, threads_for(items / W, 256), 0, stream>>>(qk, v, cos, sin, k_cache,
                                                                                      v_cache, slot_mapping, a);
  } else {
    rotary_write_kv_kernel<T, 1><<<tokens, threads_for(items, 256), 0, stream>>>(qk, v, cos, sin, k_cache,
                                                                                  v_cache, slot_mapping, a);
  }
}

}  // namespace stage1::cuda
