// CUDA's round-to-nearest arithmetic intrinsics as IEEE operations on the host (compile with
// -ffp-contract=off so that nothing is fused), for the programs that run the kernels' code on a
// CPU (cuda_order_sim.cpp, cuda_kernel_emu.cpp). rsqrtf is the GPU's approximation there; here it
// is 1/sqrtf on both sides of every comparison, so it never decides a result.
#pragma once

#include <cmath>
#include <cstring>

static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
static inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
static inline float __double2float_rn(double a) { return static_cast<float>(a); }
static inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
static inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
static inline float host_rsqrtf(float a) { return 1.0f / std::sqrt(a); }
#define rsqrtf host_rsqrtf  // a macro: cuda_runtime.h may already declare rsqrtf
