// CPU implementation of residtap::capture_block: one pass over each selected row, parallel over
// rows, for resid/delta/l2/maxabs; the norm and its mean/rstd call torch's own CPU LayerNorm on
// the selected rows, a chunk at a time, because torch's AVX cascade of Welford partials is brittle
// to emulate (../shared/GPU.md) and it is computed row by row, so gathering first or splitting the
// rows into chunks changes no bit.
//
// The row loops are written so that gcc vectorizes them at -O3 with the build's flags (no -march):
// no calls and no branches per element, and the reductions (max |x|, sum of squares) kept in kLanes
// independent partials.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../capture_common.h"

namespace residtap {
namespace {

// Row elements as float and back. bfloat16 by its bits, with c10's own rounding (round to
// nearest even, every NaN to 0x7fc0): all 2^32 float32 patterns gave c10's bits when this was
// written, and test_op.py checks random patterns against torch's casts. float16 through c10.
inline float load_f(float v) { return v; }
inline float load_f(c10::Half v) { return static_cast<float>(v); }
inline float load_f(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T round_to(float f);
template <>
inline float round_to<float>(float f) { return f; }
template <>
inline c10::Half round_to<c10::Half>(float f) { return static_cast<c10::Half>(f); }
template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : uint16_t(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

constexpr int64_t kLanes = 8;

// An output of one row per selected position, as the row loops use it: its first row and dtype.
struct RowOut {
  void* base = nullptr;  // null: not requested
  at::ScalarType type = at::kFloat;
  RowOut() = default;
  explicit RowOut(const at::Tensor& t)
      : base(t.defined() ? t.data_ptr() : nullptr), type(t.defined() ? t.scalar_type() : at::kFloat) {}
  template <typename T>
  T* row(int64_t r, int64_t d) const { return static_cast<T*>(base) + r * d; }
};

template <typename T>
void store_row(T* p, const float* src, int64_t d) {
  for (int64_t i = 0; i < d; ++i) p[i] = round_to<T>(src[i]);
}

void store_row_any(const RowOut& dst, int64_t r, const float* src, int64_t d) {
  switch (dst.type) {
    case at::kFloat: return store_row(dst.row<float>(r, d), src, d);
    case at::kBFloat16: return store_row(dst.row<c10::BFloat16>(r, d), src, d);
    case at::kHalf: return store_row(dst.row<c10::Half>(r, d), src, d);
    default: RESIDTAP_CHECK(false, "residtap: unsupported output dtype ", dst.type);
  }
}

// The row's bits, copied as integers of the element's size (a loop the compiler vectorizes; for
// rows this short it is faster here than memcpy).
template <typename scalar_t>
void copy_row(scalar_t* dst, const scalar_t* src, int64_t d) {
  using Bits = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, uint32_t>;
  static_assert(sizeof(Bits) == sizeof(scalar_t));
  Bits* __restrict to = reinterpret_cast<Bits*>(dst);
  const Bits* __restrict from = reinterpret_cast<const Bits*>(src);
  for (int64_t i = 0; i < d; ++i) to[i] = from[i];
}

// A row of `out` into a capture buffer, as Tensor.to(dtype) gives it: in the model dtype the very
// same bits (a NaN keeps its sign and payload, which a trip through float would not for
// bfloat16: c10's float -> bfloat16 makes every NaN 0x7fc0); otherwise the cast of its floats.
template <typename scalar_t>
void store_copy(const RowOut& dst, int64_t r, const scalar_t* src, const float* src_f, int64_t d) {
  if (dst.type == c10::CppTypeToScalarType<scalar_t>::value) {
    copy_row(dst.row<scalar_t>(r, d), src, d);
  } else {
    store_row_any(dst, r, src_f, d);
  }
}

// max |x|, on the bits: |x| is x's bits without the sign, and non-negative floats order as those
// bits do as integers, infinity included, so an integer max (which vectorizes, where a float max
// with NaN rules does not) gives max |x| exactly; and a row with a NaN gets a NaN (the one with the
// largest payload), as torch's amax propagates NaN.
float row_maxabs(const float* x, int64_t d) {
  int32_t m[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      int32_t u;
      std::memcpy(&u, x + i + j, sizeof u);
      u &= 0x7FFFFFFF;
      m[j] = u > m[j] ? u : m[j];
    }
  }
  for (; i < d; ++i) {
    int32_t u;
    std::memcpy(&u, x + i, sizeof u);
    u &= 0x7FFFFFFF;
    m[0] = u > m[0] ? u : m[0];
  }
  int32_t best = 0;
  for (int64_t j = 0; j < kLanes; ++j) best = m[j] > best ? m[j] : best;
  float f;
  std::memcpy(&f, &best, sizeof f);
  return f;
}

// ||x||_2 in float64 (each square exact), rounded once to float32: within the contract's 2 ulp of
// float32 whatever the order of the sum, so it is kept in kLanes partials.
float row_l2(const float* x, int64_t d) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const double v = x[i + j];
      acc[j] += v * v;
    }
  }
  for (; i < d; ++i) acc[0] += static_cast<double>(x[i]) * x[i];
  double s = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return static_cast<float>(std::sqrt(s));
}

// Rows [first, last) of the selection: resid, delta, l2 and maxabs, and the rows the norm runs on
// where it needs them gathered (`rows_m_t`, model dtype) or in float32 (`rows_f_t`, a 16-bit model's
// moments), each indexed from `first` (undefined: not needed).
template <typename scalar_t>
void rowwise_pass(const CaptureArgs& a, int64_t first, int64_t last, const at::Tensor& rows_m_t,
                  const at::Tensor& rows_f_t) {
  scalar_t* rows_m = rows_m_t.defined() ? rows_m_t.data_ptr<scalar_t>() : nullptr;
  float* rows_f = rows_f_t.defined() ? rows_f_t.data_ptr<float>() : nullptr;
  const int64_t P = a.n_pos, D = a.d_model;
  const int64_t* idx = a.index.defined() ? a.index.data_ptr<int64_t>() : nullptr;
  const bool per_row_index = a.index.defined() && a.index.dim() == 2;
  const scalar_t* out_p = a.out.data_ptr<scalar_t>();
  const scalar_t* inp_p = a.inp.defined() ? a.inp.data_ptr<scalar_t>() : nullptr;
  const int64_t ob = a.out.stride(0), os = a.out.stride(1);
  const int64_t ib = a.inp.defined() ? a.inp.stride(0) : 0;
  const int64_t is = a.inp.defined() ? a.inp.stride(1) : 0;
  float* l2_p = a.l2.defined() ? a.l2.data_ptr<float>() : nullptr;
  float* maxabs_p = a.maxabs.defined() ? a.maxabs.data_ptr<float>() : nullptr;
  const RowOut resid(a.resid), delta(a.delta);
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  constexpr at::ScalarType model_type = c10::CppTypeToScalarType<scalar_t>::value;
  const bool resid_cast = a.resid.defined() && a.resid.scalar_type() != model_type;
  const bool delta_cast = a.delta.defined() && a.delta.scalar_type() != model_type;
  // A 16-bit row as float: for the moments, l2, maxabs and casts of the row itself.
  const bool need_f = !is_float && (rows_f || l2_p || maxabs_p || resid_cast || (delta_cast && !inp_p));
  if (!(a.resid.defined() || a.delta.defined() || l2_p || maxabs_p || rows_m || rows_f)) return;

  const int64_t grain = std::max<int64_t>(1, 32768 / D);
  at::parallel_for(first, last, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(need_f && !rows_f ? D : 0), dlt(delta_cast && inp_p ? D : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / P, p = r % P;
      int64_t s = p;
      if (idx) s = per_row_index ? idx[b * P + p] : idx[p];  // in [0, seq): checked up front
      const scalar_t* xo = out_p + b * ob + s * os;
      if (rows_m) copy_row(rows_m + (r - first) * D, xo, D);
      const float* x = nullptr;  // the row as float, where needed
      if constexpr (is_float) {
        x = xo;
      } else if (need_f) {
        float* xf = rows_f ? rows_f + (r - first) * D : xbuf.data();
        for (int64_t i = 0; i < D; ++i) xf[i] = load_f(xo[i]);
        x = xf;
      }
      if (resid.base) store_copy(resid, r, xo, x, D);
      if (delta.base) {
        if (inp_p) {
          const scalar_t* xi = inp_p + b * ib + s * is;
          // torch's sub computes in float and rounds once to the model dtype.
          if (!delta_cast) {
            scalar_t* dp = delta.row<scalar_t>(r, D);
            for (int64_t i = 0; i < D; ++i) dp[i] = round_to<scalar_t>(load_f(xo[i]) - load_f(xi[i]));
          } else {
            for (int64_t i = 0; i < D; ++i)
              dlt[i] = load_f(round_to<scalar_t>(load_f(xo[i]) - load_f(xi[i])));
            store_row_any(delta, r, dlt.data(), D);
          }
        } else {
          store_copy(delta, r, xo, x, D);
        }
      }
      if (maxabs_p) maxabs_p[r] = row_maxabs(x, D);
      if (l2_p) l2_p[r] = row_l2(x, D);
    }
  });
}

// Selected rows per chunk: about 1 MB of float32, so that the chunk is still in cache when the norm
// reads it, and so that the norm's outputs are allocations the C allocator reuses. (One
// native_layer_norm over a whole [16384, 768] float32 block allocates 50 MB, past glibc's largest
// mmap threshold, and pays for a fresh page on every 4 KB it writes.)
constexpr int64_t kChunkElems = int64_t{1} << 18;

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
  // Every index value before any output is written, so that a bad one leaves the outputs as they
  // were. (The CUDA op cannot read them on the host without a sync; it asserts on the device.)
  if (a.index.defined()) {
    const int64_t* idx = a.index.const_data_ptr<int64_t>();
    for (int64_t k = 0, n = a.index.numel(); k < n; ++k)
      RESIDTAP_CHECK_ARG(idx[k] >= 0 && idx[k] < a.seq, "index", cat("values in [0, ", a.seq, ")"),
                         idx[k]);
  }
  at::NoGradGuard no_grad;
  const int64_t N = a.batch * a.n_pos, D = a.d_model;
  const bool moments = a.mean.defined() || a.rstd.defined();
  // The stats' moments are those of out.float(). For a float32 model the norm run for normed (or
  // run on the rows themselves) has them: torch's CPU kernel computes mean and rstd from the row
  // alone, before weight and bias. A 16-bit model's rows are made float32 by the row pass.
  const bool float_model = a.out.scalar_type() == at::kFloat;
  const bool norm_rows = a.normed.defined() || (moments && float_model);  // model-dtype rows normed
  // Every position of a row-major block: the norm reads it in place. Otherwise the row pass
  // gathers the selected rows for it.
  const bool in_place = !a.index.defined() && a.out.is_contiguous();
  const bool norm = a.normed.defined() || moments;
  const int64_t chunk = std::max<int64_t>(1, norm ? std::min(N, kChunkElems / D) : N);
  at::Tensor rows_m, rows_f;
  if (norm_rows && !in_place) rows_m = at::empty({chunk, D}, a.out.options());
  if (moments && !float_model) rows_f = at::empty({chunk, D}, a.out.options().dtype(at::kFloat));
  const at::Tensor flat_out = in_place ? a.out.view({N, D}) : at::Tensor();
  auto flat = [&](const at::Tensor& t, int64_t width) { return t.defined() ? t.view({N, width}) : t; };
  const at::Tensor normed_f = flat(a.normed, D), mean_f = flat(a.mean, 1), rstd_f = flat(a.rstd, 1);

  for (int64_t first = 0; first < N; first += chunk) {
    const int64_t n = std::min(chunk, N - first), last = first + n;
    switch (a.out.scalar_type()) {  // make_capture_args admits these three
      case at::kFloat: rowwise_pass<float>(a, first, last, rows_m, rows_f); break;
      case at::kBFloat16: rowwise_pass<c10::BFloat16>(a, first, last, rows_m, rows_f); break;
      case at::kHalf: rowwise_pass<c10::Half>(a, first, last, rows_m, rows_f); break;
      default: RESIDTAP_CHECK(false, "residtap: unsupported dtype ", a.out.scalar_type());
    }
    if (!norm) continue;
    const at::Tensor x = !norm_rows ? at::Tensor() : in_place ? flat_out.narrow(0, first, n)
                                                              : rows_m.narrow(0, 0, n);
    std::tuple<at::Tensor, at::Tensor, at::Tensor> ln;  // (normed, mean, rstd) of the last norm run
    if (a.normed.defined()) {
      ln = at::native_layer_norm(x, {D}, a.weight, a.bias, a.eps);
      normed_f.narrow(0, first, n).copy_(std::get<0>(ln));
    }
    if (!moments) continue;
    if (!float_model) {
      ln = at::native_layer_norm(rows_f.narrow(0, 0, n), {D}, {}, {}, a.eps);
    } else if (!a.normed.defined()) {
      ln = at::native_layer_norm(x, {D}, {}, {}, a.eps);
    }
    if (a.mean.defined()) mean_f.narrow(0, first, n).copy_(std::get<1>(ln));
    if (a.rstd.defined()) rstd_f.narrow(0, first, n).copy_(std::get<2>(ln));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(residtap, CPU, m) { m.impl("capture_block", &capture_block_cpu); }

}  // namespace residtap
