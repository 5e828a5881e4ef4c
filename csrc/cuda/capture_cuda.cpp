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
// same arithmetic, one block per row, the row re-read for normalization; it loads whole 4-element
// vectors where the width and pointers allow, else one element at a time.
// Experimental, off unless a thread asks (residtap::_set_staged_rows): a staged variant of the fast
// kernel that copies each block's next rows into shared memory (cp.async) while it works on the
// current ones, on a grid sized to the GPU; same arithmetic, same bytes (rows_kernels.cuh).
//
// No host synchronization and no device allocation on these paths (beyond make_capture_args' copy
// of an input whose last dimension is strided, which no supported model's hidden state is);
// launches go to the current stream, so the op can be captured in a CUDA graph.
//
// Files: this one is the host side (checks, the choice of path, the dtype dispatch), plain C++
// compiled by the host compiler (far faster than through nvcc); the kernels
// are in rows_impl.cuh, compiled once per model dtype (rows_float.cu, rows_bfloat16.cu,
// rows_half.cu) so that a build compiles them in parallel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "../capture_common.h"
#include "rows.cuh"

namespace residtap {
namespace cuda_impl {
namespace {

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
  const cudaError_t err = cudaFuncGetAttributes(&attr, arch_probe_kernel());
  if (err != cudaSuccess && err != cudaErrorInvalidDeviceFunction &&
      err != cudaErrorNoKernelImageForDevice) {
    C10_CUDA_CHECK(err);  // another failure (a sticky error from an earlier kernel): say that one
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so later checks do not trip over it
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
    RESIDTAP_CHECK(false, "residtap.capture_block: the CUDA kernels of this build have no code for ",
                   prop->name, " (compute capability ", prop->major, ".", prop->minor, "): ",
                   cudaGetErrorString(err), ". Rebuild for it with RESIDTAP_CUDA_ARCHS=",
                   prop->major, ".", prop->minor, " (builds are cached per architecture list) in "
                   "a new Python process, or use backend='reference'.");
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
      default: RESIDTAP_CHECK(false, "residtap.capture_block: unsupported capture dtype ", out);
    }
  };
  switch (in) {
    case at::kFloat: return with_out(float{});
    case at::kBFloat16: return with_out(c10::BFloat16{});
    case at::kHalf: return with_out(c10::Half{});
    default: RESIDTAP_CHECK(false, "residtap.capture_block: unsupported model dtype ", in);
  }
}

// The widths torch's vectorized LayerNorm kernel takes (alignment aside).
bool torch_fast_ln_width(int64_t d) { return d > 0 && d % 4 == 0 && d <= (int64_t{1} << 24); }

// Whether torch's vectorized LayerNorm kernel (the one reproduced here) runs for x: torch makes a
// non-contiguous input contiguous first (a fresh, aligned copy) and checks 4-element alignment of
// input, weight and bias (its output is always fresh).
bool torch_takes_fast_ln(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t d) {
  const size_t align = 4 * x.element_size();
  if (!torch_fast_ln_width(d)) return false;
  if (x.is_contiguous() && !aligned(x.const_data_ptr(), align)) return false;
  if (w.defined() && !aligned(w.const_data_ptr(), align)) return false;
  if (b.defined() && !aligned(b.const_data_ptr(), align)) return false;
  return true;
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
  RESIDTAP_CHECK(d <= std::numeric_limits<int32_t>::max(),
                 "residtap.capture_block: argument 'out' expected d_model < 2^31, got ", d);

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
                                         : torch_fast_ln_width(d));
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
  base.max_grid = grid_cap();
  base.staged = staged_rows() ? 1 : 0;

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

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
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
    if (p.delta == nullptr) {  // only delta reads inp: its alignment must not choose the kernel
      p.inp = nullptr;
      p.inp_sb = p.inp_ss = 0;
    }
    p.welford = wants_normed || p.mean != nullptr || p.rstd != nullptr;
    dispatch_types(a.out.scalar_type(), out_types[k], [&](auto in_tag, auto out_tag) {
      launch_rows<decltype(in_tag), decltype(out_tag)>(p, stream);
    });
  }
}
}  // namespace
}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(residtap, CUDA, m) {
  m.impl("capture_block", &cuda_impl::capture_block_cuda);
}

}  // namespace residtap
