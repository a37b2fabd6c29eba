// Decode attention over the paged KV cache, reading each sequence's blocks where they lie.
// One task per (sequence, kv head): every key and value row is loaded once for all the query heads that
// share it (GQA), scores stay in a small per-task buffer, and nothing of the cache is copied.
// Each sequence attends to positions [start, context_len); the log-sum-exp of its scores is returned too,
// so a part computed elsewhere (a group's shared prefix) can be merged in exactly.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// A row of the cache as floats: the row itself for fp32, else converted into `buf`.
template <typename T>
static inline const float* as_float(const T* row, float* buf, int64_t dim) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t d = 0; d < dim; ++d) buf[d] = static_cast<float>(row[d]);
    return buf;
  }
}

template <typename T>
static void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                          const int64_t* context_lens, const int64_t* starts, T* out, float* lse, int64_t batch, int64_t heads, int64_t kv_heads,
                          int64_t dim, int64_t block_size, int64_t table_width, float scale, int64_t window) {
  const int64_t group = heads / kv_heads;
  const int64_t row = kv_heads * dim;  // stride between consecutive tokens of one block
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), row_buf(dim), scores;
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
      // Walk the blocks that hold [first, ctx): a block's tokens sit `row` elements apart.
      for (int64_t t0 = first; t0 < ctx;) {
        const int64_t in_block = t0 % block_size, count = std::min(block_size - in_block, ctx - t0);
        const T* k = k_cache + (table[t0 / block_size] * block_size + in_block) * row + h * dim;
        for (int64_t i = 0; i < count; ++i, k += row) {
          const float* kf = as_float(k, row_buf.data(), dim);
          for (int64_t g = 0; g < group; ++g) scores[g * n + (t0 - first) + i] = dot16(qf.data() + g * dim, kf, dim);
        }
        t0 += count;
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
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = first; t0 < ctx;) {
        const int64_t in_block = t0 % block_size, count = std::min(block_size - in_block, ctx - t0);
        const T* v = v_cache + (table[t0 / block_size] * block_size + in_block) * row + h * dim;
        for (int64_t i = 0; i < count; ++i, v += row) {
          const float* vf = as_float(v, row_buf.data(), dim);
          for (int64_t g = 0; g < group; ++g) axpy16(acc.data() + g * dim, scores[g * n + (t0 - first) + i], vf, dim);
        }
        t0 += count;
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          out[(b * heads + h * group + g) * dim + d] = static_cast<T>(acc[g * dim + d]);
    }
  });
}

std::vector<torch::Tensor> paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                                  torch::Tensor block_tables, torch::Tensor context_lens,
                                                  torch::Tensor starts, double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                            starts.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(), batch, heads, kv_heads, dim, block_size,
                            block_tables.size(1), static_cast<float>(scale), window);
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV (CPU)");
}
