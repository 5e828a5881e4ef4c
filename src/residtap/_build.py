"""Build and load the compiled extension for the torch that imports it.

The extension is JIT-compiled with ``torch.utils.cpp_extension.load`` and ninja into a cache keyed
by the torch version, the CUDA build, the target architectures and a hash of the sources (and of
where they are), so it is built once per environment and always against the torch in use. CUDA
sources are added only where torch is a CUDA build and nvcc is found; a CPU-only machine builds the
CPU op alone.

Environment:
    RESIDTAP_BUILD_DIR     where builds are cached (default ~/.cache/residtap/build)
    RESIDTAP_NO_CUDA=1     build the CPU op only, even where CUDA could be built
    RESIDTAP_CUDA_ARCHS    e.g. "9.0" or "8.0;9.0" (default: the visible GPUs, else 9.0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
DEFAULT_CUDA_ARCHS = "9.0"
_NAME = "residtap_C"
# Never fast-math. The IEEE settings are nvcc's defaults, spelled out so that flags slipped in
# through NVCC_PREPEND_FLAGS cannot turn on flush-to-zero or approximate division unnoticed.
IEEE_CUDA_FLAGS = ("-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What was (or would be) built, and why a backend is or is not there."""

    loaded: bool
    with_cuda: bool
    cuda_archs: tuple[str, ...]
    build_dir: str | None
    error: str | None  # why loading failed, when it did
    cuda_skipped_because: str | None  # why CUDA sources were left out, when they were


_lock = threading.Lock()
_info: BuildInfo | None = None


def _find_nvcc() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME if set, else the first candidate with both nvcc and the
    runtime headers (an `nvcc` on PATH may be a wrapper script in /usr/local/bin, whose
    parent has no toolkit)."""
    if os.environ.get("CUDA_HOME"):
        home = Path(os.environ["CUDA_HOME"])
        return home if (home / "bin" / "nvcc").exists() else None  # (_cuda_plan says why)
    candidates = [Path("/usr/local/cuda")]
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which).resolve().parent.parent)
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _pip_cuda_includes() -> list[str]:
    """Headers of the pip-installed CUDA runtime (nvidia/cu13/include, …) that torch's headers
    include (cusparse.h) but a bare toolkit install may lack."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        for inc in sorted(Path(root).glob("*/include")):
            if (inc / "cusparse.h").exists() or (inc / "cuda_runtime.h").exists():
                found.append(str(inc))
    return found


def _cuda_plan() -> tuple[Path | None, str | None]:
    """(CUDA_HOME, None) when CUDA sources should be built, else (None, reason)."""
    if os.environ.get("RESIDTAP_NO_CUDA", "") not in ("", "0"):
        return None, "RESIDTAP_NO_CUDA is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    if not list(CSRC.glob("cuda/*.cu")):
        return None, "no CUDA sources in this checkout"
    try:
        _cuda_archs()
    except ValueError as e:  # a bad setting is the reason, not a CUDA build that failed (and is recorded)
        return None, str(e)
    home = _find_nvcc()
    if home is None and os.environ.get("CUDA_HOME"):
        return None, f"CUDA_HOME={os.environ['CUDA_HOME']} has no bin/nvcc"
    if home is None:
        return None, "nvcc was not found (set CUDA_HOME)"
    return home, None


# One compute capability as torch's TORCH_CUDA_ARCH_LIST takes it: "9.0", "9.0a", "10.0f", "8.6+PTX".
_ARCH = re.compile(r"\d+\.\d+[af]?(\+PTX)?")


def _cuda_archs() -> tuple[str, ...]:
    """The architectures to build for; a ValueError naming RESIDTAP_CUDA_ARCHS when it is set to
    something else. (Passed on as is, an empty list made torch detect the GPUs, which fails with an
    IndexError where there are none, and "90" failed as "Unknown CUDA arch (90)", recorded as a
    failed CUDA build, without naming the variable.)"""
    env = os.environ.get("RESIDTAP_CUDA_ARCHS")
    if env:
        archs = tuple(a.strip() for a in env.replace(",", ";").split(";") if a.strip())
        if not archs or not all(_ARCH.fullmatch(a) for a in archs):
            raise ValueError("RESIDTAP_CUDA_ARCHS: expected compute capabilities such as '9.0' or '8.0;9.0' "
                             f"(major.minor, optionally with a, f or +PTX; separated by ';' or ','), got {env!r}")
        return archs
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return tuple(sorted(f"{ma}.{mi}" for ma, mi in caps))
    return (DEFAULT_CUDA_ARCHS,)


def _sources(with_cuda: bool) -> list[Path]:
    srcs = [CSRC / "ops.cpp", *sorted(CSRC.glob("cpu/*.cpp"))]
    if with_cuda:
        srcs += sorted(CSRC.glob("cuda/*.cu")) + sorted(CSRC.glob("cuda/*.cpp"))  # kernels; host side
    return srcs


def _tag(sources: list[Path], with_cuda: bool, archs: tuple[str, ...], flags: tuple[str, ...]) -> str:
    """The build's directory name: torch, Python, CUDA and architectures in words; the sources,
    the headers they include, where they are and the compiler flags as a hash. (ninja's build file
    names the sources by absolute path: two checkouts sharing one directory would rebuild each
    other's extension on every switch.)"""
    h = hashlib.sha256("\0".join((str(CSRC), *flags)).encode())
    headers = (".h", ".cuh") if with_cuda else (".h",)
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and (p.suffix in headers or p in sources):
            h.update(str(p.relative_to(CSRC)).encode())
            h.update(p.read_bytes())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    dev = f"cu{torch.version.cuda}-sm{'_'.join(a.replace('.', '') for a in archs)}" if with_cuda else "cpu"
    return f"torch{torch.__version__.replace('+', '_')}-{py}-{dev}-{h.hexdigest()[:12]}"


def _openmp() -> bool:
    """Whether the C++ sources are compiled with OpenMP: where torch's own intra-op parallelism is
    OpenMP, on Linux, where torch's wheels ship GCC's libgomp and the extension's compiler is the
    system's c++ (GCC or a compiler that takes GCC's -fopenmp)."""
    return bool(getattr(torch._C, "has_openmp", False)) and sys.platform.startswith("linux")


_tried_dir: str | None = None  # the build directory of the last attempt, for the record of a failure
# In a CUDA build directory: why the build failed there, for the given toolkit. Later processes (every
# torchrun rank, every script) go straight to the CPU op instead of failing the same compile again,
# until the toolkit changes or the file is deleted.
FAILED_MARKER = "cuda_build_failed.txt"


class _FailedBefore(RuntimeError):
    """The CUDA build failed in an earlier process, with the same sources, flags and toolkit."""


# What else decides whether the same sources compile: the host compiler nvcc is told to use, flags
# slipped in through the environment, and the headers (the toolkit's, the pip-installed CUDA ones).
_BUILD_ENV = ("CC", "CXX", "CUDAHOSTCXX", "NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS")
# A compile that was killed or starved says nothing about the sources: never recorded.
_TRANSIENT = ("signal", "killed", "no space left", "out of memory", "cannot allocate memory", "resource "
              "temporarily unavailable", "timed out", "timeout")


def _toolkit_identity(cuda_home: Path) -> str:
    """One line: nvcc and the toolkit's headers (path, size, mtime), the compiler environment, and the
    pip CUDA header directories; a change to any of them makes a recorded failure worth retrying."""
    def stamp(p: Path) -> str:
        try:
            st = p.stat()
        except OSError:
            return f"{p}:missing"
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    host = shutil.which(os.environ.get("CXX") or "c++")  # the host compiler on PATH
    parts = [stamp(cuda_home / "bin" / "nvcc"), stamp(cuda_home / "include"), stamp(Path(host or "c++")),
             *(stamp(Path(d)) for d in _pip_cuda_includes()),
             *(f"{k}={os.environ.get(k, '')}" for k in _BUILD_ENV)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _record_failure(cuda_home: Path, why: str, log: str) -> None:
    """Best effort: a build directory that cannot be written to just means the next process tries again.
    A compile killed or starved (a signal, memory, disk, a timeout: anywhere in ``log``) is not recorded."""
    if _tried_dir is None or any(word in log.lower() for word in _TRANSIENT):
        return
    try:
        (Path(_tried_dir) / FAILED_MARKER).write_text(f"{_toolkit_identity(cuda_home)}\n{why}\n")
    except OSError:
        pass


def _failed_before(build_dir: Path, cuda_home: Path) -> str | None:
    """The recorded reason, when this build directory's CUDA build failed with this toolkit."""
    try:
        toolkit, why = (build_dir / FAILED_MARKER).read_text().split("\n")[:2]
    except (OSError, ValueError):
        return None
    return why if toolkit == _toolkit_identity(cuda_home) else None


def _load() -> BuildInfo:
    """The extension with CUDA where it can be built; where that build fails (a broken or mismatched
    toolkit), the CPU op alone, with the CUDA failure as the reason CUDA was left out."""
    cuda_home, cuda_skip = _cuda_plan()
    if cuda_home is None:
        return _build(None, cuda_skip)
    try:
        return _build(cuda_home, None)
    except _FailedBefore as e:
        why = str(e)
        print(f"residtap: {why}; building the CPU op alone", file=sys.stderr, flush=True)
        return _build(None, why)
    except Exception as e:  # noqa: BLE001 — recorded: the CPU op must not be lost with it
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # the compiler's own first complaint, rather than torch's "Error building extension" line or
        # ninja's command lines
        first = next((line for line in lines if not line.startswith("[") and "Error building" not in line
                      and ("error" in line.lower() or "fatal" in line.lower())), lines[0] if lines else "")
        why = f"the CUDA build failed ({type(e).__name__}: {first}; see {_tried_dir})"
        _record_failure(cuda_home, why, str(e))
        print(f"residtap: {why}; building the CPU op alone", file=sys.stderr, flush=True)
        return _build(None, why)


def _build(cuda_home: Path | None, cuda_skip: str | None) -> BuildInfo:
    global _tried_dir
    nvcc_home = cuda_home or _find_nvcc()
    if nvcc_home is not None and not os.environ.get("CUDA_HOME"):
        # cpp_extension decides CUDA_HOME when it is first imported and guesses /usr/local.
        os.environ["CUDA_HOME"] = str(nvcc_home)
    # Its import logs "No CUDA runtime is found" on GPU-less machines, which is noise here: the
    # build needs nvcc, not a GPU, and `residtap env` reports what was built.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_log.setLevel(level)

    with_cuda = cuda_home is not None
    archs = _cuda_archs() if with_cuda else ()
    sources = _sources(with_cuda)

    extra_include = [str(CSRC)]
    cflags = ["-O3"]  # the C++ standard is the one torch's own flags ask for
    ldflags = []
    if _openmp():
        # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop.
        # The link asks for libgomp.so.1, which resolves to the copy torch has already loaded,
        # so the CPU op shares torch's thread pool and follows torch.set_num_threads.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    cuda_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *IEEE_CUDA_FLAGS]
    if with_cuda:
        cpp_extension.CUDA_HOME = str(cuda_home)
        os.environ["CUDA_HOME"] = str(cuda_home)
        extra_include += _pip_cuda_includes()
        cflags.append("-DRESIDTAP_WITH_CUDA")
        cuda_flags.append("-DRESIDTAP_WITH_CUDA")
    root = Path(os.environ.get("RESIDTAP_BUILD_DIR") or Path.home() / ".cache" / "residtap" / "build")
    build_dir = root / _tag(sources, with_cuda, archs, (*cflags, *ldflags, *cuda_flags))
    _tried_dir = str(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    if with_cuda:
        earlier = _failed_before(build_dir, cuda_home)
        if earlier is not None:
            raise _FailedBefore(f"{earlier}; not tried again with the same toolkit: delete "
                                f"{build_dir / FAILED_MARKER} to retry")

    # The CPU op alone has a name of its own: after a failed CUDA build in this process, torch would
    # otherwise version it (residtap_C_v1.so), and the next process would compile residtap_C.so anew.
    name = _NAME if with_cuda else f"{_NAME}_cpu"
    if not (build_dir / f"{name}.so").exists():
        what = (f"C++ and CUDA (sm {', '.join(archs)}) extension" if with_cuda
                else "C++ extension (CPU only)")
        took = "about 3-4 minutes on 2 cores" if with_cuda else "under a minute"
        print(f"residtap: compiling the {what} for torch {torch.__version__} into {build_dir} (first use "
              f"only; {took})...", file=sys.stderr, flush=True)
    # cpp_extension reads the architectures from TORCH_CUDA_ARCH_LIST: set for this build only,
    # the process's own value (for its other JIT builds) put back after.
    saved_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_include_paths=extra_include,
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=os.environ.get("RESIDTAP_VERBOSE_BUILD", "") not in ("", "0"),
        )
    finally:
        if saved_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_archs
    if with_cuda:
        try:
            (build_dir / FAILED_MARKER).unlink(missing_ok=True)  # built with another toolkit since
        except OSError:
            pass
    return BuildInfo(True, with_cuda, archs, str(build_dir), None, cuda_skip)


def load_extension() -> BuildInfo:  # (not traced by torch.compile: see capture._untraced)
    """Build (once) and load the extension; never raises: failures are recorded in the result."""
    global _info
    with _lock:
        if _info is None:
            try:
                _info = _load()
                from . import ops

                ops._register_fake()
            except Exception as e:  # a missing compiler, a failed build: recorded, reported later
                cuda_home, cuda_skip = _cuda_plan()
                _info = BuildInfo(False, False, (), _tried_dir, f"{type(e).__name__}: {e}".strip(),
                                  cuda_skip)
        return _info


def build_info() -> BuildInfo | None:
    """The result of the last load attempt, or None when none was made in this process."""
    return _info
