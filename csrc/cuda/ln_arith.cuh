// torch's CUDA LayerNorm arithmetic (its vectorized "fast" kernel), step for step, so that the fused
// capture op reproduces F.layer_norm and torch.native_layer_norm bit for bit. ../shared/GPU.md
// describes the order of operations (confirmed on an H200 by a probe kernel); in short:
//
//   * torch runs one 128-thread block per row: "virtual thread" t = lane + 32*warp (0..127) reads the
//     4-element vectors t, t+128, t+256, ... of the row and feeds each element to a Welford update;
//   * partials are merged by shuffle-down inside each warp (offsets 16, 8, 4, 2, 1) and then across
//     the 4 warps as ((w0 + w2) + (w1 + w3));
//   * var = m2 / D, rstd = rsqrtf(var + eps), y = fma(w, rstd * (x - mean), b).
//
// Only the order of operations matters, not which physical thread performs them, so the kernels
// in rows_impl.cuh hold several virtual threads per physical thread ("slots") and replay the
// same merge tree. Every operation below is an explicit round-to-nearest intrinsic so that the
// compiler can neither contract nor re-associate it (never build with fast-math).
//
// Everything here is free of ATen so that tests/cuda_order_sim.cpp can compile it for the host
// (with the intrinsics emulated and warp shuffles run in lock step) and check that the layouts
// below replay torch's order exactly: the one part of the kernel a CPU machine can verify.
#pragma once

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace residtap {
namespace cuda_impl {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlock = 128;    // threads per block for both kernels
constexpr int kMaxFastK = 16;  // fast kernel: at most 16 vectors per virtual thread (width 8192)

// Partial moments of one virtual thread (count kept as float, as torch does).
struct Moments {
  float mean;
  float m2;
  float n;
};

// torch's cuWelfordOnlineSum for the element number `n` (1-based) of a virtual thread, with
// rcp = the correctly rounded 1/n:  d = x - mean; mean += d * (1/n) (one fma); m2 += d * (x - mean).
__device__ __forceinline__ void welford_push(float& mean, float& m2, float x, float rcp) {
  const float d = __fsub_rn(x, mean);
  mean = __fmaf_rn(d, rcp, mean);
  m2 = __fmaf_rn(d, __fsub_rn(x, mean), m2);
}

// torch's cuWelfordCombine(dataB = own, dataA = incoming). The argument order matters: the result
// is not symmetric in floating point.
__device__ __forceinline__ Moments welford_combine(const Moments& own, const Moments& in) {
  const float delta = __fsub_rn(own.mean, in.mean);
  const float n = __fadd_rn(in.n, own.n);
  Moments r;
  if (n > 0.f) {
    const float c = __frcp_rn(n);
    const float n_in = __fmul_rn(in.n, c);
    const float n_own = __fmul_rn(own.n, c);
    r.mean = __fmaf_rn(n_in, in.mean, __fmul_rn(n_own, own.mean));
    r.m2 = __fmaf_rn(__fmul_rn(__fmul_rn(delta, delta), in.n), n_own, __fadd_rn(in.m2, own.m2));
  } else {
    r.mean = 0.f;
    r.m2 = 0.f;
  }
  r.n = n;
  return r;
}

__device__ __forceinline__ Moments shfl_down(const Moments& m, int delta) {
  return Moments{__shfl_down_sync(kFullMask, m.mean, delta), __shfl_down_sync(kFullMask, m.m2, delta),
                 __shfl_down_sync(kFullMask, m.n, delta)};
}

// Layout for widths d <= 128 * 4 * K (d % (4 * kU) == 0, 16-byte aligned rows):
//   kU   vectors of 4 elements per 16-byte unit: 1 for float, 2 for 16-bit types;
//   kT   threads per row ("team"); a block of 128 threads holds 128 / kT rows; every thread keeps
//        its kY * K units (32 to 128 elements) in registers from the read to the normalization;
//   team thread p, unit (y, j) = the kU vectors starting at kU*p + kU*kT*y + 128*j, i.e. the j-th
//   vector of virtual threads kU*p + u + kU*kT*y (see reduce_virtual_warps).
template <int kElemBytes, int K>
struct FastLayout {
  static constexpr int kU = kElemBytes == 2 ? 2 : 1;
  // float: 16 vectors per thread (8 for K = 1, whose 16 Welford slots would spill);
  // 16-bit: 8 vectors per thread up to K = 8, then 16.
  static constexpr int kT = kU == 1 ? (K == 1 ? 16 : 8 * K) : (8 * K < 64 ? 8 * K : 64);
  static constexpr int kUT = kU * kT;
  static constexpr int kY = 128 / kUT;
  static constexpr int kSlots = kU * kY;
  static constexpr int kN = 4 * kU;  // elements per unit
  static constexpr int kTeams = kBlock / kT;
  static constexpr int kTeamWarps = kT > 32 ? kT / 32 : 1;
  static constexpr int kLanes = kT < 32 ? kT : 32;  // team lanes within one warp
  static constexpr int kUnits = kY * K;  // 16-byte units per thread and row
  // Units whose loads are issued together before their stores: inp for delta (kChunk), weight
  // and bias for normed (kNormChunk, two loads per unit). Sized to fit the register budget.
  static constexpr int kChunk = 4;
  static constexpr int kNormChunk = 2;
  static_assert(kUnits % kChunk == 0 && kUnits % kNormChunk == 0, "units come in whole chunks");
  static_assert(kUT * kY == 128 && kY >= 1 && kT <= kBlock, "bad layout");
  __host__ __device__ static constexpr int offset(int y, int j) { return 4 * (kUT * y + 128 * j); }
};


// Feeds one 16-byte unit of the row to its kU slots (`m` = the slots of one y): the unit holds
// the j-th 4-element vector of kU consecutive virtual threads, i.e. their elements 4j+1 .. 4j+4,
// in order. 1/n is the correctly rounded reciprocal (== __frcp_rn(n)); written as an IEEE division
// of constants it folds to an immediate once unrolled, whereas __frcp_rn(constant) keeps its
// refinement instructions.
template <int kU>
__device__ __forceinline__ void welford_unit(Moments* m, const float* xf, int j) {
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const float rcp = 1.0f / static_cast<float>(4 * j + ii + 1);
#pragma unroll
    for (int u = 0; u < kU; ++u) welford_push(m[u].mean, m[u].m2, xf[4 * u + ii], rcp);
  }
}

// torch keeps each virtual thread's element count: 4 per vector it read (`nv` vectors here).
template <int kU>
__device__ __forceinline__ void set_counts(Moments* m, int nv) {
#pragma unroll
  for (int u = 0; u < kU; ++u) m[u].n = static_cast<float>(4 * nv);
}

// The in-warp part of torch's merge tree, for a physical layout where each thread holds the
// partials of kU * kY virtual threads: slot s = u + kU * y of team thread p is virtual thread
//     t = kU * p + u + kU * kT * y      (u < kU, y < kY, p < kT;  kU * kT * kY == 128).
// (A 16-byte load of a 16-bit type covers kU = 2 consecutive vectors, hence consecutive virtual
// threads; teams of kT threads hold one row.) Virtual lane = t % 32, virtual warp = t / 32.
// Torch merges, for offset o = 16, 8, 4, 2, 1, virtual lane v with virtual lane v + o; only the
// lanes that feed lane 0 matter, and those are the ones computed correctly here (the others hold
// harmless garbage, exactly like the lanes torch never reads). Offsets are handled by whichever
// index carries them: y (inside the thread), p (a shuffle by o / kU lanes) or u (inside the thread).
// On return, virtual warp w's result is at virtual thread 32 * w: see vwarp_owner().
template <int kU, int kT, int kY>
__device__ __forceinline__ void reduce_virtual_warps(Moments (&m)[kU * kY]) {
  constexpr int kUT = kU * kT;  // virtual threads spanned by one y step
  static_assert(kUT * kY == 128, "the layout must cover torch's 128 threads");
  static_assert(kU == 1 || kU == 2, "kU is 1 or 2");
  if constexpr (kUT < 32) {
    // A virtual warp spans kYlo consecutive y of the same thread: offsets >= kUT live in y.
    constexpr int kYlo = 32 / kUT;
#pragma unroll
    for (int o = 16; o >= kUT; o /= 2) {
      const int step = o / kUT;
#pragma unroll
      for (int w = 0; w < kY / kYlo; ++w)
#pragma unroll
        for (int ylo = 0; ylo < kYlo; ++ylo)
          if (ylo < step)
#pragma unroll
            for (int u = 0; u < kU; ++u) {
              Moments& own = m[u + kU * (ylo + kYlo * w)];
              own = welford_combine(own, m[u + kU * (ylo + step + kYlo * w)]);
            }
    }
  }
  // Offsets carried by the physical lane: shuffle down by o / kU lanes.
  constexpr int kShuffleTop = (kUT < 32 ? kUT : 32) / 2;
  constexpr int kYStep = kUT < 32 ? 32 / kUT : 1;  // only y at the start of a virtual warp matter
#pragma unroll
  for (int o = kShuffleTop; o >= kU; o /= 2) {
#pragma unroll
    for (int y = 0; y < kY; y += kYStep)
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        Moments& own = m[u + kU * y];
        own = welford_combine(own, shfl_down(own, o / kU));
      }
  }
  if constexpr (kU == 2) {  // offset 1: the two vectors of one 16-byte unit
#pragma unroll
    for (int y = 0; y < kY; y += kYStep) m[2 * y] = welford_combine(m[2 * y], m[2 * y + 1]);
  }
}

// Which team thread p and which y hold virtual warp w's result (virtual thread 32 * w, u = 0).
template <int kU, int kT>
struct VwarpOwner {
  static constexpr int kUT = kU * kT;
  __host__ __device__ static constexpr int y(int w) { return (32 * w) / kUT; }
  __host__ __device__ static constexpr int p(int w) { return ((32 * w) % kUT) / kU; }
};

// torch's cross-warp merge ((w0 + w2) + (w1 + w3)), then var = m2 / D and rstd = rsqrt(var + eps).
__device__ __forceinline__ void finish_moments(const Moments* w, int d, float eps, float& mean,
                                               float& rstd) {
  const Moments c02 = welford_combine(w[0], w[2]);
  const Moments c13 = welford_combine(w[1], w[3]);
  const Moments f = welford_combine(c02, c13);
  mean = f.mean;
  const float var = __fdiv_rn(f.m2, static_cast<float>(d));
  rstd = rsqrtf(__fadd_rn(var, eps));  // the hardware approximation torch also uses
}

// One output element of torch's fast LayerNorm kernel, in float (rounded to the model dtype by
// the caller). Without a weight pass w = 1 and without a bias b = -0: fma(1, c, -0) == c and
// fma(w, c, -0) == w * c exactly, signed zeros included.
// Bias without weight is a different expression in torch's source, rstd * (x - mean) + b, and its
// shipped sm_90 machine code (torch 2.11 and 2.14, float, half and bfloat16 alike) computes it in
// two ways: the compiler merged that branch with the no-affine one, so element 0 of each 4-element
// vector is rounded after the product and then added (FMUL, FADD), while elements 1..3 are one
// fma. `pos4` is the element's place in torch's 4-element vector, i.e. its column % 4.
__device__ __forceinline__ float ln_apply(float x, float mean, float rstd, float w, float b,
                                          bool bias_only, int pos4) {
  const float xm = __fsub_rn(x, mean);
  if (bias_only) return pos4 == 0 ? __fadd_rn(__fmul_rn(rstd, xm), b) : __fmaf_rn(rstd, xm, b);
  return __fmaf_rn(w, __fmul_rn(rstd, xm), b);
}

// max with NaN propagation (like torch.amax): once a NaN is seen the result stays NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
}

}  // namespace cuda_impl
}  // namespace residtap
