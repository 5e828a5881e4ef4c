"""Capture the residual stream into preallocated buffers, from forward hooks.

Data flows one way: the model's forward calls a hook → the hook hands the block's input and output
to one op → the op writes into buffers this object owns. Hooks exist only inside ``with``; they are
removed in ``finally``, whatever the forward raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import sys
import threading
from typing import NamedTuple, NoReturn

import torch
from torch import nn

from . import backend as _backend
from .arch import (Layout, UnsupportedStreamError, attention_mask_of, forward_signature, mask_argument, module_device,
                   norm_width_mismatch, not_a_stream, resolve_layout, stream_changed, text_config, unwrapped)
from .overlap import OverlapError, SideStreams, tensor_version
from .reference import OUTPUTS, STAT_NAMES, Stats, take, without_autocast
from .selection import (LAST, NO_LAST_TOKEN, NOT_GIVEN, KeepMask, PositionPlan, last_token_index, resolve_dtype,
                        resolve_layers, resolve_outputs, resolve_position_spec, resolve_positions)

_UNSEEN = object()  # positions="last": the model's forward has not been called since the last use


class CaptureError(RuntimeError):
    """Reading a capture that has nothing valid to give (not run, failed, not requested)."""


class _DeviceOps(NamedTuple):
    """How the layers whose hidden states are on one (device, dtype) are captured: decided at the
    first such layer of a shape, inside the forward, without a host sync (see _plan_norm)."""

    choice: _backend.Choice
    norm_kind: str  # passed to the op
    fused_normed: bool  # the op writes normed; else the final-norm module's own code does
    norm_params: tuple  # (weight, bias) on this device for the op, or (None, None)
    norm_device: torch.device | None  # where the module runs when it computes normed itself
    stamp: _NormStamp  # the final norm's tensors when this was planned


class _NormStamp:
    """Identifies the final norm (the module, how it is re-applied, its eps) and its tensors and
    their contents by (device, data_ptr, version): a move, a replacement or an in-place update
    (training) changes it. Host-side reads only. It holds the module and the tensors, so their
    memory (and with it an equal stamp) cannot pass to a new object while the stamp is kept."""

    __slots__ = ("key", "_held")

    def __init__(self, params: tuple, hooked: bool = False, module=None, spec=None):
        self._held = (params, module)
        self.key = (tuple(None if p is None else (p.device, p.data_ptr(), tensor_version(p))
                          for p in params), hooked, id(module), spec)

    def __eq__(self, other) -> bool:
        return isinstance(other, _NormStamp) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What to capture, validated at construction (``ValueError`` naming the argument)."""

    layer_ids: tuple[int, ...]
    positions: object  # None | int | slice | tuple[int, ...] | "last" | KeepMask
    dtype: torch.dtype | None
    outputs: tuple[str, ...]
    backend: str | None
    overlap: bool = False

    @classmethod
    def make(cls, layout: Layout, layers, positions, dtype, outputs, backend,
             overlap: bool = False) -> "CaptureConfig":
        outputs = resolve_outputs(outputs)
        if "normed" in outputs and layout.final_norm is None:
            raise ValueError(f"outputs: 'normed' needs a final norm, but {layout.family} has none "
                             "(pass final_norm= to name one)")
        positions = resolve_position_spec(positions)  # tensors are read once here, never in a forward
        _backend.requested_backend(backend)  # the argument, or RESIDTAP_BACKEND when it is None
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap: expected True or False, got {overlap!r}")
        return cls(tuple(resolve_layers(layers, layout.n_layers)), positions,
                   resolve_dtype(dtype), outputs, backend, overlap)


class Capture:
    """Capture the raw residual stream (and optionally delta, normed, stats) of every selected layer.

    Residual index 0 is the embeddings (``hidden_states[0]``), index ``i`` the raw output of block
    ``i-1``, before any final norm. After a forward inside ``with``::

        cap.layer_ids   # the residual indices captured, ascending
        cap.resid       # [len(layer_ids), batch, n_pos, d_model]
        cap.delta       # same shape: what block i-1 added, its output - its input (= resid_i - resid_{i-1}
                        # unless the model changes the stream between blocks); at 0 the embeddings
        cap.normed      # same shape: the model's final norm applied to resid_i
        cap.stats       # Stats(mean, rstd, l2, maxabs), each [len(layer_ids), batch, n_pos] float32

    The tensors are views into buffers this object allocates once per shape and reuses: they stay
    valid until the next forward inside this capture overwrites them. Keep a copy with ``.clone()``
    (or ``.cpu()``) if you need them longer.

    ``positions`` (gathered on the device, bit-identical to gathering the reference):

    - ``None``: every position; an int, a slice, or a sequence / 1-D tensor of ints (negatives
      count from the end): the same positions in every row.
    - ``"last"``: each row's last real token given the ``attention_mask`` the model was called with
      (left, right or any padding; for the decoder blocks of an encoder-decoder model such as T5,
      its ``decoder_attention_mask``; the model's own forward is hooked to read it, so call the model
      you passed; no mask means every token is real). ``n_pos`` is 1; ``cap.positions`` says which
      position each row used. Computed on the device inside the forward, with no host sync
      (give the mask on the model's device, as HF expects; a mask elsewhere is copied over).
    - a bool tensor ``[batch, seq]`` (e.g. ``attention_mask.bool()``): keep the True tokens, packed:
      ``cap.resid`` is ``[len(layer_ids), n_kept, d_model]`` (stats ``[len(layer_ids), n_kept]``),
      in row-major order, and ``cap.kept`` ``[n_kept, 2]`` holds the (row, position) of each.
      Finding the kept tokens reads the mask once, at construction (one host sync there); each
      forward must have exactly that ``[batch, seq]`` shape.

    One layer at a time, on one device or several::

        cap.layer("resid", 12)        # [batch, n_pos, d_model]: a view, like cap.resid[k]
        cap.layer("stats", 12).rstd   # [batch, n_pos]
        cap.per_layer("normed")       # a list aligned with cap.layer_ids
        cap.devices                   # where each layer's buffers are, aligned with cap.layer_ids

    A model dispatched over several devices (``device_map`` / accelerate's hooks, or blocks moved by
    hand) is captured where it runs: each layer's buffers are allocated, at the first forward of a
    shape, on the device its hidden state arrives on (layer 0, the embeddings: where the first
    block's input is), and the op runs there (backend and parity guard per device). The stacked
    ``cap.resid``, ``delta``, ``normed`` and ``stats`` then cannot exist and raise CaptureError; read
    ``cap.layer`` / ``cap.per_layer``, or gather on one device with
    ``torch.stack([t.to(device) for t in cap.per_layer("resid")])``. With every layer on one device
    nothing changes: one stacked buffer per output, and ``cap.layer`` gives views into it.

    ``overlap=True`` (CUDA): each layer's capture runs on a side stream, beside the next blocks,
    instead of between them on the forward's stream; the model's own forward waits for all of them
    before it returns, so the buffers read the same afterwards (see residtap.overlap). It needs a
    model that does not modify its hidden states in place (HF's do not); one that does gets an
    OverlapError, where version counters exist (not under ``torch.inference_mode``).

    Example::

        with residtap.capture(model, layers=[-1], outputs=("resid", "normed")) as cap:
            model(input_ids)
        last_raw, last_normed = cap.resid[0], cap.normed[0]
    """

    def __init__(self, model: nn.Module, layers=None, positions=None, dtype=None,
                 outputs=("resid",), *, blocks=NOT_GIVEN, final_norm=NOT_GIVEN,
                 backend: str | None = None, overlap: bool = False):
        _untraced()
        self.model = model
        self.layout = resolve_layout(model, blocks=blocks, final_norm=final_norm)
        self.config = CaptureConfig.make(self.layout, layers, positions, dtype, outputs, backend, overlap)
        self._side = SideStreams() if overlap else None
        self._model_depth = 0  # how many calls of the model are running (see _on_model_enter)
        self._owner = None  # the thread whose call of the model made _model_depth 1
        self._begun_on = None  # the thread whose block 0 began the forward
        self._calls = 0  # outermost calls of the model so far; a forward begun in one is _begun_in
        self._begun_in = None
        self._slot = {lid: k for k, lid in enumerate(self.config.layer_ids)}
        self._handles: list = []
        self._block_handles: list = []  # the hooks on the blocks, kept after other hooks (see _hooks_last)
        self._plans: dict[int, PositionPlan] = {}
        # Buffers, allocated per shape in _begin. Every layer on one device: one stacked buffer per
        # name [n_layers, rows, n_pos, ...] and per-layer views into it; else per-layer buffers only.
        self._buffers: dict[str, torch.Tensor] = {}  # stacked; empty when stored per layer
        self._layer_bufs: list[dict[str, torch.Tensor]] = []  # per selected layer: [rows, n_pos, ...]
        self._buf_devices: list[torch.device] = []  # per selected layer: where its buffers are
        self._stacked = True
        self._spec = None  # (rows, n_pos, d_model, capture dtype) of the buffers
        self._key = None
        self._choice: _backend.Choice | None = None  # the first hidden state's device's
        self._ops: dict[tuple, _DeviceOps] = {}  # (device, dtype) -> how the op runs there, per shape
        self._norm_copies: dict[torch.device, tuple] = {}  # device -> (stamp, (weight, bias) copies)
        self._stamp: _NormStamp | None = None  # the final norm's, read once per forward (_begin)
        self._state = "empty"  # empty → running → complete | failed
        self._open = False  # a forward has begun at block 0 and neither completed nor left the model
        self._done: set[int] = set()  # the layer ids this forward has written
        self._sel = None  # the selection on the first hidden state's device
        self._sels: dict = {}  # device -> this forward's selection there
        self._shape = None  # (batch, seq) of the last forward
        self._stream = None  # (batch, seq, d_model) of the last forward
        self._packed = isinstance(self.config.positions, KeepMask)
        self._attention_mask = _UNSEEN
        self._signature = forward_signature(model)  # where a positional attention_mask sits
        self._mask_name = "attention_mask"  # the model's argument that masks the blocks' tokens (__enter__)
        # Modules that skip blocks at random while training (HF's OPT, XGLM and BioGPT decoders keep
        # config.layerdrop as their own .layerdrop): refused per call, see _on_model_enter.
        self._layerdrops = [(name, m) for name, m in model.named_modules()
                            if type(getattr(m, "layerdrop", None)) in (int, float)]
        # Where each selected layer's hidden state is expected (None: the first hidden state's
        # device), read from the blocks (_predict_homes) and corrected by what forwards show.
        self._homes: list[torch.device | None] = self._predict_homes()
        self._anchor = None  # the first hidden state's device when _homes were last read
        self._homes_version = 0  # part of the allocation key: bumped whenever _homes change
        self._probe_parity()

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("Capture: this capture is already active (entered twice)")
        self._refresh_blocks()  # the blocks the model holds now (one replaced or wrapped since set-up)
        blocks = self.layout.blocks
        self._refresh_norm()  # the model's final norm now, for the probe (and each forward's _begin)
        self._probe_parity()  # again: the model may have been moved or cast since construction
        try:
            if self.config.positions == LAST:
                self._attention_mask = _UNSEEN
                self._mask_name = mask_argument(self.model, blocks)
                self._handles.append(self.model.register_forward_pre_hook(_Hook(self._on_model_call),
                                                                          with_kwargs=True))
            self._model_depth = 0
            self._open = False
            self._handles.append(self.model.register_forward_pre_hook(_Hook(self._on_model_enter)))
            self._handles.append(self.model.register_forward_hook(_Hook(self._on_model_exit), always_call=True))
            self._hook_blocks()
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def _hook_blocks(self) -> None:
        """This capture's hooks on the blocks, kept apart in _block_handles (see _hooks_last)."""
        blocks = self.layout.blocks
        handles = [blocks[0].register_forward_pre_hook(_Hook(self._on_first_block), with_kwargs=True)]
        self._block_handles = handles  # (so that a failure part-way still removes what was registered)
        for i, blk in enumerate(blocks):
            if i + 1 in self._slot:
                # always_call: a hook before ours that raises once the block has returned (one that
                # stops the forward at this layer) must not keep this layer from being captured.
                handles.append(blk.register_forward_hook(_Hook(self._on_block_output, i), with_kwargs=True,
                                                         always_call=True))

    def _refresh_blocks(self, layout: Layout | None = None) -> bool:
        """The blocks as the model holds them now (``layout``, else Layout.with_current_blocks);
        whether they changed. Their devices are read again at the next forward."""
        if layout is None:
            layout = self.layout.with_current_blocks()
        if layout is self.layout:
            return False
        self.layout = layout
        self._anchor = None  # _begin reads the blocks' devices again
        if self.config.positions == LAST:
            self._mask_name = mask_argument(self.model, layout.blocks)
        return True

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove_hooks()
        self._open = False
        if exc_type is not None and self._state == "running":
            self._state = "failed"
        if self._side is not None:
            self._join(check=exc_type is None)  # never swallow the forward's exception

    def _on_model_enter(self, module, _args):
        if module is not self.model or _in_backward():  # a replica sharing the model's hook dicts
            self._refuse_replica(module)  # (DataParallel's, refused), or a checkpointed forward
            return  # recomputed by backward (_in_backward)
        if self._model_depth:
            self._check_depth()
        if self._model_depth == 0:
            self._owner = _thread_id()
            self._refuse_layerdrop()
            self._calls += 1
            self._rehook_blocks()
            self._hooks_last()
            # A forward has started: until its first block runs, the buffers hold the previous
            # one's, which must not be read as this one's if it raises first (in the embeddings).
            self._state = "running"
            self._done.clear()
        self._model_depth += 1

    def _rehook_blocks(self) -> bool:
        """At the start of a forward: hook the blocks the model holds now where they were replaced
        or wrapped inside ``with`` (see _refresh_blocks); whether they changed."""
        changed = self._refresh_blocks(self._blocks_now())
        if changed:
            for h in self._block_handles:
                h.remove()
            self._hook_blocks()
        return changed

    def _refuse_replica(self, module: nn.Module) -> None:
        """torch.nn.DataParallel over several GPUs runs replicas of the model, which share its hooks
        but are other modules, on its threads: their forwards are not captured (the buffers are on
        one device and hold one forward), so one is refused rather than leaving the previous
        forward's buffers to be read as this one's."""
        if getattr(module, "_is_replica", False):
            self._refuse(f"a replica of {type(module).__name__} made by torch.nn.DataParallel ran inside the "
                         "capture: a capture records forwards of the model itself, on the device it is on, "
                         "not of replicas on several GPUs; nothing was kept from this forward. Capture the "
                         "model called on one device, or run one process per GPU (torchrun; residtap "
                         "extract does) with a capture in each")

    def _check_depth(self) -> None:  # (not traced by torch.compile: see _untraced)
        """At the start of a call of the model while another seems to be running (rare; host-side
        only): a call from another thread while the forward on that one runs is refused, since the
        buffers hold one forward at a time and the two would write them in turns. A depth that
        outlived its call is reset, so this call starts a forward: the last one ended by a
        BaseException that is not an Exception (KeyboardInterrupt, SystemExit, caught inside
        ``with``), for which torch skips _on_model_exit. Asked only at a nonzero depth."""
        if self._owner != _thread_id():
            if self._owner_runs_model():
                self._model_depth += 1  # (torch calls _on_model_exit for this call as it raises)
                self._two_threads(f"{type(self.model).__name__} was called")
            self._model_depth = 0
        elif _running_calls(self.model, sys._getframe()) <= 1:
            self._model_depth = 0

    def _owner_runs_model(self) -> bool:
        """Whether the thread that began the running forward is inside a call of the model."""
        frame = sys._current_frames().get(self._owner)
        return frame is not None and _running_calls(self.model, frame, stop=1) > 0

    def _two_threads(self, what: str) -> NoReturn:
        """Refuse a call on a second thread while a forward runs on another. Not a failed capture:
        the refused call wrote nothing, and the other thread's forward is captured."""
        raise UnsupportedStreamError(
            f"residtap: {what} from two threads at once inside one capture, which holds one forward at a "
            "time; this call was stopped before its blocks ran (the other thread's forward is captured). "
            "Run the forwards one after another, or give each thread its own model and capture")

    def _depth_outlived_call(self) -> bool:  # (not traced by torch.compile: see _untraced)
        """At block 0 inside a call of the model as the depth says (host-side, a short walk up the
        stack): whether that call really runs. One ended by KeyboardInterrupt or SystemExit caught
        inside ``with`` left the depth behind (see _check_depth), and these blocks run without the
        model. On another thread while the model's call runs: that call's blocks, run on a worker
        thread by its forward (_on_first_block refuses them if its blocks began on another thread)."""
        if self._owner == _thread_id():
            return _running_calls(self.model, sys._getframe(), stop=1) == 0
        return not self._owner_runs_model()

    def _refuse_layerdrop(self) -> None:
        """A model that drops blocks at random while training has no residual for the blocks a
        forward skips, and a skipped first block would leave the previous forward's positions and
        shapes in place: refused before the forward runs (host-side attribute reads only)."""
        for name, m in self._layerdrops:
            if m.training and m.layerdrop > 0:
                where = f"{type(self.model).__name__}{'.' + name if name else ''}"
                self._refuse(f"{where}.layerdrop is {m.layerdrop} and the model is in training mode, so "
                             "each forward skips blocks at random and has no residual for them; call "
                             f"model.eval(), or set {where}.layerdrop = 0, while capturing")

    def _refuse(self, why: str) -> NoReturn:
        """A forward whose stream residtap does not capture: this capture is left failed (its buffers
        are not read as that forward's), and UnsupportedStreamError says why."""
        self._state = "failed"
        raise UnsupportedStreamError(f"residtap: {why}")

    def _on_model_exit(self, module, _args, _output):
        if module is not self.model or _in_backward():
            return
        # overlap: at the end of the model's forward (also when it raised), the main stream waits
        # for every side-stream capture, so whatever reads the buffers next is ordered after them.
        self._model_depth = max(0, self._model_depth - 1)
        if self._model_depth == 0:
            self._open = False
            if self._side is not None:
                self._join(check=self._state != "failed")

    @contextlib.contextmanager
    def _fails_on_overlap_error(self):
        """A hidden state changed in place under a side-stream capture (OverlapError, from launching
        or joining) leaves this capture failed."""
        try:
            yield
        except OverlapError:
            self._state = "failed"
            raise

    def _join(self, check: bool = True) -> None:
        """overlap: the main streams wait for every side-stream capture."""
        with self._fails_on_overlap_error():
            self._side.join(check=check)

    def _hooks_last(self) -> None:
        """Move this capture's hooks on the blocks behind every other hook there, before the blocks
        run. A hook registered after the capture was entered (a steering or ablation hook added
        inside ``with``) runs before ours then, so the capture reads each block's output and the
        first block's input as the next block, ``hidden_states`` and the reference (whose hooks
        are registered when it is called) see them; else a hook that changed a block's output
        would be missing from ``resid`` yet present in the next layer's ``delta``. Torch keeps a
        module's hooks in an OrderedDict and calls them in its order (``prepend=True`` moves a
        hook the other way). Host-side only; a forward of the blocks without the model (no model
        call) keeps the order they had."""
        for handle in self._block_handles:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks and hasattr(hooks, "move_to_end"):
                hooks.move_to_end(handle.id)

    def _remove_hooks(self) -> None:
        handles, self._handles, self._block_handles = self._handles + self._block_handles, [], []
        for h in handles:
            h.remove()

    def _on_model_call(self, module, args, kwargs):
        if module is not self.model or _in_backward():
            return
        if self._model_depth:  # before the mask is kept: a second thread's must not replace the first's
            self._check_depth()
        # Blocks only see a processed (often 4-D) mask; the [batch, seq] one is the model's argument.
        try:
            self._attention_mask = attention_mask_of(self._signature, args, kwargs, self._mask_name)
        except ValueError:  # (this hook runs before _on_model_enter: the buffers are the last forward's)
            self._state = "failed"
            raise

    def _on_first_block(self, module, args, kwargs):
        if module is not self.layout.blocks[0] or _in_backward():
            self._refuse_replica(module)  # (the model's own pre-hook refuses first, where it is hooked)
            return
        if self._model_depth and self._depth_outlived_call():
            self._model_depth = 0
        if self._model_depth == 0 and self._rehook_blocks() and module is not self.layout.blocks[0]:
            # The blocks called without the model (``model.transformer(ids)``), after block 0 was
            # replaced or wrapped inside ``with``: this is the old block 0, inside the new one,
            # whose input the capture has not seen. (Other blocks replaced are hooked now, before
            # they run.)
            self._refuse(f"block 0 of {self.layout.family} was replaced inside this capture's with, and the "
                         f"blocks then ran without a call of {type(self.model).__name__} (which hooks the blocks "
                         "it holds before they run), so the capture saw the replaced block's input, not the "
                         "new one's; nothing was kept from this forward. Call the model, or enter the capture "
                         "after replacing blocks")
        hidden = self.layout.hidden_from_args(args, kwargs)
        if self._model_depth and self._begun_in == self._calls:
            if self._begun_on != _thread_id():  # (block 0 of this call already ran on another thread)
                self._two_threads(f"the blocks of {type(self.model).__name__} were called")
            self._ran_twice(0)
        self._begin(hidden)
        self._begun_in = self._calls if self._model_depth else None
        self._begun_on = _thread_id()
        if 0 in self._slot:
            self._write(0, hidden, None)

    def _on_block_output(self, i: int, module, args, kwargs, output):
        if module is not self.layout.blocks[i] or _in_backward():
            return
        if output is None:  # the block itself raised: torch calls an always_call hook without output
            return
        self._write(i + 1, self.layout.hidden_from_output(output), self.layout.hidden_from_args(args, kwargs))

    # ------------------------------------------------------------------ per forward
    def _begin(self, hidden: torch.Tensor) -> None:
        """Start of a forward: resolve positions for this length and (re)allocate if the shape changed."""
        if self._side is not None:  # a forward that ended without a join (it raised): join now,
            self._join(check=False)  # before its buffers are reused or freed
        self._state = "running"
        self._open = True
        self._done.clear()
        self._refresh_norm()
        self._stamp = self._norm_stamp()  # once per forward, not per layer (see _ops_for)
        if (why := not_a_stream(hidden)) is not None:
            raise UnsupportedStreamError(f"residtap: {why}")
        batch, seq, d_model = hidden.shape
        if self.layout.final_norm is not None and ("normed" in self.config.outputs) \
                and (why := norm_width_mismatch(self.layout.final_norm, d_model)) is not None:
            raise ValueError(why)
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
        self._stream = tuple(hidden.shape)  # every block's input and output must keep it
        self._sels = {hidden.device: self._sel}
        if hidden.device != self._anchor:  # first forward, or the model moved: read its blocks again
            self._homes = [hidden.device if h is None else h for h in self._predict_homes()]
            self._anchor = hidden.device
            self._homes_version += 1
        cap_dtype = self.config.dtype or hidden.dtype
        key = (rows, n_pos, d_model, cap_dtype, hidden.dtype, hidden.device, self._homes_version)
        if key != self._key:
            self._allocate(rows, n_pos, d_model, cap_dtype)
            self._key = key
            self._ops = {}
            self._choice = self._ops_for(hidden.device, hidden.dtype, d_model).choice

    def _predict_homes(self) -> list[torch.device | None]:
        """Where each selected layer's hidden state will arrive, read from the model without running
        it: the device block ``i-1`` runs on (see arch.module_device). Layer 0 is the first block's input,
        whose device _begin sees (None here). A guess for allocating before the layers arrive: a layer
        seen on another device gets buffers there (_rehome)."""
        blocks = self.layout.blocks
        return [None if lid == 0 else module_device(blocks[lid - 1]) for lid in self.config.layer_ids]

    def _live_norm_params(self) -> tuple:
        """The final LayerNorm's (weight, bias) as the module holds them now: a Parameter replaced
        after set-up (``load_state_dict(assign=True)``, ``ln_f.weight = ...``) is the one used."""
        if self.layout.norm.kind != "layer_norm":
            return (None, None)
        norm = self.layout.final_norm
        return (norm.weight, norm.bias)

    def _norm_params(self):
        return tuple(p.detach() if p is not None else None for p in self._live_norm_params())

    def _norm_stamp(self) -> _NormStamp:
        return _NormStamp(self._live_norm_params(), self._norm_hooked(), self.layout.final_norm,
                          self.layout.norm)

    def _refresh_norm(self) -> None:
        """The final norm as the model holds it now (see Layout.refreshed): a module assigned at its
        path, or an eps changed, after this capture was built is what normed and stats follow."""
        layout = self.layout.refreshed()
        if layout is self.layout:
            return
        if layout.final_norm is None and "normed" in self.config.outputs:
            raise ValueError(f"final_norm: 'normed' was requested, but the model's final norm at "
                             f"{layout.norm_at[1]!r} is None now")
        self.layout = layout

    def _norm_hooked(self) -> bool:
        """Whether calling the final norm runs more than its class's forward: forward hooks (its
        own, or global ones), or a forward replaced on the instance (a patching library's). Then the
        op cannot stand in for it, and the module computes normed as in the model. (accelerate's
        replaced forward, recognised by its _hf_hook, only moves tensors: the op still stands in.)"""
        norm = self.layout.final_norm
        if norm is None:
            return False
        patched = "forward" in vars(norm) and not hasattr(norm, "_hf_hook")
        return patched or bool(norm._forward_hooks or norm._forward_pre_hooks
                               or nn.modules.module._global_forward_hooks
                               or nn.modules.module._global_forward_pre_hooks)

    def _norm_params_on(self, device: torch.device) -> tuple[tuple, tuple | None]:
        """The final norm's (weight, bias), detached, on ``device``, and the stamp they were copied
        at (None when they are the module's own tensors, already there).

        Where the model keeps its final norm on another GPU than a layer, the fused op needs the
        weights on the layer's GPU: a copy (bit-identical) made once per device, at set-up for the
        devices the blocks are on, else at first use, and made again when the stamp changes. Copies
        rather than moving each layer's hidden state to the norm and back: the op then runs where
        the layer is, and a forward moves nothing; the arithmetic is torch's CUDA LayerNorm on
        either GPU. Between device types (a CPU norm, a GPU layer) torch's arithmetic differs, and
        weights on the meta device (offloaded) cannot be copied: no copy, so the module computes
        normed on its own device, as the model would (see _write)."""
        params = self._norm_params()
        if all(p is None or p.device == device or p.device.type != device.type for p in params):
            return params, None
        stamp = self._norm_stamp()
        kept = self._norm_copies.get(device)
        if kept is None or kept[0] != stamp:
            kept = self._norm_copies[device] = (stamp, tuple(None if p is None else _to(p, device)
                                                             for p in params))
        return kept[1], stamp

    def _probe_parity(self) -> None:
        """The CUDA parity guard, run here at set-up (one host sync) for the model's own dtype and
        device, so that nothing synchronizes inside a forward. See backend.norm_parity."""
        outputs = self.config.outputs
        if "normed" not in outputs and "stats" not in outputs:
            return
        param = next(self.model.parameters(), None)
        if param is None:
            return
        # The model's first device, and every other device its blocks run on (device_map).
        devices = dict.fromkeys([param.device, *(h for h in self._predict_homes() if h is not None)])
        cuda = [d for d in devices if d.type == "cuda"]
        d_model = self._guess_d_model() if cuda else None
        if d_model is None:
            return
        eps = self.layout.norm.eps
        # The dtypes the hidden states will have: the parameters', and float32 too where the config
        # keeps the residual stream in float32 under narrower weights (Mamba's residual_in_fp32).
        dtypes = [param.dtype]
        if getattr(text_config(unwrapped(self.model)), "residual_in_fp32", False) is True \
                and param.dtype != torch.float32:
            dtypes.append(torch.float32)
        for device in cuda:
            for dtype in dtypes:
                # Per dtype: a model in one the op lacks runs on the reference, which needs no probe.
                if _backend.choose(self.config.backend, device, dtype).name != "compiled":
                    continue
                (weight, bias), fused_normed = self._fused_norm_on(device, dtype)
                if fused_normed:
                    _backend.norm_parity(device, dtype, d_model, weight, bias, eps, normed=True)
                if "stats" in outputs:
                    _backend.norm_parity(device, dtype, d_model, None, None, eps, normed=False)

    def _guess_d_model(self) -> int | None:
        """The residual width, read without a forward: the final LayerNorm's, else the config's
        hidden_size (OPT-350m's embeddings are narrower than its residual), else the embeddings'."""
        w = self._live_norm_params()[0]
        if w is not None:
            return int(w.shape[-1])
        inner = unwrapped(self.model)  # (DataParallel's module: the config and embeddings are there)
        hidden = getattr(text_config(inner), "hidden_size", None)
        if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0:
            return hidden
        emb = getattr(inner, "get_input_embeddings", lambda: None)()
        return int(emb.weight.shape[-1]) if getattr(emb, "weight", None) is not None else None

    def _fused_norm_on(self, device: torch.device, dtype: torch.dtype):
        """((weight, bias) for the op on ``device``, whether the op computes normed itself there);
        (None, None) and False when it does not."""
        norm = self.layout.norm
        if "normed" not in self.config.outputs or norm.kind != "layer_norm" or self._norm_hooked():
            return (None, None), False
        (weight, bias), _ = self._norm_params_on(device)
        if not _backend.fused_norm_ok(norm, weight, bias, dtype, device):
            return (None, None), False
        return (weight, bias), True

    def _ops_for(self, device: torch.device, dtype: torch.dtype, d_model: int) -> _DeviceOps:
        ops = self._ops.get((device, dtype))
        if ops is None or ops.stamp != self._stamp:  # first use, or the norm changed
            ops = self._ops[(device, dtype)] = self._plan_norm(dtype, device, d_model)
        return ops

    def _plan_norm(self, dtype: torch.dtype, device: torch.device, d_model: int) -> _DeviceOps:
        """Inside the forward, without syncing: the backend for ``device`` and how the op gets
        normed / mean+rstd there. A combination the set-up probe did not cover (or one whose probe
        failed) gets torch's own norm from the op ("torch_layer_norm")."""
        choice = _backend.choose(self.config.backend, device, dtype)
        params, fused_normed = self._fused_norm_on(device, dtype)
        compiled = choice.name == "compiled"

        needed = (([(*params, True)] if fused_normed else [])  # (weight, bias, normed)
                  + ([(None, None, False)] if "stats" in self.config.outputs else []))
        verdicts = [_backend.norm_parity(device, dtype, d_model, weight, bias, self.layout.norm.eps,
                                         normed=normed, probe=False)
                    for weight, bias, normed in needed] if compiled else []
        ok = all(v is True for v in verdicts)
        if None in verdicts:  # not probed at set-up: exact all the same, but say why it is slower
            _backend.warn_unprobed(device, dtype, d_model)
        kind = ("layer_norm" if fused_normed else "none") if ok else "torch_layer_norm"
        final_norm = self.layout.final_norm
        norm_device = module_device(final_norm) if final_norm is not None else None
        return _DeviceOps(choice, kind, fused_normed, params, norm_device, self._stamp)

    def _last_selection(self, batch: int, seq: int, device: torch.device):
        """positions="last": each row's last real token, from the mask the model was called with."""
        mask, self._attention_mask = self._attention_mask, _UNSEEN  # use each forward's mask once
        if mask is _UNSEEN:
            encoder = (self._mask_name == "attention_mask"
                       and getattr(getattr(unwrapped(self.model), "config", None), "is_encoder_decoder", False))
            raise RuntimeError(
                f"positions='last': the blocks ran but {type(self.model).__name__}.forward was not called "
                f"(its {self._mask_name} is read there); call the model you passed to residtap.capture"
                + ("; where the encoder runs by itself (generate calls an encoder-decoder model's encoder "
                   "directly), capture model.get_encoder(), with blocks= and final_norm= paths relative "
                   "to it" if encoder is True else ""))
        if seq == 0:
            raise ValueError(NO_LAST_TOKEN)
        if mask is None:  # no padding: every row ends at the last position
            return slice(seq - 1, seq)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch \
                or mask.shape[1] < seq:
            got = (f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            advice = ("; a 4-D mask (generate with cache_implementation='static' passes one) says no row's "
                      "last real token here: use the dynamic cache, or an int position (-1 for left-padded "
                      "generation)" if isinstance(mask, torch.Tensor) and mask.dim() == 4 else "")
            raise ValueError(f"positions='last': expected the model's {self._mask_name} to be [batch, "
                             f">= seq] = [{batch}, >= {seq}] (1 = real token), got {got}{advice}")
        index = last_token_index(mask, seq)  # [batch, 1] int64, device ops only: no host sync
        return _to(index, device)

    def _stacked_on(self, devices: list[torch.device]) -> bool:
        """Whether layers on these devices get one stacked buffer per output (all on one device).
        The one place that decides; tests on a one-device machine patch it to force per-layer
        buffers, the storage a model on several devices gets."""
        return len(set(devices)) == 1

    def _allocate(self, rows, n_pos, d_model, cap_dtype) -> None:
        self._buffers, self._layer_bufs = {}, []  # the old shape's buffers go first
        self._spec = (rows, n_pos, d_model, cap_dtype)
        self._buf_devices = list(self._homes)
        self._stacked = self._stacked_on(self._buf_devices)
        if self._stacked:
            self._buffers = self._new_buffers((len(self._buf_devices),), self._buf_devices[0])
            self._layer_bufs = self._stacked_views()
        else:
            self._layer_bufs = [self._new_buffers((), device) for device in self._buf_devices]

    def _stacked_views(self) -> list[dict[str, torch.Tensor]]:
        """Per selected layer, its views into the stacked buffers."""
        return [{name: buf[k] for name, buf in self._buffers.items()}
                for k in range(len(self._buf_devices))]

    def _new_buffers(self, lead: tuple, device: torch.device) -> dict[str, torch.Tensor]:
        rows, n_pos, d_model, cap_dtype = self._spec
        bufs = {}
        with _normal_tensors():
            for name in ("resid", "delta", "normed"):
                if name in self.config.outputs:
                    bufs[name] = torch.empty(*lead, rows, n_pos, d_model, dtype=cap_dtype, device=device)
            if "stats" in self.config.outputs:
                for name in STAT_NAMES:
                    bufs[name] = torch.empty(*lead, rows, n_pos, dtype=torch.float32, device=device)
        return bufs

    def _rehome(self, k: int, device: torch.device) -> None:
        """Layer ``k``'s hidden state arrived on another device than its buffers (its block's
        parameters did not say where it runs, or the model moved but not its first block's input):
        buffers there now (an allocation, no sync), and that device from the next forward on."""
        self._homes[k] = device
        self._homes_version += 1
        self._layer_bufs[k] = self._new_buffers((), device)
        self._buf_devices[k] = device
        self._stacked = False  # the other layers keep their views for this forward

    def _restack(self) -> None:
        """End of a forward stored per layer whose layers all turned out to be on one device (a
        model moved onto one device after it was split): stack them, one copy this once, so that
        cap.resid works as for any one-device model and the next forwards reuse the stack."""
        if not self._stacked_on(self._buf_devices):
            return
        with _normal_tensors():
            self._buffers = {name: torch.stack([b[name] for b in self._layer_bufs])
                             for name in self._layer_bufs[0]}
        self._layer_bufs = self._stacked_views()
        self._stacked = True
        self._key = (*self._key[:-1], self._homes_version)

    def _sel_on(self, device: torch.device):
        """This forward's position selection on ``device``, made once per forward and device."""
        sel = self._sels.get(device, _UNSEEN)
        if sel is _UNSEEN:
            sel = self._sels[device] = self._selection_for(device)
        return sel

    def _selection_for(self, device: torch.device):
        first = self._sel
        if not isinstance(first, torch.Tensor):  # None or a slice: no device
            return first
        if self._packed:
            return self.config.positions.flat_index(device)  # cached per device, from pinned memory
        if isinstance(self.config.positions, str):  # "last": this forward's, made on the device
            return _to(first, device)
        return self._plans[self._shape[1]].as_selection(device)  # cached per device

    def _ran_twice(self, block: int) -> None:
        self._refuse(f"block {block} of {self.layout.family} ran more than once in one forward of "
                     f"{type(self.model).__name__}. A model that loops over its blocks (recurrent or looped "
                     "layers) has no single residual per block, which is what residtap captures; nothing "
                     "was kept from this forward")

    def _write(self, layer_id: int, out: torch.Tensor, inp: torch.Tensor | None) -> None:
        if self._stream is None or (self._model_depth and self._begun_in != self._calls):
            # no forward begun, or none in this call of the model: its first block did not run
            self._refuse(f"block {layer_id - 1} of {self.layout.family} returned in a forward of "
                         f"{type(self.model).__name__} in which block 0 did not run. A forward that skips "
                         "blocks has no residual for them, and residtap starts each forward at the first "
                         "block; nothing was kept from this forward")
        if self._model_depth == 0 and (not self._open or self._block_0_replaced()):  # blocks run without the model
            self._refuse(f"block {layer_id - 1} of {self.layout.family} returned, run without a call of "
                         f"{type(self.model).__name__}, when no forward was open: block 0 did not run since the "
                         "last forward ended (a block 0 replaced inside with is not hooked until the model "
                         "is called), or this block ran more than once; nothing was kept from this forward")
        if layer_id in self._done:
            self._ran_twice(layer_id - 1)
        if (why := stream_changed(layer_id - 1, self.layout.family, out, inp, self._stream)) is not None:
            self._refuse(f"{why}. A residual stream that changes shape between blocks is not one residtap "
                         "captures; nothing was kept from this forward")
        k = self._slot[layer_id]
        full_out = out = out.detach()
        device = out.device
        if device != self._buf_devices[k]:
            self._rehome(k, device)
        # only delta reads the input: without it, no copy of it onto this device, and the op's
        # choice of kernel does not depend on its alignment
        inp = inp.detach() if inp is not None and "delta" in self.config.outputs else None
        if inp is not None and inp.device != device:
            # accelerate moves a block's input inside the block's forward: the hook sees it where
            # the previous block left it. A copy, so delta is still out - inp exactly.
            inp = _to(inp, device)
        if inp is not None and inp.dtype != out.dtype:
            inp = self._widen_input(layer_id, inp, out)
        ops = self._ops_for(device, out.dtype, out.shape[-1])
        if self._packed:  # [batch, seq, d] as one row [1, batch*seq, d]: a view when contiguous
            out = out.reshape(1, -1, out.shape[-1])
            inp = inp.reshape(1, -1, inp.shape[-1]) if inp is not None else None
        index = self._sel_on(device)
        if isinstance(index, slice) and out.shape[0] > 1 and _misaligned_for_torch_ln(out):
            # A span of every row is a non-contiguous view, which torch's LayerNorm would first copy
            # (fresh, aligned); the contract norms the block output itself, which torch's alignment
            # check sends to its other kernel. The op gathers from the output itself instead.
            index = torch.arange(*index.indices(out.shape[1]), device=device)
        if isinstance(index, slice):  # a contiguous span is a view: nothing to gather
            out = out[:, index]
            inp = inp[:, index] if inp is not None else None
            index = None
        bufs = self._layer_bufs[k]
        module_normed = "normed" in bufs and not ops.fused_normed

        def work(full_out, out, inp, index):  # reads only its arguments (see SideStreams.run)
            weight, bias = ops.norm_params
            ops.choice.fn(
                out, inp, index, norm_weight=weight, norm_bias=bias,
                norm_kind=ops.norm_kind, eps=self.layout.norm.eps,
                resid=bufs.get("resid"), delta=bufs.get("delta"),
                normed=bufs.get("normed") if ops.fused_normed else None,
                mean=bufs.get("mean"), rstd=bufs.get("rstd"), l2=bufs.get("l2"),
                maxabs=bufs.get("maxabs"),
            )
            if module_normed:
                # The module's own code on the full tensor, then the gather: exact by construction.
                # A norm kept on another device (device_map) gets a copy of the hidden state there,
                # rather than residtap copying an arbitrary module per device; the result comes
                # back by copy_.
                with torch.no_grad():
                    x = full_out
                    if ops.norm_device is not None and ops.norm_device != device:
                        x = _to(x, ops.norm_device)
                    with without_autocast(x.device):  # as the reference applies it
                        normed = self.layout.final_norm(x)
                    if self._packed:
                        normed = normed.reshape(1, -1, normed.shape[-1])
                    bufs["normed"].copy_(take(normed, self._sel_on(normed.device)))

        if self._side is not None and self._overlaps(ops, device, module_normed):
            with self._fails_on_overlap_error():
                self._side.run(device, layer_id, (full_out, out, inp, index), work)
        else:
            work(full_out, out, inp, index)
        self._done.add(layer_id)
        if len(self._done) == len(self.config.layer_ids):
            if self._side is not None and (self._model_depth == 0 or not self._stacked):
                # No model-level hook will join (the blocks were called without the model), or
                # _restack is about to read the buffers on the main stream.
                self._join()
            self._state = "complete"
            self._open = False
            if not self._stacked:
                self._restack()

    def _block_0_replaced(self) -> bool:
        """Whether the model holds another block 0 than the one this forward began at (host-side
        attribute reads, ~4 µs; asked for blocks run without the model only, whose forward's end no
        hook sees but its last selected layer). Its replacement has no hook yet, so a forward through
        it has not begun: the one open is an earlier forward's that ended without completing (an
        exception this capture did not see). Where blocks= was given as a list, the model's block 0
        is not known: see README."""
        return self._blocks_now().blocks[0] is not self.layout.blocks[0]

    def _blocks_now(self) -> Layout:
        """Layout.with_current_blocks, inside a forward: a different number of blocks (its
        ValueError) leaves this capture failed."""
        try:
            return self.layout.with_current_blocks()
        except ValueError:
            self._state = "failed"
            raise

    @staticmethod
    def _widen_input(layer_id: int, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A block that widens the stream (Mamba's ``residual_in_fp32``: bfloat16 in, float32 out):
        its input cast up to the output's dtype, an exact cast, so that delta is ``out - inp`` as torch
        computes it. The op takes one dtype. A block that narrows the stream is refused rather than
        captured in a dtype the contract does not define."""
        if torch.promote_types(inp.dtype, out.dtype) != out.dtype:
            names = [str(t.dtype).replace("torch.", "") for t in (out, inp)]
            raise UnsupportedStreamError(
                f"residtap: block {layer_id - 1} returned a {names[0]} hidden state from a {names[1]} input; "
                "a residual stream that narrows inside the model cannot be captured")
        return inp.to(out.dtype)

    def _overlaps(self, ops: _DeviceOps, device: torch.device, module_normed: bool) -> bool:
        """Whether this layer's capture may run on the side stream: on a CUDA device, and all of it
        there (the final norm's own code runs on that device with no accelerate hook moving its
        weights). Other layers run in place, on the forward's stream."""
        if not self._side.has_stream(device):
            return False
        return not module_normed or (ops.norm_device in (None, device)
                                     and not hasattr(self.layout.final_norm, "_hf_hook"))

    # ------------------------------------------------------------------ results
    @property
    def layer_ids(self) -> list[int]:
        return list(self.config.layer_ids)

    @property
    def backend(self) -> str | None:
        """"compiled" or "reference" once a forward has run."""
        return self._choice.name if self._choice else None

    def _check_complete(self, attr: str) -> None:
        """Raise unless the buffers hold a whole forward. With overlap, a read before the model has
        returned (a hook after the last block reads them) first orders the reading stream after the
        side-stream captures still in flight, as the end of the forward would."""
        if self._state == "complete" and self._side is not None and self._side.pending:
            self._join()
        if self._state == "empty":
            raise CaptureError(f"cap.{attr}: no forward has run inside this capture yet")
        if self._state == "failed":
            raise CaptureError(f"cap.{attr}: the last forward raised, so the buffers are incomplete")
        if self._state == "running":
            reached = f"the last forward reached {len(self._done)} of {len(self.config.layer_ids)} selected layers"
            if self._model_depth == 0 and self._calls:
                # The model's call has ended short of the selected layers. Where it returned, either the
                # model did not run those blocks, or they ran without this capture's hooks: torch.compile'd
                # code does not guard on hooks added after it was compiled, and runs on without them.
                missing = [lid for lid in self.config.layer_ids if lid not in self._done]
                raise CaptureError(
                    f"cap.{attr}: {reached}, and the call of {type(self.model).__name__} has ended "
                    f"(residual indices {missing} were not written). If it raised, its exception says why. If it "
                    "returned, either the model stopped before those blocks (a forward that runs fewer "
                    "blocks than the model holds, such as config.num_hidden_layers set below it, or an "
                    "early exit), or the blocks ran without the capture's hooks: a model compiled "
                    "(torch.compile, model.compile()) before the capture was entered keeps running code "
                    "compiled without them, since torch does not guard on hooks added later. Enter the "
                    "capture before the first compiled call, or call torch._dynamo.reset() inside the "
                    "with before the forward")
            raise CaptureError(f"cap.{attr}: {reached}")

    def _check_requested(self, output: str, attr: str) -> None:
        if output not in self.config.outputs:
            raise CaptureError(f"cap.{attr}: {output!r} was not requested (outputs="
                               f"{self.config.outputs}); pass outputs=(..., {output!r})")

    def _get(self, name: str, output: str) -> torch.Tensor:
        self._check_requested(output, output)
        self._check_complete(output)
        if not self._stacked:
            raise self._not_stacked(output)
        buf = self._buffers[name]
        return buf[:, 0] if self._packed else buf  # packed rows: [layers, n_kept, ...]

    def _not_stacked(self, output: str) -> CaptureError:
        where: dict[str, list[int]] = {}
        for lid, device in zip(self.config.layer_ids, self._buf_devices):
            where.setdefault(str(device), []).append(lid)
        places = "; ".join(f"{device}: layers {lids}" for device, lids in where.items())
        return CaptureError(
            f"cap.{output}: the captured layers live on several devices ({places}), so they are not "
            f"one stacked tensor; read them per layer with cap.layer({output!r}, layer_id) or "
            f"cap.per_layer({output!r}) (a list aligned with cap.layer_ids), or gather them on one "
            f"device: torch.stack([t.to(device) for t in cap.per_layer({output!r})])")

    def layer(self, output: str, layer_id: int):
        """One captured layer's ``output``, a view into this capture's buffers on the device that
        layer ran on (valid until the next forward, like ``cap.resid``), whether the layers are on
        one device or several. ``output``: "resid", "delta" or "normed" → ``[batch, n_pos, d_model]``
        (``[n_kept, d_model]`` for a bool-mask ``positions``); "stats" → :class:`Stats` of
        ``[batch, n_pos]``. ``layer_id``: a residual index in ``cap.layer_ids`` (negatives count
        from the end, as in ``layers=``). On one device, ``cap.layer("resid", cap.layer_ids[k])``
        is ``cap.resid[k]``."""
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        given = layer_id
        try:  # numpy integers and 0-d integer tensors too, as in layers=; never a bool
            if isinstance(given, bool) or getattr(given, "dtype", None) == torch.bool:
                raise TypeError
            layer_id = operator.index(given)
        except TypeError:
            raise ValueError(f"layer_id: expected an int residual index, got {type(given).__name__}") \
                from None
        n = self.layout.n_layers + 1
        k = self._slot.get(layer_id + n if -n <= layer_id < 0 else layer_id)
        attr = f"layer({output!r}, {layer_id})"
        if not -n <= layer_id < n:  # no layers= could capture it: say what exists, not "pass layers="
            raise CaptureError(f"cap.{attr}: expected a residual index in [{-n}, {n - 1}] (the model has "
                               f"{n - 1} blocks, so residual indices 0..{n - 1}), got {layer_id}")
        if k is None:
            raise CaptureError(f"cap.{attr}: residual index {layer_id} was not captured (layer_ids="
                               f"{self.layer_ids}); pass layers=[..., {layer_id}]")
        self._check_requested(output, attr)
        self._check_complete(attr)
        bufs = self._layer_bufs[k]
        if output == "stats":
            return Stats(*(bufs[s][0] if self._packed else bufs[s] for s in STAT_NAMES))
        return bufs[output][0] if self._packed else bufs[output]

    def per_layer(self, output: str) -> list:
        """``[cap.layer(output, i) for i in cap.layer_ids]``: each on its own layer's device."""
        return [self.layer(output, lid) for lid in self.config.layer_ids]

    @property
    def devices(self) -> list[torch.device]:
        """The device of each captured layer's buffers, aligned with ``layer_ids``: one device
        unless the model is dispatched over several."""
        if self._state == "empty":
            raise CaptureError("cap.devices: no forward has run inside this capture yet")
        return list(self._buf_devices)

    @property
    def kept(self) -> torch.Tensor:
        """int64 ``[n_kept, 2]``: the (row, position) of each token a bool-mask ``positions`` keeps,
        in the order of the packed outputs (``cap.resid[l, i]`` is token ``kept[i]``)."""
        if not self._packed:
            raise CaptureError("cap.kept: only a bool mask [batch, seq] as positions= packs tokens; "
                               f"this capture has positions={self.config.positions!r} (see cap.positions)")
        return self.config.positions.kept.clone()  # a copy: this capture's own stays as it is

    @property
    def positions(self) -> torch.Tensor:
        """int64 ``[batch, n_pos]``: the position of each captured token in the last forward (for
        ``"last"``, each row's last real token), on the first layer's device. Built when read: a
        new tensor, so changing it changes nothing the capture gathers."""
        if self._packed:
            raise CaptureError("cap.positions: a bool mask packs tokens; their (row, position) is cap.kept")
        self._check_complete("positions")
        (batch, seq), sel = self._shape, self._sel
        device = self._buf_devices[0]
        if isinstance(sel, torch.Tensor):  # the index the op gathers with (cached per length): copied
            return (sel if sel.dim() == 2 else sel.unsqueeze(0).expand(batch, -1)).clone()
        start, stop = (0, seq) if sel is None else (sel.start, sel.stop)
        return torch.arange(start, stop, device=device).unsqueeze(0).expand(batch, -1).clone()

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


class _Hook:
    """A hook a capture registers: ``fn(*bound, *args)``. Copied with the module it is on
    (``copy.deepcopy(model)`` inside ``with``) or pickled with it (``torch.save(model)``), it becomes
    an _InertHook, which does nothing and refers to nothing: the copy neither keeps the capture (and
    through it the original model) alive nor fails to pickle, and runs as a model without hooks."""

    __slots__ = ("fn", "bound")

    def __init__(self, fn, *bound):
        self.fn, self.bound = fn, bound

    def __call__(self, *args):
        return self.fn(*self.bound, *args)

    def __deepcopy__(self, memo) -> "_InertHook":
        return _InertHook()

    def __reduce__(self):
        return (_InertHook, ())


class _InertHook:
    """What a capture's hook becomes in a copy of the model (see _Hook)."""

    def __call__(self, *args) -> None:
        return None


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_CALL_IMPL = nn.Module._call_impl.__code__


_thread_id = threading.get_ident  # (not traced by torch.compile: see _untraced)
_untraced_done = False


def _untraced() -> None:
    """torch.compile traces module hooks: the capture's host-side bookkeeping (threads, the stack) and
    the extension loader (files, a lock, a build) must run as Python at each call instead, and
    traced it warned on get_ident, stat, sha256 and mkdir. torch.compiler.disable says so; applied
    once, when a capture is first set up, since it imports torch._dynamo (about a second, which
    ``import residtap`` and the CLI should not pay; an HF model's forward imports it anyway)."""
    global _untraced_done, _thread_id
    if _untraced_done:
        return
    from . import _build

    disable = torch.compiler.disable
    Capture._check_depth = disable(Capture._check_depth)
    Capture._depth_outlived_call = disable(Capture._depth_outlived_call)
    _thread_id = disable(threading.get_ident)
    _build.load_extension = disable(_build.load_extension)
    _untraced_done = True


def _running_calls(module: nn.Module, frame, stop: int | None = None) -> int:
    """How many calls of ``module`` are running on the stack from ``frame`` down (a thread's): torch's
    ``nn.Module._call_impl`` frames for it; with ``stop``, counted up to that many. A walk of the
    stack (a few µs to the model's call from its first block)."""
    n = 0
    while frame is not None and n != stop:
        if frame.f_code is _CALL_IMPL and frame.f_locals.get("self") is module:
            n += 1
        frame = frame.f_back
    return n


def _in_backward() -> bool:
    """Whether this call runs inside autograd's backward. Activation checkpointing of a block's (or
    the model's) ``__call__`` (``torch.utils.checkpoint.checkpoint(block, x)``, reentrant or not)
    runs it again there to recompute what the forward did not save: that is not a forward of the
    model, and a capture ignores it (the buffers keep the forward's). One call into torch's C++
    per hook, no device work. (HF's gradient checkpointing wraps ``forward``, inside the hooks.)"""
    return _graph_task_id() != -1


def _normal_tensors():
    """Where buffers are allocated: outside inference mode even inside a forward run under
    ``torch.inference_mode()``. An inference tensor cannot be written in place outside inference
    mode, so buffers made in the first forward would break every later forward without it. Writing
    a normal tensor in place inside inference mode is allowed."""
    return torch.inference_mode(False)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, without a host sync where that is safe: onto a GPU the copy is queued
    (GPU to GPU it is ordered on both devices' current streams); onto the CPU it must be complete
    before the CPU reads it, so it waits (the model's own CPU↔GPU moves wait too)."""
    return t.to(device, non_blocking=device.type == "cuda")


def _misaligned_for_torch_ln(x: torch.Tensor) -> bool:
    """A contiguous tensor whose address fails torch's 4-element alignment check for its
    vectorized CUDA LayerNorm (no HF model makes one; a view one element into a buffer does)."""
    return x.is_contiguous() and x.data_ptr() % (4 * x.element_size()) != 0


def capture(model: nn.Module, layers=None, positions=None, dtype=None, outputs=("resid",), *,
            blocks=NOT_GIVEN, final_norm=NOT_GIVEN, backend: str | None = None,
            overlap: bool = False) -> Capture:
    """``with residtap.capture(model, ...) as cap: model(x)`` — see :class:`Capture`."""
    return Capture(model, layers, positions, dtype, outputs, blocks=blocks, final_norm=final_norm,
                   backend=backend, overlap=overlap)
