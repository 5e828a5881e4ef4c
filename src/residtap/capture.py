"""Capture the residual stream into preallocated buffers, from forward hooks.

Data flows one way: the model's forward calls a hook → the hook hands the block's input and output
to one op → the op writes into buffers this object owns. Hooks exist only inside ``with``; they are
removed in ``finally``, whatever the forward raised.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import backend as _backend
from .arch import Layout, resolve_layout
from .reference import STAT_NAMES, Stats, take
from .selection import (NOT_GIVEN, PositionPlan, resolve_dtype, resolve_layers, resolve_outputs,
                        resolve_positions)


class CaptureError(RuntimeError):
    """Reading a capture that has nothing valid to give (not run, failed, not requested)."""


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What to capture, validated at construction (``ValueError`` naming the argument)."""

    layer_ids: tuple[int, ...]
    positions: object  # None | int | slice | tuple[int, ...]
    dtype: torch.dtype | None
    outputs: tuple[str, ...]
    backend: str | None

    @classmethod
    def make(cls, layout: Layout, layers, positions, dtype, outputs, backend) -> "CaptureConfig":
        outputs = resolve_outputs(outputs)
        if "normed" in outputs and layout.final_norm is None:
            raise ValueError(f"outputs: 'normed' needs a final norm, but {layout.family} has none "
                             "(pass final_norm= to name one)")
        if isinstance(positions, torch.Tensor):  # read once here, never inside the forward
            resolve_positions(positions.detach().cpu(), 2**62)
            positions = tuple(positions.tolist())
        elif positions is not None and not isinstance(positions, slice):
            resolve_positions(positions, 2**62)  # type checks now; range checks per sequence length
            positions = positions if isinstance(positions, int) else tuple(positions)
        if backend is not None and backend not in _backend.BACKENDS:
            raise ValueError(f"backend: expected one of {_backend.BACKENDS} or None, got {backend!r}")
        return cls(tuple(resolve_layers(layers, layout.n_layers)), positions,
                   resolve_dtype(dtype), outputs, backend)


class Capture:
    """Capture the raw residual stream (and optionally delta, normed, stats) of every selected layer.

    Residual index 0 is the embeddings (``hidden_states[0]``), index ``i`` the raw output of block
    ``i-1``, before any final norm. After a forward inside ``with``::

        cap.layer_ids   # the residual indices captured, ascending
        cap.resid       # [len(layer_ids), batch, n_pos, d_model]
        cap.delta       # same shape: resid_i - resid_{i-1} (what block i-1 added); at 0 the embeddings
        cap.normed      # same shape: the model's final norm applied to resid_i
        cap.stats       # Stats(mean, rstd, l2, maxabs), each [len(layer_ids), batch, n_pos] float32

    The tensors are views into buffers this object allocates once per shape and reuses: they stay
    valid until the next forward inside this capture overwrites them. Keep a copy with ``.clone()``
    (or ``.cpu()``) if you need them longer.

    Example::

        with residtap.capture(model, layers=[-1], outputs=("resid", "normed")) as cap:
            model(input_ids)
        last_raw, last_normed = cap.resid[0], cap.normed[0]
    """

    def __init__(self, model: nn.Module, layers=None, positions=None, dtype=None,
                 outputs=("resid",), *, blocks=NOT_GIVEN, final_norm=NOT_GIVEN,
                 backend: str | None = None):
        self.model = model
        self.layout = resolve_layout(model, blocks=blocks, final_norm=final_norm)
        self.config = CaptureConfig.make(self.layout, layers, positions, dtype, outputs, backend)
        self._slot = {lid: k for k, lid in enumerate(self.config.layer_ids)}
        self._handles: list = []
        self._plans: dict[int, PositionPlan] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._key = None
        self._choice: _backend.Choice | None = None
        self._state = "empty"  # empty → running → complete | failed
        self._written = 0
        self._sel = None
        self._norm_kind = "none"
        w = self.layout.norm.weight
        if "normed" in self.config.outputs and w is not None:
            # Any parity check (one host sync) runs now, at set-up, not inside the forward.
            _backend.fused_norm_ok(self.layout.norm, w.dtype, w.device, w.shape[-1])

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("Capture: this capture is already active (entered twice)")
        blocks = self.layout.blocks
        try:
            self._handles.append(blocks[0].register_forward_pre_hook(self._on_first_block, with_kwargs=True))
            for i, blk in enumerate(blocks):
                if i + 1 in self._slot:
                    self._handles.append(blk.register_forward_hook(self._block_hook(i), with_kwargs=True))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove_hooks()
        if exc_type is not None and self._state == "running":
            self._state = "failed"
        # never swallow the forward's exception

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def _on_first_block(self, _module, args, kwargs):
        hidden = self.layout.hidden_from_args(args, kwargs)
        self._begin(hidden)
        if 0 in self._slot:
            self._write(0, hidden, None)

    def _block_hook(self, i: int):
        def hook(_module, args, kwargs, output):
            self._write(i + 1, self.layout.hidden_from_output(output),
                        self.layout.hidden_from_args(args, kwargs))
        return hook

    # ------------------------------------------------------------------ per forward
    def _begin(self, hidden: torch.Tensor) -> None:
        """Start of a forward: resolve positions for this length and (re)allocate if the shape changed."""
        self._state, self._written = "running", 0
        if hidden.dim() != 3:
            raise RuntimeError(f"residtap: expected the first block's hidden state to be "
                               f"[batch, seq, d_model], got shape {tuple(hidden.shape)}")
        batch, seq, d_model = hidden.shape
        plan = self._plans.get(seq)
        if plan is None:
            plan = self._plans[seq] = resolve_positions(self.config.positions, seq)
        self._sel = plan.as_selection(hidden.device)
        cap_dtype = self.config.dtype or hidden.dtype
        key = (batch, plan.n_pos, d_model, cap_dtype, hidden.dtype, hidden.device)
        if key != self._key:
            self._allocate(len(self.config.layer_ids), batch, plan.n_pos, d_model, cap_dtype, hidden)
            self._key = key
            self._choice = _backend.choose(self.config.backend, hidden.device)
            self._norm_kind = ("layer_norm" if _backend.fused_norm_ok(
                self.layout.norm, hidden.dtype, hidden.device, d_model) else "module")

    def _allocate(self, n_layers, batch, n_pos, d_model, cap_dtype, like: torch.Tensor) -> None:
        self._buffers = {}
        for name in ("resid", "delta", "normed"):
            if name in self.config.outputs:
                self._buffers[name] = torch.empty(n_layers, batch, n_pos, d_model, dtype=cap_dtype,
                                                  device=like.device)
        if "stats" in self.config.outputs:
            for name in STAT_NAMES:
                self._buffers[name] = torch.empty(n_layers, batch, n_pos, dtype=torch.float32,
                                                  device=like.device)

    def _write(self, layer_id: int, out: torch.Tensor, inp: torch.Tensor | None) -> None:
        k = self._slot[layer_id]
        full_out = out = out.detach()
        inp = inp.detach() if inp is not None else None
        index = self._sel
        if isinstance(index, slice):  # a contiguous span is a view: nothing to gather
            out = out[:, index]
            inp = inp[:, index] if inp is not None else None
            index = None
        bufs = {name: buf[k] for name, buf in self._buffers.items()}
        norm = self.layout.norm
        fused_norm = self._norm_kind == "layer_norm"
        self._choice.fn(
            out, inp, index,
            norm_weight=norm.weight.detach() if fused_norm and norm.weight is not None else None,
            norm_bias=norm.bias.detach() if fused_norm and norm.bias is not None else None,
            norm_kind="layer_norm" if fused_norm else "none", eps=norm.eps,
            resid=bufs.get("resid"), delta=bufs.get("delta"),
            normed=bufs.get("normed") if fused_norm else None,
            mean=bufs.get("mean"), rstd=bufs.get("rstd"), l2=bufs.get("l2"), maxabs=bufs.get("maxabs"),
        )
        if "normed" in bufs and not fused_norm:
            # The module's own code on the full tensor, then the gather: exact by construction.
            with torch.no_grad():
                bufs["normed"].copy_(take(self.layout.final_norm(full_out), self._sel))
        self._written += 1
        if self._written == len(self.config.layer_ids):
            self._state = "complete"

    # ------------------------------------------------------------------ results
    @property
    def layer_ids(self) -> list[int]:
        return list(self.config.layer_ids)

    @property
    def backend(self) -> str | None:
        """"compiled" or "reference" once a forward has run."""
        return self._choice.name if self._choice else None

    def _get(self, name: str, output: str) -> torch.Tensor:
        if output not in self.config.outputs:
            raise CaptureError(f"cap.{output}: {output!r} was not requested (outputs="
                               f"{self.config.outputs}); pass outputs=(..., {output!r})")
        if self._state == "empty":
            raise CaptureError(f"cap.{output}: no forward has run inside this capture yet")
        if self._state == "failed":
            raise CaptureError(f"cap.{output}: the last forward raised, so the buffers are incomplete")
        if self._state == "running":
            raise CaptureError(f"cap.{output}: the last forward reached {self._written} of "
                               f"{len(self.config.layer_ids)} selected layers")
        return self._buffers[name]

    @property
    def resid(self) -> torch.Tensor:
        return self._get("resid", "resid")

    @property
    def delta(self) -> torch.Tensor:
        return self._get("delta", "delta")

    @property
    def normed(self) -> torch.Tensor:
        return self._get("normed", "normed")

    @property
    def stats(self) -> Stats:
        return Stats(*(self._get(s, "stats") for s in STAT_NAMES))

    def __repr__(self) -> str:
        return (f"Capture({self.layout.family}, layers={self.layer_ids}, outputs={self.config.outputs}, "
                f"state={self._state})")


def capture(model: nn.Module, layers=None, positions=None, dtype=None, outputs=("resid",), *,
            blocks=NOT_GIVEN, final_norm=NOT_GIVEN, backend: str | None = None) -> Capture:
    """``with residtap.capture(model, ...) as cap: model(x)`` — see :class:`Capture`."""
    return Capture(model, layers, positions, dtype, outputs, blocks=blocks, final_norm=final_norm,
                   backend=backend)
