// Shapes, checks and the plain parameter struct shared by the CPU and CUDA implementations of
// residtap::capture_block. No kernels here and no knowledge of Python.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <utility>

namespace residtap {

// Error messages are built from strings alone, never through an iostream in this library. The GPU
// machine builds extensions with CXX=/opt/gcc/bin/g++, which links libstdc++ into the .so
// statically (the built library needs no libstdc++.so.6 and defines its own streams and locales);
// beside torch's shared libstdc++, that private copy's number formatting crashed the process
// (SIGSEGV in ostream::_M_insert<long>), so every bad-input error with a shape or a count in its
// message was a segfault there, while one made of strings alone went through. So numbers go
// through std::to_string, and each check hands TORCH_CHECK one finished std::string, which c10
// passes on without a stream. cat() takes only the types below: anything else is a compile error
// rather than a crash in an error path (test_build.py keeps streams and bare TORCH_CHECKs out).
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(const char* s) { return s; }
inline std::string piece(c10::string_view s) { return std::string(s.data(), s.size()); }
inline std::string piece(int v) { return std::to_string(v); }
inline std::string piece(long v) { return std::to_string(v); }
inline std::string piece(long long v) { return std::to_string(v); }  // int64_t on macOS
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef v) {
  std::string r = "[";
  for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + std::to_string(v[i]);
  return r + "]";
}

template <typename... T>
std::string cat(const T&... v) {
  std::string r;
  ((r += piece(v)), ...);
  return r;
}

// TORCH_CHECK with a message made by cat() (the only form of check in csrc/).
#define RESIDTAP_CHECK(cond, ...) TORCH_CHECK((cond), ::residtap::cat(__VA_ARGS__))

// Error messages name the argument, what was expected and what was received.
#define RESIDTAP_CHECK_ARG(cond, name, expected, got)                                        \
  RESIDTAP_CHECK((cond), "residtap.capture_block: argument '", name, "' expected ", expected, \
                 ", got ", got)

// The most blocks a row-kernel launch from this thread may use; 0: as many as the rows need (the
// kernels loop over rows, so any grid gives the same bytes). Set through residtap::_set_grid_cap
// (ops.cpp) around a launch that should leave most of the GPU to concurrent work: overlap's
// side-stream captures, beside the forward's next blocks. The CPU implementation ignores it.
inline int64_t& grid_cap() {
  static thread_local int64_t cap = 0;
  return cap;
}

// Whether this thread's CUDA launches of the fast row kernel use its staged variant (rows copied
// ahead into shared memory while the previous group is worked on; see fast_rows_kernel). Same
// output bytes either way. Experimental: set through residtap::_set_staged_rows (ops.cpp) to
// measure it; off by default. The CPU implementation ignores it.
inline bool& staged_rows() {
  static thread_local bool staged = false;
  return staged;
}

inline std::string describe(const at::Tensor& t) {
  return cat(t.scalar_type(), " tensor of shape ", t.sizes(), " on ", t.device(),
             t.is_contiguous() ? "" : " (non-contiguous)");
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// kTorchLayerNorm: the same LayerNorm, but normed, mean and rstd come from torch's own
// native_layer_norm even where a backend could replay its arithmetic (the parity guard's choice
// when replay and the installed torch disagree; the CPU op always calls torch anyway).
enum class NormKind { kNone = 0, kLayerNorm = 1, kTorchLayerNorm = 2 };

inline NormKind parse_norm_kind(c10::string_view s) {
  if (s == "layer_norm") return NormKind::kLayerNorm;
  if (s == "torch_layer_norm") return NormKind::kTorchLayerNorm;
  if (s == "none") return NormKind::kNone;
  RESIDTAP_CHECK(false, "residtap.capture_block: argument 'norm_kind' expected one of "
                        "'layer_norm', 'torch_layer_norm', 'none', got '", s, "'");
}

// What every backend needs to know, after validation. Tensors are kept as given (outputs are
// written in place); `out`/`inp` have unit stride on the last dimension.
struct CaptureArgs {
  at::Tensor out, inp, index;  // inp/index undefined when absent
  at::Tensor weight, bias;     // undefined when absent
  NormKind norm = NormKind::kNone;
  double eps = 1e-5;
  at::Tensor resid, delta, normed, mean, rstd, l2, maxabs;  // undefined when not requested
  int64_t batch = 0, seq = 0, n_pos = 0, d_model = 0;
};

inline at::Tensor opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

inline void check_row_output(const at::Tensor& t, const char* name, const CaptureArgs& a) {
  if (!t.defined()) return;
  RESIDTAP_CHECK_ARG(t.device() == a.out.device(), name, cat("a tensor on ", a.out.device()),
                     describe(t));
  RESIDTAP_CHECK_ARG(is_float_type(t.scalar_type()), name,
                     "dtype float32, bfloat16 or float16", describe(t));
  RESIDTAP_CHECK_ARG(t.dim() == 3 && t.size(0) == a.batch && t.size(1) == a.n_pos &&
                         t.size(2) == a.d_model,
                     name, cat("shape [", a.batch, ", ", a.n_pos, ", ", a.d_model, "]"),
                     describe(t));
  RESIDTAP_CHECK_ARG(t.is_contiguous(), name, "a contiguous tensor", describe(t));
}

inline void check_stat_output(const at::Tensor& t, const char* name, const CaptureArgs& a) {
  if (!t.defined()) return;
  RESIDTAP_CHECK_ARG(t.device() == a.out.device(), name, cat("a tensor on ", a.out.device()),
                     describe(t));
  RESIDTAP_CHECK_ARG(t.scalar_type() == at::kFloat, name, "dtype float32", describe(t));
  RESIDTAP_CHECK_ARG(t.dim() == 2 && t.size(0) == a.batch && t.size(1) == a.n_pos, name,
                     cat("shape [", a.batch, ", ", a.n_pos, "]"), describe(t));
  RESIDTAP_CHECK_ARG(t.is_contiguous(), name, "a contiguous tensor", describe(t));
}

// Whether writing `w` may change what `t` holds: torch's own test where it can tell (both dense);
// else, conservatively, whether they share a storage and their byte extents meet.
inline bool may_overlap(const at::Tensor& w, const at::Tensor& t) {
  if (!w.defined() || !t.defined()) return false;
  switch (at::get_overlap_status(w, t)) {
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial: return true;
    case at::MemOverlapStatus::No: return false;
    case at::MemOverlapStatus::TooHard: break;
  }
  if (!w.has_storage() || !t.has_storage() || !w.storage().is_alias_of(t.storage())) return false;
  auto extent = [](const at::Tensor& x) {  // [first byte, one past the last byte]
    int64_t last = 0;
    for (int64_t d = 0; d < x.dim(); ++d) last += (x.size(d) - 1) * x.stride(d);
    const char* p = static_cast<const char*>(x.const_data_ptr());
    return std::make_pair(p, p + (last + 1) * static_cast<int64_t>(x.element_size()));
  };
  const auto [w0, w1] = extent(w);
  const auto [t0, t1] = extent(t);
  return w0 < t1 && t0 < w1;
}

// Outputs may share no memory with the inputs or with each other: the op reads its inputs while
// it writes, and each output is written by its own pass (torch's out= ops refuse the same).
inline void check_no_overlap(const CaptureArgs& a, const at::Tensor& out,
                             const std::optional<at::Tensor>& inp) {
  const std::pair<const char*, at::Tensor> outputs[] = {
      {"resid", a.resid}, {"delta", a.delta}, {"normed", a.normed}, {"mean", a.mean},
      {"rstd", a.rstd},   {"l2", a.l2},       {"maxabs", a.maxabs}};
  const std::pair<const char*, at::Tensor> inputs[] = {
      {"out", out}, {"inp", opt(inp)}, {"index", a.index}, {"norm_weight", a.weight},
      {"norm_bias", a.bias}};
  for (size_t i = 0; i < std::size(outputs); ++i) {
    const auto& [name, w] = outputs[i];
    if (!w.defined() || w.numel() == 0) continue;
    for (const auto& [other, t] : inputs)
      RESIDTAP_CHECK_ARG(!may_overlap(w, t), name, "memory of its own",
                         describe(w) + " sharing memory with '" + other + "'");
    for (size_t j = 0; j < i; ++j)
      RESIDTAP_CHECK_ARG(!may_overlap(w, outputs[j].second), name, "memory of its own",
                         describe(w) + " sharing memory with '" + outputs[j].first + "'");
  }
}

inline CaptureArgs make_capture_args(
    const at::Tensor& out, const std::optional<at::Tensor>& inp,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, c10::string_view norm_kind, double eps,
    const std::optional<at::Tensor>& resid, const std::optional<at::Tensor>& delta,
    const std::optional<at::Tensor>& normed, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& rstd, const std::optional<at::Tensor>& l2,
    const std::optional<at::Tensor>& maxabs) {
  CaptureArgs a;
  RESIDTAP_CHECK_ARG(out.dim() == 3 && out.size(2) > 0, "out",
                     "a [batch, seq, d_model] tensor with d_model >= 1", describe(out));
  RESIDTAP_CHECK_ARG(is_float_type(out.scalar_type()), "out",
                     "dtype float32, bfloat16 or float16", describe(out));
  // Rare layouts (a transposed hidden state) are made row-contiguous once; hook outputs of
  // every supported model already are.
  a.out = out.stride(2) == 1 ? out : out.contiguous();
  a.batch = out.size(0);
  a.seq = out.size(1);
  a.d_model = out.size(2);

  a.inp = opt(inp);
  if (a.inp.defined()) {
    RESIDTAP_CHECK_ARG(a.inp.sizes() == out.sizes() && a.inp.scalar_type() == out.scalar_type() &&
                           a.inp.device() == out.device(),
                       "inp", cat("the shape, dtype and device of 'out' (", describe(out), ")"),
                       describe(a.inp));
    if (a.inp.stride(2) != 1) a.inp = a.inp.contiguous();
  }

  a.index = opt(index);
  a.n_pos = a.seq;
  if (a.index.defined()) {
    RESIDTAP_CHECK_ARG(a.index.scalar_type() == at::kLong && a.index.device() == out.device(),
                       "index", cat("an int64 tensor on ", out.device()), describe(a.index));
    RESIDTAP_CHECK_ARG(a.index.dim() == 1 || (a.index.dim() == 2 && a.index.size(0) == a.batch),
                       "index", cat("shape [n_pos] or [", a.batch, ", n_pos]"),
                       describe(a.index));
    if (!a.index.is_contiguous()) a.index = a.index.contiguous();
    a.n_pos = a.index.size(-1);
  }

  a.norm = parse_norm_kind(norm_kind);
  a.eps = eps;
  a.weight = opt(norm_weight);
  a.bias = opt(norm_bias);
  auto check_norm_param = [&](const at::Tensor& t, const char* name) {
    if (!t.defined()) return;
    RESIDTAP_CHECK_ARG(t.dim() == 1 && t.size(0) == a.d_model && t.device() == out.device() &&
                           t.is_contiguous(),
                       name, cat("a contiguous [", a.d_model, "] tensor on ", out.device()),
                       describe(t));
    RESIDTAP_CHECK_ARG(t.scalar_type() == out.scalar_type(), name,
                       cat("the dtype of 'out' (", out.scalar_type(), ")"), describe(t));
  };
  check_norm_param(a.weight, "norm_weight");
  check_norm_param(a.bias, "norm_bias");

  a.resid = opt(resid);
  a.delta = opt(delta);
  a.normed = opt(normed);
  a.mean = opt(mean);
  a.rstd = opt(rstd);
  a.l2 = opt(l2);
  a.maxabs = opt(maxabs);
  check_row_output(a.resid, "resid", a);
  check_row_output(a.delta, "delta", a);
  check_row_output(a.normed, "normed", a);
  check_stat_output(a.mean, "mean", a);
  check_stat_output(a.rstd, "rstd", a);
  check_stat_output(a.l2, "l2", a);
  check_stat_output(a.maxabs, "maxabs", a);
  RESIDTAP_CHECK_ARG(!(a.normed.defined() && a.norm == NormKind::kNone), "normed",
                     "None when norm_kind is 'none'", describe(a.normed));
  check_no_overlap(a, out, inp);
  return a;
}

// Rows of x ([batch, seq] or [batch, seq, d]) at the selected positions of `a` (x itself when
// every position is selected): what backends use where they call torch for a step.
inline at::Tensor gather_positions(const at::Tensor& x, const CaptureArgs& a) {
  if (!a.index.defined()) return x;
  if (a.index.dim() == 1) return x.index_select(1, a.index);
  if (x.dim() == 2) return x.gather(1, a.index);
  return x.gather(1, a.index.unsqueeze(-1).expand({a.batch, a.n_pos, x.size(2)}));
}

}  // namespace residtap
