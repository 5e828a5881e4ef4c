// CPU implementation of residtap::capture_block: one pass over each selected row, parallel over
// rows, for resid/delta/l2/maxabs; the norm and its mean/rstd call torch's own CPU LayerNorm on
// the gathered rows, because torch's AVX cascade of Welford partials is brittle to emulate
// (../shared/GPU.md) and it is computed row by row, so gathering first changes no bit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../capture_common.h"

namespace residtap {
namespace {

template <typename T>
void store_row(const at::Tensor& dst, int64_t row, const float* src, int64_t d) {
  T* p = dst.data_ptr<T>() + row * d;
  for (int64_t i = 0; i < d; ++i) p[i] = static_cast<T>(src[i]);  // round to nearest even
}

void store_row_any(const at::Tensor& dst, int64_t row, const float* src, int64_t d) {
  switch (dst.scalar_type()) {
    case at::kFloat: return store_row<float>(dst, row, src, d);
    case at::kBFloat16: return store_row<c10::BFloat16>(dst, row, src, d);
    case at::kHalf: return store_row<c10::Half>(dst, row, src, d);
    default: TORCH_CHECK(false, "residtap: unsupported output dtype ", dst.scalar_type());
  }
}

// A row of `out` into a capture buffer, as Tensor.to(dtype) gives it: in the model dtype the very
// same bits (a NaN keeps its sign and payload, which a trip through float would not for
// bfloat16: c10's float -> bfloat16 makes every NaN 0x7fc0); otherwise the cast of its floats.
template <typename scalar_t>
void store_copy(const at::Tensor& dst, int64_t row, const scalar_t* src, const float* src_f, int64_t d) {
  if (dst.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    std::memcpy(dst.data_ptr<scalar_t>() + row * d, src, sizeof(scalar_t) * d);
  } else {
    store_row_any(dst, row, src_f, d);
  }
}

template <typename scalar_t>
void rowwise_pass(const CaptureArgs& a) {
  const int64_t B = a.batch, S = a.seq, P = a.n_pos, D = a.d_model;
  const int64_t* idx = a.index.defined() ? a.index.data_ptr<int64_t>() : nullptr;
  const bool per_row_index = a.index.defined() && a.index.dim() == 2;
  const scalar_t* out_p = a.out.data_ptr<scalar_t>();
  const scalar_t* inp_p = a.inp.defined() ? a.inp.data_ptr<scalar_t>() : nullptr;
  const int64_t ob = a.out.stride(0), os = a.out.stride(1);
  const int64_t ib = a.inp.defined() ? a.inp.stride(0) : 0;
  const int64_t is = a.inp.defined() ? a.inp.stride(1) : 0;
  float* l2_p = a.l2.defined() ? a.l2.data_ptr<float>() : nullptr;
  float* maxabs_p = a.maxabs.defined() ? a.maxabs.data_ptr<float>() : nullptr;
  const bool need_x = a.resid.defined() || a.delta.defined() || l2_p || maxabs_p;
  if (!need_x) return;

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * P, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D), dlt(a.delta.defined() ? D : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / P, p = r % P;
      int64_t s = p;
      if (idx) {
        s = per_row_index ? idx[b * P + p] : idx[p];
        TORCH_CHECK(s >= 0 && s < S, "residtap.capture_block: argument 'index' expected values in [0, ",
                    S, "), got ", s);
      }
      const scalar_t* xo = out_p + b * ob + s * os;
      for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(xo[i]);
      if (a.resid.defined()) store_copy<scalar_t>(a.resid, r, xo, x.data(), D);
      if (a.delta.defined()) {
        if (inp_p) {
          const scalar_t* xi = inp_p + b * ib + s * is;
          // torch's sub computes in float and rounds once to the model dtype.
          for (int64_t i = 0; i < D; ++i)
            dlt[i] = static_cast<float>(static_cast<scalar_t>(x[i] - static_cast<float>(xi[i])));
          store_row_any(a.delta, r, dlt.data(), D);
        } else {
          store_copy<scalar_t>(a.delta, r, xo, x.data(), D);
        }
      }
      if (maxabs_p) {
        float m = 0.f;
        for (int64_t i = 0; i < D; ++i) {
          const float v = std::fabs(x[i]);
          if (std::isnan(v)) { m = v; break; }  // amax propagates NaN
          m = v > m ? v : m;
        }
        maxabs_p[r] = m;
      }
      if (l2_p) {
        double acc = 0.0;
        for (int64_t i = 0; i < D; ++i) acc += static_cast<double>(x[i]) * x[i];
        l2_p[r] = static_cast<float>(std::sqrt(acc));
      }
    }
  });
}

void capture_block_cpu(const at::Tensor& out, const std::optional<at::Tensor>& inp,
                       const std::optional<at::Tensor>& index,
                       const std::optional<at::Tensor>& norm_weight,
                       const std::optional<at::Tensor>& norm_bias, c10::string_view norm_kind,
                       double eps, const std::optional<at::Tensor>& resid,
                       const std::optional<at::Tensor>& delta,
                       const std::optional<at::Tensor>& normed,
                       const std::optional<at::Tensor>& mean,
                       const std::optional<at::Tensor>& rstd, const std::optional<at::Tensor>& l2,
                       const std::optional<at::Tensor>& maxabs) {
  CaptureArgs a = make_capture_args(out, inp, index, norm_weight, norm_bias, norm_kind, eps, resid,
                                    delta, normed, mean, rstd, l2, maxabs);
  at::NoGradGuard no_grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.out.scalar_type(), "capture_block_cpu",
                                  [&] { rowwise_pass<scalar_t>(a); });

  if (!(a.normed.defined() || a.mean.defined() || a.rstd.defined())) return;
  const at::Tensor rows = gather_positions(a.out, a);  // [B, P, D], model dtype
  std::tuple<at::Tensor, at::Tensor, at::Tensor> ln;  // (normed, mean, rstd) of the last norm run
  if (a.normed.defined()) {
    ln = at::native_layer_norm(rows, {a.d_model}, a.weight, a.bias, a.eps);
    a.normed.copy_(std::get<0>(ln));
  }
  if (!(a.mean.defined() || a.rstd.defined())) return;
  // The stats' moments are those of out.float(). For a float32 model the norm just run already
  // has them (torch's CPU kernel computes mean and rstd from the row alone, before weight and
  // bias); otherwise one more pass, on the float copy.
  if (!a.normed.defined() || a.out.scalar_type() != at::kFloat) {
    ln = at::native_layer_norm(rows.to(at::kFloat), {a.d_model}, {}, {}, a.eps);
  }
  if (a.mean.defined()) a.mean.copy_(std::get<1>(ln).view({a.batch, a.n_pos}));
  if (a.rstd.defined()) a.rstd.copy_(std::get<2>(ln).view({a.batch, a.n_pos}));
}

}  // namespace

TORCH_LIBRARY_IMPL(residtap, CPU, m) { m.impl("capture_block", &capture_block_cpu); }

}  // namespace residtap
