// Vectors of floats sized to the machine's registers (GCC/Clang vector extensions), shared by the kernels.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vfw __attribute__((vector_size(W * 4)));
typedef float vfwu __attribute__((vector_size(W * 4), aligned(4)));
static inline vfw loadw(const float* p) { return *reinterpret_cast<const vfwu*>(p); }
static inline void storew(float* p, vfw v) { *reinterpret_cast<vfwu*>(p) = v; }
typedef int32_t viw __attribute__((vector_size(W * 4)));

// exp on a vector: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, e^r by its degree-7 Taylor
// polynomial (relative error below 1e-7). libm's expf is scalar here and took a third of the time.
static inline vfw exp_w(vfw x) {
  const viw keep = x >= -87.f;  // below this e^x underflows: return 0
  x = x < -87.f ? vfw{} - 87.f : x;
  x = x > 88.f ? vfw{} + 88.f : x;
  const vfw y = x * 1.44269504f + 0.5f;
  viw n = __builtin_convertvector(y, viw);
  n += y < __builtin_convertvector(n, vfw);  // truncation to floor: subtract 1 where it rounded up
  const vfw r = x - __builtin_convertvector(n, vfw) * 0.693147181f;
  vfw p = 1.f / 5040.f + r * 0.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const viw scaled = (viw)p + (n << 23);  // multiply by 2^n in the exponent bits
  return (vfw)(scaled & keep);
}

// The sum and the largest of a vector's lanes, in lane order.
static inline float sum_lanes(vfw v) {
  float s = 0.f;
  for (int j = 0; j < W; ++j) s += v[j];
  return s;
}
static inline float max_lanes(vfw v) {
  float m = v[0];
  for (int j = 1; j < W; ++j) m = m > v[j] ? m : v[j];
  return m;
}

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

// Prefetches the cache lines of [p, p + bytes) into all cache levels.
static inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// bf16 on whole vectors: a bf16 is the top half of an fp32, rounded to nearest even as c10 rounds (NaN stays
// a NaN). Element by element these conversions kept bf16 models' kernels several times slower than fp32's.
typedef uint16_t vhwu __attribute__((vector_size(W * 2), aligned(2)));
typedef uint32_t vuw __attribute__((vector_size(W * 4)));

static inline vfw load_bf16(const c10::BFloat16* p) {
  return (vfw)(__builtin_convertvector(*reinterpret_cast<const vhwu*>(p), vuw) << 16);
}
static inline vuw bf16_bits_rounded(vfw x) {  // the rounded value in the top 16 bits
  const vuw u = (vuw)x;
  const vuw rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return (vuw)(x != x ? (viw)(vuw{} + 0x7FC00000u) : (viw)rounded);
}
static inline void store_bf16(c10::BFloat16* p, vfw x) {
  *reinterpret_cast<vhwu*>(p) = __builtin_convertvector(bf16_bits_rounded(x) >> 16, vhwu);
}

// W values of T as floats, and back (rounded to T); T is float, c10::BFloat16 or another type torch converts.
template <typename T>
static inline vfw load_floats(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return loadw(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return load_bf16(p);
  } else {
    vfw v;
    for (int j = 0; j < W; ++j) v[j] = static_cast<float>(p[j]);
    return v;
  }
}
template <typename T>
static inline void store_floats(T* p, vfw v) {
  if constexpr (std::is_same_v<T, float>) {
    storew(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    store_bf16(p, v);
  } else {
    for (int j = 0; j < W; ++j) p[j] = static_cast<T>(v[j]);
  }
}
// v rounded to T's precision, kept as floats (where the torch ops a kernel replaces round to T).
template <typename T>
static inline vfw round_floats(vfw v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return (vfw)(bf16_bits_rounded(v) & 0xFFFF0000u);
  } else {
    for (int j = 0; j < W; ++j) v[j] = static_cast<float>(static_cast<T>(v[j]));
    return v;
  }
}
