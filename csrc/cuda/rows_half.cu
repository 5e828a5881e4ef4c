// The row kernels for half models (one translation unit per model dtype: parallel builds).
#include "rows_impl.cuh"

RESIDTAP_INSTANTIATE_ROWS(c10::Half)
