"""Typed Python wrappers over ``torch.ops.residtap.*`` and their fake implementations.

The compiled library is loaded by :mod:`residtap._build`; nothing here imports it at module load,
so a machine that cannot build it can still import residtap and use the reference.
"""

from __future__ import annotations

import contextlib

import torch

NORM_KINDS = ("layer_norm", "torch_layer_norm", "none")


def capture_block(
    out: torch.Tensor,  # [batch, seq, d_model]
    inp: torch.Tensor | None = None,  # [batch, seq, d_model]
    index: torch.Tensor | None = None,  # int64 [n_pos] or [batch, n_pos]
    *,
    norm_weight: torch.Tensor | None = None,  # [d_model]
    norm_bias: torch.Tensor | None = None,  # [d_model]
    norm_kind: str = "none",
    eps: float = 1e-5,
    resid: torch.Tensor | None = None,  # [batch, n_pos, d_model], capture dtype
    delta: torch.Tensor | None = None,  # [batch, n_pos, d_model], capture dtype
    normed: torch.Tensor | None = None,  # [batch, n_pos, d_model], capture dtype
    mean: torch.Tensor | None = None,  # [batch, n_pos] float32
    rstd: torch.Tensor | None = None,  # [batch, n_pos] float32
    l2: torch.Tensor | None = None,  # [batch, n_pos] float32
    maxabs: torch.Tensor | None = None,  # [batch, n_pos] float32
) -> None:
    """Write the requested outputs of one block into caller-owned buffers (see csrc/ops.cpp).

    Example::

        resid = torch.empty(2, 5, 768)
        capture_block(block_out, block_in, resid=resid)   # resid[:] = block_out

    The first call builds (once per machine) and loads the library where nothing has yet.
    """
    if not _fake_registered:  # (set once the library is loaded)
        _load_or_raise()
    torch.ops.residtap.capture_block(
        out, inp, index, norm_weight, norm_bias, norm_kind, eps,  # the schema's float: ints too, never str
        resid, delta, normed, mean, rstd, l2, maxabs,
    )


def _load_or_raise() -> None:
    from ._build import load_extension

    info = load_extension()
    if not info.loaded:
        raise RuntimeError(f"residtap.ops: the compiled library could not be built or loaded ({info.error}); "
                           "residtap.reference.capture_block computes the same outputs in PyTorch")


@contextlib.contextmanager
def _thread_setting(op_name: str, value):
    """Sets one of the compiled library's per-thread launch settings (``torch.ops.residtap.<op_name>``,
    which returns the previous value) for the block, and puts the previous value back after it,
    also when it raises. Loads the library where nothing has yet (so that the setting holds for the
    launches in the block); a no-op where it cannot be loaded."""
    from ._build import load_extension

    load_extension()
    try:
        set_value = getattr(torch.ops.residtap, op_name)
    except (AttributeError, RuntimeError):
        yield
        return
    previous = set_value(value)
    try:
        yield
    finally:
        set_value(previous)


def grid_cap(blocks: int):
    """Within the block, this thread's CUDA launches of capture_block use at most ``blocks`` thread
    blocks each (0: no cap), so that a launch beside other work leaves it most of the GPU; the
    outputs are the same bytes (the kernels loop over rows). A no-op where the compiled library is
    not loaded (the reference has no launches to cap)."""
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
        raise ValueError(f"blocks: expected an int >= 0 (0: no cap), got {blocks!r}")
    return _thread_setting("_set_grid_cap", blocks)


def staged_rows(on: bool = True):
    """Within the block, this thread's CUDA launches of capture_block use the staged variant of the
    fast row kernel (each block copies its next rows into shared memory while it works on the
    current ones) or, with ``on=False``, the plain one. Experimental, off by default: the outputs
    are the same bytes either way, and which is faster is measured by benchmarks/bench_op.py. A
    no-op where the compiled library is not loaded."""
    if not isinstance(on, bool):
        raise ValueError(f"on: expected True or False, got {on!r}")
    return _thread_setting("_set_staged_rows", on)


_fake_registered = False


def _register_fake() -> None:
    """Called once the library is loaded: lets torch.compile trace through the op."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("residtap::capture_block")
    def _(out, inp, index, norm_weight, norm_bias, norm_kind, eps,
          resid, delta, normed, mean, rstd, l2, maxabs):
        torch._check(out.dim() == 3, lambda: "residtap.capture_block: 'out' must be [batch, seq, d_model]")
        # Torch sends here any call with a meta tensor, real ones beside it included: refuse a tensor
        # on another device than out's, as the compiled op does (else the call writes nothing).
        for name, t in (("inp", inp), ("index", index), ("norm_weight", norm_weight),
                        ("norm_bias", norm_bias), ("resid", resid), ("delta", delta), ("normed", normed),
                        ("mean", mean), ("rstd", rstd), ("l2", l2), ("maxabs", maxabs)):
            torch._check(t is None or t.device == out.device,
                         lambda: f"residtap.capture_block: argument '{name}' expected a tensor on "
                                 f"{out.device}, got a tensor on {t.device}")
        return None

    _fake_registered = True
