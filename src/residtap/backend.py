"""The one place that decides which implementation of the capture op runs.

``"compiled"``: the C++/CUDA extension; an error if it cannot be built or lacks the device.
``"reference"``: the pure-PyTorch contract (identical results, slower, allocates).
``"auto"`` (default, or ``RESIDTAP_BACKEND``): compiled where possible, otherwise the reference
with one warning saying why.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple

import torch

BACKENDS = ("auto", "compiled", "reference")


class BackendUnavailableError(RuntimeError):
    """``backend="compiled"`` was asked for where the compiled op cannot run (says why)."""


class Choice(NamedTuple):
    name: str  # "compiled" or "reference"
    fn: Callable[..., None]  # signature of residtap.ops.capture_block
    why: str


_warned: set[str] = set()
# The hidden-state dtypes the compiled op takes (csrc/capture_common.h). The reference takes any
# floating dtype, so a model in another one (float64) is the reference's under "auto", not the op's
# argument error from inside the forward.
COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compiled_unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when the compiled op can run on ``device`` for hidden states of ``dtype`` (None: any
    dtype it takes), else why not."""
    from ._build import load_extension

    info = load_extension()
    if not info.loaded:
        return f"the extension could not be built or loaded ({info.error})"
    if device.type == "cuda" and not info.with_cuda:
        return f"the extension was built without CUDA ({info.cuda_skipped_because})"
    if device.type not in ("cpu", "cuda"):
        return f"no compiled kernel for device type {device.type!r}"
    if dtype is not None and dtype not in COMPILED_DTYPES:
        return f"the compiled op takes float32, bfloat16 or float16 hidden states, not {dtype}"
    return None


def requested_backend(backend: str | None) -> str:
    """``backend`` as asked for: the argument, else ``RESIDTAP_BACKEND``, else "auto"; a ValueError
    naming whichever of the two holds something else."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        return backend
    env = os.environ.get("RESIDTAP_BACKEND") or "auto"
    if env not in BACKENDS:
        raise ValueError(f"RESIDTAP_BACKEND: expected one of {BACKENDS} or unset, got {env!r}")
    return env


def decide(requested: str | None, device: torch.device,
           dtype: torch.dtype | None = None) -> tuple[str, str]:
    """What :func:`choose` does for ``requested`` on ``device`` (for hidden states of ``dtype``, when
    given), without doing it: ("compiled", "requested" | "available"), ("reference", "requested"),
    ("reference", why the compiled op cannot run) under "auto", or ("unavailable", why) where
    "compiled" was asked for and cannot run."""
    requested = requested_backend(requested)
    if requested == "reference":
        return "reference", "requested"
    reason = compiled_unavailable_reason(torch.device(device), dtype)
    if reason is None:
        return "compiled", "requested" if requested == "compiled" else "available"
    return ("unavailable" if requested == "compiled" else "reference"), reason


def choose(requested: str | None, device: torch.device, dtype: torch.dtype | None = None) -> Choice:
    name, why = decide(requested, device, dtype)
    from . import ops, reference

    if name == "compiled":
        return Choice("compiled", ops.capture_block, why)
    if name == "unavailable":
        raise BackendUnavailableError(f"backend='compiled' was requested but {why}")
    if why == "requested":
        return Choice("reference", reference.capture_block, why)
    reason = why
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"residtap: using the pure-PyTorch reference because {reason}. Results are "
                      "identical, only slower; pass backend='compiled' to make this an error.",
                      RuntimeWarning, stacklevel=3)
    return Choice("reference", reference.capture_block, reason)


def fused_norm_ok(norm, weight, bias, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the op may compute ``normed`` itself for this (norm, dtype, device): the norm is a
    LayerNorm whose parameters (``weight``, ``bias``, each may be None) share the model's dtype
    and device and are contiguous, as the op requires. When False the capture calls the
    final-norm module instead (exact by construction). Whether the CUDA op then replays torch's
    arithmetic or calls torch is :func:`norm_parity`'s decision."""
    if norm.kind != "layer_norm":
        return False
    params = [p for p in (weight, bias) if p is not None]
    return all(p.dtype == dtype and p.device == torch.device(device) and p.is_contiguous()
               for p in params)


# The parity guard. The CUDA op replays torch's own CUDA LayerNorm arithmetic (normed, and the
# stats mean/rstd) step for step; a future torch that changed its kernel would make the replay
# differ. So the first time a combination is used, the op runs on a probe next to torch and, if
# a single bit differs, the capture asks the op for torch's own norm ("torch_layer_norm") from
# then on, with one warning. Probing needs one host sync: Capture probes at set-up; a
# combination first seen inside a forward (where nothing may sync) takes torch's norm, unprobed.
_parity: dict[tuple, bool] = {}  # (device, dtype, d_model, normed?, weight?, bias?, eps) -> verdict


def norm_parity(device, dtype: torch.dtype, d_model: int, weight=None, bias=None, eps: float = 1e-5,
                *, normed: bool | None = None, probe: bool = True) -> bool | None:
    """Whether the compiled op's fused LayerNorm is bit-identical to torch's for this combination:
    ``normed`` (default: whether ``weight`` or ``bias`` is given) with ``weight``/``bias``, else the
    stats-only moments (mean, rstd). Only CUDA replays torch's arithmetic; every other device
    answers True. With ``probe=False`` an unprobed combination answers None instead of
    synchronizing."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    normed = _wants_normed(normed, weight, bias)
    key = (str(device), dtype, int(d_model), normed, weight is not None, bias is not None, float(eps))
    if key in _parity or not probe:
        return _parity.get(key)
    ok, detail = _probe_parity(device, dtype, d_model, weight, bias, eps, normed)
    _parity[key] = ok
    if not ok:
        warnings.warn(
            f"residtap: the fused CUDA LayerNorm differs from torch {torch.__version__} for "
            f"{dtype}, width {d_model} ({detail}); calling torch's own layer_norm for it instead "
            "(exact, a little slower). Please report this with `residtap env`.",
            RuntimeWarning, stacklevel=3)
    return ok


def warn_unprobed(device, dtype: torch.dtype, d_model: int) -> None:
    """Once per combination: a forward met a (device, dtype, width) the set-up probe did not cover,
    so torch's own norm runs for it (see norm_parity)."""
    key = f"unprobed {device} {dtype} {d_model}"
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"residtap: the fused CUDA LayerNorm was not checked against torch for {dtype}, width "
        f"{d_model} on {device} when this capture was set up (the model was moved or cast, or its "
        "final norm or that norm's eps changed, after `with residtap.capture(...)` was entered, or its "
        "hidden states have another dtype than its parameters), so torch's own layer_norm computes "
        "normed and stats there: exact, a little slower. Enter the capture after moving or casting "
        "the model.", RuntimeWarning, stacklevel=2)


def _wants_normed(normed: bool | None, weight, bias) -> bool:
    """Whether a parity question is about normed: as told, else whether weight or bias is given."""
    return (weight is not None or bias is not None) if normed is None else bool(normed)


def _probe_parity(device, dtype, d_model, weight, bias, eps, normed=None) -> tuple[bool, str]:
    """Run the op and the reference op on probe rows (centred at 0 and at 30, several row counts)."""
    from . import ops, reference

    normed = _wants_normed(normed, weight, bias)
    norm_kind = "layer_norm" if normed else "none"
    g = torch.Generator(device="cpu").manual_seed(1234)
    for rows in (1, 7, 133):
        x = torch.randn(1, rows, d_model, generator=g)
        x[:, rows // 2:] += 30.0
        x = x.to(device=device, dtype=dtype)
        got, want = {}, {}
        for res, fn in ((got, ops.capture_block), (want, reference.capture_block)):
            res["mean"], res["rstd"] = (torch.empty(1, rows, device=device) for _ in range(2))
            if norm_kind != "none":
                res["normed"] = torch.empty_like(x)
            with torch.no_grad():
                fn(x, norm_weight=weight, norm_bias=bias, norm_kind=norm_kind, eps=eps, **res)
        for name in got:
            if not torch.equal(got[name], want[name]):
                return False, f"{name} differs on a {rows}-row probe"
    return True, ""
