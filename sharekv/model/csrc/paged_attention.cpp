// Attention of one query row per sequence over the paged KV cache on the CPU (the decode kernel), and the
// writes of a step's keys and values into the cache.
//
// paged_decode_attention: one query per sequence over its own blocks, read where they lie. One task per
// (sequence, kv head): every key and value row is loaded once for all the query heads that share it (GQA),
// scores stay in a small per-task buffer, and nothing of the cache is copied. For the usual head shapes
// (1-4 query heads per KV head, a head of 2 or 4 machine vectors) both passes keep the queries and the
// accumulators in registers. Each sequence attends to positions [start, context_len); the log-sum-exp of
// its scores is returned too, so a part computed elsewhere (a group's shared prefix, tiled_attention.cpp)
// can be merged in exactly. Rows given a `mass_rows` entry also write their attention probabilities per key
// slot, averaged over the query heads of each KV head (what an eviction policy such as H2O accumulates), at
// no extra pass over the cache.
//
// It reads a cache in the model's dtype, an int8 cache with one scale per slot and KV head (an fp8 e5m2
// byte beside the blocks), or a KIVI cache (int4, int2 codes with fp16 params; sharekv/kv/quant.py), and the
// tail blocks of a residual window, through one row reader per format (cache_rows.h). Each row is
// dequantized into a small buffer as it is read, so no full-precision copy of the cache is ever made.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cache_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// The value pass of one (sequence, KV head) task with its G x C accumulator vectors (G query heads, a head of
// C vectors) held in registers over all rows. Accumulating into memory instead made every row's
// multiply-add wait on the previous row's store (a third of the kernel's time).
template <int G, int C, typename Rows>
static void value_pass(Rows& reader, const int64_t* table, int64_t first, int64_t ctx, int64_t block_size, int64_t h,
                       const float* scores, int64_t n, float* row_buf, float* acc) {
  vfw a[G][C] = {};
  for_each_row(table, first, ctx, block_size, [&](int64_t block, int64_t slot, int64_t at) {
    const float* vf = reader.value(block, slot, h, row_buf);
    vfw v[C];
    for (int c = 0; c < C; ++c) v[c] = loadw(vf + c * W);
    for (int g = 0; g < G; ++g) {
      const float p = scores[g * n + at];
      for (int c = 0; c < C; ++c) a[g][c] += p * v[c];
    }
  });
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) storew(acc + (g * C + c) * W, a[g][c]);
}

// The key pass with the task's G x C query vectors in registers: each key row is loaded once for all G
// query heads, and each of its G dot products is one vector of partial sums reduced at the end.
template <int G, int C, typename Rows>
static void key_pass(Rows& reader, const int64_t* table, int64_t first, int64_t ctx, int64_t block_size, int64_t h,
                     const float* qf, float* scores, int64_t n, float* row_buf) {
  vfw q[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) q[g][c] = loadw(qf + (g * C + c) * W);
  for_each_row(table, first, ctx, block_size, [&](int64_t block, int64_t slot, int64_t at) {
    const float* kf = reader.key(block, slot, h, row_buf);
    vfw k[C];
    for (int c = 0; c < C; ++c) k[c] = loadw(kf + c * W);
    for (int g = 0; g < G; ++g) {
      vfw part = q[g][0] * k[0];
      for (int c = 1; c < C; ++c) part += q[g][c] * k[c];
      scores[g * n + at] = sum_lanes(part);
    }
  });
}

// s[0, n) replaced by its softmax, a vector at a time; returns the log-sum-exp of the scores. (libm's expf
// is scalar here: one call per score, where exp_w takes a vector of them.)
static inline float softmax_(float* s, int64_t n) {
  const int64_t whole = n / W * W;
  vfw top = vfw{} - std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < whole; i += W) {
    const vfw v = loadw(s + i);
    top = v > top ? v : top;
  }
  float m = max_lanes(top);
  for (int64_t i = whole; i < n; ++i) m = std::max(m, s[i]);
  vfw acc = {};
  for (int64_t i = 0; i < whole; i += W) {
    const vfw e = exp_w(loadw(s + i) - m);
    storew(s + i, e);
    acc += e;
  }
  float sum = sum_lanes(acc);
  for (int64_t i = whole; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
  return m + std::log(sum);
}

// The shapes whose passes keep their vectors in registers: 1-4 query heads per KV head and a head of 2 or 4
// vectors (64-dim heads on AVX-512; 16- and 32-dim on AVX2). Others take the generic loops.
static inline bool in_registers(int64_t group, int64_t dim) {
  return group >= 1 && group <= 4 && (dim == 2 * W || dim == 4 * W);
}

// Calls fn(G, C) with the shape as compile-time integers (after in_registers said yes).
template <typename Fn>
static void with_register_shape(int64_t group, int64_t dim, Fn fn) {
  using std::integral_constant;
  auto with_group = [&](auto c) {
    switch (group) {
      case 1: fn(integral_constant<int, 1>{}, c); break;
      case 2: fn(integral_constant<int, 2>{}, c); break;
      case 3: fn(integral_constant<int, 3>{}, c); break;
      default: fn(integral_constant<int, 4>{}, c); break;
    }
  };
  if (dim == 2 * W) with_group(integral_constant<int, 2>{});
  else with_group(integral_constant<int, 4>{});
}

template <typename T, typename Rows>
static void decode_kernel(const T* q, const Rows& rows, const int64_t* block_tables,
                          const int64_t* context_lens, const int64_t* starts, T* out, float* lse, int64_t batch, int64_t heads, int64_t kv_heads,
                          int64_t dim, int64_t block_size, int64_t table_width, float scale, int64_t window,
                          float* mass, const int64_t* mass_rows, int64_t mass_width) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), row_buf(dim), scores;
    Rows reader = rows;  // a task's own copy: a reader may keep per-block state
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t ctx = context_lens[b];
      const int64_t first = std::max<int64_t>(starts[b], window > 0 ? ctx - window : 0);
      const int64_t n = ctx - first;
      const int64_t* table = block_tables + b * table_width;
      if (n <= 0) {  // nothing of its own to attend to: contributes nothing to a merge
        for (int64_t g = 0; g < group; ++g) {
          lse[b * heads + h * group + g] = -std::numeric_limits<float>::infinity();
          for (int64_t d = 0; d < dim; ++d) out[(b * heads + h * group + g) * dim + d] = static_cast<T>(0.f);
        }
        continue;
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          qf[g * dim + d] = static_cast<float>(q[(b * heads + h * group + g) * dim + d]) * scale;
      scores.assign(group * n, 0.f);
      // Walk the blocks that hold [first, ctx).
      if (in_registers(group, dim)) {
        with_register_shape(group, dim, [&](auto g_, auto c_) {
          key_pass<decltype(g_)::value, decltype(c_)::value>(reader, table, first, ctx, block_size, h, qf.data(),
                                                             scores.data(), n, row_buf.data());
        });
      } else {
        for_each_row(table, first, ctx, block_size, [&](int64_t block, int64_t slot, int64_t at) {
          const float* kf = reader.key(block, slot, h, row_buf.data());
          for (int64_t g = 0; g < group; ++g) scores[g * n + at] = dot16(qf.data() + g * dim, kf, dim);
        });
      }
      for (int64_t g = 0; g < group; ++g) lse[b * heads + h * group + g] = softmax_(scores.data() + g * n, n);
      if (mass != nullptr && mass_rows[b] >= 0) {
        float* row_mass = mass + (mass_rows[b] * kv_heads + h) * mass_width + first;
        for (int64_t i = 0; i < n; ++i) {
          float p = 0.f;
          for (int64_t g = 0; g < group; ++g) p += scores[g * n + i];
          row_mass[i] = p / static_cast<float>(group);
        }
      }
      if (in_registers(group, dim)) {
        with_register_shape(group, dim, [&](auto g_, auto c_) {
          value_pass<decltype(g_)::value, decltype(c_)::value>(reader, table, first, ctx, block_size, h,
                                                               scores.data(), n, row_buf.data(), acc.data());
        });
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
        for_each_row(table, first, ctx, block_size, [&](int64_t block, int64_t slot, int64_t at) {
          const float* vf = reader.value(block, slot, h, row_buf.data());
          for (int64_t g = 0; g < group; ++g) axpy16(acc.data() + g * dim, scores[g * n + at], vf, dim);
        });
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          out[(b * heads + h * group + g) * dim + d] = static_cast<T>(acc[g * dim + d]);
    }
  });
}



std::tuple<torch::Tensor, torch::Tensor> paged_decode_attention(
    torch::Tensor q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& k_scale,
    const torch::Tensor& v_scale, const torch::Tensor& tail_k, const torch::Tensor& tail_v, torch::Tensor block_tables,
    torch::Tensor context_lens, torch::Tensor starts, double scale, int64_t window, const torch::Tensor& mass,
    torch::Tensor mass_rows, int64_t bits) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(q.size(2) % 16 == 0, "head_dim must be a multiple of 16");
  q = q.contiguous();
  block_tables = block_tables.to(torch::kInt64).contiguous();
  context_lens = context_lens.to(torch::kInt64).contiguous();
  starts = starts.to(torch::kInt64).contiguous();
  TORCH_CHECK(starts.numel() == q.size(0), "one start position per sequence");
  auto out = torch::empty_like(q);
  auto lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat32));
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  float* mass_ptr = nullptr;
  const int64_t* mass_rows_ptr = nullptr;
  if (mass.numel() > 0) {  // [observed rows, kv_heads, width], zero beyond each row's context
    TORCH_CHECK(mass.is_contiguous() && mass.scalar_type() == torch::kFloat32 && mass.size(1) == kv_heads,
                "mass must be contiguous float32 [rows, kv_heads, width]");
    mass_rows = mass_rows.to(torch::kInt64).contiguous();
    TORCH_CHECK(mass_rows.numel() == q.size(0), "one mass row (or -1) per sequence");
    mass_ptr = mass.data_ptr<float>();
    mass_rows_ptr = mass_rows.data_ptr<int64_t>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    with_rows<scalar_t>(k_cache, v_cache, k_scale, v_scale, tail_k, tail_v, dim, bits, [&](const auto& rows) {
      decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), rows, block_tables.data_ptr<int64_t>(),
                              context_lens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                              lse.data_ptr<float>(), batch, heads, kv_heads, dim, block_size, block_tables.size(1),
                              static_cast<float>(scale), window, mass_ptr, mass_rows_ptr, mass_ptr ? mass.size(2) : 0);
    });
  });
  return {out, lse};
}

// The write of a step's keys (or values) x [tokens, kv_heads, dim] into an int8 cache, in one pass per row:
// the row's scale (the smallest e5m2 number >= max|x| / 127), its int8 values at the row's slot, and the
// values as the cache now holds them into `stored` (what the step's fresh-prefill attention reads). The
// same numbers as sharekv/kv/quant.py's quantize_int8 (tested).
void quantize_write_(torch::Tensor x, torch::Tensor slots, const torch::Tensor& cache, const torch::Tensor& scales,
                     const torch::Tensor& stored) {
  TORCH_CHECK(x.device().is_cpu() && cache.scalar_type() == torch::kChar && scales.scalar_type() == torch::kByte,
              "quantize_write_ writes an int8 CPU cache with uint8 scales");
  TORCH_CHECK(cache.is_contiguous() && scales.is_contiguous() && stored.is_contiguous() &&
                  stored.sizes() == x.sizes() && stored.scalar_type() == x.scalar_type(),
              "cache, scales and stored must be contiguous, stored shaped like x");
  x = x.contiguous();
  slots = slots.to(torch::kInt64).contiguous();
  const int64_t tokens = x.size(0), kv_heads = x.size(1), dim = x.size(2);
  const int64_t* slot = slots.data_ptr<int64_t>();
  int8_t* q = cache.data_ptr<int8_t>();
  uint8_t* sc = scales.data_ptr<uint8_t>();
  const float scale_max = static_cast<float>(std::numeric_limits<c10::Float8_e5m2>::max());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_write_", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* out = stored.data_ptr<scalar_t>();
    at::parallel_for(0, tokens * kv_heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = src + r * dim;
        float amax = 0.f;
        for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(static_cast<float>(row[d])));
        const float wanted = std::min(amax / 127.f, scale_max);
        c10::Float8_e5m2 scale(wanted);
        if (static_cast<float>(scale) < wanted) scale = c10::Float8_e5m2(scale.x + 1, c10::Float8_e5m2::from_bits());
        const float s = static_cast<float>(scale), inv = s > 0.f ? 1.f / s : 0.f;
        const int64_t at = slot[r / kv_heads] * kv_heads + r % kv_heads;
        sc[at] = scale.x;
        int8_t* dst = q + at * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const float v = std::clamp(std::nearbyint(static_cast<float>(row[d]) * inv), -127.f, 127.f);
          dst[d] = static_cast<int8_t>(v);
          out[r * dim + d] = static_cast<scalar_t>(v * s);
        }
      }
    });
  });
}

// The write of a step's keys and values [tokens, kv_heads, dim] at their slots of a cache in their dtype:
// one call for both, a row copy each (two indexed assignments in torch, each an index_put_). Each token's
// row must be contiguous, the tokens may be strided: k and v are read where they lie in the fused q/k/v
// product.
void write_kv_(torch::Tensor k, torch::Tensor v, torch::Tensor slots, const torch::Tensor& k_cache,
               const torch::Tensor& v_cache) {
  TORCH_CHECK(k.device().is_cpu() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == v.scalar_type() &&
                  k.sizes() == v.sizes() && k.dim() == 3,
              "write_kv_ writes k and v [tokens, kv_heads, dim] into contiguous CPU caches of their dtype");
  const int64_t tokens = k.size(0), row = k.size(1) * k.size(2), bytes = row * k.element_size();
  for (auto* x : {&k, &v})
    if (x->stride(2) != 1 || x->stride(1) != x->size(2)) *x = x->contiguous();  // rows not contiguous
  slots = slots.to(torch::kInt64).contiguous();
  TORCH_CHECK(slots.numel() == tokens && k_cache.size(2) * k_cache.size(3) == row, "one slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  const int64_t k_step = k.stride(0) * k.element_size(), v_step = v.stride(0) * v.element_size();
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + slot[t] * bytes, ks + t * k_step, bytes);
      std::memcpy(vc + slot[t] * bytes, vs + t * v_step, bytes);
    }
  });
}

// Registered as torch operators (torch.ops.sharekv.*), not a Python module: the profiler names them, their
// time is accounted like any aten op's, and torch.compile traces around them (fake implementations in
// sharekv/model/native.py). A trailing underscore marks the ops that write into their arguments.
TORCH_LIBRARY(sharekv, m) {
  m.def("quantize_write_(Tensor x, Tensor slots, Tensor(a!) cache, Tensor(b!) scales, Tensor(c!) stored) -> ()");
  m.def("write_kv_(Tensor k, Tensor v, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache) -> ()");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, Tensor v_scale, "
        "Tensor tail_k, Tensor tail_v, Tensor block_tables, Tensor context_lens, Tensor starts, float scale, "
        "int window, Tensor(a!) mass, Tensor mass_rows, int bits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sharekv, CPU, m) {
  m.impl("quantize_write_", &quantize_write_);
  m.impl("write_kv_", &write_kv_);
  m.impl("paged_decode_attention", &paged_decode_attention);
}
