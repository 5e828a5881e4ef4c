"""The CUDA kernels checked on the host, where no GPU is needed (CI has none).

- tests/cuda_order_sim.cpp compiles the kernel's own layout and reduction code
  (csrc/cuda/ln_arith.cuh) for the CPU, runs each simulated block's threads in lock step and
  compares every row's mean and rstd, bit for bit, with a direct transcription of torch's order.
- tests/cuda_kernel_emu.cpp compiles the kernels themselves (csrc/cuda/rows_kernels.cuh) for the
  CPU with CUDA's built-ins emulated (threads as fibers in lock step, shared memory, barriers,
  shuffles) and checks every output of both kernels over dtypes, widths, gathers and options,
  the fast one also staged (asynchronous copies into shared memory, deferred to the thread's wait
  so that reading a stage too early shows).

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
    last = run.stdout.strip().splitlines()[-1].split()
    return int(last[1]), int(last[3]), run.stdout + run.stderr


def test_fast_kernel_layouts_replay_torch_order(tmp_path):
    configs, mismatches, out = compile_and_run(tmp_path, "cuda_order_sim.cpp")
    assert mismatches == 0, out
    assert configs >= 100, out  # every layout and width actually ran


def test_kernels_emulated_on_the_host(tmp_path):
    from residtap._build import _find_nvcc

    cuda_home = _find_nvcc()
    if cuda_home is None:  # cuda_runtime.h provides the vector types the kernels load and store
        pytest.skip("no CUDA toolkit (nvcc) found: its headers are needed to compile the kernels")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    configs, failures, out = compile_and_run(tmp_path, "cuda_kernel_emu.cpp", "-I", torch_include,
                                             "-I", str(cuda_home / "include"))
    assert failures == 0, out
    assert configs >= 250, out
