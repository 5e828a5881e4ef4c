"""The CUDA kernels checked on the host, where no GPU is needed (CI has none).

- tests/cuda_order_sim.cpp compiles the kernel's own layout and reduction code
  (csrc/cuda/ln_arith.cuh) for the CPU, runs each simulated block's threads in lock step and
  compares every row's mean and rstd, bit for bit, with a direct transcription of torch's order.
- tests/cuda_kernel_emu.cpp compiles the kernels themselves (csrc/cuda/rows_kernels.cuh) for the
  CPU with CUDA's built-ins emulated (threads as fibers in lock step, shared memory, barriers,
  shuffles) and checks every output of both kernels over dtypes, widths, gathers, layouts and
  options, the fast one also staged (asynchronous copies into shared memory, deferred to the
  thread's wait so that reading a stage too early shows), under schedules that let threads run
  ahead of each other between barriers.

Each file says what it can and cannot establish; tests/test_cuda.py runs the real thing on a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"


def compile_and_run(tmp_path, source: str, *flags: str) -> tuple[int, int, str]:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / Path(source).stem
    subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-Wno-unknown-pragmas",
                    "-Wno-attributes", "-I", str(CUDA_SRC), "-I", str(ROOT / "tests"), *flags,
                    str(ROOT / "tests" / source), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    # 0: all passed; 1: failures, listed; anything else (a crash: an emulated access far out of its
    # buffers, as an offset narrowed to 32 bits makes) is a failure too
    assert run.returncode in (0, 1), f"{source} ended with status {run.returncode}:\n{run.stdout[-3000:]}{run.stderr}"
    last = run.stdout.strip().splitlines()[-1].split()
    return int(last[1]), int(last[3]), run.stdout + run.stderr


def test_fast_kernel_layouts_replay_torch_order(tmp_path):
    configs, mismatches, out = compile_and_run(tmp_path, "cuda_order_sim.cpp")
    assert mismatches == 0, out
    assert configs >= 100, out  # every layout and width actually ran


def test_device_reciprocal_table_is_correctly_rounded(tmp_path):
    """The fast kernel's merges take 1/n from a table that nvcc evaluates at compile time
    (ln_arith.cuh, kRcpX4); the host programs above check it as g++ evaluates it. Here nvcc's own
    constant data, read from the PTX it emits, must be IEEE's correctly rounded 1/(4 i) (what the
    device's __frcp_rn returns) at every index, and 0 at index 0."""
    import re

    import numpy as np

    from residtap._build import IEEE_CUDA_FLAGS, _find_nvcc

    cuda_home = _find_nvcc()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    src = tmp_path / "rcp_probe.cu"
    src.write_text('#include "ln_arith.cuh"\n__global__ void probe(float* out, float n) '
                   "{ out[0] = residtap::cuda_impl::rcp_x4(n); }\n")
    ptx = tmp_path / "rcp_probe.ptx"
    subprocess.run([str(cuda_home / "bin" / "nvcc"), "-std=c++20", "-O3", *IEEE_CUDA_FLAGS, "-ptx",
                    "-arch=sm_90", "-I", str(CUDA_SRC), str(src), "-o", str(ptx)], check=True)
    m = re.search(r"\.const \.align 4 \.b8 \S*kRcpX4\S*\[(\d+)\] = \{([^}]*)\}", ptx.read_text())
    assert m is not None, "kRcpX4 not found in the PTX"
    table = np.array([int(b) for b in m.group(2).split(",")], dtype=np.uint8).view("<f4")
    assert int(m.group(1)) == table.nbytes == 4 * 2049
    i = np.arange(1, 2049, dtype=np.float32)
    want = np.concatenate([[np.float32(0)], np.float32(1) / (np.float32(4) * i)]).astype(np.float32)
    assert np.array_equal(table.view(np.uint32), want.view(np.uint32))


def test_kernels_emulated_on_the_host(tmp_path):
    from residtap._build import _find_nvcc

    cuda_home = _find_nvcc()
    if cuda_home is None:  # cuda_runtime.h provides the vector types the kernels load and store
        pytest.skip("no CUDA toolkit (nvcc) found: its headers are needed to compile the kernels")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    configs, failures, out = compile_and_run(tmp_path, "cuda_kernel_emu.cpp", "-I", torch_include,
                                             "-I", str(cuda_home / "include"))
    assert failures == 0, out
    assert configs >= 880, out


@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_staged_kernel_copies_assemble_for_gpus_before_and_after_sm80(tmp_path, arch):
    """The staged kernel is instantiated for every target, so its copies must assemble (ptxas, not
    only the PTX front end) where cp.async does not exist: before sm_80 they are plain copies.
    Otherwise a build for a T4 (sm_75) fails as a whole, the CPU op included."""
    from residtap._build import _find_nvcc

    cuda_home = _find_nvcc()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    src = tmp_path / "copy_probe.cu"
    src.write_text('#include "rows_kernels.cuh"\n'
                   "__global__ void probe(uint4* g) {\n  __shared__ uint4 s[1];\n"
                   "  residtap::cuda_impl::async_copy16(s, g);\n  residtap::cuda_impl::async_commit();\n"
                   "  residtap::cuda_impl::async_wait<0>();\n  g[1] = s[0];\n}\n")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    nvcc = [str(cuda_home / "bin" / "nvcc"), "-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-arch={arch}",
            "-I", str(CUDA_SRC), "-I", str(ROOT / "csrc"), "-I", torch_include, str(src)]
    for kind in ("-cubin", "-ptx"):  # assembled by ptxas; and the PTX, to see which copy it uses
        done = subprocess.run([*nvcc, kind, "-o", str(tmp_path / f"probe{kind[1:]}")], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert ("cp.async" in (tmp_path / "probeptx").read_text()) == (arch == "sm_90")
