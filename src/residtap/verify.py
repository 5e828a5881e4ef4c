"""The seed's experiment as a report: hook outputs against ``hidden_states``, layer by layer.

For every residual index i it compares the raw residual captured from hooks (``resid_i``) and the
model's final norm re-applied to it (``normed_i``) with ``hidden_states[i]``, and detects which
convention the model follows (raw everywhere, or the last entry normalized) from the data, not from
a table. Everything is computed on the model's device; one small summary is copied to the host.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from .capture import Capture
from .selection import NOT_GIVEN


@dataclasses.dataclass(frozen=True)
class LayerRow:
    layer: int
    raw_maxabs: float  # max |resid_i - hidden_states[i]|
    raw_exact: bool  # torch.equal(resid_i, hidden_states[i])
    normed_maxabs: float | None  # max |final_norm(resid_i) - hidden_states[i]|
    normed_exact: bool | None
    matches: str  # "raw", "normed", "both" or "neither"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    model: str
    n_layers: int
    n_hidden_states: int
    dtype: str
    device: str
    has_final_norm: bool
    rows: tuple[LayerRow, ...]

    @property
    def convention(self) -> str:
        """Which hidden_states entries are raw block outputs and which are normalized, as found."""
        if self.n_hidden_states != self.n_layers + 1:
            return (f"unexpected: {self.n_hidden_states} hidden states for {self.n_layers} blocks")
        last = self.rows[-1].matches
        body_raw = all(r.matches in ("raw", "both") for r in self.rows[:-1])
        if body_raw and last == "normed":
            return "last entry is final_norm(raw output); all others are raw block outputs"
        if body_raw and last in ("raw", "both"):
            return "all entries are raw block outputs (no final norm applied to hidden_states)"
        return "unexplained: some entries match neither the raw residual nor its final norm"

    @property
    def ok(self) -> bool:
        """Every non-last entry equals the raw residual, and the last is explained exactly:
        re-applying the final norm reproduces it (or it is itself raw, where nothing is applied)."""
        return not self.convention.startswith(("unexpected", "unexplained"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rows"] = [dataclasses.asdict(r) for r in self.rows]
        d["convention"] = self.convention
        d["ok"] = self.ok
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        def num(x):
            return "-" if x is None else f"{x:.3g}"

        def yes(x):
            return "-" if x is None else ("exact" if x else "DIFF")

        head = (f"residtap verify: {self.model}, {self.n_layers} blocks, {self.dtype} on {self.device}\n"
                f"{'layer':>5}  {'max|hook-hs|':>12}  {'hook==hs':>8}  {'max|norm(hook)-hs|':>18}  "
                f"{'norm==hs':>8}  hidden_states[i] is")
        lines = [head]
        for r in self.rows:
            what = {"raw": "raw block output", "normed": "final_norm(raw)", "both": "raw (= normed)",
                    "neither": "NEITHER"}[r.matches]
            lines.append(f"{r.layer:>5}  {num(r.raw_maxabs):>12}  {yes(r.raw_exact):>8}  "
                         f"{num(r.normed_maxabs):>18}  {yes(r.normed_exact):>8}  {what}")
        lines.append(f"convention: {self.convention}")
        if not self.has_final_norm:
            lines.append("note: this model has no final norm, so nothing is re-applied")
        lines.append("OK" if self.ok else "FAILED: see the rows above")
        return "\n".join(lines)


def verify(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           blocks=NOT_GIVEN, final_norm=NOT_GIVEN, backend: str | None = None) -> VerifyReport:
    """Run the seed's experiment on ``model`` with ``input_ids`` ``[batch, seq]``.

    Example::

        report = residtap.verify(model, input_ids)
        print(report); assert report.ok
    """
    cap = Capture(model, layers=None, blocks=blocks, final_norm=final_norm, backend=backend,
                  outputs=("resid", "normed") if _has_norm(model, blocks, final_norm) else ("resid",))
    kwargs = {"output_hidden_states": True}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    with torch.no_grad(), cap:
        out = model(input_ids, **kwargs)
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise ValueError(f"model: {type(model).__name__} returned no hidden_states with "
                         "output_hidden_states=True")
    resid = cap.resid
    normed = cap.normed if "normed" in cap.config.outputs else None

    # All comparisons on the device; one [n, 4] summary comes back to the host at the end.
    nan = torch.tensor(float("nan"), device=resid.device)
    summary = []
    for i in range(min(len(hs), resid.shape[0])):
        h = hs[i]
        row = []
        for cand in (resid[i], None if normed is None else normed[i]):
            if cand is None or cand.shape != h.shape:
                row += [nan, nan]
            else:
                row += [(cand.float() - h.float()).abs().amax(), (cand == h).all().float()]
        summary.append(torch.stack(row))
    table = torch.stack(summary).cpu().tolist()

    rows = []
    for i, (raw_max, raw_eq, n_max, n_eq) in enumerate(table):
        raw_exact = raw_eq == 1.0
        normed_exact = None if n_eq != n_eq else n_eq == 1.0
        matches = {(True, True): "both", (True, False): "raw", (False, True): "normed",
                   (False, False): "neither"}[(raw_exact, bool(normed_exact))]
        rows.append(LayerRow(i, raw_max, raw_exact, None if n_max != n_max else n_max, normed_exact, matches))
    return VerifyReport(model=getattr(getattr(model, "config", None), "_name_or_path", None)
                        or type(model).__name__,
                        n_layers=cap.layout.n_layers, n_hidden_states=len(hs),
                        dtype=str(resid.dtype).replace("torch.", ""), device=str(resid.device),
                        has_final_norm=cap.layout.final_norm is not None, rows=tuple(rows))


def _has_norm(model, blocks, final_norm) -> bool:
    from .arch import resolve_layout

    return resolve_layout(model, blocks=blocks, final_norm=final_norm).final_norm is not None
