// Every residtap schema, defined once. Backends add implementations in their own files
// (cpu/capture_cpu.cpp, cuda/capture_cuda.cpp) with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(residtap, m) {
  // One call per block, from the block's forward hook. Reads the block's output `out`
  // [batch, seq, d_model] and (optionally) its input `inp` of the same shape, selects positions,
  // and writes each requested output into a caller-owned buffer. Allocates no device memory and
  // never synchronizes with the host.
  //
  //   index      None: all positions (seq == n_pos); int64 [n_pos]: the same positions for every
  //              row; int64 [batch, n_pos]: positions per row. Values must lie in [0, seq).
  //   norm_kind  "layer_norm" (weight/bias optional); "torch_layer_norm", the same values but
  //              normed, mean and rstd always from torch's own native_layer_norm (what the parity
  //              guard selects when a backend's replay of torch's arithmetic ever differs); or
  //              "none" (normed must then be None).
  //   eps        the final norm's eps, also used for stats mean/rstd.
  //   resid      [batch, n_pos, d_model], capture dtype: out, cast as .to(dtype).
  //   delta      same: (out - inp) in the model dtype, then cast; out itself when inp is None.
  //   normed     same: the final norm applied to out in the model dtype, then cast.
  //   mean, rstd [batch, n_pos] float32: torch.native_layer_norm(out.float(), (d,), None, None, eps).
  //   l2         [batch, n_pos] float32: per-token L2 norm of out (our reduction order, <= 2 ulp).
  //   maxabs     [batch, n_pos] float32: max |out| over d_model (NaN propagates).
  m.def(
      "capture_block(Tensor out, Tensor? inp, Tensor? index, Tensor? norm_weight, "
      "Tensor? norm_bias, str norm_kind, float eps, "
      "Tensor(a!)? resid, Tensor(b!)? delta, Tensor(c!)? normed, Tensor(d!)? mean, "
      "Tensor(e!)? rstd, Tensor(f!)? l2, Tensor(g!)? maxabs) -> ()");
}
