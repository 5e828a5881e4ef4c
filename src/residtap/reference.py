"""The contract: residtap's outputs defined in plain PyTorch, from forward hooks.

Every fast path (the C++ op on CPU, the CUDA op on GPU) must reproduce these functions bit for bit
(``torch.equal`` on the same device and dtype); the one documented exception is ``stats.l2``, whose
reduction order is ours (within 2 ulp of float32 against float64). NaNs are where the reference has
them, and a copy (resid in the model dtype, delta without an input) keeps a NaN's every bit; a NaN
that arithmetic or a cast makes (delta, normed, a cast resid, mean, rstd, maxabs) may carry another
sign or payload, as torch's own kernels give different ones depending on where in their vector
loops an element falls.

For a block with input ``inp`` and output ``out``, both ``[batch, seq, d_model]``:

======== ===================================================================================
resid    ``out.detach().clone().to(dtype)``, gathered at the selected positions
delta    ``(out - inp).to(dtype)`` computed in the model dtype (the block's contribution);
         for residual index 0 (the embeddings, no block before it) ``delta = resid``
normed   ``final_norm(out).to(dtype)``: the model's own final norm, in the model dtype
stats    ``mean, rstd = torch.native_layer_norm(out.float(), (d,), None, None, eps)[1:]``
         with the final norm's eps; ``l2 = ||out||_2`` per token; ``maxabs = max |out|``
======== ===================================================================================

Positions are gathered after computing (``take``); every output is row-wise, so gathering
first or last changes no value. ``dtype`` defaults to the hidden state's dtype as it enters the
first block. A block may widen the stream (Mamba's ``residual_in_fp32``: bfloat16 in, float32
out): ``out - inp`` is then computed as torch promotes it, in the wider dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

NOT_GIVEN = object()  # distinguishes "not passed" from an explicit None (blocks=, final_norm=)

OUTPUTS = ("resid", "delta", "normed", "stats")
STAT_NAMES = ("mean", "rstd", "l2", "maxabs")

# A position selection: None (all), a slice of the sequence, or an int64 index
# [n_pos] (same for every row) or [batch, n_pos] (per row).
Selection = "None | slice | torch.Tensor"


class Stats(NamedTuple):
    """Per-token statistics of the raw residual, each float32 ``[..., batch, n_pos]``."""

    mean: torch.Tensor
    rstd: torch.Tensor
    l2: torch.Tensor
    maxabs: torch.Tensor


def take(x: torch.Tensor, sel) -> torch.Tensor:
    """Rows of ``x`` ``[batch, seq, ...]`` at the selected positions: ``[batch, n_pos, ...]``."""
    if sel is None:
        return x
    if isinstance(sel, slice):
        return x[:, sel]
    if sel.dim() == 1:
        return x[:, sel]
    idx = sel.reshape(*sel.shape, *([1] * (x.dim() - 2))).expand(*sel.shape, *x.shape[2:])
    if x.is_floating_point() and x.element_size() == 2:
        # torch's CPU gather passes 16-bit floats through float32 (every bfloat16 NaN comes out
        # 0xffff): gathered as bits, a NaN keeps its sign and payload, as x[:, sel] keeps them.
        return x.view(torch.int16).gather(1, idx).view(x.dtype)
    return x.gather(1, idx)


def token_stats(out: torch.Tensor, eps: float) -> Stats:
    """Stats of ``out`` ``[batch, seq, d]`` as the contract defines them, each ``[batch, seq]``."""
    d = out.shape[-1]
    _, mean, rstd = torch.native_layer_norm(out.float(), (d,), None, None, eps)
    l2 = torch.linalg.vector_norm(out.double(), dim=-1).float()
    maxabs = out.float().abs().amax(dim=-1)
    return Stats(mean.squeeze(-1), rstd.squeeze(-1), l2, maxabs)


def without_autocast(device: torch.device):
    """The outputs are defined in the capture dtype by the ops named, whatever autocast the model
    runs under (the fused op ignores it): torch's autocast off on ``device``'s type for computing
    them. (Under it, a LayerNorm of a bfloat16 stream returns float32 on CUDA, and torch.stack of
    float16 tensors under CPU autocast to bfloat16 raises.)"""
    # (entering torch.autocast costs ~15 µs on the host; asking whether it is on, under 1 µs)
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def block_outputs(
    out: torch.Tensor,
    inp: torch.Tensor | None,
    *,
    sel=None,
    dtype: torch.dtype | None = None,
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-5,
    outputs=("resid",),
) -> dict:
    """The reference outputs of one block (or of the embeddings when ``inp`` is None).

    ``out``, ``inp``: ``[batch, seq, d_model]``. Returns a dict with the requested names:
    ``resid``/``delta``/``normed`` ``[batch, n_pos, d_model]`` in ``dtype`` (default: ``out``'s)
    and ``stats`` (a :class:`Stats` of ``[batch, n_pos]`` float32 tensors).
    """
    with without_autocast(out.device):
        return _block_outputs(out, inp, sel, dtype, final_norm, eps, outputs)


def _block_outputs(out, inp, sel, dtype, final_norm, eps, outputs) -> dict:
    out = out.detach()
    dtype = dtype or out.dtype
    res = {}
    if "resid" in outputs:
        res["resid"] = take(out.clone(), sel).to(dtype)
    if "delta" in outputs:
        delta = out.clone() if inp is None else out - inp.detach()
        res["delta"] = take(delta, sel).to(dtype)
    if "normed" in outputs:
        if final_norm is None:
            raise ValueError("reference.block_outputs: 'normed' needs final_norm, got None")
        with torch.no_grad():
            res["normed"] = take(final_norm(out), sel).to(dtype)
    if "stats" in outputs:
        res["stats"] = Stats(*(take(s, sel) for s in token_stats(out, eps)))
    return res


def layer_norm_fn(weight, bias, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.layer_norm`` over the last dimension: the reference for norm_kind="layer_norm"."""
    return lambda x: F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def capture_block(out, inp=None, index=None, *, norm_weight=None, norm_bias=None,
                  norm_kind="none", eps=1e-5, resid=None, delta=None, normed=None,
                  mean=None, rstd=None, l2=None, maxabs=None) -> None:
    """Pure-PyTorch stand-in for ``residtap.ops.capture_block``, with the same signature.

    This is the backend used where the compiled extension is unavailable; it allocates
    temporaries, so it is slower, but its results are the contract itself. Its arguments are checked
    as the op checks them (shapes, dtypes, devices; a RuntimeError naming the argument, before anything
    is written), except what would read the device: index values (out of range: as torch indexes, so a
    negative one counts from the end here, where the op requires [0, seq); Capture passes only those),
    the op's layout rules (contiguous buffers, no overlap), which a copy does not need, and its dtypes:
    any floating dtype is taken (float64 models run here).
    """
    _check_block_args(out, inp, index, norm_weight, norm_bias, norm_kind,
                      dict(resid=resid, delta=delta, normed=normed),
                      dict(mean=mean, rstd=rstd, l2=l2, maxabs=maxabs))
    wanted = {"resid": resid, "delta": delta, "normed": normed}
    stat_bufs = {"mean": mean, "rstd": rstd, "l2": l2, "maxabs": maxabs}
    outputs = [k for k, v in wanted.items() if v is not None]
    if any(v is not None for v in stat_bufs.values()):
        outputs.append("stats")
    layer_norm = norm_kind in ("layer_norm", "torch_layer_norm")
    norm = layer_norm_fn(norm_weight, norm_bias, eps) if layer_norm else None
    res = block_outputs(out, inp, sel=index, dtype=None, final_norm=norm, eps=eps, outputs=outputs)
    for k, buf in wanted.items():
        if buf is not None:
            buf.copy_(res[k])
    for k, buf in stat_bufs.items():
        if buf is not None:
            buf.copy_(getattr(res["stats"], k))


def _check_block_args(out, inp, index, norm_weight, norm_bias, norm_kind, rows: dict, stats: dict) -> None:
    """capture_block's argument checks that read no tensor value (see capture_block)."""
    def refuse(name, expected, t):
        got = (f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
               else repr(t))
        raise RuntimeError(f"residtap.capture_block: argument '{name}' expected {expected}, got {got}")

    # (any floating dtype: the reference is what runs a model in one the op lacks, float64)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[2] == 0 or not out.is_floating_point():
        refuse("out", "a floating-point tensor [batch, seq, d_model] with d_model >= 1", out)
    batch, seq, d = out.shape
    if inp is not None and (not isinstance(inp, torch.Tensor) or inp.shape != out.shape
                            or inp.dtype != out.dtype or inp.device != out.device):
        refuse("inp", f"a {out.dtype} tensor of out's shape {tuple(out.shape)} on {out.device}", inp)
    n_pos = seq
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.device != out.device \
                or not (index.dim() == 1 or (index.dim() == 2 and index.shape[0] == batch)):
            refuse("index", f"an int64 tensor [n_pos] or [{batch}, n_pos] on {out.device}", index)
        n_pos = index.shape[-1]
    if norm_kind not in ("layer_norm", "torch_layer_norm", "none"):
        refuse("norm_kind", "one of 'layer_norm', 'torch_layer_norm', 'none'", norm_kind)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (d,) or t.dtype != out.dtype
                              or t.device != out.device):
            refuse(name, f"a {out.dtype} tensor [{d}] on {out.device}", t)
    for name, t in rows.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (batch, n_pos, d)
                              or not t.is_floating_point() or t.device != out.device):
            refuse(name, f"a floating-point tensor [{batch}, {n_pos}, {d}] on {out.device}", t)
    if rows["normed"] is not None and norm_kind == "none":
        refuse("normed", "None with norm_kind='none' (nothing to re-apply)", rows["normed"])
    for name, t in stats.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (batch, n_pos)
                              or t.dtype != torch.float32 or t.device != out.device):
            refuse(name, f"a float32 tensor [{batch}, {n_pos}] on {out.device}", t)


@dataclasses.dataclass(frozen=True)
class ReferenceResult:
    """What run_reference computed. ``per_layer[k]``: layer ``layer_ids[k]``'s outputs ({name:
    ``[batch, n_pos, d_model]`` tensor, "stats": Stats}) on the device that layer ran on.
    ``outputs``: the same stacked, {name: ``[len(layer_ids), batch, n_pos, d_model]``}, when every
    layer ran on one device."""

    layer_ids: list
    per_layer: list
    model_output: object
    stacked: dict | None  # None: the layers ran on several devices

    @property
    def outputs(self) -> dict:
        if self.stacked is None:
            devices = sorted({str(_device_of(r)) for r in self.per_layer})
            raise ValueError(f"ReferenceResult.outputs: the layers ran on several devices "
                             f"({', '.join(devices)}), so they are not stacked; read "
                             "ref.layer(name, layer_id) or ref.per_layer")
        return self.stacked

    def layer(self, name: str, layer_id: int):
        """Layer ``layer_id``'s (a residual index in ``layer_ids``) output ``name``, where it ran."""
        return self.per_layer[self.layer_ids.index(layer_id)][name]


def _device_of(res: dict) -> torch.device:
    first = next(iter(res.values()))
    return (first.mean if isinstance(first, Stats) else first).device


def _clone_as_placed(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` at the same address modulo 64 bytes (for a contiguous ``x``): torch's CUDA
    LayerNorm chooses its kernel by the address's alignment, and the contract norms the block
    output as the model holds it, so a clone must not move it to an aligned address."""
    size = x.element_size()
    if not x.is_contiguous() or x.data_ptr() % size:
        return x.clone()
    buf = torch.empty(x.numel() + 64 // size, dtype=x.dtype, device=x.device)
    shift = (x.data_ptr() - buf.data_ptr()) % 64 // size
    y = buf[shift:shift + x.numel()].view(x.shape)
    y.copy_(x)
    return y


def run_reference(model, *args, layers=None, positions=None, dtype=None, outputs=("resid",),
                  blocks=NOT_GIVEN, final_norm=NOT_GIVEN, **kwargs) -> ReferenceResult:
    """Run ``model(*args, **kwargs)`` with plain forward hooks that ``.clone()`` each block's input
    and output, then compute every requested output with torch ops as the contract says.

    Selections follow :class:`residtap.Capture` exactly (same argument rules: ``final_norm=None`` is
    no final norm, ``blocks``/``final_norm`` not given are the family's). ``positions="last"``
    takes each row's last nonzero column of the ``attention_mask`` the model is called with (0 for a
    row with none; the last position for every row without a mask); a bool tensor ``[batch, seq]``
    keeps its True tokens by boolean indexing: outputs ``[layers, n_kept, ...]``, row-major.

    A model dispatched over several devices (``device_map``, blocks moved by hand): each layer is
    computed where its block's output is, with the block's input copied there, and normed by the
    final norm on the device the norm runs on (the hidden state copied there and the result back,
    as the model itself would compute it). Read such a result per layer (``layer`` / ``per_layer``).

    The model runs in the caller's autograd mode (wrap the call in ``torch.no_grad()`` to save
    memory), so that it computes what a capture in the same mode sees. The outputs are detached;
    ``model_output`` is what the model returned, graph and all in grad mode.
    """
    from .arch import (UnsupportedStreamError, module_device, norm_width_mismatch, not_a_stream, resolve_layout,
                       stream_changed)
    from .selection import (LAST, KeepMask, resolve_dtype, resolve_layers, resolve_outputs,
                            resolve_position_spec, resolve_positions)

    dtype = resolve_dtype(dtype)

    layout = resolve_layout(model, blocks=blocks, final_norm=final_norm)
    layer_ids = resolve_layers(layers, layout.n_layers)
    outputs = resolve_outputs(outputs)
    if "normed" in outputs and layout.final_norm is None:
        raise ValueError(f"outputs: 'normed' needs a final norm, but {layout.family} has none "
                         "(pass final_norm= to name one)")
    spec = resolve_position_spec(positions)  # as Capture reads it: numpy, 0-d tensors, checks
    # a bool mask: kept by boolean indexing with the mask itself (Capture gathers by KeepMask's index)
    keep = torch.as_tensor(positions) if isinstance(spec, KeepMask) else None
    positions = spec
    saved = {}  # residual index -> (output, input); one seen twice: a block ran twice (a loop)

    def ran_twice(block):
        raise UnsupportedStreamError(
            f"run_reference: block {block} of {layout.family} ran more than once in one forward of "
            f"{type(model).__name__}; residtap keeps one residual per block")

    def pre_hook(_mod, a, kw):
        if 0 in saved:
            ran_twice(0)
        hidden = layout.hidden_from_args(a, kw).detach()
        if (why := not_a_stream(hidden)) is not None:  # a stream Capture refuses is refused here too
            raise UnsupportedStreamError(f"run_reference: {why}")
        # placed like the original: residual 0 (the embeddings) is normed as the model holds it too
        saved[0] = (_clone_as_placed(hidden), None)

    def make_hook(i):
        def hook(_mod, a, kw, output):
            if i + 1 in saved:
                ran_twice(i)
            out = _clone_as_placed(layout.hidden_from_output(output).detach())
            inp = layout.hidden_from_args(a, kw).detach()
            stream = saved[0][0].shape if 0 in saved else out.shape
            if i + 1 in layer_ids and (why := stream_changed(i, layout.family, out, inp, stream)):
                raise UnsupportedStreamError(f"run_reference: {why}")  # (Capture checks the layers it keeps)
            # the input where the output is (a dispatched block may receive it elsewhere)
            saved[i + 1] = (out, inp.to(out.device, copy=True))
        return hook

    handles = [layout.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for i, blk in enumerate(layout.blocks):
            handles.append(blk.register_forward_hook(make_hook(i), with_kwargs=True))
        # In the caller's autograd mode, as a capture runs: a model's forward may depend on it
        # (torch's attention picks its kernel by whether a mask needs grad: Doge, Inkling).
        model_output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()

    norm = layout.final_norm
    norm_device = module_device(norm) if norm is not None else None

    def apply_norm(x):  # where the model runs its final norm, the result back where x is
        if norm_device is None or norm_device == x.device:
            return norm(x)
        with without_autocast(norm_device):  # (block_outputs turns it off where x is)
            return norm(x.to(norm_device)).to(x.device)

    missing = [lid for lid in dict.fromkeys([0, *layer_ids]) if lid not in saved]
    if missing:
        raise UnsupportedStreamError(
            f"run_reference: the forward of {type(model).__name__} produced no residual indices {missing}: "
            "the blocks that make them did not run (a forward that skips blocks or stops before them); "
            "residtap keeps one residual per block")
    if "normed" in outputs and (why := norm_width_mismatch(norm, saved[0][0].shape[-1])) is not None:
        raise ValueError(why)
    # The default capture dtype is the stream's as it enters the first block (Capture's too): a
    # model whose blocks widen it (Mamba's residual_in_fp32) is captured in its own dtype throughout.
    dtype = dtype or saved[0][0].dtype
    per_layer = []
    for lid in layer_ids:
        out, inp = saved[lid]
        if keep is not None:
            sel = None
        elif isinstance(positions, str) and positions == LAST:
            sel = _last_real(model, layout.blocks, args, kwargs, out.shape[:2]).to(out.device)
        else:
            sel = resolve_positions(positions, out.shape[1]).as_selection(out.device)
        res = block_outputs(out, inp, sel=sel, dtype=dtype,
                            final_norm=apply_norm if norm is not None else None,
                            eps=layout.eps, outputs=outputs)
        if keep is not None:  # all positions computed, then x[keep]: [n_kept, ...]
            k = keep.to(out.device)
            res = {n: Stats(*(s[k] for s in v)) if n == "stats" else v[k] for n, v in res.items()}
        per_layer.append(res)
    stacked = None
    if len(devices := {_device_of(r) for r in per_layer}) == 1:
        stacked = {}
        with without_autocast(devices.pop()):  # (torch.stack is in autocast's lists)
            for name in outputs:
                if name == "stats":
                    stacked[name] = Stats(*(torch.stack([getattr(r["stats"], s) for r in per_layer])
                                            for s in STAT_NAMES))
                else:
                    stacked[name] = torch.stack([r[name] for r in per_layer])
    return ReferenceResult(list(layer_ids), per_layer, model_output, stacked)


def _last_real(model, blocks, args, kwargs, shape) -> torch.Tensor:
    """int64 ``[batch, 1]``: for each row, the last of the current ``seq`` columns of the model's
    mask of the blocks' tokens (``attention_mask``; a decoder's ``decoder_attention_mask``) that
    is nonzero (0 if none); ``seq - 1`` for every row without a mask."""
    from .arch import attention_mask_of, forward_signature, mask_argument
    from .selection import NO_LAST_TOKEN

    batch, seq = shape
    if seq == 0:
        raise ValueError(NO_LAST_TOKEN)
    mask = attention_mask_of(forward_signature(model), args, kwargs, mask_argument(model, blocks))
    if mask is None:
        return torch.full((batch, 1), seq - 1, dtype=torch.long)
    rows = (mask[:, -seq:] != 0).tolist()
    return torch.tensor([[max((j for j in range(seq) if row[j]), default=0)] for row in rows])
