"""Building and loading the extension: what is recorded when a part cannot be built, where builds go,
and what `residtap env` says. The compiler is stubbed here; CI's set-up step builds for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from residtap import _build, cli


@pytest.fixture
def fresh(monkeypatch):
    """No load recorded yet in this process, restored afterwards."""
    monkeypatch.setattr(_build, "_info", None)
    monkeypatch.setattr(_build, "_tried_dir", None)
    return _build


def test_a_failed_cuda_build_keeps_the_cpu_op(fresh, monkeypatch, capsys):
    """A broken or mismatched toolkit must not cost the CPU op: the CUDA failure becomes the reason
    CUDA was left out, and the extension is built again without it."""
    calls = []

    def build(cuda_home, cuda_skip):
        calls.append(cuda_home)
        fresh._tried_dir = f"/builds/{'cuda' if cuda_home else 'cpu'}"
        if cuda_home is not None:
            raise RuntimeError("Error building extension 'residtap_C': [1/5] nvcc -c x.cu\n"
                               "nvcc fatal : Unsupported gpu architecture 'compute_99'")
        return fresh.BuildInfo(True, False, (), fresh._tried_dir, None, cuda_skip)

    monkeypatch.setattr(fresh, "_cuda_plan", lambda: (Path("/toolkit"), None))
    monkeypatch.setattr(fresh, "_build", build)
    info = fresh._load()
    assert calls == [Path("/toolkit"), None]
    assert info.loaded and not info.with_cuda
    assert info.cuda_skipped_because == ("the CUDA build failed (RuntimeError: nvcc fatal : Unsupported gpu "
                                         "architecture 'compute_99'; see /builds/cuda)")
    assert "building the CPU op alone" in capsys.readouterr().err


def test_a_failed_load_records_where_it_was_built(fresh, monkeypatch):
    def fails():
        fresh._tried_dir = "/builds/x"
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fresh, "_load", fails)
    info = fresh.load_extension()
    assert not info.loaded and info.build_dir == "/builds/x" and info.error == "RuntimeError: no compiler"


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build: CUDA is never planned")
def test_cuda_home_without_nvcc_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("RESIDTAP_NO_CUDA", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert _build._cuda_plan() == (None, f"CUDA_HOME={tmp_path} has no bin/nvcc")


def test_build_directory_and_architectures(monkeypatch, tmp_path):
    """An empty RESIDTAP_BUILD_DIR is unset (not the working directory); the architectures reach the
    compiler for this build only, the process's TORCH_CUDA_ARCH_LIST put back after."""
    seen = {}

    def load(**kwargs):
        seen.update(kwargs, archs=os.environ.get("TORCH_CUDA_ARCH_LIST"))

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # _build sets both
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RESIDTAP_BUILD_DIR", "")
    monkeypatch.setenv("RESIDTAP_CUDA_ARCHS", "9.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.chdir(tmp_path)
    info = _build._build(Path("/usr/local/cuda"), None)
    assert Path(info.build_dir).parent == tmp_path / ".cache" / "residtap" / "build"
    assert info.with_cuda and seen["archs"] == "9.0" and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"
    assert seen["build_directory"] == info.build_dir


@pytest.mark.parametrize("value,want", [
    ("reference", "reference (RESIDTAP_BACKEND=reference)"),
    ("bogus", "invalid: RESIDTAP_BACKEND: expected one of ('auto', 'compiled', 'reference') or unset, "
              "got 'bogus'"),
])
def test_env_reports_the_backend_residtap_backend_asks_for(extension, monkeypatch, value, want):
    monkeypatch.setenv("RESIDTAP_BACKEND", value)
    rep = cli.env_report()
    assert rep["backend_by_device"]["cpu"] == want
    assert rep["backend_requested"] == (value if value == "reference" else want)


def _stub_toolkit(fresh, monkeypatch, tmp_path, load) -> Path:
    """A toolkit directory with an nvcc, ``load`` as the compiler (CUDA sources: ``k.cu``), builds under
    ``tmp_path/builds``; returns the toolkit."""
    from torch.utils import cpp_extension

    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.setattr(fresh, "_cuda_plan", lambda: (toolkit, None))
    monkeypatch.setattr(fresh, "_sources", lambda with_cuda: [Path("ops.cpp"), *([Path("k.cu")] * with_cuda)])
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv("RESIDTAP_BUILD_DIR", str(tmp_path / "builds"))
    monkeypatch.setenv("RESIDTAP_CUDA_ARCHS", "9.0")
    return toolkit


def test_a_failed_cuda_build_is_not_retried_with_the_same_toolkit(fresh, monkeypatch, tmp_path, capsys):
    """Every process (every torchrun rank) would otherwise fail the same compile again before falling
    back to the CPU op. The failure is recorded in the CUDA build directory and trusted until the
    toolkit changes; a later success removes the record."""
    built, cuda_works = [], [False]

    def load(**kwargs):
        cuda = any(s.endswith(".cu") for s in kwargs["sources"])
        built.append("cuda" if cuda else "cpu")
        if cuda and not cuda_works[0]:
            raise RuntimeError("Error building extension 'residtap_C'\nx.cu(3): error: expected a ';'")

    toolkit = _stub_toolkit(fresh, monkeypatch, tmp_path, load)
    first = fresh._load()
    assert built == ["cuda", "cpu"] and not first.with_cuda
    marker = next((tmp_path / "builds").glob(f"*/{fresh.FAILED_MARKER}"))

    built.clear()
    again = fresh._load()  # the next process
    assert built == ["cpu"] and not again.with_cuda
    assert again.cuda_skipped_because.startswith(first.cuda_skipped_because)
    assert f"not tried again with the same toolkit: delete {marker} to retry" in again.cuda_skipped_because
    assert "expected a ';'" in capsys.readouterr().err

    monkeypatch.setenv("NVCC_CCBIN", "/opt/other/g++")  # another host compiler: worth a retry
    built.clear()
    fresh._load()
    assert built == ["cuda", "cpu"] and marker.exists()
    built.clear()
    fresh._load()
    assert built == ["cpu"]

    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n# another toolkit\n")
    cuda_works[0] = True
    built.clear()
    fixed = fresh._load()
    assert built == ["cuda"] and fixed.with_cuda and fixed.cuda_skipped_because is None
    assert not marker.exists()


def test_a_cuda_compile_that_was_killed_is_not_recorded(fresh, monkeypatch, tmp_path):
    """A compiler killed (out of memory on a shared machine) or starved of disk says nothing about the
    sources: the next process tries again."""
    def load(**kwargs):
        if any(s.endswith(".cu") for s in kwargs["sources"]):
            raise RuntimeError("Error building extension 'residtap_C': [2/5] nvcc -c k.cu\n"
                               "nvcc error   : 'cicc' died due to signal 9 (Kill signal)")

    _stub_toolkit(fresh, monkeypatch, tmp_path, load)
    info = fresh._load()
    assert "died due to signal 9" in info.cuda_skipped_because
    assert not list((tmp_path / "builds").glob(f"*/{fresh.FAILED_MARKER}"))


def test_the_cpu_op_alone_has_a_name_of_its_own_and_says_when_it_compiles(monkeypatch, tmp_path, capsys):
    """After a failed CUDA build in a process, torch versions a rebuild under the same name
    (residtap_C_v1.so): the next process then compiled residtap_C.so anew without a word. The CPU op
    alone is residtap_C_cpu, and the message appears exactly when its file is not there yet."""
    names = []

    def load(**kwargs):
        names.append(kwargs["name"])
        (Path(kwargs["build_directory"]) / f"{kwargs['name']}.so").write_bytes(b"")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setenv("RESIDTAP_BUILD_DIR", str(tmp_path))
    first = _build._build(None, None)
    assert "compiling the C++ extension (CPU only)" in capsys.readouterr().err
    (Path(first.build_dir) / "residtap_C_v1.so").write_bytes(b"")  # what another process's fallback left
    _build._build(None, None)
    assert names == ["residtap_C_cpu"] * 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_only_cpu_and_cuda_have_a_compiled_kernel(extension, device):
    """Elsewhere "auto" is the reference, with the reason, and "compiled" is unavailable."""
    why = f"no compiled kernel for device type '{device}'"
    assert _build.load_extension().loaded
    from residtap import backend

    assert backend.decide("auto", torch.device(device)) == ("reference", why)
    assert backend.decide("compiled", torch.device(device)) == ("unavailable", why)


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build: CUDA is never planned")
def test_residtap_no_cuda_0_means_not_set(monkeypatch):
    monkeypatch.setenv("RESIDTAP_NO_CUDA", "0")
    assert _build._cuda_plan()[1] != "RESIDTAP_NO_CUDA is set"
    monkeypatch.setenv("RESIDTAP_NO_CUDA", "1")
    assert _build._cuda_plan() == (None, "RESIDTAP_NO_CUDA is set")


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build: CUDA is never planned")
@pytest.mark.parametrize("value", [";", " , ", "90", "sm_90", "9.0;nine"])
def test_a_malformed_residtap_cuda_archs_is_the_reason_cuda_is_left_out(monkeypatch, tmp_path, value):
    """An empty list reached torch as an empty TORCH_CUDA_ARCH_LIST, whose GPU detection fails with an
    IndexError on a machine without a GPU; "90" failed in torch with "Unknown CUDA arch (90)", never
    naming the variable, and was recorded as a failed CUDA build. Now the plan says which variable,
    what it expects and what it got, and nothing is compiled or recorded for it."""
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.delenv("RESIDTAP_NO_CUDA", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv("RESIDTAP_CUDA_ARCHS", value)
    home, why = _build._cuda_plan()
    assert home is None
    assert why.startswith(f"RESIDTAP_CUDA_ARCHS: expected compute capabilities such as '9.0' or '8.0;9.0'")
    assert why.endswith(f"got {value!r}")


@pytest.mark.parametrize("value,want", [("9.0", ("9.0",)), ("8.0, 9.0a", ("8.0", "9.0a")),
                                        ("8.6;9.0+PTX", ("8.6", "9.0+PTX")), ("10.0f", ("10.0f",))])
def test_residtap_cuda_archs_takes_semicolons_or_commas(monkeypatch, value, want):
    monkeypatch.setenv("RESIDTAP_CUDA_ARCHS", value)
    assert _build._cuda_archs() == want


def test_csrc_builds_every_message_without_an_iostream():
    """Where the compiler links libstdc++ into the extension statically (the H200 machine's
    CXX=/opt/gcc/bin/g++), a number put into a std::ostream from inside it crashed the process
    (SIGSEGV), so every bad-input error with a shape or a count in its message did, where the same
    check here raised. Messages are made by capture_common.h's cat() from strings and
    std::to_string, and handed to TORCH_CHECK whole (c10 then uses no stream): no TORCH_CHECK with
    pieces, no c10::str and no stream anywhere else in csrc/."""
    import re

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    banned = re.compile(r"TORCH_CHECK\s*\(|TORCH_WARN|TORCH_INTERNAL_ASSERT|AT_ERROR|c10::str\s*\("
                        r"|\bstd::(?:[io]?stringstream|ostream|cout|cerr)\b|<(?:sstream|iostream)>")
    found = []
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if path.name == "capture_common.h" and code.startswith("#define RESIDTAP_CHECK(cond"):
                continue  # the one place that hands TORCH_CHECK a finished message
            found += [f"{path.relative_to(csrc)}:{n}: {line.strip()}" for _ in banned.finditer(code)]
    assert not found, "\n".join(found)
