// The row kernels (device code only; the launchers are in rows_impl.cuh). Kept free of host-only
// and ATen headers so that tests/cuda_kernel_emu.cpp can compile these very kernels for the CPU,
// with CUDA's built-ins emulated, and check them on a machine without a GPU.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ln_arith.cuh"
#include "rows.cuh"

namespace residtap {
namespace cuda_impl {
namespace {

// ------------------------------------------------------------------------------ conversions
template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);  // exact for float, c10::BFloat16 and c10::Half
}

// float -> T with round to nearest even; c10's constructors are what torch's own kernels use.
template <typename T>
__device__ __forceinline__ T from_f(float v) {
  return static_cast<T>(v);
}

// A value of the model dtype cast to the capture dtype, as Tensor.to() does (identity: same bits).
template <typename OutT, typename InT>
__device__ __forceinline__ OutT cast_out(InT v) {
  if constexpr (std::is_same_v<OutT, InT>) {
    return v;
  } else {
    return static_cast<OutT>(to_f(v));
  }
}

// Same, when the value is also at hand as a float (saves re-converting it).
template <typename OutT, typename InT>
__device__ __forceinline__ OutT cast_out(InT v, float vf) {
  if constexpr (std::is_same_v<OutT, InT>) {
    return v;
  } else {
    return from_f<OutT>(vf);
  }
}

template <typename T>
__device__ __forceinline__ T* p_out(void* ptr) {
  return static_cast<T*>(ptr);
}

// --------------------------------------------------------------------------- memory access
template <typename T, int N>
struct alignas(16) Unit {  // one 16-byte load of the model dtype
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_unit(const T* src, Unit<T, N>& dst) {
  static_assert(sizeof(T) * N == 16, "a unit is 16 bytes");
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  memcpy(&dst, &raw, 16);
}

// A unit from shared memory (a stage of the staged kernel) or, with __ldg, from global memory.
template <bool kShared, typename T, int N>
__device__ __forceinline__ void load_staged_or_global(const T* src, Unit<T, N>& dst) {
  if constexpr (kShared) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    memcpy(&dst, &raw, 16);
  } else {
    load_unit(src, dst);
  }
}

// The unit's values as floats (exact). bfloat16 is the upper half of a float: one shift or one
// mask per element instead of the generic extract-and-shift.
template <typename T, int N>
__device__ __forceinline__ void unpack(const Unit<T, N>& u, float (&f)[N]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t w[N / 2];
    memcpy(w, &u, sizeof(w));
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_f(u.v[i]);
  }
}

// Store N values of T (8, 16 or 32 bytes; dst aligned to min(16, bytes)) as streaming stores:
// captured buffers are not read again by the forward, so they should not evict its activations.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const T (&v)[N]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      uint4 raw;
      memcpy(&raw, reinterpret_cast<const char*>(v) + 16 * c, 16);
      __stcs(reinterpret_cast<uint4*>(dst) + c, raw);
    }
  } else {
    static_assert(kBytes == 8, "stores are 8, 16 or 32 bytes");
    uint2 raw;
    memcpy(&raw, v, 8);
    __stcs(reinterpret_cast<uint2*>(dst), raw);
  }
}

// ----------------------------------------------------- asynchronous copies (staged fast kernel)
// Global -> shared 16-byte copies that do not wait (cp.async, sm_80+), in commit groups: the staged
// fast kernel copies the next row group into shared memory while it works on the current one.
// Before sm_80 (no cp.async; ptxas refuses it) the copy is a plain one that has landed before the
// wait, which then has nothing to wait for: the same bytes, only not overlapped. The staged kernel
// is instantiated for every target whether or not it is used, so this keeps such targets buildable.
// tests/cuda_kernel_emu.cpp supplies these four for the CPU (the copies deferred to the wait, so
// that reading a stage before waiting for it shows up as wrong outputs there).
#ifndef RESIDTAP_KERNEL_EMU
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define RESIDTAP_CP_ASYNC 1
#endif

__device__ __forceinline__ void async_copy16(void* smem_dst, const void* gmem_src) {
#if defined(RESIDTAP_CP_ASYNC)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  // .cg: through L2 only; the rows are read once
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#elif defined(__CUDA_ARCH__)
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(RESIDTAP_CP_ASYNC)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's most recent commit groups are still in flight.
template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(RESIDTAP_CP_ASYNC)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The block's dynamic shared memory (the staged kernel's stages).
__device__ __forceinline__ uint4* stage_memory() {
  extern __shared__ uint4 residtap_stage_memory[];
  return residtap_stage_memory;
}
#endif

// Offsets (elements) of the selected row r's data in out and inp; false if the index is bad
// (after a device-side assert, like torch's own indexing; checking on the host would sync).
__device__ __forceinline__ bool resolve_row(const Params& p, int64_t r, int64_t& out_off,
                                            int64_t& inp_off) {
  const int64_t b = r / p.n_pos;
  const int64_t pos = r - b * p.n_pos;
  int64_t s = pos;
  if (p.index != nullptr) {
    s = p.index[p.index_2d ? r : pos];
    CUDA_KERNEL_ASSERT_MSG(s >= 0 && s < p.seq,
                           "residtap.capture_block: 'index' value outside [0, seq)");
    if (s < 0 || s >= p.seq) return false;
  }
  out_off = b * p.out_sb + s * p.out_ss;
  inp_off = b * p.inp_sb + s * p.inp_ss;
  return true;
}

// ------------------------------------------------------------------------------ fast kernel
// The layout (FastLayout, in ln_arith.cuh) and the replay of torch's order are shared with the
// host-side simulation in tests/cuda_order_sim.cpp, which checks them against torch's order.
// Blocks per SM the compiler must fit (so at most 65536 / (128 * blocks) registers per thread):
// 4 (128 registers) where the layout holds its row slice, a chunk of input units and its Welford
// slots in that without spilling, else 3 (170 registers). Measured with ptxas for every
// instantiation (-Xptxas -v, nvcc 13.0, sm_90): 4 blocks spilled 48-200 bytes per thread in the
// 16-bit K = 1 and K = 16 and the float K = 2 and K = 4 layouts, and nothing in the others. Each
// thread keeps 8-16 16-byte loads in flight, so 384 threads per SM already cover HBM's
// latency-bandwidth product; more blocks hide the row's reductions better.
template <typename InT, int K>
constexpr int fast_min_blocks() {
  if constexpr (sizeof(InT) == 2) {
    return K == 1 || K == 16 ? 3 : 4;
  } else {
    return K == 2 || K == 4 ? 3 : 4;
  }
}

// The staged variant (kStaged, chosen per thread with residtap::_set_staged_rows; experimental):
// the same kernel, but its rows arrive through shared memory. Each block loops over row groups
// (blockIdx.x, + gridDim.x, ...; the launcher sizes the grid to what fits on the GPU at once) and,
// before working on a group, starts asynchronous copies of its next group's rows of out (and inp,
// for delta) into the other of two stages; so loads are in flight while it reduces, normalizes and
// stores. Every thread copies exactly the 16-byte units it later reads itself, so a thread's own
// cp.async.wait_group is the only synchronization the stages need. It keeps no row in registers:
// each unit is read from the stage where it is used (twice when normed is asked for), which frees
// the registers the plain kernel spends on its row slice. The arithmetic, and so every output bit,
// is the same as without staging; only where the row comes from differs.
// Shared memory: two stages of kTeams rows of d elements per staged tensor (staged_smem_bytes).
template <typename InT, int K>
__host__ __device__ inline size_t staged_smem_bytes(const Params& p) {
  using L = FastLayout<sizeof(InT), K>;
  const size_t tensors = p.delta != nullptr && p.inp != nullptr ? 2 : 1;
  return 2 * tensors * L::kTeams * static_cast<size_t>(p.d) * sizeof(InT);
}

template <typename InT, typename OutT, int K, bool kStaged = false>
__global__ void __launch_bounds__(kBlock, (fast_min_blocks<InT, K>())) fast_rows_kernel(const Params p) {
  using L = FastLayout<sizeof(InT), K>;
  constexpr int kU = L::kU, kT = L::kT, kY = L::kY, kN = L::kN;
  // Only teams wider than a warp (kT of 64, 128) use shared memory and barriers: the merge tree's
  // exchanges across warps, and the team's l2 / maxabs partials.
  constexpr bool kWide = L::kTeamWarps > 1;
  __shared__ Moments s_xchg[kWide ? kBlock : 1];
  __shared__ double s_l2[L::kTeams][L::kTeamWarps];
  __shared__ float s_max[L::kTeams][L::kTeamWarps];

  const int team = threadIdx.x / kT;
  const int tp = threadIdx.x % kT;  // thread within the team
  const int lane = threadIdx.x % 32;
  const int team_warp = tp / 32;
  const int tp_off = 4 * kU * tp;   // element offset of this thread's first unit in a row
  // What this launch writes (uniform over the grid).
  const bool has_inp = p.inp != nullptr, has_resid = p.resid != nullptr;
  const bool has_delta = p.delta != nullptr, has_normed = p.normed != nullptr;
  const bool has_w = p.weight != nullptr, has_b = p.bias != nullptr;
  const bool welford = p.welford != 0, bias_only = p.bias_only != 0;

  // Staged: stage s holds, per staged tensor, the block's kTeams rows; this thread's part of its
  // team's row starts at element tp_off.
  const bool stage_inp = kStaged && has_delta && has_inp;
  const int64_t stage_elems = static_cast<int64_t>(L::kTeams) * p.d;  // one tensor of one stage
  InT* const stages = kStaged ? reinterpret_cast<InT*>(stage_memory()) : nullptr;
  auto stage_x = [&](int s) {
    return stages + (stage_inp ? 2 : 1) * s * stage_elems + team * p.d + tp_off;
  };
  auto stage_i = [&](int s) { return stage_x(s) + stage_elems; };
  // Starts the copies of this thread's units of row group `g` into stage s (one commit group,
  // empty past the last group, so that async_wait<1> always means "all but the newest").
  auto fetch = [&](int64_t g, int s) {
    const int64_t r = g * L::kTeams + team;
    int64_t oo = 0, io = 0;
    if (r < p.rows && resolve_row(p, r, oo, io)) {  // past the last group: r >= rows
      const InT* src = static_cast<const InT*>(p.out) + oo + tp_off;
      const InT* isrc = static_cast<const InT*>(p.inp) + io + tp_off;
#pragma unroll
      for (int y = 0; y < kY; ++y)
#pragma unroll
        for (int j = 0; j < K; ++j) {
          if (tp_off + L::offset(y, j) >= p.d) continue;
          async_copy16(stage_x(s) + L::offset(y, j), src + L::offset(y, j));
          if (stage_inp) async_copy16(stage_i(s) + L::offset(y, j), isrc + L::offset(y, j));
        }
    }
    async_commit();
  };
  if constexpr (kStaged) fetch(blockIdx.x, 0);

  int stage = 0;
  for (int64_t group = blockIdx.x; group * L::kTeams < p.rows; group += gridDim.x, stage ^= 1) {
    const int64_t row = group * L::kTeams + team;
    int64_t ooff = 0, ioff = 0;
    const bool active = row < p.rows && resolve_row(p, row, ooff, ioff);
    const InT* xrow = kStaged ? stage_x(stage) : static_cast<const InT*>(p.out) + ooff + tp_off;
    const InT* irow = kStaged ? stage_i(stage) : static_cast<const InT*>(p.inp) + ioff + tp_off;
    const int64_t orow = row * p.d + tp_off;
    if constexpr (kStaged) {
      // The next group's copies go into the other stage, which this thread finished reading in
      // the previous iteration (its values were used before this point); then this group's.
      fetch(group + gridDim.x, stage ^ 1);
      async_wait<1>();
    }

    // ---- read the row slice once (all loads in flight together); staged, the stage holds it
    Unit<InT, kN> x[kY][K];
    bool valid[kY][K];
#pragma unroll
    for (int y = 0; y < kY; ++y)
#pragma unroll
      for (int j = 0; j < K; ++j) {
        valid[y][j] = active && tp_off + L::offset(y, j) < p.d;
        if constexpr (!kStaged) {
          if (valid[y][j]) {
            load_unit(xrow + L::offset(y, j), x[y][j]);
          } else {
            memset(&x[y][j], 0, sizeof(x[y][j]));
          }
        }
      }
    // Where unit (y, j) of the row is used, `xs` is it read from the stage (staged), which this
    // thread does not refill before its next iteration: the staged kernel holds no row slice in
    // registers. The plain kernel uses x[y][j] as it is (a copy changed its register allocation).

    // ---- one pass: resid and delta out, l2 / maxabs, torch's Welford over each virtual thread
    Moments m[L::kSlots];
#pragma unroll
    for (int s = 0; s < L::kSlots; ++s) m[s] = Moments{0.f, 0.f, 0.f};
    double l2 = 0.0;
    float mx = 0.f;
    // Units go in chunks whose input loads are all issued before any store: a load placed after
    // a store is not hoisted above it (the compiler cannot rule out aliasing), so one unit at a
    // time would expose the full memory latency per unit (seen in the SASS).
#pragma unroll
    for (int c0 = 0; c0 < L::kUnits; c0 += L::kChunk) {
      Unit<InT, kN> xi[L::kChunk];
      if (has_delta && has_inp) {
#pragma unroll
        for (int c = 0; c < L::kChunk; ++c) {
          const int y = (c0 + c) / K, j = (c0 + c) % K;
          if (valid[y][j]) load_staged_or_global<kStaged>(irow + L::offset(y, j), xi[c]);
        }
      }
#pragma unroll
      for (int c = 0; c < L::kChunk; ++c) {
        const int y = (c0 + c) / K, j = (c0 + c) % K;  // y-major: each slot sees j in order
        if (!valid[y][j]) continue;
        Unit<InT, kN> xs;
        if constexpr (kStaged) load_staged_or_global<true>(xrow + L::offset(y, j), xs);
        const Unit<InT, kN>& xu = kStaged ? xs : x[y][j];
        float xf[kN];
        unpack(xu, xf);
        double l2u = 0.0;
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          l2u = __fma_rn(static_cast<double>(xf[i]), static_cast<double>(xf[i]), l2u);
          mx = max_nan(mx, fabsf(xf[i]));
        }
        l2 += l2u;
        if (welford) welford_unit<kU>(&m[kU * y], xf, j);
        OutT r[kN];
        if (has_resid) {
#pragma unroll
          for (int i = 0; i < kN; ++i) r[i] = cast_out<OutT>(xu.v[i], xf[i]);
          store_vec(p_out<OutT>(p.resid) + orow + L::offset(y, j), r);
        }
        if (has_delta) {
          if (has_inp) {
            float fi[kN];
            unpack(xi[c], fi);
#pragma unroll
            for (int i = 0; i < kN; ++i) {
              // torch's sub: computed in float, rounded once to the model dtype
              r[i] = cast_out<OutT>(from_f<InT>(__fsub_rn(xf[i], fi[i])));
            }
          } else {
#pragma unroll
            for (int i = 0; i < kN; ++i) r[i] = cast_out<OutT>(xu.v[i], xf[i]);
          }
          store_vec(p_out<OutT>(p.delta) + orow + L::offset(y, j), r);
        }
      }
    }

    // ---- torch's merge tree (every team thread gets the row's mean and rstd); l2 and maxabs over
    // the team (the double sum's order is ours)
    float mean = 0.f, rstd = 0.f;
    if (welford) {
#pragma unroll
      for (int y = 0; y < kY; ++y) {
        int nv = 0;
#pragma unroll
        for (int j = 0; j < K; ++j) nv += valid[y][j] ? 1 : 0;
        set_counts<kU>(&m[kU * y], nv);
      }
      finish_moments(merge_tree<kU, kT, kY, true>(m, tp, s_xchg), p.d, p.eps, mean, rstd);
    }
#pragma unroll
    for (int o = L::kLanes / 2; o > 0; o /= 2) {
      l2 += __shfl_xor_sync(kFullMask, l2, o);
      mx = max_nan(mx, __shfl_xor_sync(kFullMask, mx, o));
    }
    if constexpr (kWide) {
      if (lane == 0) {
        s_l2[team][team_warp] = l2;
        s_max[team][team_warp] = mx;
      }
      __syncthreads();
      if (tp == 0) {
#pragma unroll
        for (int w = 1; w < L::kTeamWarps; ++w) {
          l2 += s_l2[team][w];
          mx = max_nan(mx, s_max[team][w]);
        }
      }
      __syncthreads();  // s_l2 and s_max are rewritten by the next row group
    }
    if (tp == 0 && active) {
      if (p.mean != nullptr) p.mean[row] = mean;
      if (p.rstd != nullptr) p.rstd[row] = rstd;
      if (p.l2 != nullptr) p.l2[row] = __double2float_rn(sqrt(l2));
      if (p.maxabs != nullptr) p.maxabs[row] = mx;
    }

    // ---- normalize from registers
    if (has_normed) {
      const InT* wrow = static_cast<const InT*>(p.weight) + tp_off;
      const InT* brow = static_cast<const InT*>(p.bias) + tp_off;
#pragma unroll
      for (int c0 = 0; c0 < L::kUnits; c0 += L::kNormChunk) {
        Unit<InT, kN> wu[L::kNormChunk], bu[L::kNormChunk];  // loads first, stores after (see above)
#pragma unroll
        for (int c = 0; c < L::kNormChunk; ++c) {
          const int y = (c0 + c) / K, j = (c0 + c) % K;
          if (!valid[y][j]) continue;
          if (has_w) load_unit(wrow + L::offset(y, j), wu[c]);
          if (has_b) load_unit(brow + L::offset(y, j), bu[c]);
        }
#pragma unroll
        for (int c = 0; c < L::kNormChunk; ++c) {
          const int y = (c0 + c) / K, j = (c0 + c) % K;
          if (!valid[y][j]) continue;
          float xf[kN], wf[kN], bf[kN];
          Unit<InT, kN> xs;
          if constexpr (kStaged) load_staged_or_global<true>(xrow + L::offset(y, j), xs);
          unpack(kStaged ? xs : x[y][j], xf);
          if (has_w) {
            unpack(wu[c], wf);
          } else {
#pragma unroll
            for (int i = 0; i < kN; ++i) wf[i] = 1.f;
          }
          if (has_b) {
            unpack(bu[c], bf);
          } else {
#pragma unroll
            for (int i = 0; i < kN; ++i) bf[i] = -0.f;
          }
          OutT r[kN];
#pragma unroll
          for (int i = 0; i < kN; ++i) {
            const float yv = ln_apply(xf[i], mean, rstd, wf[i], bf[i], bias_only, i % 4);
            r[i] = cast_out<OutT>(from_f<InT>(yv));  // rounded once to the model dtype
          }
          store_vec(p_out<OutT>(p.normed) + orow + L::offset(y, j), r);
        }
      }
    }
  }
}

// --------------------------------------------------------------------------- generic kernel
// Any width and alignment: one block of 128 threads per row, physical thread = torch's virtual
// thread, the row re-read (from L2, usually) for normalization. Moments only when d % 4 == 0 (the
// host never asks otherwise). With p.vec (d % 4 == 0 and every row 4-element aligned: rows wider
// than the fast kernel's 8192, 16-bit widths % 8 != 0) each thread loads whole 4-element vectors,
// kGenericVecs of them issued together; otherwise (misaligned views) one element at a time. Both
// visit each thread's elements in the same order.
constexpr int kGenericVecs = 4;

// Four consecutive values of T (8 or 16 bytes, aligned to that) in one load.
template <typename T>
__device__ __forceinline__ void load4(const T* src, T (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    memcpy(v, &raw, 16);
  } else {
    static_assert(sizeof(T) == 2, "float, bfloat16 or half");
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(src));
    memcpy(v, &raw, 8);
  }
}

template <typename InT, typename OutT>
__global__ void __launch_bounds__(kBlock) generic_rows_kernel(const Params p) {
  __shared__ Moments s_xchg[kBlock];
  __shared__ double s_l2[4];
  __shared__ float s_max[4];
  const int t = threadIdx.x;
  const int lane = t % 32, warp = t / 32;
  const InT* out = static_cast<const InT*>(p.out);
  const InT* inp = static_cast<const InT*>(p.inp);
  OutT* resid = static_cast<OutT*>(p.resid);
  OutT* delta = static_cast<OutT*>(p.delta);
  OutT* normed = static_cast<OutT*>(p.normed);
  const InT* weight = static_cast<const InT*>(p.weight);
  const InT* bias = static_cast<const InT*>(p.bias);
  const int nvec = static_cast<int>((static_cast<int64_t>(p.d) + 3) / 4);  // d may be up to 2^31 - 1

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    int64_t ooff = 0, ioff = 0;
    const bool active = resolve_row(p, row, ooff, ioff);
    Moments m[1] = {Moments{0.f, 0.f, 0.f}};
    double l2 = 0.0;
    float mx = 0.f;
    if (active && p.vec) {
      for (int v0 = t; v0 < nvec; v0 += kGenericVecs * kBlock) {
        InT xv[kGenericVecs][4], iv[kGenericVecs][4];
#pragma unroll
        for (int u = 0; u < kGenericVecs; ++u) {  // loads first, then the stores (see fast kernel)
          const int v = v0 + u * kBlock;
          if (v >= nvec) break;
          load4(out + ooff + 4 * v, xv[u]);
          if (delta != nullptr && inp != nullptr) load4(inp + ioff + 4 * v, iv[u]);
        }
#pragma unroll
        for (int u = 0; u < kGenericVecs; ++u) {
          const int v = v0 + u * kBlock;
          if (v >= nvec) break;
          float xf[4];
          OutT r[4];
#pragma unroll
          for (int ii = 0; ii < 4; ++ii) {
            xf[ii] = to_f(xv[u][ii]);
            l2 = __fma_rn(static_cast<double>(xf[ii]), static_cast<double>(xf[ii]), l2);
            mx = max_nan(mx, fabsf(xf[ii]));
            if (p.welford) {
              m[0].n = __fadd_rn(m[0].n, 1.f);
              welford_push(m[0].mean, m[0].m2, xf[ii], __frcp_rn(m[0].n));
            }
          }
          if (resid != nullptr) {
#pragma unroll
            for (int ii = 0; ii < 4; ++ii) r[ii] = cast_out<OutT>(xv[u][ii], xf[ii]);
            store_vec(resid + row * p.d + 4 * v, r);
          }
          if (delta != nullptr) {
#pragma unroll
            for (int ii = 0; ii < 4; ++ii) {
              r[ii] = inp != nullptr ? cast_out<OutT>(from_f<InT>(__fsub_rn(xf[ii], to_f(iv[u][ii]))))
                                     : cast_out<OutT>(xv[u][ii], xf[ii]);
            }
            store_vec(delta + row * p.d + 4 * v, r);
          }
        }
      }
    } else if (active) {
      for (int v = t; v < nvec; v += kBlock) {
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const int e = 4 * v + ii;
          if (e >= p.d) break;
          const InT xv = out[ooff + e];
          const float xf = to_f(xv);
          l2 = __fma_rn(static_cast<double>(xf), static_cast<double>(xf), l2);
          mx = max_nan(mx, fabsf(xf));
          if (resid != nullptr) resid[row * p.d + e] = cast_out<OutT>(xv);
          if (delta != nullptr) {
            delta[row * p.d + e] =
                inp != nullptr ? cast_out<OutT>(from_f<InT>(__fsub_rn(xf, to_f(inp[ioff + e]))))
                               : cast_out<OutT>(xv);
          }
          if (p.welford) {
            m[0].n = __fadd_rn(m[0].n, 1.f);
            welford_push(m[0].mean, m[0].m2, xf, __frcp_rn(m[0].n));
          }
        }
      }
    }
    float mean = 0.f, rstd = 0.f;  // torch's merge tree: every thread gets the row's moments
    if (p.welford) finish_moments(merge_tree<1, kBlock, 1, false>(m, t, s_xchg), p.d, p.eps, mean, rstd);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      l2 += __shfl_xor_sync(kFullMask, l2, o);
      mx = max_nan(mx, __shfl_xor_sync(kFullMask, mx, o));
    }
    if (lane == 0) {
      s_l2[warp] = l2;
      s_max[warp] = mx;
    }
    __syncthreads();
    if (t == 0 && active) {
      if (p.mean != nullptr) p.mean[row] = mean;
      if (p.rstd != nullptr) p.rstd[row] = rstd;
      if (p.l2 != nullptr) p.l2[row] = __double2float_rn(sqrt(((s_l2[0] + s_l2[1]) + s_l2[2]) + s_l2[3]));
      if (p.maxabs != nullptr) {
        p.maxabs[row] = max_nan(max_nan(s_max[0], s_max[1]), max_nan(s_max[2], s_max[3]));
      }
    }
    __syncthreads();  // s_l2 and s_max are rewritten by the next row
    if (normed != nullptr && active && p.vec) {
      for (int v0 = t; v0 < nvec; v0 += kGenericVecs * kBlock) {
        InT xv[kGenericVecs][4], wv[kGenericVecs][4], bv[kGenericVecs][4];
#pragma unroll
        for (int u = 0; u < kGenericVecs; ++u) {
          const int v = v0 + u * kBlock;
          if (v >= nvec) break;
          load4(out + ooff + 4 * v, xv[u]);
          if (weight != nullptr) load4(weight + 4 * v, wv[u]);
          if (bias != nullptr) load4(bias + 4 * v, bv[u]);
        }
#pragma unroll
        for (int u = 0; u < kGenericVecs; ++u) {
          const int v = v0 + u * kBlock;
          if (v >= nvec) break;
          OutT r[4];
#pragma unroll
          for (int ii = 0; ii < 4; ++ii) {
            const float wf = weight != nullptr ? to_f(wv[u][ii]) : 1.f;
            const float bf = bias != nullptr ? to_f(bv[u][ii]) : -0.f;
            const float yv = ln_apply(to_f(xv[u][ii]), mean, rstd, wf, bf, p.bias_only, ii);
            r[ii] = cast_out<OutT>(from_f<InT>(yv));
          }
          store_vec(normed + row * p.d + 4 * v, r);
        }
      }
    } else if (normed != nullptr && active) {
      for (int e = t; e < p.d; e += kBlock) {
        const float wf = weight != nullptr ? to_f(weight[e]) : 1.f;
        const float bf = bias != nullptr ? to_f(bias[e]) : -0.f;
        const float yv = ln_apply(to_f(out[ooff + e]), mean, rstd, wf, bf, p.bias_only, e % 4);
        normed[row * p.d + e] = cast_out<OutT>(from_f<InT>(yv));
      }
    }
  }
}

}  // namespace
}  // namespace cuda_impl
}  // namespace residtap
