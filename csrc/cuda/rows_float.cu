// The row kernels for float models (one translation unit per model dtype: parallel builds).
#include "rows_impl.cuh"

RESIDTAP_INSTANTIATE_ROWS(float)

namespace residtap::cuda_impl {
const void* arch_probe_kernel() {
  return reinterpret_cast<const void*>(&generic_rows_kernel<float, float>);
}
}  // namespace residtap::cuda_impl
