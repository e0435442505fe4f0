// Fused CPU kernels of vbdropout (float32, dense tensors). Built on first use by
// vbdropout/kernels/build.py; vbdropout/kernels/functions.py wraps them in
// autograd functions, and every caller keeps an eager PyTorch path.
//
// Results do not depend on the number of threads: work is split into chunks of
// fixed size (the same vector body / scalar tail split whatever the threads), sums
// are accumulated per chunk, and the noise of element i depends only on (seed, i).
//
// Compiled with -ffast-math (for glibc's vectorized exp/log/cos), under which the
// compiler may assume that no value is NaN or inf; the KL sums therefore test the
// inputs' bit patterns and return NaN when one is not finite.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 16384;     // elements per partial sum and per task
constexpr int64_t kNoiseBlock = 256;  // noise pairs generated per vectorized block

// ---------------------------------------------------------------------------
// The KL of each prior per weight, from θ, log σ² and σ² = exp(log σ²).

// VBD's hierarchical prior (Liu et al. 2019, Eq. 17/18): KL = ½·log(1 + θ²/σ²)
// = ½·(log(θ² + σ²) − log σ²), the argument of log floored at 1e−30.
// ∂/∂θ = θ/u, ∂/∂log σ² = −½·θ²/u with u = θ² + σ².
struct HierarchicalKL {
  float value(float t, float s, float v) const {
    return 0.5f * (std::log(std::max(t * t + v, 1e-30f)) - s);
  }
  void grads(float t, float, float v, float& dt, float& ds) const {
    const float ratio = t / std::max(t * t + v, 1e-30f);
    dt = ratio;
    ds = -0.5f * ratio * t;
  }
};

// Sparse VD's log-uniform prior (Molchanov et al. 2017) with log α = clip(log σ² −
// log(θ² + 1e−8), low, high): KL = k1·q + ½·log1p(e^(−log α)),
// q = σ(−k2 − k3·log α); ∂KL/∂log α = −k1·k3·q·(1 − q) − ½·σ(−log α) inside the
// clip range and 0 outside it; ∂log α/∂θ = −2θ/(θ² + 1e−8).
struct LogUniformKL {
  float k1, k2, k3, low, high;
  float log_alpha(float t, float s) const {
    return std::min(std::max(s - std::log(t * t + 1e-8f), low), high);
  }
  float value(float t, float s, float) const {
    const float la = log_alpha(t, s);
    const float q = 1.0f / (1.0f + std::exp(k2 + k3 * la));
    return k1 * q + 0.5f * std::log1p(std::exp(-la));
  }
  void grads(float t, float s, float, float& dt, float& ds) const {
    const float la = log_alpha(t, s);
    const float q = 1.0f / (1.0f + std::exp(k2 + k3 * la));
    const float d = -k1 * k3 * q * (1.0f - q) - 0.5f / (1.0f + std::exp(la));
    ds = (la > low && la < high) ? d : 0.0f;
    dt = ds * (-2.0f * t / (t * t + 1e-8f));
  }
};

void check_prior(int64_t prior, const std::vector<double>& constants) {
  TORCH_CHECK(prior == 0 || prior == 1, "unknown prior id (0 hierarchical, 1 log-uniform)");
  TORCH_CHECK(constants.size() == (prior == 0 ? 0u : 5u),
              "the hierarchical KL takes no constants, the log-uniform one k1, k2, k3, low, high");
}

// Calls f with the KL of prior id `prior` (0 hierarchical, 1 log-uniform with
// constants k1, k2, k3, low, high), checked by check_prior.
template <class F>
void with_kl(int64_t prior, const std::vector<double>& c, const F& f) {
  if (prior == 0) {
    f(HierarchicalKL{});
  } else {
    f(LogUniformKL{static_cast<float>(c[0]), static_cast<float>(c[1]),
                   static_cast<float>(c[2]), static_cast<float>(c[3]),
                   static_cast<float>(c[4])});
  }
}

// ---------------------------------------------------------------------------
// Loops over one chunk (plain functions with restrict pointers, so that they vectorize).

// 1 if x is NaN or ±inf (its exponent bits all set), read from the bits so that
// -ffast-math cannot assume it away.
inline uint32_t not_finite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) == 0x7f800000u;
}

// Σ KL over n weights (NaN if an input is not finite), and σ² if kWriteSigma2.
template <class KL, bool kWriteSigma2>
float kl_chunk(const KL& kl, const float* __restrict t, const float* __restrict s,
               float* __restrict sigma2, int64_t n) {
  float acc = 0.0f;
  uint32_t bad = 0;
#pragma omp simd reduction(+ : acc) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::exp(s[i]);
    if constexpr (kWriteSigma2) sigma2[i] = v;
    acc += kl.value(t[i], s[i], v);
    bad |= not_finite(t[i]) | not_finite(s[i]);
  }
  return bad ? std::numeric_limits<float>::quiet_NaN() : acc;
}

template <class KL>
void kl_grads_chunk(const KL& kl, const float* __restrict t, const float* __restrict s,
                    float* __restrict gt, float* __restrict gs, float g, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float dt, ds;
    kl.grads(t[i], s[i], std::exp(s[i]), dt, ds);
    gt[i] = g * dt;
    gs[i] = g * ds;
  }
}

template <class KL>
void weight_grads_chunk(const KL& kl, const float* __restrict t, const float* __restrict s,
                        const float* __restrict v, float* __restrict gt,
                        float* __restrict gv, float g, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float dt, ds;
    kl.grads(t[i], s[i], v[i], dt, ds);
    gt[i] += g * dt;
    gv[i] = gv[i] * v[i] + g * ds;
  }
}

// ---------------------------------------------------------------------------
// Ops.

// f(begin, end) over [0, n) in chunks of `chunk` elements, the chunks in parallel.
template <class F>
void for_chunks(int64_t n, int64_t chunk, const F& f) {
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

void check_dense_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, " must be dense");
}

void check_like(const at::Tensor& reference, const at::Tensor& t, const char* name) {
  check_dense_float(t, name);
  TORCH_CHECK(t.sizes() == reference.sizes() && t.strides() == reference.strides(), name,
              " must have the shape and strides of the first argument");
}

// The gradient of a KL sum: a one-element CPU tensor (a tensor rather than a
// number, so that a compiled graph need not read it back into Python).
float scalar_grad(const at::Tensor& grad) {
  TORCH_CHECK(grad.device().is_cpu() && grad.numel() == 1, "grad must be one CPU number");
  return grad.item<float>();
}

// Σ KL over the weights, and σ² = exp(log σ²) when `sigma2` is defined.
at::Tensor kl_sum_into(const at::Tensor& theta, const at::Tensor& log_sigma2, int64_t prior,
                       const std::vector<double>& constants, float* sigma2) {
  check_dense_float(theta, "theta");
  check_like(theta, log_sigma2, "log_sigma2");
  check_prior(prior, constants);
  const float* t = theta.const_data_ptr<float>();
  const float* s = log_sigma2.const_data_ptr<float>();
  const int64_t n = theta.numel();
  std::vector<double> partial((n + kChunk - 1) / kChunk, 0.0);
  with_kl(prior, constants, [&](const auto& kl) {
    using KL = std::decay_t<decltype(kl)>;
    for_chunks(n, kChunk, [&](int64_t b, int64_t e) {
      partial[b / kChunk] = sigma2 == nullptr
                                ? kl_chunk<KL, false>(kl, t + b, s + b, nullptr, e - b)
                                : kl_chunk<KL, true>(kl, t + b, s + b, sigma2 + b, e - b);
    });
  });
  double sum = 0.0;
  for (double p : partial) sum += p;
  return at::scalar_tensor(sum, theta.options());
}

at::Tensor kl_sum(const at::Tensor& theta, const at::Tensor& log_sigma2, int64_t prior,
                  std::vector<double> constants) {
  return kl_sum_into(theta, log_sigma2, prior, constants, nullptr);
}

// g·∂(Σ KL)/∂θ and g·∂(Σ KL)/∂log σ².
std::tuple<at::Tensor, at::Tensor> kl_sum_backward(const at::Tensor& theta,
                                                   const at::Tensor& log_sigma2,
                                                   int64_t prior,
                                                   std::vector<double> constants,
                                                   const at::Tensor& grad) {
  check_dense_float(theta, "theta");
  check_like(theta, log_sigma2, "log_sigma2");
  check_prior(prior, constants);
  at::Tensor grad_theta = at::empty_like(theta);
  at::Tensor grad_log_sigma2 = at::empty_like(theta);
  const float* t = theta.const_data_ptr<float>();
  const float* s = log_sigma2.const_data_ptr<float>();
  float* gt = grad_theta.data_ptr<float>();
  float* gs = grad_log_sigma2.data_ptr<float>();
  const float g = scalar_grad(grad);
  with_kl(prior, constants, [&](const auto& kl) {
    for_chunks(theta.numel(), kChunk, [&](int64_t b, int64_t e) {
      kl_grads_chunk(kl, t + b, s + b, gt + b, gs + b, g, e - b);
    });
  });
  return {grad_theta, grad_log_sigma2};
}

// σ² = exp(log σ²) and Σ KL in one pass: what a training forward needs.
std::tuple<at::Tensor, at::Tensor> sigma2_and_kl(const at::Tensor& theta,
                                                 const at::Tensor& log_sigma2,
                                                 int64_t prior,
                                                 std::vector<double> constants) {
  check_dense_float(theta, "theta");
  at::Tensor sigma2 = at::empty_like(theta);
  at::Tensor kl = kl_sum_into(theta, log_sigma2, prior, constants, sigma2.data_ptr<float>());
  return {sigma2, kl};
}

// In place, for the backward pass of a training forward: ∂L/∂σ² (of the variance
// product) becomes ∂L/∂log σ² = ∂L/∂σ²·σ² + g·∂KL/∂log σ², and g·∂KL/∂θ is added to
// ∂L/∂θ, where g is the gradient of the KL sum.
void weight_grads_(const at::Tensor& theta, const at::Tensor& log_sigma2,
                   const at::Tensor& sigma2, at::Tensor grad_theta, at::Tensor grad_sigma2,
                   int64_t prior, std::vector<double> constants, const at::Tensor& grad) {
  check_dense_float(theta, "theta");
  check_like(theta, log_sigma2, "log_sigma2");
  check_like(theta, sigma2, "sigma2");
  check_like(theta, grad_theta, "grad_theta");
  check_like(theta, grad_sigma2, "grad_sigma2");
  check_prior(prior, constants);
  const float* t = theta.const_data_ptr<float>();
  const float* s = log_sigma2.const_data_ptr<float>();
  const float* v = sigma2.const_data_ptr<float>();
  float* gt = grad_theta.data_ptr<float>();
  float* gv = grad_sigma2.data_ptr<float>();
  const float g = scalar_grad(grad);
  with_kl(prior, constants, [&](const auto& kl) {
    for_chunks(theta.numel(), kChunk, [&](int64_t b, int64_t e) {
      weight_grads_chunk(kl, t + b, s + b, v + b, gt + b, gv + b, g, e - b);
    });
  });
}

// Two independent N(0, 1) numbers per counter: the SplitMix64 output for state
// seed + index·γ, split into two uniforms, then Box–Muller. (sin is
// written as a shifted cos so that both vectorize; the compiler would otherwise
// merge them into a sincos call that does not.)
void normal_pairs(uint64_t seed, int64_t first, int64_t count, float* __restrict z0,
                  float* __restrict z1) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    uint64_t z = seed + static_cast<uint64_t>(first + j) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    // u1 in (0, 1] from the high 32 bits (so |z| reaches 6.7), u2 in [0, 1) from 24 more
    const float u1 = (static_cast<float>(static_cast<int64_t>(z >> 32)) + 1.0f) * 0x1p-32f;
    const float u2 = static_cast<float>(static_cast<int32_t>((z >> 8) & 0xFFFFFF)) * 0x1p-24f;
    const float radius = std::sqrt(-2.0f * std::log(u1));
    const float angle = 6.2831853071795865f * u2;
    z0[j] = radius * std::cos(angle);
    z1[j] = radius * std::cos(angle - 1.5707963267948966f);
  }
}

void lrt_pairs(const float* __restrict m, const float* __restrict v, const float* __restrict z0,
               const float* __restrict z1, float* __restrict o, float* __restrict d, float eps,
               int64_t pairs) {
#pragma omp simd
  for (int64_t j = 0; j < pairs; ++j) {
    const float sd0 = std::sqrt(v[2 * j] + eps), sd1 = std::sqrt(v[2 * j + 1] + eps);
    o[2 * j] = m[2 * j] + sd0 * z0[j];
    o[2 * j + 1] = m[2 * j + 1] + sd1 * z1[j];
    d[2 * j] = 0.5f * z0[j] / sd0;
    d[2 * j + 1] = 0.5f * z1[j] / sd1;
  }
}

// The local reparameterization sample b = μ + sqrt(v + ε)·z, z ~ N(0, 1), and
// ∂b/∂v = z / (2·sqrt(v + ε)) for the backward pass. Element i takes the first
// number of pair i/2 if i is even, else the second.
std::tuple<at::Tensor, at::Tensor> lrt_sample(const at::Tensor& mean, const at::Tensor& var,
                                              const at::Tensor& seed, double eps) {
  check_dense_float(mean, "mean");
  check_like(mean, var, "var");
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed must be one int64 on the CPU");
  at::Tensor out = at::empty_like(mean);
  at::Tensor dvar = at::empty_like(mean);
  const float* m = mean.const_data_ptr<float>();
  const float* v = var.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* d = dvar.data_ptr<float>();
  const int64_t n = mean.numel();
  const uint64_t key = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  const float e = static_cast<float>(eps);
  for_chunks((n + 1) / 2, kChunk / 2, [&](int64_t begin, int64_t end) {
    float z0[kNoiseBlock], z1[kNoiseBlock];
    for (int64_t p = begin; p < end; p += kNoiseBlock) {
      const int64_t count = std::min(kNoiseBlock, end - p);
      normal_pairs(key, p, count, z0, z1);
      const int64_t full = std::min(count, n / 2 - p);  // pairs with both elements in range
      lrt_pairs(m + 2 * p, v + 2 * p, z0, z1, o + 2 * p, d + 2 * p, e, full);
      if (full < count) {  // odd n: the last element takes z0 of the last pair
        const int64_t i = n - 1;
        const float sd = std::sqrt(v[i] + e);
        o[i] = m[i] + sd * z0[full];
        d[i] = 0.5f * z0[full] / sd;
      }
    }
  });
  return {out, dvar};
}

}  // namespace

TORCH_LIBRARY(vbdropout, m) {
  m.def("kl_sum(Tensor theta, Tensor log_sigma2, int prior, float[] constants) -> Tensor");
  m.def(
      "kl_sum_backward(Tensor theta, Tensor log_sigma2, int prior, float[] constants, "
      "Tensor grad) -> (Tensor, Tensor)");
  m.def(
      "sigma2_and_kl(Tensor theta, Tensor log_sigma2, int prior, float[] constants) "
      "-> (Tensor, Tensor)");
  m.def(
      "weight_grads_(Tensor theta, Tensor log_sigma2, Tensor sigma2, Tensor(a!) grad_theta, "
      "Tensor(b!) grad_sigma2, int prior, float[] constants, Tensor grad) -> ()");
  m.def("lrt_sample(Tensor mean, Tensor var, Tensor seed, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vbdropout, CPU, m) {
  m.impl("kl_sum", &kl_sum);
  m.impl("kl_sum_backward", &kl_sum_backward);
  m.impl("sigma2_and_kl", &sigma2_and_kl);
  m.impl("weight_grads_", &weight_grads_);
  m.impl("lrt_sample", &lrt_sample);
}
