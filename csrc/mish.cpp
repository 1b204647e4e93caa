// In-place Mish on CPU float32 and bfloat16 with one exponential per element.
//
// tanh(log(1 + n)) = ((1 + n)^2 - 1) / ((1 + n)^2 + 1) = t / (t + 2) with n = exp(x) and
// t = n (n + 2), so Mish(x) = x * t / (t + 2). The exponential's argument is clamped to
// [-104, 20]: above 20, t / (t + 2) rounds to 1 in float32 (the result is x, as with torch's
// exp/log1p/tanh); below -104, exp(x) rounds to 0 (the result is a signed zero, as with torch).
// NaN is clamped too, to -104, and comes back through the final product with x. bfloat16 is
// computed in float32 and rounded once to nearest even, as torch does.
//
// The loop has no branches and no calls, so the compiler vectorises it; it is compiled for several
// instruction sets and the best one the CPU has is picked when the library is loaded.
#include "mish.h"

#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>

#include "common.h"

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MSID_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef MSID_TARGET_CLONES
#define MSID_TARGET_CLONES
#endif

namespace msidtrans {
namespace {

constexpr float kExpLow = -104.0f, kExpHigh = 20.0f;

inline float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// exp(x) for x in [kExpLow, kExpHigh], within about 2 ulp, subnormal results included.
inline float exp_clamped(float x) {
  // k = round(x / ln 2): adding 1.5 * 2^23 leaves no fraction bits to round into.
  const float shifter = 12582912.0f;
  const float k = (x * 1.44269504088896341f + shifter) - shifter;
  // r = x - k ln 2 in two steps (Cody-Waite): ln2_hi has 15 significant bits, so k * ln2_hi is
  // exact for |k| < 2^9; |r| <= ln(2) / 2.
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-6f;
  // exp(r) by its Taylor series to r^7 (relative error below 1e-8 for |r| <= ln(2) / 2).
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // times 2^k, k in [-150, 29], as two normal powers of two (2^k alone may be subnormal), built
  // from their exponent bits; the last product rounds once.
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1, k2 = ki - k1;
  return p * bits_to_float((k1 + 127) << 23) * bits_to_float((k2 + 127) << 23);
}

// The clamp bounds lo, hi (kExpLow, kExpHigh) are arguments of the loops: with constants there,
// the compiler splits a loop into a path per bound (where exp folds to a constant) and no longer
// vectorises it.
inline float mish(float x, float lo, float hi) {
  float c = x > lo ? x : lo;  // NaN goes to lo
  c = c < hi ? c : hi;
  const float e = exp_clamped(c);
  const float t = e * (e + 2.0f);
  return x * (t / (t + 2.0f));
}

MSID_TARGET_CLONES
void mish_f32(float* data, int64_t n, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) data[i] = mish(data[i], lo, hi);
}

// bfloat16 is the upper half of a float32; NaN becomes 0x7fc0, as c10::BFloat16 rounds it.
MSID_TARGET_CLONES
void mish_bf16(uint16_t* data, int64_t n, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    const float y = mish(bits_to_float(static_cast<int32_t>(data[i]) << 16), lo, hi);
    const uint32_t bits = float_to_bits(y);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    data[i] = static_cast<uint16_t>(y != y ? 0x7fc0u : rounded);
  }
}

}  // namespace

void mish_(const at::Tensor& x) {
  TORCH_CHECK(x.is_cpu(), "mish_ expects a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "mish_ expects float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(),
              "mish_ expects a tensor without gaps or overlaps, got strides ", x.strides());
  if (x.scalar_type() == at::kFloat) {
    float* data = x.data_ptr<float>();
    at::parallel_for(0, x.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      mish_f32(data + begin, end - begin, kExpLow, kExpHigh);
    });
  } else {
    auto* data = reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>());
    at::parallel_for(0, x.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      mish_bf16(data + begin, end - begin, kExpLow, kExpHigh);
    });
  }
}

}  // namespace msidtrans
