// What the host code (capture_cuda.cpp) and the kernels (rows_impl.cuh, compiled in one
// translation unit per model dtype so that they build in parallel) share: the parameter struct and
// the launchers' declarations. No kernels here.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace residtap {
namespace cuda_impl {

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
  int vec;       // generic kernel: whole 4-element vectors (d % 4 == 0, rows 4-element aligned)
  int64_t max_grid;  // at most this many blocks per launch (0: no cap; the kernels loop over rows)
  int staged;        // fast kernel: its staged variant (rows copied ahead into shared memory)
};

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Launches the row kernels for one (model dtype, capture dtype) on `stream`; defined in
// rows_<model dtype>.cu (which stay free of ATen's heavy headers: they compile faster).
template <typename InT, typename OutT>
void launch_rows(const Params& p, cudaStream_t stream);

// One kernel of this build (for the architecture check: its attributes exist only where the build
// has code for the GPU).
const void* arch_probe_kernel();

}  // namespace cuda_impl
}  // namespace residtap
