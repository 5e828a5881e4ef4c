// torch's CUDA LayerNorm order of operations for one row, transcribed directly (../shared/GPU.md):
// virtual thread t of 128 reads the 4-element vectors t, t+128, ... and feeds each element to a
// Welford update; each warp merges by shuffle-down 16, 8, 4, 2, 1; then ((w0 + w2) + (w1 + w3));
// var = m2 / d, rstd = rsqrt(var + eps). No layout tricks: the expectation the host checks of the
// kernels (cuda_order_sim.cpp, cuda_kernel_emu.cpp) compare against. Include after ln_arith.cuh
// (its Welford primitives) with the round-to-nearest intrinsics and rsqrtf defined.
#pragma once

#include <cstring>

inline void torch_ln_moments(const float* row, int d, float eps, float& mean, float& rstd) {
  using residtap::cuda_impl::Moments;
  using residtap::cuda_impl::welford_combine;
  Moments vt[128];
  for (int t = 0; t < 128; ++t) {
    Moments m{0.f, 0.f, 0.f};
    for (int v = t; v < d / 4; v += 128) {
      for (int i = 0; i < 4; ++i) {
        const float n = __fadd_rn(m.n, 1.f);
        residtap::cuda_impl::welford_push(m.mean, m.m2, row[4 * v + i], __frcp_rn(n));
        m.n = n;
      }
    }
    vt[t] = m;
  }
  Moments w[4];
  for (int k = 0; k < 4; ++k) {
    Moments lanes[32];
    for (int l = 0; l < 32; ++l) lanes[l] = vt[32 * k + l];
    for (int o = 16; o > 0; o /= 2) {  // all lanes read before any writes, as shuffles do
      Moments next[32];
      for (int l = 0; l < 32; ++l) next[l] = welford_combine(lanes[l], l + o < 32 ? lanes[l + o] : lanes[l]);
      std::memcpy(lanes, next, sizeof(lanes));
    }
    w[k] = lanes[0];
  }
  // warps 2, 3 hand over to 0, 1; then warp 1 to warp 0
  const Moments f = welford_combine(welford_combine(w[0], w[2]), welford_combine(w[1], w[3]));
  mean = f.mean;
  rstd = rsqrtf(__fadd_rn(__fdiv_rn(f.m2, static_cast<float>(d)), eps));
}
