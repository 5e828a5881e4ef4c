// Host-side check of the fused CUDA kernel's replay of torch's LayerNorm order of operations.
//
// The fast kernel (csrc/cuda/rows_kernels.cuh) packs several of torch's 128 "virtual threads" into
// each physical thread and several rows into each block, then replays torch's Welford updates and
// merge tree in that layout, the tree's merges shared out among a row's threads (merge_tree, in
// ln_arith.cuh; the generic kernel runs the same tree with one virtual thread per thread). Whether
// the replay visits the same operations in the same order is a question of indices, not of GPU
// arithmetic, so it can be answered on a CPU: this program compiles the kernel's own layout and
// reduction code (csrc/cuda/ln_arith.cuh) for the host, emulates the round-to-nearest intrinsics
// with IEEE float operations (-ffp-contract=off) and runs each simulated block's 128 threads as
// std::threads whose warp shuffles and block barriers meet in lock step. The mean and rstd that
// every thread of a team ends up with must equal, bit for bit, a plain transcription of torch's
// order (GPU.md): virtual thread t reads vectors t, t+128, ...; shuffle-down merges 16, 8, 4, 2, 1
// in each warp; then ((w0 + w2) + (w1 + w3)). The transcription (torch_ln_order.h) has its own
// Welford update and merge, so the kernel's primitives are checked too, not assumed.
//
// What this cannot check: the GPU's own arithmetic (rsqrtf is emulated by 1/sqrtf on both sides),
// memory access, or speed. tests/test_cuda.py does that on a GPU.
//
// Output: one line per layout (the merges each thread does per row), then "configs N mismatches M";
// exit status 1 if M > 0.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline

#include "host_intrinsics.h"

// A warp in lock step: each shuffle publishes the value, waits for all 32 lanes, reads the source
// lane, waits again. A block barrier for __syncthreads (the merge tree of teams wider than a warp).
struct WarpSim {
  float slot[32];
  std::barrier<> bar{32};
};
struct Dim3 {
  unsigned x = 0;
};
thread_local WarpSim* tl_warp = nullptr;
thread_local Dim3 threadIdx;
static std::barrier<>* g_block_bar = nullptr;

static inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const unsigned lane = threadIdx.x % 32;
  tl_warp->slot[lane] = v;
  tl_warp->bar.arrive_and_wait();
  const float r = tl_warp->slot[lane ^ static_cast<unsigned>(mask)];
  tl_warp->bar.arrive_and_wait();
  return r;
}
static inline void __syncthreads() { g_block_bar->arrive_and_wait(); }

#include "ln_arith.cuh"
#include "torch_ln_order.h"

using residtap::cuda_impl::FastLayout;
using residtap::cuda_impl::Moments;
using residtap::cuda_impl::welford_push;

constexpr float kEps = 1e-5f;

// Runs `thread(tid, xchg)` as the 128 threads of one block in lock step (warp shuffles, block
// barriers, the kernel's shared exchange array) and returns each thread's moments.
template <typename Thread>
static std::vector<Moments> run_block(const Thread& thread) {
  constexpr int kBlock = residtap::cuda_impl::kBlock;
  std::vector<Moments> result(kBlock);
  WarpSim warps[4];
  std::barrier<> block_bar(kBlock);
  g_block_bar = &block_bar;
  Moments xchg[kBlock];
  std::vector<std::thread> threads;
  for (int tid = 0; tid < kBlock; ++tid) {
    threads.emplace_back([&, tid] {
      tl_warp = &warps[tid / 32];
      threadIdx.x = static_cast<unsigned>(tid);
      result[tid] = thread(tid, xchg);
    });
  }
  for (auto& t : threads) t.join();
  return result;
}

// Mismatches between what each thread finished with and torch's order on its row (row_of(tid));
// the first one is printed, labelled `what`.
template <typename RowOf>
static int compare(const std::vector<Moments>& result, int d, const RowOf& row_of, const char* what) {
  int bad = 0;
  for (int tid = 0; tid < static_cast<int>(result.size()); ++tid) {  // every thread of every team
    float mean, rstd, want_mean, want_rstd;
    residtap::cuda_impl::finish_moments(result[tid], d, kEps, mean, rstd);
    torch_ln_moments(row_of(tid), d, kEps, want_mean, want_rstd);
    if (std::memcmp(&mean, &want_mean, 4) != 0 || std::memcmp(&rstd, &want_rstd, 4) != 0) {
      if (bad == 0)
        std::printf("  MISMATCH %s d=%d thread=%d: mean %.9g vs %.9g, rstd %.9g vs %.9g\n", what, d, tid,
                    mean, want_mean, rstd, want_rstd);
      ++bad;
    }
  }
  return bad;
}

static std::vector<float> random_row(int d, std::mt19937& rng, float centre) {
  std::normal_distribution<float> dist(centre, 3.f);
  std::vector<float> row(d);
  for (auto& x : row) x = dist(rng);
  return row;
}

// One simulated block of the fast kernel: kTeams rows, each thread doing exactly what
// fast_rows_kernel does with its units (the same header functions, the same indices).
template <int kElemBytes, int K>
static int check_block(int d, std::mt19937& rng, float centre) {
  using L = FastLayout<kElemBytes, K>;
  constexpr int kU = L::kU, kT = L::kT, kY = L::kY, kN = L::kN;
  std::vector<std::vector<float>> rows;
  for (int team = 0; team < L::kTeams; ++team) rows.push_back(random_row(d, rng, centre));
  const auto result = run_block([&](int tid, Moments* xchg) {
    const int tp = tid % kT, tp_off = 4 * kU * tp;
    const float* row = rows[tid / kT].data();
    Moments m[L::kSlots];
    for (auto& s : m) s = Moments{0.f, 0.f, 0.f};
    for (int y = 0; y < kY; ++y) {
      int nv = 0;
      for (int j = 0; j < K; ++j) {
        if (tp_off + L::offset(y, j) >= d) continue;
        float xf[kN];
        std::memcpy(xf, row + tp_off + L::offset(y, j), sizeof(xf));
        residtap::cuda_impl::welford_unit<kU>(&m[kU * y], xf, j);
        ++nv;
      }
      residtap::cuda_impl::set_counts<kU>(&m[kU * y], nv);
    }
    return residtap::cuda_impl::merge_tree<kU, kT, kY, true>(m, tp, xchg);
  });
  char what[32];
  std::snprintf(what, sizeof(what), "bytes=%d K=%d", kElemBytes, K);
  return compare(result, d, [&](int tid) { return rows[tid / kT].data(); }, what);
}

// The launcher's choice of K for a width (rows_choice.cuh, fast_k; checked there by
// cuda_kernel_emu.cpp). Restated: this program compiles without CUDA's headers.
template <int kElemBytes>
static int check_width(int d, std::mt19937& rng, float centre) {
  const int k = (d / 4 + 127) / 128;
  if (k <= 1) return check_block<kElemBytes, 1>(d, rng, centre);
  if (k <= 2) return check_block<kElemBytes, 2>(d, rng, centre);
  if (k <= 4) return check_block<kElemBytes, 4>(d, rng, centre);
  if (k <= 8) return check_block<kElemBytes, 8>(d, rng, centre);
  return check_block<kElemBytes, 16>(d, rng, centre);
}

// The generic kernel (rows_kernels.cuh): one row per block, thread t = torch's virtual thread t,
// counting its elements one by one, through the same merge tree (its cross-warp steps in shared
// memory).
static int check_generic(int d, std::mt19937& rng, float centre) {
  constexpr int kBlock = residtap::cuda_impl::kBlock;
  const std::vector<float> row = random_row(d, rng, centre);
  const auto result = run_block([&](int tid, Moments* xchg) {
    Moments m[1] = {Moments{0.f, 0.f, 0.f}};
    for (int v = tid; v < d / 4; v += kBlock) {
      for (int i = 0; i < 4; ++i) {
        m[0].n = __fadd_rn(m[0].n, 1.f);
        welford_push(m[0].mean, m[0].m2, row[4 * v + i], __frcp_rn(m[0].n));
      }
    }
    return residtap::cuda_impl::merge_tree<1, kBlock, 1, false>(m, tid, xchg);
  });
  return compare(result, d, [&](int) { return row.data(); }, "generic");
}

// The merges one thread does per row in each layout (the plan's work; printed for the record).
static int merges_per_thread(int kU, int kT, int kY) {
  const auto plan = residtap::cuda_impl::tree_plan(kU, kT, kY);
  int n = 0;
  for (const auto& st : plan.step) n += st.slots > 1 ? st.slots / 2 : 1;  // a pair step: 1
  return n;
}

template <int kElemBytes, int K>
static void print_plan() {
  using L = FastLayout<kElemBytes, K>;
  std::printf("layout bytes=%d K=%d kT=%d slots=%d: %d merges per thread\n", kElemBytes, K, L::kT,
              L::kSlots, merges_per_thread(L::kU, L::kT, L::kY));
}

int main() {
  // Widths on both sides of every K boundary, tiny ones (most virtual threads empty), and the
  // model widths of GPU.md's probe.
  const int widths[] = {8,    16,   24,   64,   72,   96,   128,  136,  256,  504,  512,  520,
                        768,  1000, 1024, 1032, 1280, 1600, 2048, 2056, 2560, 3072, 4096, 4104,
                        5120, 6144, 7168, 8184, 8192};
  print_plan<4, 1>(), print_plan<4, 2>(), print_plan<4, 4>(), print_plan<4, 8>(), print_plan<4, 16>();
  print_plan<2, 1>(), print_plan<2, 2>(), print_plan<2, 4>(), print_plan<2, 8>(), print_plan<2, 16>();
  std::mt19937 rng(1234);
  int configs = 0, mismatches = 0;
  // The fast kernel's 1/n: rcp_x4 (table and index) against __frcp_rn at every count it can meet.
  for (int n = 4; n <= residtap::cuda_impl::kMaxFastWidth; n += 4) {
    const float want = __frcp_rn(static_cast<float>(n));
    const float got = residtap::cuda_impl::rcp_x4(static_cast<float>(n));
    if (std::memcmp(&want, &got, 4) != 0) {
      std::printf("  MISMATCH rcp_x4(%d) = %.9g, want %.9g\n", n, got, want);
      ++mismatches;
    }
  }
  if (residtap::cuda_impl::rcp_x4(0.f) != 0.f) {
    std::printf("  MISMATCH rcp_x4(0) != 0\n");
    ++mismatches;
  }
  for (float centre : {0.f, 30.f}) {
    for (int d : widths) {
      // float: units of 4 elements; 16-bit types: units of 8 (other widths take the generic kernel)
      mismatches += check_width<4>(d, rng, centre);
      ++configs;
      if (d % 8 == 0) {
        mismatches += check_width<2>(d, rng, centre);
        ++configs;
      }
      mismatches += check_generic(d, rng, centre);
      ++configs;
    }
  }
  std::printf("configs %d mismatches %d\n", configs, mismatches);
  return mismatches == 0 ? 0 : 1;
}
