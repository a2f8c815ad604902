// Instantiates every launcher (and so every kernel) of csrc/cuda/fused_ops.cuh for bf16, fp16 and fp32, with no
// torch header: test_cuda_compile.py compiles this with nvcc for sm_80 and sm_90 on a machine without a GPU.
#include "cuda/fused_ops.cuh"

namespace stage1::cuda {

#define STAGE1_INSTANTIATE(T)                                                                                   \
  template void launch_rms_norm<T>(T*, const T*, T*, const T*, int64_t, int, float, cudaStream_t);             \
  template void launch_silu_and_mul<T>(T*, const T*, int64_t, int, cudaStream_t);                              \
  template void launch_rotary_write_kv<T>(T*, const T*, const float*, const float*, T*, T*, const int64_t*,     \
                                          int64_t, const RotaryKVArgs&, cudaStream_t);

STAGE1_INSTANTIATE(__nv_bfloat16)
STAGE1_INSTANTIATE(__half)
STAGE1_INSTANTIATE(float)

}  // namespace stage1::cuda
