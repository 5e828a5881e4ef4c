// Which row kernel a call runs, and how wide its grid is: plain host functions of the parameters,
// with no CUDA runtime call, shared by the launchers (rows_impl.cuh) and tests/cuda_kernel_emu.cpp,
// which checks them on a machine without a GPU (a wrong choice is a misaligned 16-byte access on
// the GPU, or the slow kernel where the fast one was legal).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "ln_arith.cuh"
#include "rows.cuh"

namespace residtap {
namespace cuda_impl {

// Blocks to launch for `blocks` units of work: at most max_grid (where > 0) and INT32_MAX, at
// least 1 (the kernels loop over what a smaller grid leaves).
inline int64_t grid_for(int64_t blocks, int64_t max_grid) {
  if (max_grid > 0) blocks = std::min(blocks, max_grid);
  return std::max<int64_t>(1, std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

// Whether rows can be accessed as whole vectors of `unit` elements (at most 16 bytes): out and inp
// (start and strides), the row outputs and, if `weights`, the norm's weight and bias aligned to a
// vector of their type.
template <typename InT, typename OutT>
bool vectors_fit(const Params& p, int64_t unit, bool weights) {
  const size_t in_align = std::min<size_t>(16, sizeof(InT) * unit);
  const size_t out_align = std::min<size_t>(16, sizeof(OutT) * unit);
  auto rows_ok = [&](const void* ptr, int64_t sb, int64_t ss) {
    return ptr == nullptr || (aligned(ptr, in_align) && sb % unit == 0 && ss % unit == 0);
  };
  if (!rows_ok(p.out, p.out_sb, p.out_ss) || !rows_ok(p.inp, p.inp_sb, p.inp_ss)) return false;
  for (const void* o : {static_cast<const void*>(p.resid), static_cast<const void*>(p.delta),
                        static_cast<const void*>(p.normed)}) {
    if (o != nullptr && !aligned(o, out_align)) return false;
  }
  for (const void* w : {p.weight, p.bias}) {
    if (weights && w != nullptr && !aligned(w, in_align)) return false;
  }
  return true;
}

// Whether the fast kernel's 16-byte accesses are legal for this call.
template <typename InT, typename OutT>
bool fast_kernel_fits(const Params& p) {
  const int64_t unit = sizeof(InT) == 2 ? 8 : 4;  // elements per 16-byte unit
  if (p.d <= 0 || p.d % unit != 0 || p.d > kMaxFastWidth) return false;
  return vectors_fit<InT, OutT>(p, unit, p.normed != nullptr);
}

// The fast kernel's K (4-element vectors per virtual thread) for a width it fits: the smallest
// instantiated one (1, 2, 4, 8, 16) that holds the row's d / 4 vectors over 128 virtual threads.
inline int fast_k(int d) {
  const int k = (d / 4 + kBlock - 1) / kBlock;
  return k <= 1 ? 1 : k <= 2 ? 2 : k <= 4 ? 4 : k <= 8 ? 8 : 16;
}

// Whether the generic kernel may load and store whole 4-element vectors (8 or 16 bytes).
template <typename InT, typename OutT>
bool generic_vec_fits(const Params& p) {
  return p.d > 0 && p.d % 4 == 0 && vectors_fit<InT, OutT>(p, 4, true);
}

}  // namespace cuda_impl
}  // namespace residtap
