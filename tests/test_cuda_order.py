"""The CUDA kernel's replay of torch's LayerNorm order, checked on the host (no GPU needed).

tests/cuda_order_sim.cpp compiles the kernel's own layout and reduction code
(csrc/cuda/ln_arith.cuh) for the CPU, runs each simulated block's threads in lock step and
compares every row's mean and rstd, bit for bit, with a direct transcription of torch's order.
See that file for what this can and cannot establish.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIM = ROOT / "tests" / "cuda_order_sim.cpp"


def test_fast_kernel_layouts_replay_torch_order(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / "cuda_order_sim"
    subprocess.run([cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-pthread", "-Wno-unknown-pragmas",
                    "-I", str(ROOT / "csrc" / "cuda"), str(SIM), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    last = run.stdout.strip().splitlines()[-1]
    configs, mismatches = int(last.split()[1]), int(last.split()[3])
    assert mismatches == 0 and run.returncode == 0, run.stdout
    assert configs >= 100, run.stdout  # every layout and width actually ran
