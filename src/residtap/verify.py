"""The seed's experiment as a report: hook outputs against ``hidden_states``, layer by layer.

For every residual index i it compares the raw residual captured from hooks (``resid_i``) and the
model's final norm re-applied to it (``normed_i``) with ``hidden_states[i]``, and detects which
convention the model follows from the data, not from a table: raw everywhere, or the last entry
normalized (HF's default, ``tie_last_hidden_states``), or the last entry passed through a
projection after the norm (OPT's ``project_out``, which may change the width; re-applied here when
the family table names it). A model without a final norm is reported as such, not as a failure.
Where hidden_states has no embeddings entry (Mamba: entry i is block i's output, the last one the
final norm of the last), the comparison shifted by one is tried too, and reported as such when it
alone explains every entry. A model whose blocks widen the stream (bfloat16 in, float32 out) is
captured at the wider dtype, so nothing is rounded before it is compared.
Everything is computed on the model's device; one small summary per comparison is copied to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math

import torch
from torch import nn

from .arch import forward_signature, text_config, unwrapped
from .capture import Capture
from .selection import NOT_GIVEN


@dataclasses.dataclass(frozen=True)
class LayerRow:
    layer: int
    raw_maxabs: float | None  # max |resid_i - hidden_states[i]| (None where the shapes differ; inf
    # where a NaN faces anything but the same NaN)
    raw_exact: bool  # torch.equal(resid_i, hidden_states[i]), where identical NaNs count as equal
    normed_maxabs: float | None  # max |final_norm(resid_i) - hidden_states[i]|
    normed_exact: bool | None
    matches: str  # "raw", "normed", "both", "projected" or "neither"
    # Last row only, where a projection follows the final norm: project_out(final_norm(resid_i)).
    projected_maxabs: float | None = None
    projected_exact: bool | None = None
    # The residual index this row compares hidden_states[layer] with: ``layer`` itself, or
    # ``min(layer + 1, n_layers)`` where hidden_states has no embeddings entry (Mamba).
    resid_index: int | None = None


def to_json(d: dict) -> str:
    """A report's dict as strict JSON: a non-finite float (max |diff| is inf where a NaN faces a
    number) becomes the string "inf", "-inf" or "nan", which JSON parsers other than Python's accept."""
    def strict(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(d), indent=2, allow_nan=False)


# hidden_states[0] is block 0's input, which no block output (Gemma's scaled embeddings included)
_FIRST_AND_OTHERS = "entry 0 is the embeddings (block 0's input), the others raw block outputs"
_WHAT = {"raw": "raw block output", "normed": "final_norm(raw)", "both": "raw (= normed)",
         "projected": "project_out(final_norm(raw))", "neither": "NEITHER"}


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    model: str
    n_layers: int
    n_hidden_states: int
    dtype: str
    device: str
    has_final_norm: bool
    rows: tuple[LayerRow, ...]
    d_model: int = 0  # width of the residual stream
    last_width: int = 0  # width of hidden_states[-1] (differs from d_model after a projection)
    has_projection: bool = False  # the family names a module applied after the final norm
    tie_last_hidden_states: bool | None = None  # the config flag, where the config sets it
    # The residual index hidden_states[0] holds: 0, the embeddings (HF's usual layout), or 1, block
    # 0's output, where hidden_states has no embeddings entry and ends with the last block's output
    # twice, raw and then through the final norm (Mamba, Mamba-2, FalconMamba).
    first_resid: int = 0

    def _projection_name(self) -> str:
        return "project_out(final_norm(raw output))" if self.has_final_norm else "project_out(raw output)"

    @property
    def convention(self) -> str:
        """Which hidden_states entries are raw block outputs and which are normalized, as found."""
        if self.n_hidden_states != self.n_layers + 1:
            return (f"unexpected: {self.n_hidden_states} hidden states for {self.n_layers} blocks")
        last = self.rows[-1].matches
        if not all(r.matches in ("raw", "both") for r in self.rows[:-1]):
            return "unexplained: some entries match neither the raw residual nor its final norm"
        shifted = self.first_resid == 1
        others = ("no embeddings entry: hidden_states[i] is block i's raw output, and the last entry "
                  if shifted else "")
        if last == "normed":
            return (f"{others}is final_norm(raw output of the last block)" if shifted
                    else f"last entry is final_norm(raw output); {_FIRST_AND_OTHERS}")
        if last == "projected":
            what = f"{self._projection_name()}, width {self.last_width} (d_model {self.d_model})"
            return (f"{others}is {what}" if shifted
                    else f"last entry is {what}; {_FIRST_AND_OTHERS}")
        if last in ("raw", "both"):
            if not self.has_final_norm:
                why = "the model has no final norm"
            elif self.tie_last_hidden_states is False:
                why = "config.tie_last_hidden_states=False"
            else:
                why = "no final norm applied to hidden_states"
            return (f"{others}repeats the last block's raw output ({why})" if shifted
                    else f"no entry is normalized ({why}): {_FIRST_AND_OTHERS}")
        if self.last_width != self.d_model:
            if self.has_projection:
                return (f"unexplained: hidden_states[-1] (width {self.last_width}, d_model "
                        f"{self.d_model}) is not {self._projection_name()}")
            return (f"unexplained: hidden_states[-1] has width {self.last_width}, not d_model "
                    f"{self.d_model}, and residtap knows no projection to re-apply")
        return "unexplained: some entries match neither the raw residual nor its final norm"

    @property
    def ok(self) -> bool:
        """Every non-last entry equals the raw residual, and the last is explained exactly:
        re-applying the final norm (and the family's projection, if any) reproduces it, or it is
        itself raw, where nothing is applied."""
        return not self.convention.startswith(("unexpected", "unexplained"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rows"] = [dataclasses.asdict(r) for r in self.rows]
        d["convention"] = self.convention
        d["ok"] = self.ok
        return d

    def to_json(self) -> str:
        """``to_dict()`` as strict JSON (see :func:`to_json`)."""
        return to_json(self.to_dict())

    def __str__(self) -> str:
        def num(x):
            return "-" if x is None else f"{x:.3g}"

        def yes(x):
            return "-" if x is None else ("exact" if x else "DIFF")

        def what(r):
            if r.matches == "projected" and not self.has_final_norm:
                return "project_out(raw)"
            if r.matches == "raw" and r.resid_index == 0:
                return "embeddings (block 0's input)"
            return _WHAT[r.matches]

        head = (f"residtap verify: {self.model}, {self.n_layers} blocks, {self.dtype} on {self.device}\n"
                f"{'layer':>5}  {'max|hook-hs|':>12}  {'hook==hs':>8}  {'max|norm(hook)-hs|':>18}  "
                f"{'norm==hs':>8}  hidden_states[i] is")
        lines = [head]
        for r in self.rows:
            lines.append(f"{r.layer:>5}  {num(r.raw_maxabs):>12}  {yes(r.raw_exact):>8}  "
                         f"{num(r.normed_maxabs):>18}  {yes(r.normed_exact):>8}  {what(r)}")
        lines.append(f"convention: {self.convention}")
        if self.first_resid == 1:
            lines.append("note: hidden_states has no embeddings entry, so row i is compared with the "
                         "residual after block i (the last row: after the last block)")
        if not self.has_final_norm:
            lines.append("note: this model has no final norm, so nothing is re-applied")
        last = self.rows[-1] if self.rows else None
        if last is not None and last.projected_exact is not None:
            lines.append(f"note: hidden_states[-1] has width {self.last_width} (d_model {self.d_model}): "
                         f"{self._projection_name()} re-applied, max|diff| {num(last.projected_maxabs)}, "
                         f"{yes(last.projected_exact)}")
        lines.append("OK" if self.ok else "FAILED: see the rows above")
        return "\n".join(lines)


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same(cand: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal as ``torch.equal`` counts it, or the very same bits. The second clause
    makes a NaN that came through unchanged count as exact (``==`` is False for any NaN)."""
    same = cand == h
    if cand.dtype == h.dtype and cand.is_floating_point() and cand.element_size() in _BITS:
        bits = _BITS[cand.element_size()]
        same |= cand.view(bits) == h.view(bits)
    return same


def _compare(cand: torch.Tensor | None, h: torch.Tensor, nan: torch.Tensor) -> list[torch.Tensor]:
    """[max |cand - h|, 1.0 if equal else 0.0] on the device; NaNs where there is nothing to compare.
    Entries that are the same (see ``_same``) differ by 0; a NaN against anything else by inf."""
    if cand is None or cand.shape != h.shape:
        return [nan, nan]
    if cand.dtype != h.dtype:  # a stream that widens (see verify): compared at the wider dtype, where
        wide = torch.promote_types(cand.dtype, h.dtype)  # the upcast of either side is exact
        cand, h = cand.to(wide), h.to(wide)
    same = _same(cand, h)
    acc = torch.promote_types(cand.dtype, torch.float32)  # float64 models: their own differences
    inf = float("inf")  # (nan_to_num would make an inf the dtype's largest finite value)
    diff = torch.where(same, 0.0, (cand.to(acc) - h.to(acc)).abs()).nan_to_num(nan=inf, posinf=inf)
    return [(diff.amax() if diff.numel() else diff.new_zeros(())).float(), same.all().float()]


def verify(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           blocks=NOT_GIVEN, final_norm=NOT_GIVEN, backend: str | None = None) -> VerifyReport:
    """Compare ``model``'s block outputs (forward hooks) with its ``hidden_states``, layer by layer, and
    with its final norm re-applied to them, on ``input_ids`` ``[batch, seq]``: which convention each
    entry follows, and whether every one is explained exactly.

    Example::

        report = residtap.verify(model, input_ids)
        print(report); assert report.ok
    """
    from .arch import resolve_layout

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or min(input_ids.shape) < 1 \
            or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        got = (f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids: expected an integer tensor [batch, seq] with batch, seq >= 1, got {got}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = (f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
               else type(attention_mask).__name__)
        raise ValueError(f"attention_mask: expected None or a tensor of input_ids' shape "
                         f"{tuple(input_ids.shape)}, got {got}")
    layout = resolve_layout(model, blocks=blocks, final_norm=final_norm)
    hs, resid, normed = _run(model, layout, input_ids, attention_mask, backend, dtype=None)
    stream_dtype = resid[0].dtype  # the stream as it enters the first block: the model's dtype
    wide = functools.reduce(torch.promote_types, [h.dtype for h in hs if h.is_floating_point()],
                            stream_dtype)
    if wide != stream_dtype:
        # The blocks widen the stream (Mamba's residual_in_fp32): again, captured at the full width.
        hs, resid, normed = _run(model, layout, input_ids, attention_mask, backend, dtype=wide)
    report = _report(model, layout, hs, resid, normed, stream_dtype, first_resid=0)
    if not report.ok and len(hs) == layout.n_layers + 1:
        shifted = _report(model, layout, hs, resid, normed, stream_dtype, first_resid=1)
        if shifted.ok:  # the convention is found from the data: one of the two explains it all
            report = shifted
    return report


def _run(model, layout, input_ids, attention_mask, backend, dtype):
    """One forward with ``output_hidden_states``, capturing every residual (and its final norm):
    (hidden_states, resid per layer, normed per layer or None)."""
    has_norm = layout.final_norm is not None
    cap = Capture(model, layers=None, dtype=dtype, blocks=layout.blocks, final_norm=layout.final_norm,
                  backend=backend, outputs=("resid", "normed") if has_norm else ("resid",))
    kwargs = {"output_hidden_states": True, "return_dict": True}  # whatever config.return_dict says
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    args = _text_only_call(model, input_ids, kwargs)
    with torch.no_grad(), cap:
        out = model(*args, **kwargs)
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise ValueError(f"model: {type(model).__name__} returned no hidden_states with "
                         "output_hidden_states=True")
    if cap._state == "running":  # the forward returned without running every block
        raise ValueError(f"model: its forward ran {len(cap._done) - 1} of its {layout.n_layers} blocks "
                         "(config.num_hidden_layers lowered for an early exit?); pass blocks= the blocks "
                         "it runs")
    # Per layer, each on the device it ran on (a model dispatched over several devices has no
    # stacked cap.resid); a copy to where hidden_states[i] is, which is exact.
    return hs, cap.per_layer("resid"), cap.per_layer("normed") if has_norm else None


def _text_only_call(model, input_ids, kwargs) -> tuple:
    """The positional arguments for a call with token ids alone. ``input_ids`` goes by keyword where
    the forward names it, as HF's all do. A forward that takes ``inputs_embeds`` and no ``input_ids``
    gets the model's own input embeddings of the ids, which is what HF's forwards compute from
    ``input_ids`` first (never the ids themselves, integers where vectors belong). Any other forward
    gets the ids as its first argument. A ValueError where the forward requires inputs verify cannot
    make up (BLIP-2's pixel_values), or takes embeddings the model has no input embeddings to make."""
    sig = forward_signature(model)
    if sig is None or not {"input_ids", "inputs_embeds"} & set(sig.parameters):
        return (input_ids,)
    name = "input_ids" if "input_ids" in sig.parameters else "inputs_embeds"
    missing = [p for p, param in sig.parameters.items()
               if param.default is param.empty and p not in kwargs and p != name
               and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)]
    if missing:
        raise ValueError(f"model: {type(model).__name__}.forward requires {', '.join(missing)} besides "
                         f"{name}; verify runs on token ids alone (capture it with residtap.Capture and "
                         "your own inputs)")
    value = input_ids if name == "input_ids" else _input_embeddings(model, input_ids)
    if sig.parameters[name].kind is inspect.Parameter.POSITIONAL_ONLY:
        return (value,)  # forward(self, input_ids, /, ...)
    kwargs[name] = value
    return ()


def _input_embeddings(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``model.get_input_embeddings()(input_ids)``, for a forward that takes ``inputs_embeds`` alone.
    A ValueError, before any forward or hook, where the model has no such module, or one that does not
    map ``[batch, seq]`` ids to ``[batch, seq, width]`` floating-point vectors (a vision model's patch
    embedding): nothing else says which vectors the forward expects."""
    name = type(model).__name__
    what = f"model: {name}.forward takes inputs_embeds and no input_ids, and"
    alone = "verify runs on token ids alone (capture it with residtap.Capture and your own inputs)"
    inner = unwrapped(model)
    try:
        embed = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    except NotImplementedError:  # HF's default, where it finds no embedding module
        embed = None
    if not isinstance(embed, nn.Module):
        raise ValueError(f"{what} {name} has no input embeddings (get_input_embeddings()) to make them from "
                         f"token ids; {alone}")
    try:
        with torch.no_grad():
            embeds = embed(input_ids)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:  # (a patch embedding given ints)
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{what} its input embeddings ({type(embed).__name__}) raised on token ids of shape "
                         f"{list(input_ids.shape)}: {type(e).__name__}: {first}; {alone}") from e
    if not (isinstance(embeds, torch.Tensor) and embeds.is_floating_point()
            and embeds.dim() == input_ids.dim() + 1 and embeds.shape[:-1] == input_ids.shape):
        got = (f"{embeds.dtype} of shape {list(embeds.shape)}" if isinstance(embeds, torch.Tensor)
               else type(embeds).__name__)
        raise ValueError(f"{what} its input embeddings ({type(embed).__name__}) made {got} of token ids of "
                         f"shape {list(input_ids.shape)}, not a floating-point vector per token; {alone}")
    return embeds


def _report(model, layout, hs, resid, normed, dtype, first_resid: int) -> VerifyReport:
    """hidden_states[i] against the residual at index ``min(i + first_resid, n_layers)``, raw and
    normed. All comparisons on the devices; one [n, 6] summary comes back to the host at the end."""
    n = len(hs) if first_resid else min(len(hs), len(resid))
    index = [min(i + first_resid, len(resid) - 1) for i in range(n)]
    summary = []
    for i, j in enumerate(index):
        h = hs[i]
        nan = torch.tensor(float("nan"), device=h.device)
        x = resid[j].to(h.device)
        y = None if normed is None else normed[j].to(h.device)
        row = _compare(x, h, nan) + _compare(y, h, nan)
        projected = None
        if i == n - 1 and layout.project_out is not None:
            with torch.no_grad():  # what HF does after the blocks: project_out(final_norm(x))
                projected = layout.project_out(x if y is None else y).to(h.device)
        summary.append(torch.stack(row + _compare(projected, h, nan)).to(resid[0].device))
    table = torch.stack(summary).cpu().tolist()

    def exact(flag: float) -> bool | None:
        return None if flag != flag else flag == 1.0

    def value(x: float) -> float | None:
        return None if x != x else x

    rows = []
    for i, (raw_max, raw_eq, n_max, n_eq, p_max, p_eq) in enumerate(table):
        raw_exact, normed_exact, projected_exact = raw_eq == 1.0, exact(n_eq), exact(p_eq)
        if projected_exact and not raw_exact and not normed_exact:
            matches = "projected"
        else:
            matches = {(True, True): "both", (True, False): "raw", (False, True): "normed",
                       (False, False): "neither"}[(raw_exact, bool(normed_exact))]
        rows.append(LayerRow(i, value(raw_max), raw_exact, value(n_max), normed_exact, matches,
                             value(p_max), projected_exact, index[i]))
    config = getattr(model, "config", None)
    tie = getattr(text_config(model), "tie_last_hidden_states", None)
    return VerifyReport(model=getattr(config, "_name_or_path", None) or type(model).__name__,
                        n_layers=layout.n_layers, n_hidden_states=len(hs),
                        dtype=str(dtype).replace("torch.", ""), device=str(resid[0].device),
                        has_final_norm=layout.final_norm is not None, rows=tuple(rows),
                        d_model=resid[0].shape[-1], last_width=hs[-1].shape[-1],
                        has_projection=layout.project_out is not None,
                        tie_last_hidden_states=tie if isinstance(tie, bool) else None,
                        first_resid=first_resid)
