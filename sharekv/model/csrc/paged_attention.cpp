// Attention over the paged KV cache on the CPU.
//
// paged_decode_attention: one query per sequence over its own blocks, read where they lie. One task per
// (sequence, kv head): every key and value row is loaded once for all the query heads that share it (GQA),
// scores stay in a small per-task buffer, and nothing of the cache is copied. For the usual head shapes
// (1-4 query heads per KV head, a head of 2 or 4 machine vectors) both passes keep the queries and the
// accumulators in registers. Each sequence attends to positions [start, context_len); the log-sum-exp of
// its scores is returned too, so a part computed elsewhere (a group's shared prefix) can be merged in
// exactly. Rows given a `mass_rows` entry also write
// their attention probabilities per key slot, averaged over the query heads of each KV head (what an
// eviction policy such as H2O accumulates), at no extra pass over the cache.
//
// prefix_attention_merge_: every query row of a group (decode tokens and prefill tokens of all members)
// against the group's shared prefix, whose keys and values are read once per step for the whole group.
// The rows are stacked into a matrix, so the work is register-tiled matrix products instead of one dot
// product per row and key; the result is merged into each row's own attention by log-sum-exp.
//
// Both read a cache in the model's dtype, an int8 cache with one scale per slot and KV head (an fp8 e5m2
// byte beside the blocks), or a KIVI cache (int4, int2 codes with fp16 params; sharekv/kv/quant.py), and the
// tail blocks of a residual window, through one row reader per format (with_rows). Each row is dequantized
// into a small buffer as it is read, so no full-precision copy of the cache is ever made.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// Fixed 16-lane inner loops: gcc turns each into whole-register FMAs (dim is a multiple of 16).
static inline float dot16(const float* a, const float* b, int64_t dim) {
  float acc[16] = {0.f};
  for (int64_t d = 0; d < dim; d += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[d + j] * b[d + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

static inline void axpy16(float* y, float a, const float* x, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 16)
    for (int j = 0; j < 16; ++j) y[d + j] += a * x[d + j];
}

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
  } else {
    for (int64_t d = 0; d < dim; ++d) buf[d] = static_cast<float>(row[d]);
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
    const T* row = tail + (((block - num_blocks) * block_size + in_block) * kv_heads + h) * dim;
    if constexpr (std::is_same_v<T, float>) {
      return row;
    } else {
      for (int64_t d = 0; d < dim; ++d) buf[d] = static_cast<float>(row[d]);
      return buf;
    }
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
      float sum = 0.f;
      for (int j = 0; j < W; ++j) sum += part[j];
      scores[g * n + at] = sum;
    }
  });
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
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * n;
        const float m = *std::max_element(s, s + n);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          s[i] = std::exp(s[i] - m);
          sum += s[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) s[i] *= inv;
        lse[b * heads + h * group + g] = m + std::log(sum);
      }
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

// ---- prefix attention ----------------------------------------------------------------------------
// Vectors of W floats (vec.h) sized to the machine's registers: tiles are chosen so the accumulators of a
// micro-kernel fill the register file (16 AVX2 or 32 AVX-512 registers) without spilling.
// Scores: 6 rows x QK_VECS key vectors; outputs: 6 rows x PV_VECS vectors of dims. With the vectors loaded
// and a broadcast, that is 29 of 32 AVX-512 registers or 15 of 16 AVX2 registers.
#if defined(__AVX512F__)
constexpr int QK_VECS = 4;
constexpr int PV_VECS = 4;
#else
constexpr int QK_VECS = 2;
constexpr int PV_VECS = 2;
#endif

constexpr int ROW_TILE = 6;                    // query rows whose scores are computed together
constexpr int64_t KEY_TILE = QK_VECS * W;      // keys per score tile
constexpr int64_t SPAN_KEYS = 512;             // most keys one task covers; a row tile's scores stay in L1
constexpr float MASKED = -1e30f;               // score of a padding key: exp() of it is 0, and it stays finite

// Output tile: ROW_TILE rows x DV vectors of dims [dc, dc + DV * W), accumulated over the span's keys.
template <int DV>
static inline void pv_block(const float* s, const float* const* v, int64_t dim, int64_t dc, int64_t span, float* o) {
  vfw acc[ROW_TILE][DV] = {};
  for (int64_t j = 0; j < span; ++j) {
    vfw vv[DV];
#pragma GCC unroll 4
    for (int c = 0; c < DV; ++c) vv[c] = loadw(v[j] + dc + c * W);
#pragma GCC unroll 6
    for (int i = 0; i < ROW_TILE; ++i) {
      const float p = s[i * SPAN_KEYS + j];
#pragma GCC unroll 4
      for (int c = 0; c < DV; ++c) acc[i][c] += p * vv[c];
    }
  }
  for (int i = 0; i < ROW_TILE; ++i)
    for (int c = 0; c < DV; ++c) storew(o + i * dim + dc + c * W, acc[i][c]);
}

// A tile of ROW_TILE query rows over one span of keys. q: [ROW_TILE][dim] scaled queries; kt: [dim][span_pad]
// keys transposed; v: span_pad pointers to value rows. Writes o [ROW_TILE][dim] = sum_j exp(s_j - m) v_j, the row
// maximum m and l = sum_j exp(s_j - m), to be merged with other spans.
static void span_tile(const float* q, const float* kt, const float* const* v, int64_t dim, int64_t span, int64_t span_pad,
                      float* o, float* m, float* l) {
  alignas(64) float s[ROW_TILE * SPAN_KEYS];
  for (int64_t j0 = 0; j0 < span_pad; j0 += KEY_TILE) {
    vfw acc[ROW_TILE][QK_VECS] = {};
    for (int64_t d = 0; d < dim; ++d) {
      vfw k[QK_VECS];
#pragma GCC unroll 4
      for (int c = 0; c < QK_VECS; ++c) k[c] = loadw(kt + d * span_pad + j0 + c * W);
#pragma GCC unroll 6
      for (int i = 0; i < ROW_TILE; ++i) {
        const float qd = q[i * dim + d];
#pragma GCC unroll 4
        for (int c = 0; c < QK_VECS; ++c) acc[i][c] += qd * k[c];
      }
    }
    for (int i = 0; i < ROW_TILE; ++i)
      for (int c = 0; c < QK_VECS; ++c) storew(s + i * SPAN_KEYS + j0 + c * W, acc[i][c]);
  }
  for (int i = 0; i < ROW_TILE; ++i) {
    float* si = s + i * SPAN_KEYS;
    for (int64_t j = span; j < span_pad; ++j) si[j] = MASKED;
    vfw top = vfw{} + MASKED;
    for (int64_t j = 0; j < span_pad; j += W) {
      const vfw x = loadw(si + j);
      top = x > top ? x : top;
    }
    float mx = MASKED;
    for (int c = 0; c < W; ++c) mx = std::max(mx, top[c]);
    vfw sum = {};
    for (int64_t j = 0; j < span_pad; j += W) {
      const vfw e = exp_w(loadw(si + j) - mx);
      storew(si + j, e);
      sum += e;
    }
    m[i] = mx;
    l[i] = 0.f;
    for (int c = 0; c < W; ++c) l[i] += sum[c];
  }
  int64_t dc = 0;
  for (; dc + PV_VECS * W <= dim; dc += PV_VECS * W) pv_block<PV_VECS>(s, v, dim, dc, span, o);
  for (; dc < dim; dc += W) pv_block<1>(s, v, dim, dc, span, o);
}

// Where a group's work lies in the scratch buffers.
struct GroupPlan {
  int64_t members = 0, rows = 0, rows_pad = 0;  // query tokens, their rows per kv head (x GQA), padded
  int64_t prefix = 0, spans = 0, span_len = 0;
  int64_t q_off = 0, part_off = 0, stat_off = 0;  // offsets into packed queries, partial outputs, m/l
};

template <typename T, typename Rows>
static void prefix_attention_impl(const T* q, const Rows& cache_rows, const int64_t* rows,
                                  const int64_t* block_ids, std::vector<GroupPlan>& plan, T* out, float* lse,
                                  int64_t heads, int64_t kv_heads, int64_t D, int64_t block_size,
                                  int64_t max_members, int64_t table_width, float scale) {
  const int64_t group = heads / kv_heads, groups = static_cast<int64_t>(plan.size());
  int64_t q_total = 0, part_total = 0, stat_total = 0;
  for (auto& p : plan) {
    p.q_off = q_total;
    p.part_off = part_total;
    p.stat_off = stat_total;
    q_total += kv_heads * p.rows_pad * D;
    part_total += kv_heads * p.spans * p.rows_pad * D;
    stat_total += kv_heads * p.spans * p.rows_pad;
  }
  std::vector<float> qp(q_total, 0.f), part(part_total), mbuf(stat_total), lbuf(stat_total);
  // Stack each group's queries per kv head: row r = member token r / group, query head h * group + r % group.
  for (int64_t g = 0; g < groups; ++g) {
    const GroupPlan& p = plan[g];
    for (int64_t h = 0; h < kv_heads; ++h) {
      float* dst = qp.data() + p.q_off + h * p.rows_pad * D;
      for (int64_t r = 0; r < p.rows; ++r) {
        const T* src = q + (rows[g * max_members + r / group] * heads + h * group + r % group) * D;
        for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<float>(src[d]) * scale;
      }
    }
  }
  // Tasks: (group, kv head, key span). Each transposes its span of keys once, for all rows; values are read
  // where they lie when the cache holds floats, else converted into a span buffer first.
  std::vector<std::array<int64_t, 3>> tasks;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t sp = 0; sp < plan[g].spans; ++sp) tasks.push_back({g, h, sp});
  const std::vector<float> zeros(D, 0.f);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * SPAN_KEYS), kbuf(SPAN_KEYS * D), vbuf(SPAN_KEYS * D);
    std::vector<const float*> krow(SPAN_KEYS), vrow(SPAN_KEYS);
    Rows reader = cache_rows;  // a task's own copy: a reader may keep per-block state
    for (int64_t t = begin; t < end; ++t) {
      const auto [g, h, sp] = tasks[t];
      const GroupPlan& p = plan[g];
      const int64_t k0 = sp * p.span_len, span = std::min(p.span_len, p.prefix - k0);
      const int64_t span_pad = (span + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
      const int64_t* table = block_ids + g * table_width;
      for (int64_t j = 0; j < span_pad; ++j) {
        if (j >= span) {
          krow[j] = nullptr;
          vrow[j] = zeros.data();
          continue;
        }
        const int64_t pos = k0 + j, block = table[pos / block_size], in_block = pos % block_size;
        krow[j] = reader.key(block, in_block, h, kbuf.data() + j * D);
        vrow[j] = reader.value(block, in_block, h, vbuf.data() + j * D);
      }
      for (int64_t d = 0; d < D; ++d) {  // rows of kt are contiguous writes
        float* dst = kt.data() + d * span_pad;
        for (int64_t j = 0; j < span_pad; ++j) dst[j] = krow[j] ? krow[j][d] : 0.f;
      }
      const float* qh = qp.data() + p.q_off + h * p.rows_pad * D;
      const int64_t slice = (h * p.spans + sp) * p.rows_pad;
      for (int64_t r = 0; r < p.rows_pad; r += ROW_TILE)
        span_tile(qh + r * D, kt.data(), vrow.data(), D, span, span_pad, part.data() + p.part_off + (slice + r) * D,
                  mbuf.data() + p.stat_off + slice + r, lbuf.data() + p.stat_off + slice + r);
    }
  });
  // Combine the spans, then merge with the row's own attention already in out/lse.
  at::parallel_for(0, groups * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / kv_heads, h = task % kv_heads;
      const GroupPlan& p = plan[g];
      for (int64_t r = 0; r < p.rows; ++r) {
        float mx = MASKED;
        for (int64_t sp = 0; sp < p.spans; ++sp) mx = std::max(mx, mbuf[p.stat_off + (h * p.spans + sp) * p.rows_pad + r]);
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t sp = 0; sp < p.spans; ++sp) {
          const int64_t at = (h * p.spans + sp) * p.rows_pad + r;
          const float w = std::exp(mbuf[p.stat_off + at] - mx);
          sum += w * lbuf[p.stat_off + at];
          axpy16(acc.data(), w, part.data() + p.part_off + at * D, D);
        }
        const int64_t idx = rows[g * max_members + r / group] * heads + h * group + r % group;
        const float lse_p = mx + std::log(sum), lse_own = lse[idx];
        const float top = std::max(lse_p, lse_own);
        const float w_p = std::exp(lse_p - top), w_own = std::exp(lse_own - top), total = w_p + w_own;
        T* o = out + idx * D;
        for (int64_t d = 0; d < D; ++d)
          o[d] = static_cast<T>((acc[d] / sum * w_p + static_cast<float>(o[d]) * w_own) / total);
        lse[idx] = top + std::log(total);
      }
    }
  });
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

// A group's rows against its prefix, merged in place into out [tokens, heads, dim] and lse [tokens, heads],
// which hold each row's attention over its own (non-prefix) keys.
void prefix_attention_merge_(torch::Tensor q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                             const torch::Tensor& k_scale, const torch::Tensor& v_scale, const torch::Tensor& tail_k,
                             const torch::Tensor& tail_v, torch::Tensor rows, const torch::Tensor& prefix_lens,
                             torch::Tensor block_ids, const torch::Tensor& out, const torch::Tensor& lse, double scale,
                             int64_t bits) {
  TORCH_CHECK(q.device().is_cpu(), "prefix_attention_merge_ runs on the CPU");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && lse.scalar_type() == torch::kFloat32,
              "out and lse must be contiguous, lse float32");
  const int64_t heads = q.size(1), dim = q.size(2), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(dim % 16 == 0, "head_dim must be a multiple of 16");
  q = q.contiguous();
  rows = rows.to(torch::kInt64).contiguous();
  block_ids = block_ids.to(torch::kInt64).contiguous();
  auto lens = prefix_lens.to(torch::kInt64).contiguous();
  const int64_t groups = rows.size(0), max_members = rows.size(1), group = heads / kv_heads;
  const int64_t* r = rows.data_ptr<int64_t>();
  std::vector<GroupPlan> plan(groups);
  int64_t base_tasks = 0;
  for (int64_t g = 0; g < groups; ++g) {
    GroupPlan& p = plan[g];
    while (p.members < max_members && r[g * max_members + p.members] >= 0) ++p.members;
    p.rows = p.members * group;
    p.rows_pad = (p.rows + ROW_TILE - 1) / ROW_TILE * ROW_TILE;
    p.prefix = lens.data_ptr<int64_t>()[g];
    TORCH_CHECK(p.prefix > 0 && p.members > 0, "every group needs members and a non-empty prefix");
    base_tasks += kv_heads;
  }
  // Split keys into spans until there are a few tasks per thread (each span is merged back exactly).
  const int64_t want = 8 * at::get_num_threads();
  for (auto& p : plan) {
    const int64_t tiles = (p.prefix + KEY_TILE - 1) / KEY_TILE;
    const int64_t spans = std::clamp<int64_t>((want + base_tasks - 1) / base_tasks, (p.prefix + SPAN_KEYS - 1) / SPAN_KEYS,
                                              std::max<int64_t>(tiles, 1));
    p.span_len = (tiles + spans - 1) / spans * KEY_TILE;
    p.spans = std::max<int64_t>(1, (p.prefix + p.span_len - 1) / p.span_len);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_attention_merge_", [&] {
    with_rows<scalar_t>(k_cache, v_cache, k_scale, v_scale, tail_k, tail_v, dim, bits, [&](const auto& cache_rows) {
      prefix_attention_impl<scalar_t>(q.data_ptr<scalar_t>(), cache_rows, r, block_ids.data_ptr<int64_t>(), plan,
                                      out.data_ptr<scalar_t>(), lse.data_ptr<float>(), heads, kv_heads, dim,
                                      block_size, max_members, block_ids.size(1), static_cast<float>(scale));
    });
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
  m.def("prefix_attention_merge_(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, Tensor v_scale, "
        "Tensor tail_k, Tensor tail_v, Tensor rows, Tensor prefix_lens, Tensor block_ids, Tensor(a!) out, "
        "Tensor(b!) lse, float scale, int bits) -> ()");
}

TORCH_LIBRARY_IMPL(sharekv, CPU, m) {
  m.impl("quantize_write_", &quantize_write_);
  m.impl("write_kv_", &write_kv_);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("prefix_attention_merge_", &prefix_attention_merge_);
}
