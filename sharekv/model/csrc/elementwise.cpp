// The element-wise chain between a layer's matrix products, one pass over each row instead of a torch op
// per step of it (each reading and writing the whole activation):
//
// add_rms_norm_: the residual add and the next RMSNorm. residual += x (x may be absent: the first layer),
//   then weight * (residual / rms(residual)), returned.
// silu_mul: SiLU of the gate half of the fused gate/up product times the up half.
// rope_: the rotary embedding (Hugging Face's rotate_half layout) applied in place to q and k, which may be
//   strided views into the fused q/k/v product.
//
// Each rounds to the activation dtype where the torch ops it replaces do (sharekv/model/elementwise.py has
// the portable versions), so the two paths agree to a rounding step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "vec.h"

template <typename T>
static inline T round_to(float v) { return static_cast<T>(v); }

// One row: residual += x (if given), then out = weight * (residual * rsqrt(mean(residual^2) + eps)).
template <typename T>
static void add_rms_norm_row(T* row, const T* x, const T* weight, T* out, int64_t hidden, float eps) {
  float squares = 0.f;
  int64_t d = 0;
  vfw acc = {};
  for (; d + W <= hidden; d += W) {  // whole vectors
    vfw v = load_floats(row + d);
    if (x) {
      v = round_floats<T>(v + load_floats(x + d));
      store_floats(row + d, v);
    }
    acc += v * v;
  }
  squares += sum_lanes(acc);
  for (int64_t e = d; e < hidden; ++e) {
    if (x) row[e] = round_to<T>(static_cast<float>(row[e]) + static_cast<float>(x[e]));
    const float v = static_cast<float>(row[e]);
    squares += v * v;
  }
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
  d = 0;
  for (; d + W <= hidden; d += W)
    store_floats(out + d, load_floats(weight + d) * round_floats<T>(load_floats(row + d) * inv));
  for (; d < hidden; ++d) {
    const float normed = static_cast<float>(round_to<T>(static_cast<float>(row[d]) * inv));
    out[d] = round_to<T>(static_cast<float>(weight[d]) * normed);
  }
}

torch::Tensor add_rms_norm_(const torch::Tensor& residual, const std::optional<torch::Tensor>& x,
                            const torch::Tensor& weight, double eps) {
  TORCH_CHECK(residual.device().is_cpu() && residual.is_contiguous() && residual.dim() == 2,
              "add_rms_norm_ takes a contiguous CPU residual [tokens, hidden]");
  const bool add = x.has_value();
  torch::Tensor xs = add ? x->contiguous() : torch::Tensor();
  TORCH_CHECK(!add || (xs.sizes() == residual.sizes() && xs.scalar_type() == residual.scalar_type()),
              "x must be shaped and typed like the residual");
  auto w = weight.contiguous();
  auto out = torch::empty_like(residual);
  const int64_t rows = residual.size(0), hidden = residual.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, residual.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* r = residual.data_ptr<scalar_t>();
    const scalar_t* a = add ? xs.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        add_rms_norm_row<scalar_t>(r + i * hidden, a ? a + i * hidden : nullptr, w.data_ptr<scalar_t>(),
                                   out.data_ptr<scalar_t>() + i * hidden, hidden, static_cast<float>(eps));
    });
  });
  return out;
}

template <typename T>
static void silu_mul_rows(const T* src, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = src + i * 2 * inter;
      const T* u = g + inter;
      T* o = out + i * inter;
      int64_t d = 0;
      for (; d + W <= inter; d += W) {  // whole vectors, with a vector exp
        const vfw x = load_floats(g + d);
        store_floats(o + d, round_floats<T>(x / (1.f + exp_w(-x))) * load_floats(u + d));
      }
      for (; d < inter; ++d) {
        const float x = static_cast<float>(g[d]);
        const float silu = static_cast<float>(round_to<T>(x / (1.f + std::exp(-x))));
        o[d] = round_to<T>(silu * static_cast<float>(u[d]));
      }
    }
  });
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "silu_mul takes a CPU [tokens, 2 * intermediate] product");
  auto gu = gate_up.contiguous();
  const int64_t rows = gu.size(0), inter = gu.size(1) / 2;
  auto out = torch::empty({rows, inter}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gu.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, inter);
  });
  return out;
}

// x [tokens, heads, dim] (last dimension contiguous), rotated in place by its token's row of cos and sin.
template <typename T>
static void rope_rows(T* x, int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride, int64_t head_stride,
                      const int64_t* pos, const T* cos, const T* sin) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + pos[t] * dim;
      const T* s = sin + pos[t] * dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = x + t * token_stride + h * head_stride;
        int64_t d = 0;
        for (; d + W <= half; d += W) {  // whole vectors, rounded at the same steps
          const vfw lo = load_floats(row + d), hi = load_floats(row + d + half);
          const vfw lo_c = round_floats<T>(lo * load_floats(c + d));
          const vfw hi_s = round_floats<T>(-hi * load_floats(s + d));
          const vfw hi_c = round_floats<T>(hi * load_floats(c + d + half));
          const vfw lo_s = round_floats<T>(lo * load_floats(s + d + half));
          store_floats(row + d, lo_c + hi_s);
          store_floats(row + d + half, hi_c + lo_s);
        }
        for (; d < half; ++d) {
          const float lo = static_cast<float>(row[d]), hi = static_cast<float>(row[d + half]);
          // as torch: x * cos and rotate_half(x) * sin each rounded, then their sum
          const float lo_c = static_cast<float>(round_to<T>(lo * static_cast<float>(c[d])));
          const float hi_s = static_cast<float>(round_to<T>(-hi * static_cast<float>(s[d])));
          const float hi_c = static_cast<float>(round_to<T>(hi * static_cast<float>(c[d + half])));
          const float lo_s = static_cast<float>(round_to<T>(lo * static_cast<float>(s[d + half])));
          row[d] = round_to<T>(lo_c + hi_s);
          row[d + half] = round_to<T>(hi_c + lo_s);
        }
      }
    }
  });
}

void rope_(const torch::Tensor& q, const torch::Tensor& k, torch::Tensor positions, const torch::Tensor& cos,
           const torch::Tensor& sin) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 &&
                  q.size(2) % 2 == 0 && q.scalar_type() == k.scalar_type(),
              "rope_ takes CPU q, k [tokens, heads, dim] with contiguous rows of one dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == q.scalar_type() &&
                  cos.size(1) == q.size(2),
              "cos and sin must be contiguous [positions, dim] tables in q's dtype");
  positions = positions.to(torch::kInt64).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_", [&] {
    for (const auto* x : {&q, &k})
      rope_rows<scalar_t>(x->data_ptr<scalar_t>(), x->size(0), x->size(1), x->size(2), x->stride(0), x->stride(1),
                          positions.data_ptr<int64_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>());
  });
}

TORCH_LIBRARY_FRAGMENT(sharekv, m) {
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor? x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(sharekv, CPU, m) {
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_", &rope_);
}
