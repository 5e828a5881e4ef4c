// Every residtap schema, defined once. Backends add implementations in their own files
// (cpu/capture_cpu.cpp, cuda/capture_cuda.cpp) with TORCH_LIBRARY_IMPL.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "capture_common.h"

namespace {
// Sets this thread's cap on the blocks of a CUDA row-kernel launch (see grid_cap in
// capture_common.h); returns the previous cap, so that a caller can restore it.
int64_t set_grid_cap(int64_t blocks) {
  RESIDTAP_CHECK(blocks >= 0,
                 "residtap._set_grid_cap: argument 'blocks' expected an int >= 0 (0: no cap), got ",
                 blocks);
  const int64_t previous = residtap::grid_cap();
  residtap::grid_cap() = blocks;
  return previous;
}

// Turns the staged fast kernel on or off for this thread's CUDA launches (see staged_rows in
// capture_common.h); returns the previous setting.
bool set_staged_rows(bool on) {
  const bool previous = residtap::staged_rows();
  residtap::staged_rows() = on;
  return previous;
}

// capture_block at the ADInplaceOrView key: the op, then a bump of the version counter of every
// buffer it wrote (its mutable arguments), as torch's own in-place ops do. Autograd then refuses a
// backward through a tensor saved from a buffer a later forward overwrote ("modified by an inplace
// operation"), and an inference tensor written outside inference mode is refused, as with the
// reference's copy_. torch's boxed fallback for this key bumps only mutable returns, and this op
// returns nothing. Host-side only; inference tensors (no version counter) skip this key.
void capture_block_inplace(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  const size_t start = stack->size() - n_args;
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < n_args; ++i) {
    const c10::IValue& arg = (*stack)[start + i];
    if (schema.is_mutable({c10::SchemaArgType::input, i}) && arg.isTensor()) {
      written.push_back(arg.toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) {
    torch::autograd::impl::bump_version(t);
  }
}
}  // namespace

TORCH_LIBRARY(residtap, m) {
  // One call per block, from the block's forward hook. Reads the block's output `out`
  // [batch, seq, d_model] and (optionally) its input `inp` of the same shape, selects positions,
  // and writes each requested output into a caller-owned buffer. Never synchronizes with the host,
  // and allocates no device memory except a contiguous copy of an input whose last dimension is
  // strided or an index that is not contiguous (no supported model's hook hands it either).
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
  // This thread's cap on the blocks of each CUDA launch of capture_block (0: none); returns the
  // previous cap. Changes no output byte, only how much of the GPU one launch may take at once.
  m.def("_set_grid_cap(int blocks) -> int", &set_grid_cap);
  // Whether this thread's CUDA launches use the staged fast kernel (experimental; same outputs);
  // returns the previous setting.
  m.def("_set_staged_rows(bool on) -> bool", &set_staged_rows);
}

TORCH_LIBRARY_IMPL(residtap, ADInplaceOrView, m) {
  m.impl("capture_block", torch::CppFunction::makeFromBoxedFunction<&capture_block_inplace>());
}
