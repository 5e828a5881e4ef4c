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


class Choice(NamedTuple):
    name: str  # "compiled" or "reference"
    fn: Callable[..., None]  # signature of residtap.ops.capture_block
    why: str


_warned: set[str] = set()


def compiled_unavailable_reason(device: torch.device) -> str | None:
    """None when the compiled op can run on ``device``, else why not."""
    from ._build import load_extension

    info = load_extension()
    if not info.loaded:
        return f"the extension could not be built or loaded ({info.error})"
    if device.type == "cuda" and not info.with_cuda:
        return f"the extension was built without CUDA ({info.cuda_skipped_because})"
    if device.type not in ("cpu", "cuda"):
        return f"no compiled kernel for device type {device.type!r}"
    return None


def choose(requested: str | None, device: torch.device) -> Choice:
    requested = requested or os.environ.get("RESIDTAP_BACKEND", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {requested!r}")
    from . import ops, reference

    if requested == "reference":
        return Choice("reference", reference.capture_block, "requested")
    reason = compiled_unavailable_reason(torch.device(device))
    if reason is None:
        return Choice("compiled", ops.capture_block, "requested" if requested == "compiled" else "available")
    if requested == "compiled":
        raise RuntimeError(f"backend='compiled' was requested but {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"residtap: using the pure-PyTorch reference because {reason}. Results are "
                      "identical, only slower; pass backend='compiled' to make this an error.",
                      RuntimeWarning, stacklevel=3)
    return Choice("reference", reference.capture_block, reason)


def fused_norm_ok(norm, dtype: torch.dtype, device: torch.device, d_model: int) -> bool:
    """Whether the compiled op may compute ``normed`` itself for this (norm, dtype, width, device);
    when False the capture calls the final-norm module instead (exact by construction).

    The CPU op calls torch's own layer_norm, so it always matches. The CUDA parity guard (which
    needs one host sync) belongs here, cached per combination; Capture calls this at set-up for
    the model's dtype so that nothing synchronizes inside the forward.
    """
    if norm.kind != "layer_norm":
        return False
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    return all(p.dtype == dtype and p.device == torch.device(device) for p in params)
