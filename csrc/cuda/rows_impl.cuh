// The launchers of the row kernels (rows_kernels.cuh), included once per model dtype by
// rows_<dtype>.cu (see capture_cuda.cpp for what they compute and why, ln_arith.cuh for the
// arithmetic order).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "rows_choice.cuh"
#include "rows_kernels.cuh"

namespace residtap {
namespace cuda_impl {
namespace {

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

}  // namespace

template <typename InT, typename OutT>
void launch_rows(const Params& p, cudaStream_t stream) {
  if (fast_kernel_fits<InT, OutT>(p)) {
    switch (fast_k(p.d)) {
      case 1: return launch_fast<InT, OutT, 1>(p, stream);
      case 2: return launch_fast<InT, OutT, 2>(p, stream);
      case 4: return launch_fast<InT, OutT, 4>(p, stream);
      case 8: return launch_fast<InT, OutT, 8>(p, stream);
      default: return launch_fast<InT, OutT, 16>(p, stream);
    }
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
