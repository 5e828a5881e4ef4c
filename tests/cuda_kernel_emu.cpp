// The fused CUDA kernels themselves (csrc/cuda/rows_kernels.cuh), compiled for the CPU and run
// with CUDA's built-ins emulated, against host-side expectations. For machines without a GPU.
//
// Each emulated block is 128 cooperative threads (ucontext fibers on one OS thread, switched only
// where a thread must wait) running the kernel function as written: threadIdx and blockIdx are set
// for the running fiber, __shared__ variables are function statics (one block runs at a time),
// __syncthreads() is a barrier of the block, and warp shuffles meet at a barrier of the warp (lock
// step). Which thread goes on after a barrier is the schedule's choice (round robin, or a strict
// priority that lets some threads run ahead of the others up to the next block barrier), varied
// over the configurations, so that a barrier missing between a shared read and the next write
// shows; a barrier that can never open (one some threads skip) is reported as a deadlock. Loads
// and stores are plain memory accesses; the round-to-nearest intrinsics are IEEE float operations
// (-ffp-contract=off); c10::BFloat16 / c10::Half convert on the host exactly as on the device
// (round to nearest even).
//
// Checked, per configuration (model dtype × capture dtype × width × rows × position index × norm
// parameters × with/without the block input), against values computed here independently:
//   resid, delta       bit for bit (a cast of out, its very bits in the model dtype, NaN payloads
//                      included; out - inp rounded to the model dtype, then cast)
//   maxabs             bit for bit
//   l2                 within 2 ulp of a float64 sum (the contract's tolerance)
//   mean, rstd, normed bit for bit against a direct transcription of torch's CUDA LayerNorm order
//                      (as in cuda_order_sim.cpp; rsqrtf is 1/sqrtf on both sides here)
// and every output row written (buffers start as NaN). The expected mean and rstd use a Welford
// update and merge written out again from GPU.md (torch_ln_order.h), not the kernels' own. inp is
// laid out like out in some configurations and sequence-major in others. This covers the kernels'
// indexing (teams, units, the row gather and out's and inp's own strides, partial and empty virtual
// threads), both kernels' control flow, barriers and warp shuffles (every lane takes part, and
// the mask says so), and the order of their arithmetic; and the launcher's choices
// (rows_choice.cuh: which kernel is legal for which pointers and strides, K, the grid) against a
// table; rows whose offsets are past 2^32 elements (64-bit indexing). Not covered: the GPU's own
// arithmetic, memory model and speed, the launches themselves (rows_impl.cuh) and the host side
// (capture_cuda.cpp), which tests/test_cuda.py covers on a GPU.
//
// Output: "configs N failures M"; exit status 1 if M > 0.
#include <cuda_runtime.h>  // vector types (uint2, uint4), cudaStream_t; host-compilable

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#undef __device__
#undef __host__
#undef __global__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__ static  // one emulated block at a time: its shared memory
#define __launch_bounds__(...)

// ---------------------------------------------------------------- CUDA built-ins, emulated
struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
EmuDim threadIdx, blockIdx, gridDim, blockDim;  // threadIdx: the running fiber's

#include "host_intrinsics.h"

static inline uint4 __ldg(const uint4* p) { return *p; }
static inline uint2 __ldg(const uint2* p) { return *p; }
static inline void __stcs(uint4* p, uint4 v) { *p = v; }
static inline void __stcs(uint2* p, uint2 v) { *p = v; }

// Fibers: the scheduler resumes each unfinished fiber in turn; a fiber runs until it waits at a
// barrier (or ends). A barrier opens when all its members have arrived.
struct AsyncCopy {
  void* dst;
  const void* src;
};
struct Barrier;
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned tid = 0;
  bool done = false;
  const Barrier* waits_on = nullptr;  // the barrier this fiber waits at, and its generation then
  unsigned wait_generation = 0;
  std::vector<AsyncCopy> open;                  // cp.async issued since the last commit
  std::vector<std::vector<AsyncCopy>> groups;   // committed, not yet waited for (oldest first)
};
static ucontext_t g_sched;
static Fiber* g_fiber = nullptr;

static void yield_to_scheduler() { swapcontext(&g_fiber->ctx, &g_sched); }

// How the scheduler picks the next fiber (see launch):
//   kRoundRobin  each runnable fiber in turn, 0 to 127; the last to arrive at a barrier goes on
//                without yielding, up to its next wait, and the others then resume in order from 0
//                (so thread 0 reads what a barrier guards before any but the last arriver runs
//                ahead: a missing barrier after such a read goes unseen here);
//   kPriority    always the first runnable fiber of a priority order (a permutation of 0..127),
//                and every arrival yields, the last one too: the highest-priority threads run as
//                far as they can (through warp-level exchanges, up to the next block barrier)
//                before the others move at all. With thread 0 last in the order, a shared value
//                that thread 0 reads after a barrier and others rewrite before the next one is
//                overwritten before thread 0 reads it (a missing barrier shows).
enum class Schedule { kRoundRobin, kPriority };
static Schedule g_schedule = Schedule::kRoundRobin;

struct Barrier {
  int members, arrived = 0;
  unsigned generation = 0;
  explicit Barrier(int n) : members(n) {}
  void arrive_and_wait() {
    const unsigned gen = generation;
    if (++arrived == members) {
      arrived = 0;
      ++generation;
      if (g_schedule == Schedule::kRoundRobin) return;
      yield_to_scheduler();  // runnable: the scheduler decides who goes on first
    } else {
      g_fiber->waits_on = this;
      g_fiber->wait_generation = gen;
      yield_to_scheduler();  // resumed only once the barrier has opened
      g_fiber->waits_on = nullptr;
    }
    threadIdx.x = g_fiber->tid;  // another fiber ran meanwhile
  }
};
static bool runnable(const Fiber& f) {
  return !f.done && (f.waits_on == nullptr || f.waits_on->generation != f.wait_generation);
}

struct WarpEx {
  uint64_t slot[32];
  Barrier bar{32};
};
struct BlockEmu {
  Barrier bar{128};
  WarpEx warps[4];
};
BlockEmu* g_block = nullptr;

static inline void __syncthreads() { g_block->bar.arrive_and_wait(); }

template <typename T>
static T warp_exchange(T v, int src_of(int lane, int arg), int arg) {
  static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
  const int lane = static_cast<int>(threadIdx.x % 32);
  WarpEx& w = g_block->warps[threadIdx.x / 32];
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  w.slot[lane] = raw;
  w.bar.arrive_and_wait();
  const int src = src_of(lane, arg);
  T r = v;
  if (src >= 0 && src < 32) std::memcpy(&r, &w.slot[src], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}
static int down_src(int lane, int d) { return lane + d; }  // past lane 31: own value
static int xor_src(int lane, int m) { return lane ^ m; }
// Every lane of a warp takes part in every exchange (a lane that does not deadlocks the warp's
// barrier), so the mask must name them all: on the GPU a lane missing from it is not waited for.
static std::string g_launch_error;  // what the last launch did wrong ("" if nothing)
static void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) g_launch_error = "a warp shuffle whose mask leaves lanes out";
}
template <typename T>
static T __shfl_down_sync(unsigned mask, T v, int d) {
  check_mask(mask);
  return warp_exchange(v, down_src, d);
}
template <typename T>
static T __shfl_xor_sync(unsigned mask, T v, int m) {
  check_mask(mask);
  return warp_exchange(v, xor_src, m);
}

// cp.async, deferred: a copy lands in shared memory only when its thread waits for its group, so a
// stage read before its wait (or refilled while still needed) gives wrong outputs here. The stage
// memory starts each block filled with a poison byte, and a guard zone past its end must stay
// untouched.
static std::vector<unsigned char> g_stage;  // the launch's dynamic shared memory + guard
static size_t g_stage_bytes = 0;
constexpr size_t kStageGuard = 256;
constexpr unsigned char kPoison = 0x5a;
static int g_async_copies = 0;  // copies performed (a staged run that performed none is a failure)

static void async_copy16(void* dst, const void* src) {
  const auto* d = static_cast<unsigned char*>(dst);
  if (d < g_stage.data() || d + 16 > g_stage.data() + g_stage_bytes) {
    g_launch_error = "cp.async outside the stage memory";
    return;
  }
  g_fiber->open.push_back({dst, src});
}
static void async_commit() {
  g_fiber->groups.push_back(std::move(g_fiber->open));
  g_fiber->open.clear();
}
template <int N>
static void async_wait() {
  auto& groups = g_fiber->groups;
  while (groups.size() > static_cast<size_t>(N)) {
    for (const AsyncCopy& c : groups.front()) {
      std::memcpy(c.dst, c.src, 16);
      ++g_async_copies;
    }
    groups.erase(groups.begin());
  }
}
static uint4* stage_memory() { return reinterpret_cast<uint4*>(g_stage.data()); }

#define RESIDTAP_KERNEL_EMU 1
#include "rows_kernels.cuh"
#include "rows_choice.cuh"
#include "torch_ln_order.h"

using namespace residtap::cuda_impl;
using BF16 = c10::BFloat16;
using F16 = c10::Half;

// Runs kernel() as a grid of `grid` blocks of 128 threads, one block after the other.
static const std::function<void()>* g_kernel = nullptr;

static void fiber_main() {
  (*g_kernel)();
  g_fiber->done = true;
  swapcontext(&g_fiber->ctx, &g_sched);  // never resumed
}

static std::vector<int> g_priority;  // kPriority's order of the 128 threads, highest first

// Blocks `first` to `first + grid - 1` of a grid of `first + grid` blocks (first > 0: the blocks
// before are not run, for rows far into a launch whose earlier ones the emulation does not hold).
static void launch(int grid, const std::function<void()>& kernel, size_t stage_bytes = 0, unsigned first = 0) {
  g_stage_bytes = stage_bytes;
  g_launch_error.clear();
  g_stage.assign(stage_bytes + kStageGuard, kPoison);
  gridDim.x = first + grid;
  blockDim.x = kBlock;
  g_kernel = &kernel;
  for (unsigned b = first; b < first + grid; ++b) {
    BlockEmu block;
    g_block = &block;
    std::fill(g_stage.begin(), g_stage.begin() + static_cast<std::ptrdiff_t>(stage_bytes), kPoison);
    blockIdx.x = b;
    static std::vector<Fiber> fibers(kBlock);  // stacks allocated once, reused by every block
    for (int t = 0; t < kBlock; ++t) {
      Fiber& f = fibers[t];
      f.tid = t;
      f.done = false;
      f.waits_on = nullptr;
      f.open.clear();
      f.groups.clear();
      if (f.stack.empty()) f.stack.resize(256 * 1024);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
    auto resume = [&](Fiber& f) {
      g_fiber = &f;
      threadIdx.x = f.tid;
      swapcontext(&g_sched, &f.ctx);
    };
    for (;;) {  // until every fiber has ended, or none can go on (a deadlock: a barrier never opens)
      bool ran = false, live = false;
      if (g_schedule == Schedule::kRoundRobin) {
        for (Fiber& f : fibers) {
          if (runnable(f)) {
            resume(f);
            ran = true;
          }
          live = live || !f.done;
        }
      } else {
        for (int t : g_priority) {
          live = live || !fibers[t].done;
          if (runnable(fibers[t])) {
            resume(fibers[t]);
            ran = live = true;
            break;
          }
        }
      }
      if (!live) break;
      if (!ran) {
        g_launch_error = "block " + std::to_string(b) + ": deadlock, threads wait at a barrier that "
                         "cannot open (a __syncthreads or shuffle some threads of the block or warp skip)";
        return;
      }
    }
    for (const Fiber& f : fibers) {  // copies still in flight at exit were fetched for nothing
      for (const auto& group : f.groups) {
        if (!group.empty() || !f.open.empty()) {
          g_launch_error = "block " + std::to_string(b) + " thread " + std::to_string(f.tid) +
                           " ended with copies never waited for";
        }
      }
    }
    for (size_t i = stage_bytes; i < g_stage.size(); ++i) {
      if (g_stage[i] != kPoison) g_launch_error = "write past the stage memory";
    }
  }
}

// ---------------------------------------------------------------- expectations (independent)
template <typename T>
static float f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
static bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

static int ulp_diff(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::abs(ia - ib);
}

struct Config {
  int batch, seq, d;
  int index_kind;  // 0 none, 1 [n_pos], 2 [batch, n_pos]
  bool with_inp, with_w, with_b, with_normed, with_stats;
  int seq_pad;     // extra rows between batches (strided out/inp)
  int grid;        // emulated blocks (the kernels loop over the rest)
  bool generic;    // run generic_rows_kernel instead of the fast one
  float centre;
  bool vec = false;  // generic kernel: whole 4-element vectors
  bool nans = false;  // plant NaNs with a sign and payload in out: resid/delta must keep their bits
  bool staged = false;  // the fast kernel's staged variant (rows through shared memory)
  bool constant = false;  // every element 2.5 and negative weights: x == mean, so torch's normed is -0
  // inp in a layout of its own: [seq, batch, d + 8] (sequence-major, rows 8 elements apart), where
  // out is [batch, seq + seq_pad, d]; the kernels must take inp's offsets from inp's strides
  bool inp_other = false;
  int schedule = 0;  // 0: round robin; 1: priority, thread 127 first and 0 last; 2: priority, shuffled
  // Rows this far into the launch (a multiple of 128 and of the positions per sequence): the rows
  // held here are rows far.. of the kernel's, their offsets in every tensor past 2^32 elements, so
  // that an offset computed in 32 bits shows. The pointers given to the kernel are the buffers'
  // minus those offsets (never dereferenced there).
  int64_t far = 0;
};

// NaN bit patterns a trip through float would not give back (c10 makes every bfloat16 NaN 0x7fc0).
template <typename T>
static void plant_nans(std::vector<T>& v) {
  const uint32_t f32_nans[] = {0xffffffffu, 0x7fc00001u, 0x7f800001u};
  const uint16_t b16_nans[] = {0xffffu, 0x7fc1u, 0xff81u};
  const uint16_t f16_nans[] = {0xffffu, 0x7e01u, 0xfe01u};
  for (size_t k = 0; 37 * k < v.size(); ++k) {
    const size_t i = 37 * k;
    if constexpr (sizeof(T) == 4) {
      std::memcpy(&v[i], &f32_nans[k % 3], 4);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      std::memcpy(&v[i], &b16_nans[k % 3], 2);
    } else {
      std::memcpy(&v[i], &f16_nans[k % 3], 2);
    }
  }
}

template <typename InT, typename OutT, int K>
static void run_kernel(const Config& c, const Params& p) {
  // Far rows: one block per row (group) from the first row held, none before it.
  const int64_t per_block = c.generic ? 1 : FastLayout<sizeof(InT), K>::kTeams;
  const unsigned first = static_cast<unsigned>(c.far / per_block);
  const int grid = c.far ? static_cast<int>((p.rows - c.far + per_block - 1) / per_block) : c.grid;
  if (c.generic) {
    launch(grid, [&] { generic_rows_kernel<InT, OutT>(p); }, 0, first);
  } else if (c.staged) {
    launch(grid, [&] { fast_rows_kernel<InT, OutT, K, true>(p); }, staged_smem_bytes<InT, K>(p), first);
  } else {
    launch(grid, [&] { fast_rows_kernel<InT, OutT, K>(p); }, 0, first);
  }
}

// The launcher's K (rows_choice.cuh, as launch_rows uses it). A configuration of the fast kernel
// must be one the launcher may give it, and the generic kernel's whole vectors too (configurations
// may run the generic kernel where the launcher would pick the fast one: the kernel must be right
// there as well).
template <typename InT, typename OutT>
static std::string run_dispatch(const Config& c, const Params& p) {
  if (!c.generic && !fast_kernel_fits<InT, OutT>(p)) return "a fast-kernel configuration it does not fit";
  if (c.generic && c.vec && !generic_vec_fits<InT, OutT>(p)) return "vec where the launcher would not";
  switch (fast_k(c.d)) {
    case 1: run_kernel<InT, OutT, 1>(c, p); break;
    case 2: run_kernel<InT, OutT, 2>(c, p); break;
    case 4: run_kernel<InT, OutT, 4>(c, p); break;
    case 8: run_kernel<InT, OutT, 8>(c, p); break;
    default: run_kernel<InT, OutT, 16>(c, p); break;
  }
  return "";
}

template <typename InT, typename OutT>
static std::string check(const Config& c, std::mt19937& rng) {
  const int d = c.d, sstride = d, bstride = (c.seq + c.seq_pad) * d;
  const int64_t inp_sb = c.inp_other ? d + 8 : bstride, inp_ss = c.inp_other ? int64_t{c.batch} * (d + 8) : sstride;
  std::normal_distribution<float> dist(c.centre, 3.f);
  std::vector<InT> out(static_cast<size_t>(c.batch) * bstride + 8);
  std::vector<InT> inp(c.inp_other ? static_cast<size_t>(c.seq * inp_ss + 8) : out.size());
  for (auto& v : out) v = static_cast<InT>(dist(rng));
  for (auto& v : inp) v = static_cast<InT>(dist(rng));
  if (c.nans) plant_nans(out);
  std::vector<InT> w(d + 8), b(d + 8);
  for (auto& v : w) v = static_cast<InT>(1.f + 0.5f * dist(rng) / 3.f - c.centre / 6.f);
  for (auto& v : b) v = static_cast<InT>(0.1f * dist(rng));
  if (c.constant) {
    std::fill(out.begin(), out.end(), static_cast<InT>(2.5f));
    for (auto& v : w) v = static_cast<InT>(-std::fabs(static_cast<float>(v)) - 0.25f);
  }
  // position index
  std::vector<int64_t> index;
  int n_pos = c.seq;
  std::uniform_int_distribution<int> pick(0, c.seq - 1);
  if (c.index_kind == 1) {
    n_pos = 5;
    for (int i = 0; i < n_pos; ++i) index.push_back(pick(rng));
  } else if (c.index_kind == 2) {
    n_pos = 3;
    for (int i = 0; i < c.batch * n_pos; ++i) index.push_back(pick(rng));
  }
  const int64_t rows = static_cast<int64_t>(c.batch) * n_pos;
  const OutT nan_out = static_cast<OutT>(NAN);
  std::vector<OutT> resid(rows * d, nan_out), delta(rows * d, nan_out), normed(rows * d, nan_out);
  std::vector<float> mean(rows, NAN), rstd(rows, NAN), l2(rows, NAN), maxabs(rows, NAN);

  Params p{};
  p.out = out.data();
  p.inp = c.with_inp ? inp.data() : nullptr;
  p.index = index.empty() ? nullptr : index.data();
  p.weight = c.with_normed && c.with_w ? w.data() : nullptr;
  p.bias = c.with_normed && c.with_b ? b.data() : nullptr;
  p.resid = resid.data();
  p.delta = delta.data();
  p.normed = c.with_normed ? normed.data() : nullptr;
  p.mean = c.with_stats ? mean.data() : nullptr;
  p.rstd = c.with_stats ? rstd.data() : nullptr;
  p.l2 = l2.data();
  p.maxabs = maxabs.data();
  p.rows = rows;
  p.n_pos = n_pos;
  p.seq = c.seq;
  p.out_sb = bstride;
  p.out_ss = sstride;
  p.inp_sb = inp_sb;
  p.inp_ss = inp_ss;
  p.d = d;
  p.index_2d = c.index_kind == 2;
  p.eps = 1e-5f;
  p.welford = c.with_normed || c.with_stats;
  p.bias_only = p.bias != nullptr && p.weight == nullptr;
  p.vec = c.vec;
  if (c.far) {  // the buffers hold rows far.. (see Config::far)
    if (c.far % n_pos != 0 || c.far % 128 != 0 || c.inp_other) return "a far configuration out of its bounds";
    const int64_t b0 = c.far / n_pos;
    auto back = [](auto* ptr, int64_t elems) {  // ptr - elems, as an address (never dereferenced)
      using T = std::remove_pointer_t<decltype(ptr)>;
      return ptr == nullptr ? ptr : reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(ptr) - elems * sizeof(T));
    };
    p.out = back(out.data(), b0 * bstride);
    p.inp = c.with_inp ? back(inp.data(), b0 * inp_sb) : nullptr;
    if (c.index_kind == 2) p.index = back(index.data(), c.far);
    p.resid = back(resid.data(), c.far * d);
    p.delta = back(delta.data(), c.far * d);
    p.normed = back(static_cast<OutT*>(p.normed), c.far * d);
    for (float** stat : {&p.mean, &p.rstd, &p.l2, &p.maxabs}) *stat = back(*stat, c.far);
    p.rows = c.far + rows;
  }
  g_schedule = c.schedule == 0 ? Schedule::kRoundRobin : Schedule::kPriority;
  g_priority.resize(kBlock);
  for (int t = 0; t < kBlock; ++t) g_priority[t] = kBlock - 1 - t;
  if (c.schedule == 2) std::shuffle(g_priority.begin(), g_priority.end(), rng);
  g_async_copies = 0;
  if (std::string err = run_dispatch<InT, OutT>(c, p); !err.empty()) return err;
  if (!g_launch_error.empty()) return g_launch_error;
  if (c.staged && rows > 0 && g_async_copies == 0) return "staged run copied nothing";

  std::vector<float> xrow(d);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bb = r / n_pos, pos = r % n_pos;
    const int64_t s = c.index_kind == 0 ? pos : index[c.index_kind == 1 ? pos : r];
    const InT* x = out.data() + bb * bstride + s * sstride;
    const InT* xi = inp.data() + bb * inp_sb + s * inp_ss;
    double sum = 0.0;
    float mx = 0.f;
    bool row_nan = false;
    for (int e = 0; e < d; ++e) {
      xrow[e] = f32(x[e]);
      sum += static_cast<double>(xrow[e]) * xrow[e];
      mx = std::fmax(mx, std::fabs(xrow[e]));
      // Tensor.to(dtype): the same bits in the model dtype (a NaN keeps its payload), else the cast.
      OutT want_r;
      if constexpr (std::is_same_v<InT, OutT>) {
        want_r = x[e];
      } else {
        want_r = static_cast<OutT>(xrow[e]);
      }
      if (!same_bits(resid[r * d + e], want_r)) return "resid at row " + std::to_string(r);
      if (std::isnan(xrow[e])) {
        row_nan = true;
        // a computed NaN's payload is the arithmetic's (the GPU's conversions differ from c10's host
        // ones): only NaN-ness is checked for it
        if (c.with_inp ? !std::isnan(f32(delta[r * d + e])) : !same_bits(delta[r * d + e], want_r))
          return "delta (NaN) at row " + std::to_string(r);
        continue;
      }
      const OutT want_d = c.with_inp ? static_cast<OutT>(f32(static_cast<InT>(xrow[e] - f32(xi[e]))))
                                     : want_r;
      if (!same_bits(delta[r * d + e], want_d)) return "delta at row " + std::to_string(r);
    }
    if (row_nan) {  // every per-token result of the row is NaN
      if (!std::isnan(maxabs[r]) || !std::isnan(l2[r])) return "maxabs/l2 (NaN) at row " + std::to_string(r);
      if (c.with_stats && (!std::isnan(mean[r]) || !std::isnan(rstd[r])))
        return "mean/rstd (NaN) at row " + std::to_string(r);
      if (c.with_normed) {
        for (int e = 0; e < d; ++e)
          if (!std::isnan(f32(normed[r * d + e]))) return "normed (NaN) at row " + std::to_string(r);
      }
      continue;
    }
    if (!same_bits(maxabs[r], mx)) return "maxabs at row " + std::to_string(r);
    if (!(ulp_diff(l2[r], static_cast<float>(std::sqrt(sum))) <= 2)) return "l2 at row " + std::to_string(r);
    if (!p.welford) continue;
    float m, rs;
    torch_ln_moments(xrow.data(), d, p.eps, m, rs);
    if (c.with_stats && (!same_bits(mean[r], m) || !same_bits(rstd[r], rs)))
      return "mean/rstd at row " + std::to_string(r);
    if (!c.with_normed) continue;
    for (int e = 0; e < d; ++e) {
      const float xm = xrow[e] - m;
      float y;
      if (p.bias_only) {  // torch's machine code: element 0 of each 4-vector unfused (ln_arith.cuh)
        y = e % 4 == 0 ? rs * xm + f32(b[e]) : std::fmaf(rs, xm, f32(b[e]));
      } else {
        y = std::fmaf(p.weight ? f32(w[e]) : 1.f, rs * xm, p.bias ? f32(b[e]) : -0.f);
      }
      const OutT want = static_cast<OutT>(f32(static_cast<InT>(y)));
      if (!same_bits(normed[r * d + e], want)) return "normed at row " + std::to_string(r);
    }
  }
  return "";
}

// The launcher's choices (rows_choice.cuh) against a table written out by hand: the fast kernel
// wherever its 16-byte units are legal, the generic kernel's 4-element vectors wherever theirs are,
// K and the grid. A wrong "yes" is a misaligned access on the GPU; a wrong "no", the slow kernel.
struct Choice {
  const char* what;
  bool fast, vec;  // expected: fast_kernel_fits, generic_vec_fits
};
template <typename InT, typename OutT>
static int check_choice(const Choice& want, const Params& p) {
  const bool fast = fast_kernel_fits<InT, OutT>(p), vec = generic_vec_fits<InT, OutT>(p);
  if (fast == want.fast && vec == want.vec) return 0;
  std::printf("FAIL choice %s: fast %d vec %d, expected %d %d\n", want.what, fast, vec, want.fast, want.vec);
  return 1;
}

static int check_choices(int& configs) {
  alignas(64) static unsigned char mem[1 << 16];
  // Every pointer 16-byte aligned, rows d apart (sequences of 3), whatever the dtypes.
  auto base = [&](int d) {
    Params p{};
    p.out = mem;
    p.inp = mem + 16384;
    p.weight = mem + 32768;
    p.bias = mem + 36864;
    p.resid = mem + 40960;
    p.delta = mem + 49152;
    p.normed = mem + 57344;
    p.d = d;
    p.out_sb = p.inp_sb = 3 * d;
    p.out_ss = p.inp_ss = d;
    return p;
  };
  int failures = 0;
  auto f32 = [&](const Choice& want, const Params& p) {
    ++configs;
    failures += check_choice<float, float>(want, p);
  };
  auto b16 = [&](const Choice& want, const Params& p) {
    ++configs;
    failures += check_choice<BF16, BF16>(want, p);
  };
  auto b16f = [&](const Choice& want, const Params& p) {
    ++configs;
    failures += check_choice<BF16, float>(want, p);
  };
  Params p = base(64);
  f32({"float d=64 aligned", true, true}, p);
  f32({"float d=8192 (widest fast)", true, true}, base(8192));
  f32({"float d=8196 (past the fast kernel)", false, true}, base(8196));
  f32({"float d=66 (not whole 4-vectors)", false, false}, base(66));
  f32({"float d=0", false, false}, base(0));
  b16({"bf16 d=64", true, true}, base(64));
  b16({"bf16 d=68 (not whole 16-byte units)", false, true}, base(68));
  b16({"bf16 d=70", false, false}, base(70));
  p = base(64);
  p.out = mem + 4;  // one float off
  f32({"out one element off", false, false}, p);
  p = base(64);
  p.out = mem + 8;  // two floats off: 8-byte aligned, not 16
  f32({"out two elements off", false, false}, p);
  p = base(64);
  p.out = mem + 8;  // four bf16 off: a 4-vector (8 bytes) is aligned, a 16-byte unit is not
  b16({"bf16 out four elements off", false, true}, p);
  p = base(64);
  p.inp = mem + 16384 + 4;
  f32({"inp one element off", false, false}, p);
  p = base(64);
  p.inp = nullptr;  // no inp: its (unaligned) strides do not matter
  p.inp_sb = p.inp_ss = 1;
  f32({"no inp", true, true}, p);
  p = base(64);
  p.out_ss = 66;  // rows two floats apart from 16-byte units
  f32({"out seq stride 66", false, false}, p);
  p = base(64);
  p.out_sb = 3 * 64 + 2;
  f32({"out batch stride +2", false, false}, p);
  p = base(64);
  p.inp_ss = 66;
  f32({"inp seq stride 66", false, false}, p);
  p = base(64);
  p.inp_sb = 1;
  f32({"inp batch stride 1", false, false}, p);
  p = base(64);
  p.out_ss = 68;  // whole 4-vectors of bf16, not whole 16-byte units
  b16({"bf16 out seq stride 68", false, true}, p);
  p = base(64);
  p.resid = mem + 40960 + 4;
  f32({"resid one element off", false, false}, p);
  p = base(64);
  p.delta = mem + 49152 + 8;
  f32({"delta two elements off", false, false}, p);
  p = base(64);
  p.normed = mem + 57344 + 4;
  f32({"normed one element off", false, false}, p);
  p = base(64);
  p.resid = mem + 40960 + 16;  // bf16 -> float: 8 floats are 32 bytes, aligned to 16
  b16f({"bf16->float resid 16 bytes off", true, true}, p);
  p = base(64);
  p.resid = mem + 40960 + 8;  // two floats: neither 8 nor 4 float outputs are 16-byte aligned
  b16f({"bf16->float resid 8 bytes off", false, false}, p);
  p = base(64);
  p.resid = mem + 40960 + 8;  // four bf16: a 4-vector (8 bytes) is aligned, a 16-byte unit is not
  b16({"bf16 resid 8 bytes off", false, true}, p);
  p = base(64);
  p.weight = mem + 32768 + 4;  // normed requested: the weight is read in units too
  f32({"weight one element off", false, false}, p);
  p = base(64);
  p.bias = mem + 36864 + 8;
  f32({"bias two elements off", false, false}, p);
  p = base(64);
  p.normed = nullptr;  // no normed: no kernel reads the weights, but only the fast kernel's check
                       // leaves them out (the generic one's is stricter: its slower path at worst)
  p.weight = mem + 32768 + 4;
  f32({"weight off without normed", true, false}, p);
  // K: the smallest of 1, 2, 4, 8, 16 with K * 128 4-vectors >= d / 4
  const int widths[] = {8, 512, 520, 1024, 1032, 2048, 2056, 4096, 4104, 8192};
  const int ks[] = {1, 1, 2, 2, 4, 4, 8, 8, 16, 16};
  for (int i = 0; i < 10; ++i) {
    ++configs;
    if (fast_k(widths[i]) != ks[i]) {
      std::printf("FAIL choice K at d=%d: %d, expected %d\n", widths[i], fast_k(widths[i]), ks[i]);
      ++failures;
    }
  }
  const int64_t grids[][3] = {{0, 0, 1}, {5, 0, 5}, {5, 3, 3}, {3, 5, 3}, {int64_t{1} << 40, 0, 2147483647},
                              {int64_t{1} << 40, 1000, 1000}};
  for (const auto& g : grids) {
    ++configs;
    if (grid_for(g[0], g[1]) != g[2]) {
      std::printf("FAIL choice grid_for(%lld, %lld) = %lld, expected %lld\n", static_cast<long long>(g[0]),
                  static_cast<long long>(g[1]), static_cast<long long>(grid_for(g[0], g[1])),
                  static_cast<long long>(g[2]));
      ++failures;
    }
  }
  return failures;
}

int main() {
  std::mt19937 rng(7);
  int configs = 0, failures = 0;
  failures += check_choices(configs);
  auto report = [&](const char* types, const Config& c, const std::string& err) {
    ++configs;
    if (err.empty()) return;
    ++failures;
    std::printf("FAIL %s d=%d batch=%d seq=%d index=%d inp=%d w=%d b=%d normed=%d stats=%d pad=%d "
                "grid=%d generic=%d vec=%d staged=%d inp_other=%d schedule=%d far=%lld: %s\n", types, c.d, c.batch,
                c.seq, c.index_kind, c.with_inp, c.with_w, c.with_b, c.with_normed, c.with_stats, c.seq_pad,
                c.grid, c.generic, c.vec, c.staged, c.inp_other, c.schedule, static_cast<long long>(c.far),
                err.c_str());
  };
  // Fast-kernel widths for every K (1: 8-512, 2: 768, 1000, 4: 1600, 8: 3072, 16: 4104, 8192) and
  // for both unit sizes, tiny widths (mostly empty virtual threads), each with and without staging
  // (grids of 1 or 2 blocks: each block loops over several row groups, so both stages are filled
  // and refilled); generic-kernel widths (16-bit % 8 != 0; above 8192).
  const int fast_widths[] = {8, 64, 72, 200, 768, 1000, 1600, 3072, 4104, 8192};
  int variant = 0;
  // Every configuration also gets a schedule and an inp layout, varied with the others.
  auto vary = [&](Config& c) {
    c.schedule = (variant / 2) % 3;
    c.inp_other = (variant / 5) % 2 == 1;
  };
  for (bool staged : {false, true})
  for (int d : fast_widths) {
    for (int index_kind = 0; index_kind < 3; ++index_kind) {
      for (int rows_case = 0; rows_case < 2; ++rows_case) {
        ++variant;
        Config c{rows_case ? 3 : 1, rows_case ? 13 : 1, d, index_kind,
                 variant % 3 != 0,  // inp
                 variant % 4 != 1,  // weight
                 variant % 5 != 2,  // bias
                 variant % 6 != 3,  // normed
                 variant % 7 != 4,  // stats
                 rows_case ? 2 : 0, variant % 2 + 1, false, variant % 2 ? 30.f : 0.f};
        vary(c);
        c.staged = staged;
        if (index_kind != 0 && c.seq == 1) c.seq = 4;
        report("float->float", c, check<float, float>(c, rng));
        if (d % 8 == 0) {
          report("bf16->bf16", c, check<BF16, BF16>(c, rng));
          report("f16->f16", c, check<F16, F16>(c, rng));
          report("bf16->float", c, check<BF16, float>(c, rng));
        }
        report("float->bf16", c, check<float, BF16>(c, rng));
      }
    }
  }
  const int generic_widths[] = {64, 68, 100, 8196, 12288};
  for (int d : generic_widths) {
    for (int index_kind = 0; index_kind < 3; ++index_kind) {
      for (bool vec : {false, true}) {
        ++variant;
        Config c{2, 6, d, index_kind, variant % 2 == 0, variant % 4 != 1, variant % 3 != 0, true,
                 true, 1, variant % 2 + 1, true, 30.f, vec};
        vary(c);
        report("float->float generic", c, check<float, float>(c, rng));
        report("bf16->bf16 generic", c, check<BF16, BF16>(c, rng));
        report("f16->float generic", c, check<F16, float>(c, rng));
      }
    }
  }
  // Generic widths that are not whole vectors: the scalar tail of the row pass (resid, delta, l2,
  // maxabs). The host never asks the kernels for normed, mean or rstd at such widths: torch takes its
  // other LayerNorm path there, and capture_cuda.cpp calls torch's own for them.
  for (int d : {5, 70, 8197}) {
    for (int index_kind = 0; index_kind < 3; ++index_kind) {
      for (bool with_inp : {false, true}) {
        ++variant;
        Config c{2, 6, d, index_kind, with_inp, true, true, false, false, 1, variant % 2 + 1, true, 30.f,
                 false};
        vary(c);
        report("float->float generic tail", c, check<float, float>(c, rng));
        report("bf16->bf16 generic tail", c, check<BF16, BF16>(c, rng));
        report("f16->float generic tail", c, check<F16, float>(c, rng));
      }
    }
  }
  // Rows equal to their mean with negative weights and no bias: torch's normed is -0 there, which a
  // +0 default bias would turn into +0. Both kernels.
  for (int d : {64, 68}) {
    ++variant;
    Config c{2, 5, d, 0, true, true, false, true, true, 0, 1, d % 8 != 0, 0.f, false};
    vary(c);
    c.constant = true;
    report("float->float constant", c, check<float, float>(c, rng));
    report("bf16->float constant", c, check<BF16, float>(c, rng));
    if (d % 8 == 0) report("bf16->bf16 constant", c, check<BF16, BF16>(c, rng));
  }
  // NaNs with a payload, in both kernels, each dtype kept and widened.
  for (int d : {64, 768, 68, 8196}) {
    for (bool with_inp : {false, true}) {
      ++variant;
      Config c{2, 9, d, variant % 3, with_inp, true, true, true, true, 1, 2, d % 8 != 0 || d > 8192,
               0.f, false, true};
      vary(c);
      c.staged = !c.generic && with_inp;  // the fast kernel: staged with inp, plain without
      report("float->float nan", c, check<float, float>(c, rng));
      report("bf16->bf16 nan", c, check<BF16, BF16>(c, rng));
      report("f16->f16 nan", c, check<F16, F16>(c, rng));
      report("bf16->float nan", c, check<BF16, float>(c, rng));
    }
  }
  // Shared results read after a barrier and rewritten for the next row (group): l2 and maxabs of a
  // team wider than a warp (fast kernel, wide rows) and of the generic kernel's block. Without the
  // moments (no normed, no stats) no barrier of the merge tree comes between the read and the next
  // write, so only the kernels' own barrier keeps them apart; the priority schedules let the other
  // threads reach that write first. One block, several rows or groups.
  for (int d : {1600, 3072, 8192, 68, 12288}) {
    for (int schedule : {1, 2}) {
      ++variant;
      Config c{2, 7, d, 0, true, true, true, false, false, 1, 1, d % 8 != 0 || d > 8192, 30.f, false};
      c.schedule = schedule;
      c.inp_other = schedule == 2;
      report("float->float barriers", c, check<float, float>(c, rng));
      if (d % 8 == 0) report("bf16->bf16 barriers", c, check<BF16, BF16>(c, rng));
      if (!c.generic) {
        c.staged = true;
        report("float->float barriers staged", c, check<float, float>(c, rng));
      }
    }
  }
  // Rows past 2^32 elements into every tensor (their offsets, rows * d and batch * batch stride,
  // overflow 32 bits), both kernels, each gather, staged too; 15 * 2^23 rows are a multiple of 128
  // and of every positions count here (4, 5 and 3).
  for (int d : {64, 768, 68, 5}) {
    for (int index_kind = 0; index_kind < 3; ++index_kind) {
      ++variant;
      const bool generic = d % 8 != 0;
      Config c{2, 4, d, index_kind, true, true, true, !generic || d % 4 == 0, !generic || d % 4 == 0, 1, 1,
               generic, 30.f, false};
      c.far = int64_t{15} << 23;
      c.schedule = variant % 3;
      c.vec = generic && d % 4 == 0 && index_kind != 1;
      report("float->float far", c, check<float, float>(c, rng));
      if (d % 8 == 0) report("bf16->bf16 far", c, check<BF16, BF16>(c, rng));
      report("f16->float far", c, check<F16, float>(c, rng));
      if (!generic) {
        c.staged = true;
        report("float->float far staged", c, check<float, float>(c, rng));
      }
    }
  }
  std::printf("configs %d failures %d\n", configs, failures);
  return failures == 0 ? 0 : 1;
}
