// Paged decode attention on the CPU: what the generic translation unit (ops.cpp) and the per-ISA kernels share.
// No torch header here: the per-ISA files are compiled with -mavx2 -mfma (etc.), and any inline function they
// pulled from a shared header could be emitted with those instructions and picked by the linker for the whole
// library (an illegal instruction on an older CPU). They see only this plain struct and raw pointers.
#pragma once

#include <cstdint>

namespace stage1::cpu {

// Cache element types the kernels read (K/V); the math is fp32 whatever the storage.
enum class CacheType : int { kFloat32 = 0, kBFloat16 = 1 };

struct DecodeAttentionArgs {
  const float* q;            // [seqs, heads, head_dim], contiguous fp32
  float* out;                // [seqs, heads, head_dim], contiguous fp32
  const void* k_cache;       // element (block, slot, kv_head, d) at k_cache[block*stride_block + slot*stride_slot
  const void* v_cache;       //   + kv_head*stride_head + d] (elements, not bytes); same for v_cache
  int64_t stride_block, stride_slot, stride_head;
  const int32_t* block_tables;  // [seqs, table_stride]
  int64_t table_stride;
  const int32_t* context_lens;  // [seqs]
  int64_t num_kv_heads, group, head_dim, block_size;  // group = heads / kv_heads
  float scale;
  CacheType cache_type;
};

// head_dim must be a multiple of 8 and at most kMaxHeadDim (ops.cpp checks).
constexpr int64_t kMaxHeadDim = 256;

// Work items [begin, end) of seqs x kv_heads (item = seq * num_kv_heads + kv_head): each one reads its
// sequence's K/V rows for one KV head once and serves every query head of that head's group.
using DecodeAttentionFn = void (*)(const DecodeAttentionArgs&, int64_t begin, int64_t end);

void decode_attention_scalar(const DecodeAttentionArgs& args, int64_t begin, int64_t end);
void decode_attention_avx2(const DecodeAttentionArgs& args, int64_t begin, int64_t end);

}  // namespace stage1::cpu
