// How the attention kernels read the paged KV cache: one row reader per storage format, each returning a
// row (one token's key or value in one KV head) as floats, dequantized into a small buffer when needed.
#pragma once

#include <torch/extension.h>

#include "vec.h"

#include <type_traits>
#include <vector>

// The scale of an int8 row, stored as the byte of an fp8 e5m2 number.
static inline float scale_of(uint8_t bits) { return static_cast<float>(c10::Float8_e5m2(bits, c10::Float8_e5m2::from_bits())); }

// A row of the cache as floats: the row itself for fp32, else converted (and for int8 scaled by the row's
// scale) into `buf`.
template <typename C>
static inline const float* as_float(const C* row, const uint8_t* scale_bits, float* buf, int64_t dim) {
  if constexpr (std::is_same_v<C, float>) {
    return row;
  } else if constexpr (std::is_same_v<C, int8_t>) {
    const float scale = scale_of(*scale_bits);
    for (int64_t d = 0; d < dim; ++d) buf[d] = static_cast<float>(row[d]) * scale;
    return buf;
  } else {  // dim is a multiple of 16, so of W
    for (int64_t d = 0; d < dim; d += W) storew(buf + d, load_floats(row + d));
    return buf;
  }
}

// How the decode kernel reads a cache row (one token's key or value in one KV head) as floats.
// The model's dtype, or int8 with a scale byte per row; blocks with ids from num_blocks on are tails in the
// queries' dtype T (an int8 pool's residual window).
template <typename T, typename C>
struct PlainRows {
  const C* k;
  const C* v;
  const uint8_t* k_scale;  // read only for an int8 cache
  const uint8_t* v_scale;
  const T* tail_k;
  const T* tail_v;
  int64_t kv_heads, dim, block_size, num_blocks;

  const float* row(const C* data, const uint8_t* scales, const T* tail, int64_t block, int64_t in_block, int64_t h,
                   float* buf) const {
    if (block >= num_blocks) {
      const int64_t at = ((block - num_blocks) * block_size + in_block) * kv_heads + h;
      return as_float<T>(tail + at * dim, nullptr, buf, dim);
    }
    const int64_t at = (block * block_size + in_block) * kv_heads + h;
    return as_float(data + at * dim, scales + at, buf, dim);
  }
  const float* key(int64_t block, int64_t in_block, int64_t h, float* buf) {
    return row(k, k_scale, tail_k, block, in_block, h, buf);
  }
  const float* value(int64_t block, int64_t in_block, int64_t h, float* buf) {
    return row(v, v_scale, tail_v, block, in_block, h, buf);
  }
  // Asks for a row's key and value to be brought into the caches ahead of their reads.
  void prefetch(int64_t block, int64_t in_block, int64_t h) const {
    if (block >= num_blocks) return;
    const int64_t at = ((block * block_size + in_block) * kv_heads + h) * dim;
    prefetch_bytes(k + at, dim * sizeof(C));
    prefetch_bytes(v + at, dim * sizeof(C));
  }
};

// A KIVI cache (sharekv/kv/quant.py): packed BITS-bit codes, keys with a (scale, minimum) per channel and
// block, values with a (scale, minimum) per token and group of channels, all fp16; blocks with ids from
// num_blocks on are full-precision tails in the queries' dtype T. A key block's channel params are
// converted once per block and kept while its rows are read.
template <typename T, int BITS>
struct KiviRows {
  static constexpr int PER_BYTE = 8 / BITS;
  static constexpr uint8_t MASK = (1 << BITS) - 1;
  const uint8_t* k;
  const uint8_t* v;
  const at::Half* k_params;  // [blocks, kv_heads, 2, dim]
  const at::Half* v_params;  // [blocks, block_size, kv_heads, 2, groups]
  const T* tail_k;
  const T* tail_v;
  int64_t kv_heads, dim, block_size, num_blocks, groups;
  std::vector<float> k_scale, k_min;
  int64_t params_of = -1;  // the (block, head) whose key params k_scale and k_min hold

  const float* tail_row(const T* tail, int64_t block, int64_t in_block, int64_t h, float* buf) const {
    return as_float<T>(tail + (((block - num_blocks) * block_size + in_block) * kv_heads + h) * dim, nullptr, buf,
                       dim);
  }
  // A row's codes as floats: byte j holds the codes of channels j, j + n, ... (planar, kv/quant.py's pack),
  // so each plane is a contiguous shift-and-mask loop.
  void unpack(const uint8_t* base, int64_t block, int64_t in_block, int64_t h, float* buf) const {
    const int64_t n = dim / PER_BYTE;
    const uint8_t* c = base + ((block * block_size + in_block) * kv_heads + h) * n;
    for (int p = 0; p < PER_BYTE; ++p) {
      float* o = buf + p * n;
      const int shift = p * BITS;
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>((c[j] >> shift) & MASK);
    }
  }
  const float* key(int64_t block, int64_t in_block, int64_t h, float* buf) {
    if (block >= num_blocks) return tail_row(tail_k, block, in_block, h, buf);
    if (params_of != block * kv_heads + h) {
      params_of = block * kv_heads + h;
      k_scale.resize(dim);
      k_min.resize(dim);
      const at::Half* p = k_params + params_of * 2 * dim;
      for (int64_t d = 0; d < dim; ++d) {
        k_scale[d] = static_cast<float>(p[d]);
        k_min[d] = static_cast<float>(p[dim + d]);
      }
    }
    unpack(k, block, in_block, h, buf);
    const float* s = k_scale.data();
    const float* m = k_min.data();
    for (int64_t d = 0; d < dim; ++d) buf[d] = buf[d] * s[d] + m[d];
    return buf;
  }
  // Asks for a row's key and value codes to be brought into the caches ahead of their reads.
  void prefetch(int64_t block, int64_t in_block, int64_t h) const {
    if (block >= num_blocks) return;
    const int64_t n = dim / PER_BYTE, at = ((block * block_size + in_block) * kv_heads + h) * n;
    prefetch_bytes(k + at, n);
    prefetch_bytes(v + at, n);
  }
  const float* value(int64_t block, int64_t in_block, int64_t h, float* buf) const {
    if (block >= num_blocks) return tail_row(tail_v, block, in_block, h, buf);
    const at::Half* p = v_params + ((block * block_size + in_block) * kv_heads + h) * 2 * groups;
    unpack(v, block, in_block, h, buf);
    const int64_t size = dim / groups;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = static_cast<float>(p[g]), low = static_cast<float>(p[groups + g]);
      float* x = buf + g * size;
      for (int64_t d = 0; d < size; ++d) x[d] = x[d] * scale + low;
    }
    return buf;
  }
};

// Calls fn(block, slot in the block, index from `first`) for each position of [first, ctx), in order,
// walking the sequence's block table.
template <typename Fn>
static inline void for_each_row(const int64_t* table, int64_t first, int64_t ctx, int64_t block_size, Fn fn) {
  for (int64_t t0 = first; t0 < ctx;) {
    const int64_t in_block = t0 % block_size, count = std::min(block_size - in_block, ctx - t0);
    const int64_t block = table[t0 / block_size];
    for (int64_t i = 0; i < count; ++i) fn(block, in_block + i, t0 - first + i);
    t0 += count;
  }
}

// Calls f with the row reader of the cache's format (the ops' k_cache .. tail_v arguments):
// - bits 0: k_cache, v_cache hold the queries' dtype T, or int8 with scale bytes k_scale, v_scale, one per
//   slot and KV head;
// - bits 4 or 2: KIVI codes [blocks, block_size, kv_heads, dim * bits / 8] with fp16 params, keys'
//   [blocks, kv_heads, 2, dim] in k_scale, values' [blocks, block_size, kv_heads, 2, groups] in v_scale.
// Tail blocks tail_k, tail_v [tails, block_size, kv_heads, dim] in T (a residual window; may be empty) take
// the block ids from k_cache.size(0) on.
template <typename T, typename F>
static void with_rows(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& k_scale,
                      const torch::Tensor& v_scale, const torch::Tensor& tail_k, const torch::Tensor& tail_v,
                      int64_t dim, int64_t bits, F&& f) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "keys and values must share a dtype");
  const bool tails = tail_k.numel() > 0;
  TORCH_CHECK(!tails || (tail_k.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                         tail_v.scalar_type() == tail_k.scalar_type() && tail_k.is_contiguous() && tail_v.is_contiguous()),
              "tail blocks must be contiguous, in the queries' dtype");
  const T* tk = tails ? tail_k.data_ptr<T>() : nullptr;
  const T* tv = tails ? tail_v.data_ptr<T>() : nullptr;
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  if (bits != 0) {
    TORCH_CHECK(bits == 4 || bits == 2, "KIVI codes have 4 or 2 bits");
    TORCH_CHECK(k_cache.scalar_type() == torch::kByte && k_scale.scalar_type() == torch::kHalf &&
                    v_scale.scalar_type() == torch::kHalf && k_scale.is_contiguous() && v_scale.is_contiguous() &&
                    k_cache.size(3) * (8 / bits) == dim,
                "a KIVI cache holds uint8 codes packing head_dim, and contiguous float16 params");
    auto run = [&](auto width) {
      f(KiviRows<T, decltype(width)::value>{k_cache.data_ptr<uint8_t>(), v_cache.data_ptr<uint8_t>(),
                                            k_scale.data_ptr<at::Half>(), v_scale.data_ptr<at::Half>(), tk, tv,
                                            kv_heads, dim, block_size, num_blocks, v_scale.size(-1)});
    };
    if (bits == 4) run(std::integral_constant<int, 4>{}); else run(std::integral_constant<int, 2>{});
  } else if (k_cache.scalar_type() == torch::kChar) {
    TORCH_CHECK(k_scale.scalar_type() == torch::kByte && v_scale.scalar_type() == torch::kByte && k_scale.is_contiguous() &&
                    v_scale.is_contiguous() && k_scale.numel() * k_cache.size(3) == k_cache.numel() &&
                    v_scale.numel() * v_cache.size(3) == v_cache.numel(),
                "an int8 cache needs contiguous scale bytes, one per slot and KV head");
    f(PlainRows<T, int8_t>{k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), k_scale.data_ptr<uint8_t>(),
                           v_scale.data_ptr<uint8_t>(), tk, tv, kv_heads, dim, block_size, num_blocks});
  } else {
    TORCH_CHECK(k_cache.scalar_type() == c10::CppTypeToScalarType<T>::value,
                "the cache must hold the queries' dtype, int8 or KIVI codes");
    f(PlainRows<T, T>{k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), nullptr, nullptr, tk, tv, kv_heads, dim,
                      block_size, num_blocks});
  }
}
