// The row kernels for bfloat16 models (one translation unit per model dtype: parallel builds).
#include "rows_impl.cuh"

RESIDTAP_INSTANTIATE_ROWS(c10::BFloat16)
