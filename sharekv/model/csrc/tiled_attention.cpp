// Attention of many query rows at once over the paged KV cache on the CPU, as register-tiled matrix products:
//
// prefix_attention_merge_: every query row of a prefix group (decode and prefill tokens of all members)
// against the group's shared prefix, whose keys and values are read once per step for the whole group; the
// result is merged into each row's own attention (paged_attention.cpp's decode kernel) by log-sum-exp.
// prefill_attention_: the tokens of prefill chunks over their sequence's keys up to themselves (causal):
// the cached ones read from the blocks, the chunk's own from the step's tensors as the cache write returned
// them.
//
// A row block is RB query rows of one KV head (row r is token r / group, query head r % group), scaled and
// stored transposed (dim-major). It walks the keys a tile at a time. Scores S = K Q^T come out key-major:
// each key row is read where it lies and its elements are broadcast against vectors of the block's
// queries, so keys are never copied or transposed (a transposed copy of each key span took as long as the
// products); each row's softmax statistics are vector maxima and sums over keys; and O += P^T V takes each
// probability as a broadcast against a value row. The softmax is online (a running maximum and sum per row,
// the output rescaled per tile), so any number of keys streams through one tile's buffer.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cache_rows.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

// Micro-tiles sized so their accumulators fill the register file (32 AVX-512 or 16 AVX2 registers) with
// room for the operands: scores KT keys x RV query vectors, outputs PR rows x PV vectors of dims.
#if defined(__AVX512F__)
constexpr int KT = 12;  // 24 accumulators + 2 query vectors
constexpr int PV = 4;   // 24 accumulators + 4 value vectors
#else
constexpr int KT = 6;  // 12 accumulators + 2 query vectors
constexpr int PV = 2;  // 12 accumulators + 2 value vectors
#endif
constexpr int RV = 2;
constexpr int64_t RB = RV * W;          // rows of a row block
constexpr int PR = 6;                   // rows of an output micro-tile
constexpr int64_t TILE_KEYS = 4 * KT;  // keys per tile: a tile's scores (TILE_KEYS x RB floats) stay in L1
constexpr float NO_KEYS = -1e30f;       // running maximum before any key: the first rescale is exp(-huge) = 0

// Scores of a row block against NK keys: s[t * RB + r] = q_r . k_t, with qt the block's queries [dim][RB].
template <int NK>
static inline void score_tile(const float* qt, const float* const* k, int64_t dim, float* s) {
  vfw acc[NK][RV] = {};
  for (int64_t d = 0; d < dim; ++d) {
    vfw q[RV];
    for (int c = 0; c < RV; ++c) q[c] = loadw(qt + d * RB + c * W);
#pragma GCC unroll 12
    for (int t = 0; t < NK; ++t) {
      const float kd = k[t][d];
      for (int c = 0; c < RV; ++c) acc[t][c] += kd * q[c];
    }
  }
  for (int t = 0; t < NK; ++t)
    for (int c = 0; c < RV; ++c) storew(s + t * RB + c * W, acc[t][c]);
}

// Rows [r0, r0 + R) of a block's output, dims [dc, dc + DV * W): o = o * alpha + sum_t p[t][r] v_t.
template <int R, int DV>
static inline void pv_tile(const float* p, const float* const* v, int64_t n, int64_t dim, int64_t r0, int64_t dc,
                           const float* alpha, float* o) {
  vfw acc[R][DV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < DV; ++c) acc[i][c] = loadw(o + (r0 + i) * dim + dc + c * W) * alpha[r0 + i];
  for (int64_t t = 0; t < n; ++t) {
    vfw vv[DV];
    for (int c = 0; c < DV; ++c) vv[c] = loadw(v[t] + dc + c * W);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const float pi = p[t * RB + r0 + i];
      for (int c = 0; c < DV; ++c) acc[i][c] += pi * vv[c];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < DV; ++c) storew(o + (r0 + i) * dim + dc + c * W, acc[i][c]);
}

template <int R>
static inline void pv_rows(const float* p, const float* const* v, int64_t n, int64_t dim, int64_t r0,
                           const float* alpha, float* o) {
  int64_t dc = 0;
  for (; dc + PV * W <= dim; dc += PV * W) pv_tile<R, PV>(p, v, n, dim, r0, dc, alpha, o);
  for (; dc < dim; dc += W) pv_tile<R, 1>(p, v, n, dim, r0, dc, alpha, o);
}

// Where a row block's running softmax lives: m and l [RB] (maximum and sum of exponentials per row) and the
// unnormalised output o [RB][dim].
struct RowState {
  float* m;
  float* l;
  float* o;
};

static void start_rows(const RowState& st, int64_t dim) {
  std::fill(st.m, st.m + RB, NO_KEYS);
  std::fill(st.l, st.l + RB, 0.f);
  std::fill(st.o, st.o + RB * dim, 0.f);
}

// Query row `src` of one head, scaled, into a row block's dim-major queries at its column `col`.
template <typename T>
static inline void pack_query(const T* src, float scale, int64_t dim, float* col) {
  for (int64_t d = 0; d < dim; ++d) col[d * RB] = static_cast<float>(src[d]) * scale;
}

// One tile of n <= TILE_KEYS keys (k: pointers padded with a zero row to a multiple of KT) folded into the
// running softmax of a block's first `rows` rows. limit: per row, only keys t < limit[r] of the tile are
// visible (causal attention), or null when all are. s: scratch for TILE_KEYS x RB scores.
static void attend_tile(const float* qt, const float* const* k, const float* const* v, int64_t n, int64_t dim,
                        const float* limit, int64_t rows, const RowState& st, float* s) {
  const int64_t n_pad = (n + KT - 1) / KT * KT;
  for (int64_t t = 0; t < n_pad; t += KT) score_tile<KT>(qt, k + t, dim, s + t * RB);
  const vfw hidden = vfw{} - std::numeric_limits<float>::infinity();  // exp() of it is 0
  alignas(64) float alpha[RB];
  for (int c = 0; c < RV; ++c) {
    float* sc = s + c * W;
    if (limit != nullptr) {
      const vfw lim = loadw(limit + c * W);
      for (int64_t t = 0; t < n; ++t) {
        const vfw x = loadw(sc + t * RB);
        storew(sc + t * RB, lim > static_cast<float>(t) ? x : hidden);
      }
    }
    const vfw m_old = loadw(st.m + c * W);
    vfw top = m_old;
    for (int64_t t = 0; t < n; ++t) {
      const vfw x = loadw(sc + t * RB);
      top = x > top ? x : top;
    }
    vfw sum = {};
    for (int64_t t = 0; t < n; ++t) {
      const vfw e = exp_w(loadw(sc + t * RB) - top);
      storew(sc + t * RB, e);
      sum += e;
    }
    const vfw a = exp_w(m_old - top);
    storew(alpha + c * W, a);
    storew(st.l + c * W, loadw(st.l + c * W) * a + sum);
    storew(st.m + c * W, top);
  }
  for (int64_t r0 = 0; r0 < rows; r0 += PR) {
    switch (std::min<int64_t>(PR, rows - r0)) {
      case 1: pv_rows<1>(s, v, n, dim, r0, alpha, st.o); break;
      case 2: pv_rows<2>(s, v, n, dim, r0, alpha, st.o); break;
      case 3: pv_rows<3>(s, v, n, dim, r0, alpha, st.o); break;
      case 4: pv_rows<4>(s, v, n, dim, r0, alpha, st.o); break;
      case 5: pv_rows<5>(s, v, n, dim, r0, alpha, st.o); break;
      default: pv_rows<6>(s, v, n, dim, r0, alpha, st.o); break;
    }
  }
}

// Runs fn(task, scratch) for tasks [0, n), each intra-op thread taking the next task as it finishes one, so
// tasks of unequal cost (listed costliest first) stay balanced. make_scratch() builds a thread's buffers.
template <typename Make, typename Fn>
static void run_tasks(int64_t n, Make make_scratch, Fn fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next++; t < n; t = next++) fn(t, scratch);
  });
}

// A thread's buffers: one tile of keys and values (pointers, and floats for rows that need converting), the
// tile's scores, and one row block's queries and state.
struct Scratch {
  std::vector<float> kbuf, vbuf, zeros, qt, o;
  std::vector<const float*> k, v;
  alignas(64) float s[TILE_KEYS * RB];
  alignas(64) float m[RB], l[RB], limit[RB];

  explicit Scratch(int64_t dim)
      : kbuf(TILE_KEYS * dim), vbuf(TILE_KEYS * dim), zeros(dim, 0.f), qt(dim * RB), o(RB * dim),
        k(TILE_KEYS + KT), v(TILE_KEYS + KT) {}
  // Key and value t of the tile: a source's (a cache reader's, or the step's fresh rows') row `at` of head h.
  template <typename Source, typename... At>
  void take(int64_t t, Source& source, int64_t dim, At... at) {
    k[t] = source.key(at..., kbuf.data() + t * dim);
    v[t] = source.value(at..., vbuf.data() + t * dim);
  }
  // Pads the tile's key pointers with the zero row up to a multiple of KT.
  void pad_keys(int64_t n) {
    for (int64_t t = n; t < (n + KT - 1) / KT * KT; ++t) k[t] = zeros.data();
  }
};

// ---- prefix groups ----------------------------------------------------------------------------------

// Where a group's work lies in the buffers.
struct GroupPlan {
  int64_t members = 0, rows = 0, rows_pad = 0;  // query tokens, their rows per kv head (x GQA), padded to RB
  int64_t prefix = 0, spans = 0, span_len = 0;
  int64_t q_off = 0, part_off = 0, stat_off = 0;  // offsets into stacked queries, partial outputs, m/l
};

template <typename T, typename Rows>
static void prefix_attention_impl(const T* q, const Rows& cache_rows, const int64_t* rows,
                                  const int64_t* block_ids, std::vector<GroupPlan>& plan, T* out, float* lse,
                                  int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                                  int64_t max_members, int64_t table_width, float scale) {
  const int64_t group = heads / kv_heads, groups = static_cast<int64_t>(plan.size());
  int64_t q_total = 0, part_total = 0, stat_total = 0;
  for (auto& p : plan) {
    p.q_off = q_total;
    p.part_off = part_total;
    p.stat_off = stat_total;
    q_total += kv_heads * p.rows_pad * dim;
    part_total += kv_heads * p.spans * p.rows_pad * dim;
    stat_total += kv_heads * p.spans * p.rows_pad;
  }
  std::vector<float> qp(q_total, 0.f), part(part_total), mbuf(stat_total), lbuf(stat_total);
  // Each group's queries per kv head, in row blocks of [dim][RB].
  for (int64_t g = 0; g < groups; ++g) {
    const GroupPlan& p = plan[g];
    for (int64_t h = 0; h < kv_heads; ++h) {
      float* dst = qp.data() + p.q_off + h * p.rows_pad * dim;
      for (int64_t r = 0; r < p.rows; ++r) {
        const T* src = q + (rows[g * max_members + r / group] * heads + h * group + r % group) * dim;
        pack_query(src, scale, dim, dst + r / RB * RB * dim + r % RB);
      }
    }
  }
  // Tasks: (group, kv head, key span), costliest first. Each converts a tile of its span's keys and values
  // once for all of the group's row blocks.
  std::vector<std::array<int64_t, 2>> tasks;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t sp = 0; sp < plan[g].spans; ++sp) tasks.push_back({g, sp});
  std::stable_sort(tasks.begin(), tasks.end(), [&](const auto& a, const auto& b) {
    return plan[a[0]].rows_pad * plan[a[0]].span_len > plan[b[0]].rows_pad * plan[b[0]].span_len;
  });
  const auto make_scratch = [&] { return std::make_pair(std::make_unique<Scratch>(dim), cache_rows); };
  run_tasks(static_cast<int64_t>(tasks.size()), make_scratch,
            [&](int64_t task, auto& scratch) {
    Scratch& sc = *scratch.first;
    auto& reader = scratch.second;  // a thread's own copy: a reader may keep per-block state
    const auto [g, sp] = tasks[task];
    const GroupPlan& p = plan[g];
    const int64_t k0 = sp * p.span_len, k1 = std::min(p.prefix, k0 + p.span_len);
    const int64_t* table = block_ids + g * table_width;
    auto state = [&](int64_t h, int64_t b) {
      const int64_t at = (h * p.spans + sp) * p.rows_pad + b * RB;
      return RowState{mbuf.data() + p.stat_off + at, lbuf.data() + p.stat_off + at,
                      part.data() + p.part_off + at * dim};
    };
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t b = 0; b * RB < p.rows; ++b) start_rows(state(h, b), dim);
    for (int64_t t0 = k0; t0 < k1; t0 += TILE_KEYS) {
      const int64_t n = std::min(TILE_KEYS, k1 - t0);
      for (int64_t h = 0; h < kv_heads; ++h) {
        for (int64_t pos = t0 + TILE_KEYS; pos < std::min(k1, t0 + 2 * TILE_KEYS); ++pos)
          reader.prefetch(table[pos / block_size], pos % block_size, h);
        for (int64_t t = 0; t < n; ++t)
          sc.take(t, reader, dim, table[(t0 + t) / block_size], (t0 + t) % block_size, h);
        sc.pad_keys(n);
        for (int64_t b = 0; b * RB < p.rows; ++b)
          attend_tile(qp.data() + p.q_off + (h * p.rows_pad + b * RB) * dim, sc.k.data(), sc.v.data(), n, dim,
                      nullptr, std::min(RB, p.rows - b * RB), state(h, b), sc.s);
      }
    }
  });
  // Combine the spans, then merge with the row's own attention already in out/lse.
  at::parallel_for(0, groups * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / kv_heads, h = task % kv_heads;
      const GroupPlan& p = plan[g];
      for (int64_t r = 0; r < p.rows; ++r) {
        float mx = NO_KEYS;
        for (int64_t sp = 0; sp < p.spans; ++sp)
          mx = std::max(mx, mbuf[p.stat_off + (h * p.spans + sp) * p.rows_pad + r]);
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t sp = 0; sp < p.spans; ++sp) {
          const int64_t at = (h * p.spans + sp) * p.rows_pad + r;
          const float w = std::exp(mbuf[p.stat_off + at] - mx);
          sum += w * lbuf[p.stat_off + at];
          axpy16(acc.data(), w, part.data() + p.part_off + at * dim, dim);
        }
        const int64_t idx = rows[g * max_members + r / group] * heads + h * group + r % group;
        const float lse_p = mx + std::log(sum), lse_own = lse[idx];
        const float top = std::max(lse_p, lse_own);
        const float w_p = std::exp(lse_p - top), w_own = std::exp(lse_own - top), total = w_p + w_own;
        T* o = out + idx * dim;
        for (int64_t d = 0; d < dim; ++d)
          o[d] = static_cast<T>((acc[d] / sum * w_p + static_cast<float>(o[d]) * w_own) / total);
        lse[idx] = top + std::log(total);
      }
    }
  });
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
    p.rows_pad = (p.rows + RB - 1) / RB * RB;
    p.prefix = lens.data_ptr<int64_t>()[g];
    TORCH_CHECK(p.prefix > 0 && p.members > 0, "every group needs members and a non-empty prefix");
    ++base_tasks;
  }
  // Split keys into spans until there are a few tasks per thread (each span is merged back exactly).
  const int64_t want = 4 * at::get_num_threads();
  for (auto& p : plan) {
    const int64_t tiles = (p.prefix + TILE_KEYS - 1) / TILE_KEYS;
    const int64_t spans = std::clamp<int64_t>((want + base_tasks - 1) / base_tasks, 1, tiles);
    p.span_len = (tiles + spans - 1) / spans * TILE_KEYS;
    p.spans = (p.prefix + p.span_len - 1) / p.span_len;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_attention_merge_", [&] {
    with_rows<scalar_t>(k_cache, v_cache, k_scale, v_scale, tail_k, tail_v, dim, bits, [&](const auto& cache_rows) {
      prefix_attention_impl<scalar_t>(q.data_ptr<scalar_t>(), cache_rows, r, block_ids.data_ptr<int64_t>(), plan,
                                      out.data_ptr<scalar_t>(), lse.data_ptr<float>(), heads, kv_heads, dim,
                                      block_size, max_members, block_ids.size(1), static_cast<float>(scale));
    });
  });
}

// ---- prefill chunks -------------------------------------------------------------------------------

// The step's tensors [tokens, kv_heads, dim] as rows of floats (each token's rows contiguous, tokens strided).
template <typename T>
struct FreshRows {
  const T* k;
  const T* v;
  int64_t k_step, v_step, dim;
  const float* key(int64_t token, int64_t h, float* buf) const {
    return as_float<T>(k + token * k_step + h * dim, nullptr, buf, dim);
  }
  const float* value(int64_t token, int64_t h, float* buf) const {
    return as_float<T>(v + token * v_step + h * dim, nullptr, buf, dim);
  }
};

template <typename T, typename Rows>
static void prefill_attention_impl(const T* q, int64_t q_step, const FreshRows<T>& fresh, const Rows& cache_rows,
                                   const int64_t* query_starts, const int64_t* query_lens, const int64_t* context_lens,
                                   const int64_t* const* tables, int64_t chunks, T* out, int64_t heads,
                                   int64_t kv_heads, int64_t dim, int64_t block_size, float scale) {
  const int64_t group = heads / kv_heads;
  // Tasks: (chunk, kv head, row block), the ones that see the most keys first.
  struct Task {
    int64_t chunk, h, block, keys;
  };
  std::vector<Task> tasks;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t rows = query_lens[c] * group, prior = context_lens[c] - query_lens[c];
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t b = 0; b * RB < rows; ++b)
        tasks.push_back({c, h, b, prior + (std::min(rows, (b + 1) * RB) - 1) / group + 1});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.keys > b.keys; });
  const auto make_scratch = [&] { return std::make_pair(std::make_unique<Scratch>(dim), cache_rows); };
  run_tasks(static_cast<int64_t>(tasks.size()), make_scratch,
            [&](int64_t index, auto& scratch) {
    Scratch& sc = *scratch.first;
    auto& reader = scratch.second;
    const Task& task = tasks[index];
    const int64_t c = task.chunk, h = task.h, start = query_starts[c], prior = context_lens[c] - query_lens[c];
    const int64_t r0 = task.block * RB, rows = std::min(RB, query_lens[c] * group - r0);
    const int64_t* table = tables[c];
    std::fill(sc.qt.begin(), sc.qt.end(), 0.f);
    float min_limit = std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < RB; ++r) {
      const int64_t row = r0 + std::min(r, rows - 1), token = row / group;
      sc.limit[r] = static_cast<float>(prior + token + 1);
      min_limit = std::min(min_limit, sc.limit[r]);
      if (r >= rows) continue;
      const T* src = q + (start + token) * q_step + (h * group + row % group) * dim;
      pack_query(src, scale, dim, sc.qt.data() + r);
    }
    const RowState st{sc.m, sc.l, sc.o.data()};
    start_rows(st, dim);
    alignas(64) float tile_limit[RB];  // the rows' limits from the tile's first key
    for (int64_t t0 = 0; t0 < task.keys; t0 += TILE_KEYS) {
      const int64_t n = std::min(TILE_KEYS, task.keys - t0);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = t0 + t;
        if (pos < prior) sc.take(t, reader, dim, table[pos / block_size], pos % block_size, h);
        else sc.take(t, fresh, dim, start + pos - prior, h);
      }
      sc.pad_keys(n);
      const bool all_visible = t0 + n <= min_limit;
      for (int64_t r = 0; r < RB; ++r) tile_limit[r] = sc.limit[r] - static_cast<float>(t0);
      attend_tile(sc.qt.data(), sc.k.data(), sc.v.data(), n, dim, all_visible ? nullptr : tile_limit, rows, st,
                  sc.s);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = r0 + r;
      T* o = out + ((start + row / group) * heads + h * group + row % group) * dim;
      const float inv = 1.f / sc.l[r];
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(sc.o[r * dim + d] * inv);
    }
  });
}

// Prefill chunks over their sequences, causal: chunk c's query_lens[c] tokens from row query_starts[c] of q
// [tokens, heads, dim] attend to the context_lens[c] - query_lens[c] positions before them in the cache
// (blocks block_ids[c]) and to their own keys and values k, v [tokens, kv_heads, dim] up to themselves.
// Writes their rows of out [tokens, heads, dim].
void prefill_attention_(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& k_scale,
                        const torch::Tensor& v_scale, const torch::Tensor& tail_k, const torch::Tensor& tail_v,
                        at::IntArrayRef query_starts, at::IntArrayRef query_lens, at::IntArrayRef context_lens,
                        at::TensorList block_ids, const torch::Tensor& out, double scale, int64_t bits) {
  TORCH_CHECK(q.device().is_cpu(), "prefill_attention_ runs on the CPU");
  const int64_t heads = q.size(1), dim = q.size(2), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(dim % 16 == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && out.is_contiguous() && out.sizes() == q.sizes(),
              "q, k, v and out share a dtype; out is contiguous, shaped like q");
  for (const auto* x : {&q, &k, &v})
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == dim, "each token's heads must be contiguous rows");
  TORCH_CHECK(k.size(1) == kv_heads && v.sizes() == k.sizes() && k.size(0) == q.size(0),
              "k, v: [tokens, kv_heads, dim]");
  const int64_t chunks = static_cast<int64_t>(query_starts.size());
  TORCH_CHECK(static_cast<int64_t>(query_lens.size()) == chunks &&
                  static_cast<int64_t>(context_lens.size()) == chunks &&
                  static_cast<int64_t>(block_ids.size()) == chunks,
              "one start, length, context length and block list per chunk");
  std::vector<torch::Tensor> tables;
  std::vector<const int64_t*> table_ptrs;
  for (int64_t c = 0; c < chunks; ++c) {
    TORCH_CHECK(query_lens[c] > 0 && context_lens[c] >= query_lens[c] &&
                    block_ids[c].numel() * block_size >= context_lens[c] - query_lens[c],
                "a chunk's blocks must cover the context before it");
    tables.push_back(block_ids[c].to(torch::kInt64).contiguous());
    table_ptrs.push_back(tables.back().data_ptr<int64_t>());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefill_attention_", [&] {
    const FreshRows<scalar_t> fresh{k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k.stride(0), v.stride(0), dim};
    with_rows<scalar_t>(k_cache, v_cache, k_scale, v_scale, tail_k, tail_v, dim, bits, [&](const auto& cache_rows) {
      prefill_attention_impl<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), fresh, cache_rows, query_starts.data(),
                                       query_lens.data(), context_lens.data(), table_ptrs.data(), chunks,
                                       out.data_ptr<scalar_t>(), heads, kv_heads, dim, block_size,
                                       static_cast<float>(scale));
    });
  });
}

TORCH_LIBRARY_FRAGMENT(sharekv, m) {
  m.def("prefix_attention_merge_(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, Tensor v_scale, "
        "Tensor tail_k, Tensor tail_v, Tensor rows, Tensor prefix_lens, Tensor block_ids, Tensor(a!) out, "
        "Tensor(b!) lse, float scale, int bits) -> ()");
  m.def("prefill_attention_(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor k_scale, "
        "Tensor v_scale, Tensor tail_k, Tensor tail_v, int[] query_starts, int[] query_lens, int[] context_lens, "
        "Tensor[] block_ids, Tensor(a!) out, float scale, int bits) -> ()");
}

TORCH_LIBRARY_IMPL(sharekv, CPU, m) {
  m.impl("prefix_attention_merge_", &prefix_attention_merge_);
  m.impl("prefill_attention_", &prefill_attention_);
}
