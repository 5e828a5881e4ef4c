// The launchers of the row kernels (rows_kernels.cuh), included once per model dtype by
// rows_<dtype>.cu (see capture_cuda.cpp for what they compute and why, ln_arith.cuh for the
// arithmetic order).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "rows_kernels.cuh"

namespace residtap {
namespace cuda_impl {
namespace {

int64_t grid_for(int64_t blocks, int64_t max_grid) {
  if (max_grid > 0) blocks = std::min(blocks, max_grid);
  return std::max<int64_t>(1, std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

// How many blocks of `kernel` with `smem` bytes of dynamic shared memory fit on the current GPU
// at once (0: none, the memory does not fit). Found once per kernel, device and size: the
// attribute and occupancy calls cost host time, and a capture launches per layer and forward.
inline int64_t resident_blocks(const void* kernel, size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, std::pair<int, size_t>>, int64_t> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_pair(kernel, std::make_pair(device, smem));
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = known.find(key); it != known.end()) return it->second;
  int sms = 0, smem_optin = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  // The kernel's static shared memory counts against the same per-block limit.
  const int dynamic_max = smem_optin - static_cast<int>(attr.sharedSizeBytes);
  if (dynamic_max > 0 && smem <= static_cast<size_t>(dynamic_max)) {
    if (smem > 48 * 1024 - attr.sharedSizeBytes) {
      // Above the default limit a kernel has to opt in, per device. To the most it may have, not
      // to this size: a smaller size set later would otherwise fail a launch of this one.
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_max));
    }
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, smem));
  }
  return known[key] = static_cast<int64_t>(per_sm) * sms;
}

// The staged fast kernel (see fast_rows_kernel): as many blocks as fit on the GPU at once, each
// looping over the `groups` row groups; false (nothing launched) where its shared memory does
// not fit.
template <typename InT, typename OutT, int K>
bool launch_fast_staged(const Params& p, int64_t groups, cudaStream_t stream) {
  auto* kernel = &fast_rows_kernel<InT, OutT, K, true>;
  const size_t smem = staged_smem_bytes<InT, K>(p);
  const int64_t resident = resident_blocks(reinterpret_cast<const void*>(kernel), smem);
  if (resident < 1) return false;
  kernel<<<grid_for(std::min(groups, resident), p.max_grid), kBlock, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The fast kernel for K vectors per virtual thread: staged where this thread asked for it and its
// stages fit, else plain, one block per row group.
template <typename InT, typename OutT, int K>
void launch_fast(const Params& p, cudaStream_t stream) {
  using L = FastLayout<sizeof(InT), K>;
  const int64_t groups = (p.rows + L::kTeams - 1) / L::kTeams;
  if (p.staged && launch_fast_staged<InT, OutT, K>(p, groups, stream)) return;
  fast_rows_kernel<InT, OutT, K><<<grid_for(groups, p.max_grid), kBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// Whether the generic kernel may load and store whole 4-element vectors (8 or 16 bytes).
template <typename InT, typename OutT>
bool generic_vec_fits(const Params& p) {
  return p.d > 0 && p.d % 4 == 0 && vectors_fit<InT, OutT>(p, 4, true);
}

}  // namespace

template <typename InT, typename OutT>
void launch_rows(const Params& p, cudaStream_t stream) {
  if (fast_kernel_fits<InT, OutT>(p)) {
    const int nvec = p.d / 4;
    const int k = (nvec + 127) / 128;  // vectors per virtual thread
    if (k <= 1) return launch_fast<InT, OutT, 1>(p, stream);
    if (k <= 2) return launch_fast<InT, OutT, 2>(p, stream);
    if (k <= 4) return launch_fast<InT, OutT, 4>(p, stream);
    if (k <= 8) return launch_fast<InT, OutT, 8>(p, stream);
    return launch_fast<InT, OutT, 16>(p, stream);
  }
  Params q = p;
  q.vec = generic_vec_fits<InT, OutT>(p) ? 1 : 0;
  generic_rows_kernel<InT, OutT><<<grid_for(p.rows, p.max_grid), kBlock, 0, stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_impl
}  // namespace residtap

// Instantiates the launchers of one model dtype for every capture dtype.
#define RESIDTAP_INSTANTIATE_ROWS(InT)                                             \
  namespace residtap::cuda_impl {                                                  \
  template void launch_rows<InT, float>(const Params&, cudaStream_t);              \
  template void launch_rows<InT, c10::BFloat16>(const Params&, cudaStream_t);      \
  template void launch_rows<InT, c10::Half>(const Params&, cudaStream_t);          \
  }
