"""Capture the residual stream into preallocated buffers, from forward hooks.

Data flows one way: the model's forward calls a hook → the hook hands the block's input and output
to one op → the op writes into buffers this object owns. Hooks exist only inside ``with``; they are
removed in ``finally``, whatever the forward raised.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from . import backend as _backend
from .arch import Layout, resolve_layout
from .reference import STAT_NAMES, Stats, take
from .selection import (LAST, NOT_GIVEN, KeepMask, PositionPlan, last_token_index, resolve_dtype,
                        resolve_layers, resolve_outputs, resolve_position_spec, resolve_positions)

_UNSEEN = object()  # positions="last": the model's forward has not been called since the last use


class CaptureError(RuntimeError):
    """Reading a capture that has nothing valid to give (not run, failed, not requested)."""


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What to capture, validated at construction (``ValueError`` naming the argument)."""

    layer_ids: tuple[int, ...]
    positions: object  # None | int | slice | tuple[int, ...] | "last" | KeepMask
    dtype: torch.dtype | None
    outputs: tuple[str, ...]
    backend: str | None

    @classmethod
    def make(cls, layout: Layout, layers, positions, dtype, outputs, backend) -> "CaptureConfig":
        outputs = resolve_outputs(outputs)
        if "normed" in outputs and layout.final_norm is None:
            raise ValueError(f"outputs: 'normed' needs a final norm, but {layout.family} has none "
                             "(pass final_norm= to name one)")
        positions = resolve_position_spec(positions)  # tensors are read once here, never in a forward
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

    ``positions`` (gathered on the device, bit-identical to gathering the reference):

    - ``None``: every position; an int, a slice, or a sequence / 1-D tensor of ints (negatives
      count from the end): the same positions in every row.
    - ``"last"``: each row's last real token given the ``attention_mask`` the model was called with
      (left, right or any padding; the model's own forward is hooked to read it, so call the model
      you passed; no mask means every token is real). ``n_pos`` is 1; ``cap.positions`` says which
      position each row used. Computed on the device inside the forward, with no host sync
      (give the mask on the model's device, as HF expects; a mask elsewhere is copied over).
    - a bool tensor ``[batch, seq]`` (e.g. ``attention_mask.bool()``): keep the True tokens, packed:
      ``cap.resid`` is ``[len(layer_ids), n_kept, d_model]`` (stats ``[len(layer_ids), n_kept]``),
      in row-major order, and ``cap.kept`` ``[n_kept, 2]`` holds the (row, position) of each.
      Finding the kept tokens reads the mask once, at construction (one host sync there); each
      forward must have exactly that ``[batch, seq]`` shape.

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
        self._shape = None  # (batch, seq) of the last forward
        self._packed = isinstance(self.config.positions, KeepMask)
        self._attention_mask = _UNSEEN
        self._mask_arg = _positional_index(model, "attention_mask")
        # How the op gets normed / mean+rstd, decided per shape in _begin: op_norm_kind is passed
        # to the op; fused_normed says whether the op writes normed (else the module's code does).
        self._op_norm_kind = "none"
        self._fused_normed = False
        self._op_norm_params = (None, None)
        self._probe_parity()

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("Capture: this capture is already active (entered twice)")
        blocks = self.layout.blocks
        try:
            if self.config.positions == LAST:
                self._attention_mask = _UNSEEN
                self._handles.append(self.model.register_forward_pre_hook(self._on_model_call,
                                                                          with_kwargs=True))
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

    def _on_model_call(self, _module, args, kwargs):
        # Blocks only see a processed (often 4-D) mask; the [batch, seq] one is the model's argument.
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_arg is not None and len(args) > self._mask_arg:
            mask = args[self._mask_arg]
        self._attention_mask = mask

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
        rows, n_pos = batch, 1
        spec = self.config.positions
        if self._packed:
            if (batch, seq) != (spec.batch, spec.seq):
                raise ValueError(f"positions: the bool mask is [batch, seq] = [{spec.batch}, {spec.seq}] "
                                 f"but the forward's hidden states are [{batch}, {seq}, ...]")
            self._sel = spec.flat_index(hidden.device)  # into the output viewed as [1, batch*seq, d]
            rows, n_pos = 1, spec.n_kept
        elif spec == LAST:
            self._sel = self._last_selection(batch, seq, hidden.device)
        else:
            plan = self._plans.get(seq)
            if plan is None:
                plan = self._plans[seq] = resolve_positions(spec, seq)
            self._sel = plan.as_selection(hidden.device)
            n_pos = plan.n_pos
        self._shape = (batch, seq)
        cap_dtype = self.config.dtype or hidden.dtype
        key = (rows, n_pos, d_model, cap_dtype, hidden.dtype, hidden.device)
        if key != self._key:
            self._allocate(len(self.config.layer_ids), rows, n_pos, d_model, cap_dtype, hidden)
            self._key = key
            self._choice = _backend.choose(self.config.backend, hidden.device)
            self._plan_norm(hidden.dtype, hidden.device, d_model)

    def _norm_params(self):
        norm = self.layout.norm
        return tuple(p.detach() if p is not None else None for p in (norm.weight, norm.bias))

    def _probe_parity(self) -> None:
        """The CUDA parity guard, run here at set-up (one host sync) for the model's own dtype and
        device, so that nothing synchronizes inside a forward. See backend.norm_parity."""
        outputs = self.config.outputs
        if "normed" not in outputs and "stats" not in outputs:
            return
        param = next(self.model.parameters(), None)
        if param is None or param.device.type != "cuda":
            return
        d_model = self._guess_d_model()
        if d_model is None or _backend.choose(self.config.backend, param.device).name != "compiled":
            return
        norm = self.layout.norm
        if "normed" in outputs and _backend.fused_norm_ok(norm, param.dtype, param.device, d_model):
            _backend.norm_parity(param.device, param.dtype, d_model, *self._norm_params(), norm.eps)
        if "stats" in outputs:
            _backend.norm_parity(param.device, param.dtype, d_model, None, None, norm.eps)

    def _guess_d_model(self) -> int | None:
        w = self.layout.norm.weight
        if w is not None:
            return int(w.shape[-1])
        emb = getattr(self.model, "get_input_embeddings", lambda: None)()
        return int(emb.weight.shape[-1]) if getattr(emb, "weight", None) is not None else None

    def _plan_norm(self, dtype: torch.dtype, device: torch.device, d_model: int) -> None:
        """Inside the forward, without syncing: a combination the set-up probe did not cover (or
        one whose probe failed) gets torch's own norm from the op ("torch_layer_norm")."""
        norm, outputs = self.layout.norm, self.config.outputs
        self._fused_normed = "normed" in outputs and _backend.fused_norm_ok(norm, dtype, device, d_model)
        compiled = self._choice.name == "compiled"

        def replay_ok(weight, bias) -> bool:
            return not compiled or _backend.norm_parity(device, dtype, d_model, weight, bias, norm.eps,
                                                        probe=False) is True

        self._op_norm_params = self._norm_params() if self._fused_normed else (None, None)
        ok = ((not self._fused_normed or replay_ok(*self._op_norm_params))
              and ("stats" not in outputs or replay_ok(None, None)))
        if self._fused_normed or "stats" in outputs:
            self._op_norm_kind = "layer_norm" if ok and self._fused_normed else (
                "none" if ok else "torch_layer_norm")
        else:
            self._op_norm_kind = "none"

    def _last_selection(self, batch: int, seq: int, device: torch.device):
        """positions="last": each row's last real token, from the mask the model was called with."""
        mask, self._attention_mask = self._attention_mask, _UNSEEN  # use each forward's mask once
        if mask is _UNSEEN:
            raise RuntimeError(
                f"positions='last': the blocks ran but {type(self.model).__name__}.forward was not called "
                "(its attention_mask is read there); call the model you passed to residtap.capture")
        if mask is None:  # no padding: every row ends at the last position
            return slice(seq - 1, seq)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch \
                or mask.shape[1] < seq:
            got = (f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"positions='last': expected the model's attention_mask to be [batch, "
                             f">= seq] = [{batch}, >= {seq}] (1 = real token), got {got}")
        index = last_token_index(mask, seq)  # [batch, 1] int64, device ops only: no host sync
        return index if index.device == device else index.to(device, non_blocking=True)

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
        if self._packed:  # [batch, seq, d] as one row [1, batch*seq, d]: a view when contiguous
            out = out.reshape(1, -1, out.shape[-1])
            inp = inp.reshape(1, -1, inp.shape[-1]) if inp is not None else None
        index = self._sel
        if isinstance(index, slice):  # a contiguous span is a view: nothing to gather
            out = out[:, index]
            inp = inp[:, index] if inp is not None else None
            index = None
        bufs = {name: buf[k] for name, buf in self._buffers.items()}
        fused_norm = self._fused_normed
        weight, bias = self._op_norm_params
        self._choice.fn(
            out, inp, index, norm_weight=weight, norm_bias=bias,
            norm_kind=self._op_norm_kind, eps=self.layout.norm.eps,
            resid=bufs.get("resid"), delta=bufs.get("delta"),
            normed=bufs.get("normed") if fused_norm else None,
            mean=bufs.get("mean"), rstd=bufs.get("rstd"), l2=bufs.get("l2"), maxabs=bufs.get("maxabs"),
        )
        if "normed" in bufs and not fused_norm:
            # The module's own code on the full tensor, then the gather: exact by construction.
            with torch.no_grad():
                normed = self.layout.final_norm(full_out)
                if self._packed:
                    normed = normed.reshape(1, -1, normed.shape[-1])
                bufs["normed"].copy_(take(normed, self._sel))
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

    def _check_complete(self, attr: str) -> None:
        if self._state == "empty":
            raise CaptureError(f"cap.{attr}: no forward has run inside this capture yet")
        if self._state == "failed":
            raise CaptureError(f"cap.{attr}: the last forward raised, so the buffers are incomplete")
        if self._state == "running":
            raise CaptureError(f"cap.{attr}: the last forward reached {self._written} of "
                               f"{len(self.config.layer_ids)} selected layers")

    def _get(self, name: str, output: str) -> torch.Tensor:
        if output not in self.config.outputs:
            raise CaptureError(f"cap.{output}: {output!r} was not requested (outputs="
                               f"{self.config.outputs}); pass outputs=(..., {output!r})")
        self._check_complete(output)
        buf = self._buffers[name]
        return buf[:, 0] if self._packed else buf  # packed rows: [layers, n_kept, ...]

    @property
    def kept(self) -> torch.Tensor:
        """int64 ``[n_kept, 2]``: the (row, position) of each token a bool-mask ``positions`` keeps,
        in the order of the packed outputs (``cap.resid[l, i]`` is token ``kept[i]``)."""
        if not self._packed:
            raise CaptureError("cap.kept: only a bool mask [batch, seq] as positions= packs tokens; "
                               f"this capture has positions={self.config.positions!r} (see cap.positions)")
        return self.config.positions.kept

    @property
    def positions(self) -> torch.Tensor:
        """int64 ``[batch, n_pos]``: the position of each captured token in the last forward (for
        ``"last"``, each row's last real token), on the capture's device. Built when read."""
        if self._packed:
            raise CaptureError("cap.positions: a bool mask packs tokens; their (row, position) is cap.kept")
        self._check_complete("positions")
        (batch, seq), sel = self._shape, self._sel
        device = next(iter(self._buffers.values())).device
        if isinstance(sel, torch.Tensor):
            return sel if sel.dim() == 2 else sel.unsqueeze(0).expand(batch, -1)
        start, stop = (0, seq) if sel is None else (sel.start, sel.stop)
        return torch.arange(start, stop, device=device).unsqueeze(0).expand(batch, -1)

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


def _positional_index(model: nn.Module, name: str) -> int | None:
    """Where ``name`` sits among ``model.forward``'s positional parameters (None if it does not)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == name:
            return i
    return None


def capture(model: nn.Module, layers=None, positions=None, dtype=None, outputs=("resid",), *,
            blocks=NOT_GIVEN, final_norm=NOT_GIVEN, backend: str | None = None) -> Capture:
    """``with residtap.capture(model, ...) as cap: model(x)`` — see :class:`Capture`."""
    return Capture(model, layers, positions, dtype, outputs, blocks=blocks, final_norm=final_norm,
                   backend=backend)
