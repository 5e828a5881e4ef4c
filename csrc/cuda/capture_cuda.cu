// CUDA implementation of residtap::capture_block: one fused pass over each selected row that writes
// resid, delta, normed and the per-token stats, reading the block's output (and input) once.
//
// Exactness (see ln_arith.cuh and ../shared/GPU.md): normed, mean and rstd replay torch's own CUDA
// LayerNorm arithmetic. Torch has two LayerNorm paths; which one ran for the reference decides the
// bits, so this file decides per call, the way torch would for the tensor the reference normalizes:
//   * torch's vectorized kernel (width % 4 == 0, pointers aligned to 4 elements): reproduced here;
//   * torch's two-kernel fallback (width % 4 != 0, misaligned pointers, width > 2^24): NOT
//     reproduced; for that call normed and/or mean/rstd are computed by calling torch's own
//     native_layer_norm on the block output and gathering the selected rows (exact by
//     construction, but it allocates temporaries; no model we know of has such widths).
//   * norm_kind "torch_layer_norm" (chosen by the Python parity guard when the fused arithmetic
//     ever disagrees with the installed torch) always takes that torch route for normed/mean/rstd.
// resid, delta, l2 and maxabs never need torch.
//
// Speed: rows up to 8192 wide go through `fast_rows_kernel`, which keeps its slice of the row in
// registers between the statistics and the normalization (one read of out/inp, 16-byte loads),
// and packs several rows per 128-thread block for narrow widths ("teams" of kT threads per row).
// Other shapes (misaligned pointers, 16-bit widths % 8 != 0, wider rows) use `generic_rows_kernel`:
// same arithmetic, scalar loads, one block per row, the row re-read for normalization.
//
// No host synchronization and no device allocation on these paths; launches go to the current
// stream, so the op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../capture_common.h"
#include "ln_arith.cuh"

namespace residtap {
namespace cuda_impl {
namespace {


// Everything a kernel needs, by value. Row outputs are contiguous [rows, d] in OutT; a null
// pointer means "not requested from this launch".
struct Params {
  const void* out;
  const void* inp;
  const int64_t* index;
  const void* weight;
  const void* bias;
  void* resid;
  void* delta;
  void* normed;
  float* mean;
  float* rstd;
  float* l2;
  float* maxabs;
  int64_t rows;  // batch * n_pos
  int64_t n_pos;
  int64_t seq;
  int64_t out_sb, out_ss, inp_sb, inp_ss;  // strides of out / inp in elements (batch, seq)
  int d;
  int index_2d;  // index is [batch, n_pos] (else [n_pos])
  float eps;
  int welford;   // compute the moments (for normed and/or mean/rstd)
  int bias_only; // bias given without weight (torch uses a different expression)
};

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
// At least 3 blocks (384 threads) per SM: up to 170 registers per thread, enough to hold a row
// slice, a chunk of input units and the Welford slots without spilling (4 blocks spilled up to
// 364 bytes per thread in the float K = 2 layout). Each thread keeps 8-16 16-byte loads in
// flight, so 384 threads per SM already cover HBM's latency-bandwidth product.
constexpr int kFastMinBlocks = 3;

template <typename InT, typename OutT, int K>
__global__ void __launch_bounds__(kBlock, kFastMinBlocks) fast_rows_kernel(const Params p) {
  using L = FastLayout<sizeof(InT), K>;
  constexpr int kU = L::kU, kT = L::kT, kY = L::kY, kN = L::kN;
  __shared__ Moments s_vwarp[L::kTeams][4];
  __shared__ float s_moments[L::kTeams][2];
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

  for (int64_t group = blockIdx.x; group * L::kTeams < p.rows; group += gridDim.x) {
    const int64_t row = group * L::kTeams + team;
    int64_t ooff = 0, ioff = 0;
    const bool active = row < p.rows && resolve_row(p, row, ooff, ioff);
    const InT* xrow = static_cast<const InT*>(p.out) + ooff + tp_off;
    const InT* irow = static_cast<const InT*>(p.inp) + ioff + tp_off;
    const int64_t orow = row * p.d + tp_off;

    // ---- read the row slice once (all loads in flight together)
    Unit<InT, kN> x[kY][K];
    bool valid[kY][K];
#pragma unroll
    for (int y = 0; y < kY; ++y)
#pragma unroll
      for (int j = 0; j < K; ++j) {
        valid[y][j] = active && tp_off + L::offset(y, j) < p.d;
        if (valid[y][j]) {
          load_unit(xrow + L::offset(y, j), x[y][j]);
        } else {
          memset(&x[y][j], 0, sizeof(x[y][j]));
        }
      }

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
          if (valid[y][j]) load_unit(irow + L::offset(y, j), xi[c]);
        }
      }
#pragma unroll
      for (int c = 0; c < L::kChunk; ++c) {
        const int y = (c0 + c) / K, j = (c0 + c) % K;  // y-major: each slot sees j in order
        if (!valid[y][j]) continue;
        float xf[kN];
        unpack(x[y][j], xf);
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
          for (int i = 0; i < kN; ++i) r[i] = cast_out<OutT>(x[y][j].v[i], xf[i]);
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
            for (int i = 0; i < kN; ++i) r[i] = cast_out<OutT>(x[y][j].v[i], xf[i]);
          }
          store_vec(p_out<OutT>(p.delta) + orow + L::offset(y, j), r);
        }
      }
    }

    // ---- torch's merge tree; l2 and maxabs over the team (the double sum's order is ours)
    if (welford) {
#pragma unroll
      for (int y = 0; y < kY; ++y) {
        int nv = 0;
#pragma unroll
        for (int j = 0; j < K; ++j) nv += valid[y][j] ? 1 : 0;
        set_counts<kU>(&m[kU * y], nv);
      }
      reduce_virtual_warps<kU, kT, kY>(m);
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        if (tp == VwarpOwner<kU, kT>::p(w)) s_vwarp[team][w] = m[kU * VwarpOwner<kU, kT>::y(w)];
      }
    }
#pragma unroll
    for (int o = L::kLanes / 2; o > 0; o /= 2) {
      l2 += __shfl_xor_sync(kFullMask, l2, o);
      mx = max_nan(mx, __shfl_xor_sync(kFullMask, mx, o));
    }
    if (lane % L::kLanes == 0) {
      s_l2[team][team_warp] = l2;
      s_max[team][team_warp] = mx;
    }
    __syncthreads();
    if (tp == 0 && active) {
      if (welford) {
        float mean, rstd;
        finish_moments(s_vwarp[team], p.d, p.eps, mean, rstd);
        s_moments[team][0] = mean;
        s_moments[team][1] = rstd;
        if (p.mean != nullptr) p.mean[row] = mean;
        if (p.rstd != nullptr) p.rstd[row] = rstd;
      }
      if (p.l2 != nullptr) {
        double acc = s_l2[team][0];
#pragma unroll
        for (int w = 1; w < L::kTeamWarps; ++w) acc += s_l2[team][w];
        p.l2[row] = __double2float_rn(sqrt(acc));
      }
      if (p.maxabs != nullptr) {
        float mm = s_max[team][0];
#pragma unroll
        for (int w = 1; w < L::kTeamWarps; ++w) mm = max_nan(mm, s_max[team][w]);
        p.maxabs[row] = mm;
      }
    }
    __syncthreads();

    // ---- normalize from registers
    if (has_normed) {
      const float mean = s_moments[team][0];
      const float rstd = s_moments[team][1];
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
          unpack(x[y][j], xf);
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
            const float yv = ln_apply(xf[i], mean, rstd, wf[i], bf[i], bias_only);
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
// thread, scalar loads, the row re-read (from L2, usually) for normalization. Moments only when
// d % 4 == 0 (the host never asks otherwise).
template <typename InT, typename OutT>
__global__ void __launch_bounds__(kBlock) generic_rows_kernel(const Params p) {
  __shared__ Moments s_vwarp[4];
  __shared__ float s_moments[2];
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
  const int nvec = (p.d + 3) / 4;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    int64_t ooff = 0, ioff = 0;
    const bool active = resolve_row(p, row, ooff, ioff);
    Moments m[1] = {Moments{0.f, 0.f, 0.f}};
    double l2 = 0.0;
    float mx = 0.f;
    if (active) {
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
    if (p.welford) {
      reduce_virtual_warps<1, kBlock, 1>(m);
      if (lane == 0) s_vwarp[warp] = m[0];  // virtual warp w's result sits at thread 32 * w
    }
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
      if (p.welford) {
        float mean, rstd;
        finish_moments(s_vwarp, p.d, p.eps, mean, rstd);
        s_moments[0] = mean;
        s_moments[1] = rstd;
        if (p.mean != nullptr) p.mean[row] = mean;
        if (p.rstd != nullptr) p.rstd[row] = rstd;
      }
      if (p.l2 != nullptr) p.l2[row] = __double2float_rn(sqrt(((s_l2[0] + s_l2[1]) + s_l2[2]) + s_l2[3]));
      if (p.maxabs != nullptr) {
        p.maxabs[row] = max_nan(max_nan(s_max[0], s_max[1]), max_nan(s_max[2], s_max[3]));
      }
    }
    __syncthreads();
    if (normed != nullptr && active) {
      const float mean = s_moments[0], rstd = s_moments[1];
      for (int e = t; e < p.d; e += kBlock) {
        const float wf = weight != nullptr ? to_f(weight[e]) : 1.f;
        const float bf = bias != nullptr ? to_f(bias[e]) : -0.f;
        const float yv = ln_apply(to_f(out[ooff + e]), mean, rstd, wf, bf, p.bias_only);
        normed[row * p.d + e] = cast_out<OutT>(from_f<InT>(yv));
      }
    }
    __syncthreads();  // s_moments is rewritten by the next row
  }
}

// ------------------------------------------------------------------------------ host side
bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Fails with a clear message when this build has no kernel image for the current GPU (cached per
// device; a host-side query, no synchronization).
void check_arch(int device) {
  static std::mutex mu;
  static std::vector<int> ok;  // 0 unknown, 1 fine
  {
    std::lock_guard<std::mutex> g(mu);
    if (device < static_cast<int>(ok.size()) && ok[device]) return;
  }
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, generic_rows_kernel<float, float>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so later checks do not trip over it
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
    TORCH_CHECK(false, "residtap.capture_block: the CUDA kernels of this build have no code for ",
                prop->name, " (compute capability ", prop->major, ".", prop->minor, "): ",
                cudaGetErrorString(err), ". Rebuild for it with RESIDTAP_CUDA_ARCHS=", prop->major,
                ".", prop->minor, " (builds are cached per architecture list) in a new Python "
                "process, or use backend='reference'.");
  }
  std::lock_guard<std::mutex> g(mu);
  if (device >= static_cast<int>(ok.size())) ok.resize(device + 1, 0);
  ok[device] = 1;
}

// The single dtype dispatch point: calls f(InT{}, OutT{}) with the C++ types of the model and
// capture dtypes.
template <typename F>
void dispatch_types(at::ScalarType in, at::ScalarType out, F&& f) {
  auto with_out = [&](auto in_tag) {
    switch (out) {
      case at::kFloat: return f(in_tag, float{});
      case at::kBFloat16: return f(in_tag, c10::BFloat16{});
      case at::kHalf: return f(in_tag, c10::Half{});
      default: TORCH_CHECK(false, "residtap.capture_block: unsupported capture dtype ", out);
    }
  };
  switch (in) {
    case at::kFloat: return with_out(float{});
    case at::kBFloat16: return with_out(c10::BFloat16{});
    case at::kHalf: return with_out(c10::Half{});
    default: TORCH_CHECK(false, "residtap.capture_block: unsupported model dtype ", in);
  }
}

int64_t grid_for(int64_t blocks) {
  return std::max<int64_t>(1, std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

template <typename InT, typename OutT, int K>
void launch_fast(const Params& p, cudaStream_t stream) {
  using L = FastLayout<sizeof(InT), K>;
  const int64_t groups = (p.rows + L::kTeams - 1) / L::kTeams;
  fast_rows_kernel<InT, OutT, K><<<grid_for(groups), kBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the fast kernel's 16-byte accesses are legal for this call.
template <typename InT, typename OutT>
bool fast_kernel_fits(const Params& p) {
  constexpr int kU = sizeof(InT) == 2 ? 2 : 1;
  const int64_t unit = 4 * kU;  // elements per 16-byte unit
  if (p.d <= 0 || p.d % unit != 0 || p.d > 128 * 4 * kMaxFastK) return false;
  auto row_ok = [&](const void* ptr, int64_t sb, int64_t ss) {
    return ptr == nullptr || (aligned(ptr, 16) && sb % unit == 0 && ss % unit == 0);
  };
  if (!row_ok(p.out, p.out_sb, p.out_ss) || !row_ok(p.inp, p.inp_sb, p.inp_ss)) return false;
  const size_t out_align = std::min<size_t>(16, sizeof(OutT) * unit);
  for (const void* o : {static_cast<const void*>(p.resid), static_cast<const void*>(p.delta),
                        static_cast<const void*>(p.normed)}) {
    if (o != nullptr && !aligned(o, out_align)) return false;
  }
  if (p.normed != nullptr) {
    if (p.weight != nullptr && !aligned(p.weight, 16)) return false;
    if (p.bias != nullptr && !aligned(p.bias, 16)) return false;
  }
  return true;
}

template <typename InT, typename OutT>
void launch_rows(const Params& p) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (fast_kernel_fits<InT, OutT>(p)) {
    const int nvec = p.d / 4;
    const int k = (nvec + 127) / 128;  // vectors per virtual thread
    if (k <= 1) return launch_fast<InT, OutT, 1>(p, stream);
    if (k <= 2) return launch_fast<InT, OutT, 2>(p, stream);
    if (k <= 4) return launch_fast<InT, OutT, 4>(p, stream);
    if (k <= 8) return launch_fast<InT, OutT, 8>(p, stream);
    return launch_fast<InT, OutT, 16>(p, stream);
  }
  generic_rows_kernel<InT, OutT><<<grid_for(p.rows), kBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether torch's vectorized LayerNorm kernel (the one reproduced here) runs for x: torch makes a
// non-contiguous input contiguous first (a fresh, aligned copy) and checks 4-element alignment of
// input, weight and bias (its output is always fresh).
bool torch_takes_fast_ln(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t d) {
  const size_t align = 4 * x.element_size();
  if (d <= 0 || d % 4 != 0 || d > (int64_t{1} << 24)) return false;
  if (x.is_contiguous() && !aligned(x.const_data_ptr(), align)) return false;
  if (w.defined() && !aligned(w.const_data_ptr(), align)) return false;
  if (b.defined() && !aligned(b.const_data_ptr(), align)) return false;
  return true;
}

// Rows of x ([batch, seq] or [batch, seq, d]) at the selected positions.
at::Tensor gather_positions(const at::Tensor& x, const CaptureArgs& a) {
  if (!a.index.defined()) return x;
  if (a.index.dim() == 1) return x.index_select(1, a.index);
  if (x.dim() == 2) return x.gather(1, a.index);
  return x.gather(1, a.index.unsqueeze(-1).expand({a.batch, a.n_pos, x.size(2)}));
}

void capture_block_cuda(const at::Tensor& out, const std::optional<at::Tensor>& inp,
                        const std::optional<at::Tensor>& index,
                        const std::optional<at::Tensor>& norm_weight,
                        const std::optional<at::Tensor>& norm_bias, c10::string_view norm_kind,
                        double eps, const std::optional<at::Tensor>& resid,
                        const std::optional<at::Tensor>& delta,
                        const std::optional<at::Tensor>& normed,
                        const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& rstd,
                        const std::optional<at::Tensor>& l2,
                        const std::optional<at::Tensor>& maxabs) {
  CaptureArgs a = make_capture_args(out, inp, index, norm_weight, norm_bias, norm_kind, eps, resid,
                                    delta, normed, mean, rstd, l2, maxabs);
  const c10::cuda::CUDAGuard guard(a.out.device());
  check_arch(a.out.get_device());
  const int64_t rows = a.batch * a.n_pos;
  if (rows == 0) return;
  at::NoGradGuard no_grad;
  const int64_t d = a.d_model;
  TORCH_CHECK(d <= std::numeric_limits<int32_t>::max(), "residtap.capture_block: argument 'out' "
              "expected d_model < 2^31, got ", d);

  // Which of normed / mean+rstd replay torch's vectorized kernel here, and which call torch.
  const bool torch_norm = a.norm == NormKind::kTorchLayerNorm;
  const bool want_mr = a.mean.defined() || a.rstd.defined();
  const bool fused_normed =
      a.normed.defined() && !torch_norm && torch_takes_fast_ln(a.out, a.weight, a.bias, d);
  // stats are defined on out.float(): for a float model that is `out` itself (its alignment
  // counts), for 16-bit models a fresh, aligned copy.
  const bool fused_mr =
      want_mr && !torch_norm &&
      (a.out.scalar_type() == at::kFloat ? torch_takes_fast_ln(a.out, {}, {}, d)
                                         : d > 0 && d % 4 == 0 && d <= (int64_t{1} << 24));
  if (a.normed.defined() && !fused_normed) {
    // torch's own LayerNorm on the whole block output, then the gather: the reference, literally.
    const at::Tensor y = std::get<0>(at::native_layer_norm(a.out, {d}, a.weight, a.bias, eps));
    a.normed.copy_(gather_positions(y, a));
  }
  if (want_mr && !fused_mr) {
    const auto st = at::native_layer_norm(a.out.to(at::kFloat), {d}, {}, {}, eps);
    if (a.mean.defined()) a.mean.copy_(gather_positions(std::get<1>(st).view({a.batch, a.seq}), a));
    if (a.rstd.defined()) a.rstd.copy_(gather_positions(std::get<2>(st).view({a.batch, a.seq}), a));
  }

  Params base{};
  base.out = a.out.const_data_ptr();
  base.inp = a.inp.defined() ? a.inp.const_data_ptr() : nullptr;
  base.index = a.index.defined() ? a.index.const_data_ptr<int64_t>() : nullptr;
  base.weight = a.weight.defined() ? a.weight.const_data_ptr() : nullptr;
  base.bias = a.bias.defined() ? a.bias.const_data_ptr() : nullptr;
  base.rows = rows;
  base.n_pos = a.n_pos;
  base.seq = a.seq;
  base.out_sb = a.out.stride(0);
  base.out_ss = a.out.stride(1);
  base.inp_sb = a.inp.defined() ? a.inp.stride(0) : 0;
  base.inp_ss = a.inp.defined() ? a.inp.stride(1) : 0;
  base.d = static_cast<int>(d);
  base.index_2d = a.index.defined() && a.index.dim() == 2;
  base.eps = static_cast<float>(eps);
  base.bias_only = !a.weight.defined() && a.bias.defined();

  // One launch per capture dtype among the row outputs (normally exactly one); the per-token
  // stats go with the first.
  struct RowOut {
    at::Tensor t;
    void* Params::*field;
  };
  std::vector<RowOut> row_outs;
  if (a.resid.defined()) row_outs.push_back({a.resid, &Params::resid});
  if (a.delta.defined()) row_outs.push_back({a.delta, &Params::delta});
  if (fused_normed) row_outs.push_back({a.normed, &Params::normed});
  const bool kernel_stats = a.l2.defined() || a.maxabs.defined() || fused_mr;
  std::vector<at::ScalarType> out_types;
  for (const auto& r : row_outs) {
    if (std::find(out_types.begin(), out_types.end(), r.t.scalar_type()) == out_types.end())
      out_types.push_back(r.t.scalar_type());
  }
  if (out_types.empty() && kernel_stats) out_types.push_back(a.out.scalar_type());

  for (size_t k = 0; k < out_types.size(); ++k) {
    Params p = base;
    bool wants_normed = false;
    for (const auto& r : row_outs) {
      if (r.t.scalar_type() != out_types[k]) continue;
      p.*(r.field) = r.t.data_ptr();
      wants_normed |= r.field == &Params::normed;
    }
    if (k == 0) {
      p.l2 = a.l2.defined() ? a.l2.data_ptr<float>() : nullptr;
      p.maxabs = a.maxabs.defined() ? a.maxabs.data_ptr<float>() : nullptr;
      if (fused_mr) {
        p.mean = a.mean.defined() ? a.mean.data_ptr<float>() : nullptr;
        p.rstd = a.rstd.defined() ? a.rstd.data_ptr<float>() : nullptr;
      }
    }
    p.welford = wants_normed || p.mean != nullptr || p.rstd != nullptr;
    dispatch_types(a.out.scalar_type(), out_types[k], [&](auto in_tag, auto out_tag) {
      launch_rows<decltype(in_tag), decltype(out_tag)>(p);
    });
  }
}

}  // namespace
}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(residtap, CUDA, m) {
  m.impl("capture_block", &cuda_impl::capture_block_cuda);
}

}  // namespace residtap
