// torch's CUDA LayerNorm order of operations for one row, transcribed directly from ../shared/GPU.md:
// virtual thread t of 128 reads the 4-element vectors t, t+128, ... and feeds each element to a
// Welford update; each warp merges by shuffle-down 16, 8, 4, 2, 1; then ((w0 + w2) + (w1 + w3));
// var = m2 / d, rstd = rsqrt(var + eps). No layout tricks, and none of the kernels' code: the
// Welford update and merge are written out here again from GPU.md, so that a mistake in the
// kernels' own primitives (ln_arith.cuh) is not on both sides of the comparison. This is the
// expectation the host checks of the kernels (cuda_order_sim.cpp, cuda_kernel_emu.cpp) compare
// against. Plain float operations: compile with -ffp-contract=off (nothing fused but the fmaf
// written here); rsqrtf is defined by host_intrinsics.h.
#pragma once

#include <cmath>
#include <cstring>

namespace torch_order {

struct Partial {
  float mean = 0.f, m2 = 0.f, n = 0.f;
};

// One element: d = x - mean; n = count + 1; mean = fma(d, 1/n, mean); m2 = fma(d, x - mean, m2),
// 1/n correctly rounded (an IEEE division of 1 by n is exactly that).
inline void push(Partial& a, float x) {
  const float d = x - a.mean;
  const float n = a.n + 1.f;
  a.mean = std::fmaf(d, 1.f / n, a.mean);
  a.m2 = std::fmaf(d, x - a.mean, a.m2);
  a.n = n;
}

// The caller's partial b merged with an incoming partial a.
inline Partial merge(const Partial& b, const Partial& a) {
  Partial r;
  const float delta = b.mean - a.mean;
  const float n = a.n + b.n;
  if (n > 0.f) {
    const float c = 1.f / n;
    const float na = a.n * c;
    const float nb = b.n * c;
    r.mean = std::fmaf(na, a.mean, nb * b.mean);
    r.m2 = std::fmaf((delta * delta) * a.n, nb, a.m2 + b.m2);
  }
  r.n = n;
  return r;
}

}  // namespace torch_order

inline void torch_ln_moments(const float* row, int d, float eps, float& mean, float& rstd) {
  using torch_order::Partial;
  Partial vt[128];
  for (int t = 0; t < 128; ++t) {
    for (int v = t; v < d / 4; v += 128) {
      for (int i = 0; i < 4; ++i) torch_order::push(vt[t], row[4 * v + i]);
    }
  }
  Partial w[4];
  for (int k = 0; k < 4; ++k) {
    Partial lanes[32];
    for (int l = 0; l < 32; ++l) lanes[l] = vt[32 * k + l];
    for (int o = 16; o > 0; o /= 2) {  // all lanes read before any writes, as shuffles do
      Partial next[32];
      for (int l = 0; l < 32; ++l) next[l] = torch_order::merge(lanes[l], l + o < 32 ? lanes[l + o] : lanes[l]);
      std::memcpy(lanes, next, sizeof(lanes));
    }
    w[k] = lanes[0];
  }
  // warps 2, 3 hand over to 0, 1; then warp 1 to warp 0
  const Partial f = torch_order::merge(torch_order::merge(w[0], w[2]), torch_order::merge(w[1], w[3]));
  mean = f.mean;
  rstd = rsqrtf(f.m2 / static_cast<float>(d) + eps);
}
