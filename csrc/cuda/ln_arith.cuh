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
// in rows_kernels.cuh hold several virtual threads per physical thread ("slots") and replay the
// same merge tree, sharing its merges out among a row's threads (merge_tree). Every operation
// below is an explicit round-to-nearest intrinsic so that the compiler can neither contract nor
// re-associate it (never build with fast-math).
//
// Everything here is free of ATen so that tests/cuda_order_sim.cpp can compile it for the host
// (with the intrinsics emulated and warp shuffles run in lock step) and check that the layouts
// and the merge tree below replay torch's order exactly.
#pragma once

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace residtap {
namespace cuda_impl {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlock = 128;    // threads per block for both kernels
constexpr int kMaxFastK = 16;  // fast kernel: at most 16 vectors per virtual thread
constexpr int kMaxFastWidth = 128 * 4 * kMaxFastK;  // so its widest row: 8192

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

// The fast kernel's counts are multiples of 4 (4 elements per vector) of at most 8192 (its widest
// row), so its merges take 1/n from this table rather than computing __frcp_rn(n) (a multi-step
// sequence with a range check and an out-of-line slow path, each a branch): kRcpX4[i] is the
// correctly rounded 1/(4 i), the very value __frcp_rn(4 i) returns (both are correctly rounded),
// here computed by the compiler as an IEEE division of constants. kRcpX4[0] is 0, not infinity:
// a merge of two empty partials (n = 0, both means and m2 zero) then yields exactly the zeros
// torch's `n > 0` branch sets, with no branch. tests/cuda_order_sim.cpp checks rcp_x4 at every
// count as g++ builds the table, tests/test_cuda_order.py every entry of the table nvcc emits.
struct RcpX4Table {
  float v[kMaxFastWidth / 4 + 1];
};
constexpr RcpX4Table make_rcp_x4() {
  RcpX4Table t{};
  t.v[0] = 0.f;
  for (int i = 1; i <= kMaxFastWidth / 4; ++i) t.v[i] = 1.0f / static_cast<float>(4 * i);
  return t;
}
#ifdef __CUDACC__
static __constant__ RcpX4Table kRcpX4 = make_rcp_x4();
#else
static constexpr RcpX4Table kRcpX4 = make_rcp_x4();
#endif

// kRcpX4 at n / 4, for n a multiple of 4 in [0, 8192]: n / 4 + 2^23 puts the integer n / 4 in the
// low bits of the float (one exact fma instead of a conversion).
__device__ __forceinline__ float rcp_x4(float n) {
  return kRcpX4.v[__float_as_int(__fmaf_rn(n, 0.25f, 8388608.f)) - 0x4B000000];
}

// welford_combine for the fast kernel's counts: the same operations on the same operands (1/n from
// the table), so the same bits, without a branch.
__device__ __forceinline__ Moments welford_combine_x4(const Moments& own, const Moments& in) {
  const float delta = __fsub_rn(own.mean, in.mean);
  const float n = __fadd_rn(in.n, own.n);
  const float c = rcp_x4(n);
  const float n_in = __fmul_rn(in.n, c);
  const float n_own = __fmul_rn(own.n, c);
  return Moments{__fmaf_rn(n_in, in.mean, __fmul_rn(n_own, own.mean)),
                 __fmaf_rn(__fmul_rn(__fmul_rn(delta, delta), in.n), n_own, __fadd_rn(in.m2, own.m2)), n};
}

// Layout for widths d <= 128 * 4 * K (d % (4 * kU) == 0, 16-byte aligned rows):
//   kU   vectors of 4 elements per 16-byte unit: 1 for float, 2 for 16-bit types;
//   kT   threads per row ("team"); a block of 128 threads holds 128 / kT rows; every thread keeps
//        its kY * K units (32 to 128 elements) in registers from the read to the normalization;
//   team thread p, unit (y, j) = the kU vectors starting at kU*p + kU*kT*y + 128*j, i.e. the j-th
//   vector of virtual threads kU*p + u + kU*kT*y (see tree_plan).
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

// ------------------------------------------------------------------------ the merge tree
// torch's merge tree over its 128 virtual threads, replayed by a team of kT physical threads that
// each hold the partials of kSlots = 128 / kT of them. Name the 7 bits of a virtual thread's index
// t = lane + 32 * warp: torch merges the partials that differ in bit 4 (shuffle-down 16), then bit
// 3, 2, 1, 0 (offsets 8, 4, 2, 1), then bit 6 (w0 + w2, w1 + w3), then bit 5; always with the
// member whose bit is 0 as `own` (cuWelfordCombine's dataB) and the other as `in`.
//
// Every bit of t lives somewhere in the layout: in the slot index (which partial of a thread) or
// in the team-thread index p. Merging over a bit that lives in the slot index is a merge inside
// each thread (kSlots / 2 of them). Merging over a bit that lives in p pairs two threads; rather
// than have both compute all their pairs (and half the lanes compute for nothing, as a plain
// shuffle-down does), the two split the work: over the highest slot bit, the thread whose p-bit
// is 0 takes the pairs whose slot bit is 0 and the other thread those whose slot bit is 1, each
// sending the partner the half it gives up (a butterfly exchange, shfl_xor). So every merge a
// thread does is one torch does, the number of partials per thread halves at each step, and the
// p-bit now stands for the slot bit it took over. Once a thread holds one partial, a merge over a
// p-bit is done by both threads alike (the same operands in the same order, so the same bits).
// After the 7 steps every thread of the team holds the row's final moments: no shared memory,
// no barrier and no single thread finishing the row, where p's bits are lane bits (kT <= 32);
// p-bits above the warp (kT of 64, 128) exchange through shared memory.
//
// A thread of the fast kernel does 7 to 18 merges per row here (bfloat16 at width 768: 11), where
// letting every thread replay every level of its warp's tree took 5 to 36, then one thread per row
// merged the 4 warps after a barrier.
enum TreeStepKind { kMergeSlots = 0, kSplitThreads = 1, kPairThreads = 2 };
struct TreeStep {
  int kind;
  int bit;    // the slot bit (kMergeSlots) or the p-bit (otherwise) that this step merges over
  int slots;  // partials per thread before the step
};
struct TreePlan {
  TreeStep step[7];
};

constexpr int log2_exact(int x) {
  int r = 0;
  while ((1 << r) < x) ++r;
  return r;
}

// The steps for FastLayout's layout: slot s = u + kU * y of team thread p holds virtual thread
// t = kU * p + u + kU * kT * y (u < kU, y < kY; a 16-byte unit of a 16-bit type holds kU = 2
// consecutive vectors, hence consecutive virtual threads). Where each bit of t lives is
// followed step by step; slot bits stay numbered 0 .. log2(slots) - 1.
constexpr TreePlan tree_plan(int kU, int kT, int kY) {
  const int lu = log2_exact(kU), lt = log2_exact(kT), ly = log2_exact(kY);
  int slot_bit[7] = {}, p_bit[7] = {};  // -1: not there
  for (int b = 0; b < 7; ++b) {
    slot_bit[b] = b < lu ? b : (b >= lu + lt ? lu + (b - lu - lt) : -1);
    p_bit[b] = b >= lu && b < lu + lt ? b - lu : -1;
  }
  int slot_bits = lu + ly;
  const int order[7] = {4, 3, 2, 1, 0, 6, 5};
  TreePlan plan{};
  for (int i = 0; i < 7; ++i) {
    const int b = order[i];
    if (slot_bit[b] >= 0) {
      const int k = slot_bit[b];
      plan.step[i] = TreeStep{kMergeSlots, k, 1 << slot_bits};
      for (int c = 0; c < 7; ++c)
        if (slot_bit[c] > k) --slot_bit[c];
      slot_bit[b] = -1;
      --slot_bits;
    } else if (slot_bits > 0) {
      plan.step[i] = TreeStep{kSplitThreads, p_bit[b], 1 << slot_bits};
      for (int c = 0; c < 7; ++c) {
        if (slot_bit[c] == slot_bits - 1) {  // the highest slot bit moves to the freed p-bit
          slot_bit[c] = -1;
          p_bit[c] = p_bit[b];
        }
      }
      p_bit[b] = -1;
      --slot_bits;
    } else {
      plan.step[i] = TreeStep{kPairThreads, p_bit[b], 1};
      p_bit[b] = -1;
    }
  }
  return plan;
}

// The partner's partial across p-bit `k`: a shuffle within the warp, else (teams wider than a
// warp) through `xchg`, a shared array of kBlock entries, with the whole block taking part.
template <int k>
__device__ __forceinline__ Moments team_exchange(const Moments& v, Moments* xchg) {
  if constexpr (k < 5) {
    return Moments{__shfl_xor_sync(kFullMask, v.mean, 1 << k), __shfl_xor_sync(kFullMask, v.m2, 1 << k),
                   __shfl_xor_sync(kFullMask, v.n, 1 << k)};
  } else {
    xchg[threadIdx.x] = v;
    __syncthreads();
    const Moments r = xchg[threadIdx.x ^ (1u << k)];
    __syncthreads();
    return r;
  }
}

// c ? a : b, on values (a conditional on two array elements would select an address and put
// the array in local memory).
__device__ __forceinline__ Moments pick(bool c, Moments a, Moments b) {
  return Moments{c ? a.mean : b.mean, c ? a.m2 : b.m2, c ? a.n : b.n};
}

// torch's merge, or welford_combine_x4 where the counts are the fast kernel's (kX4).
template <bool kX4>
__device__ __forceinline__ Moments merge(const Moments& own, const Moments& in) {
  if constexpr (kX4) {
    return welford_combine_x4(own, in);
  } else {
    return welford_combine(own, in);
  }
}

// One merge over p-bit k: this thread holds `keep` and gives up `send`; the partner's `send` comes
// back. The member whose p-bit is 0 is `own`.
template <bool kX4, int k>
__device__ __forceinline__ Moments pair_merge(const Moments& keep, const Moments& send, bool hi,
                                              Moments* xchg) {
  const Moments recv = team_exchange<k>(send, xchg);
  return merge<kX4>(pick(hi, recv, keep), pick(hi, keep, recv));
}

template <int kU, int kT, int kY, bool kX4, int kStep>
__device__ __forceinline__ void tree_step(Moments* m, int tp, Moments* xchg) {
  constexpr TreeStep st = tree_plan(kU, kT, kY).step[kStep];
  constexpr int H = st.slots / 2;
  if constexpr (st.kind == kMergeSlots) {
    constexpr int lo = (1 << st.bit) - 1;
    Moments r[H];
#pragma unroll
    for (int s = 0; s < H; ++s) {
      const int s0 = ((s & ~lo) << 1) | (s & lo);  // slot bit st.bit inserted: 0, then 1
      r[s] = merge<kX4>(m[s0], m[s0 | (1 << st.bit)]);
    }
#pragma unroll
    for (int s = 0; s < H; ++s) m[s] = r[s];
  } else {
    const bool hi = ((tp >> st.bit) & 1) != 0;
    if constexpr (st.kind == kSplitThreads) {
      // keep the pairs whose highest slot bit equals this thread's p-bit
#pragma unroll
      for (int s = 0; s < H; ++s) {
        m[s] = pair_merge<kX4, st.bit>(pick(hi, m[s + H], m[s]), pick(hi, m[s], m[s + H]), hi, xchg);
      }
    } else {
      m[0] = pair_merge<kX4, st.bit>(m[0], m[0], hi, xchg);
    }
  }
  if constexpr (kStep + 1 < 7) tree_step<kU, kT, kY, kX4, kStep + 1>(m, tp, xchg);
}

// Runs torch's merge tree over a team's partials (m: this thread's kU * kY slots in FastLayout's
// order; tp: its index in the team) and returns the row's moments, the same in every thread of
// the team. `xchg` (kBlock entries of shared memory) is used only by teams wider than a warp, and
// there every thread of the block must call this. kX4: the counts are the fast kernel's (multiples
// of 4, at most 8192; see welford_combine_x4).
template <int kU, int kT, int kY, bool kX4>
__device__ __forceinline__ Moments merge_tree(Moments (&m)[kU * kY], int tp, Moments* xchg) {
  static_assert(kU * kT * kY == 128, "the layout must cover torch's 128 threads");
  static_assert(kU == 1 || kU == 2, "kU is 1 or 2");
  tree_step<kU, kT, kY, kX4, 0>(m, tp, xchg);
  return m[0];
}

// torch's finish: var = m2 / D (true division), rstd = rsqrt(var + eps).
__device__ __forceinline__ void finish_moments(const Moments& f, int d, float eps, float& mean,
                                               float& rstd) {
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
