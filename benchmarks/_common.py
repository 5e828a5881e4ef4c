"""Shared plumbing for the scripts in benchmarks/: argument parsing, timing, JSON rows, tables.

Small on purpose; every benchmark imports it as ``from _common import ...`` (the scripts run as
``python benchmarks/bench_x.py``, so this directory is on ``sys.path``).

    parser = base_parser(__doc__)            # --smoke, --device, --iters, --warmup, --out
    args = parser.parse_args()
    t = median_time(lambda: f(x), device=args.device, iters=args.iters, warmup=args.warmup)
    rows.append(row(bench="op", shape=[8, 768], dtype="bfloat16", median_s=t))
    print_table(rows, ["shape", "dtype", "median_s"])
    path = write_rows(rows, "bench_op", args.out)

``row(**fields)`` stamps each row with the environment (GPU name, torch / CUDA / transformers
versions, UTC time), so a results file read on its own says where its numbers came from.
``write_rows`` writes ``<out>/<name>-<device slug>.json`` (default ``benchmarks/results/``): a JSON
list of rows, replacing an earlier file for the same benchmark and device.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "base_parser", "environment", "row", "median_time", "sample_times",
           "interleaved_times", "medians", "write_rows", "print_table", "slug", "device_slug", "l2_problem", "finish",
           "parse_list", "sync", "ForwardTimeline", "print_timelines"]


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every benchmark shares (add your own after)."""
    # the docstring's first paragraph (its first line may end mid-sentence)
    first = (description or "").strip().split("\n\n")[0]
    p = argparse.ArgumentParser(description=" ".join(first.split()) or None)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, a few seconds, runs on CPU too (what CI runs)")
    p.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda when available, else cpu)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions first")
    p.add_argument("--out", default=None,
                   help=f"directory for the JSON results (default {RESULTS_DIR})")
    return p


def parse_list(text: str | None, allowed, flag: str) -> list[str]:
    """A comma list of names from ``allowed``, each once, in the order given (all of them when
    ``text`` is empty), or exit naming the flag."""
    if not text:
        return list(allowed)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in allowed for n in names) or len(set(names)) < len(names):
        raise SystemExit(f"{flag}: expected a comma list of {','.join(allowed)}, each once, got {text!r}")
    return names


def sync(device: torch.device) -> None:
    """Wait for the device (around host wall-clock timings); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


@functools.lru_cache(maxsize=None)
def environment(device: str = "cpu") -> dict:
    """GPU name (or CPU model), library versions; the same for every row of a run."""
    import transformers

    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        hw = torch.cuda.get_device_name(idx)
        cap = ".".join(map(str, torch.cuda.get_device_capability(idx)))
    else:
        hw, cap = _cpu_model(), None
    return {
        "device": dev.type,
        "hardware": hw,
        "capability": cap,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        # float32 matmuls may run as TF32 ("high"/"medium"), which changes float32 forward times
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else platform's word for it ("x86_64" says little)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row(device: str | torch.device = "cpu", **fields) -> dict:
    """One result row: the environment of ``device``, the time now (UTC), then ``fields``."""
    stamp = dict(environment(str(device)))
    stamp["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    stamp.update(fields)
    return stamp


# GPU cycles of sleep per timed call (median_time): about 100 us at the H200's 1.98 GHz, far more
# than the host needs to enqueue a call and its two events.
HOLD_CYCLES_PER_CALL = 200_000


def median_time(fn: Callable[[], object], *, device: str | torch.device = "cpu", iters: int = 10,
                warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds over ``iters`` calls after ``warmup`` calls
    (:func:`sample_times`)."""
    return statistics.median(sample_times(fn, device=device, iters=iters, warmup=warmup))


def sample_times(fn: Callable[[], object], *, device: str | torch.device = "cpu", iters: int = 10,
                 warmup: int = 3) -> list[float]:
    """The time of each of ``iters`` calls of ``fn()`` in seconds, after ``warmup`` calls.

    On CUDA each call is bracketed by CUDA events on the current stream (GPU time of the work
    ``fn`` enqueues, no host sync between calls except reading the events at the end), with the
    GPU held by a sleep kernel while the host enqueues every call: a kernel shorter than the
    host's cost of launching it (tens of microseconds through Python) would otherwise be timed
    as that host cost. A warning says so if the host still fell behind. On CPU,
    ``time.perf_counter``.
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        torch.cuda._sleep(HOLD_CYCLES_PER_CALL * iters)  # the host gets ahead of the GPU here
        for start, end in events:
            start.record()
            fn()
            end.record()
        if events and events[-1][0].query():  # the GPU reached the last call before it was enqueued
            print(f"sample_times: the host fell behind the GPU ({iters} calls); short calls may be timed "
                  "as their launch cost", file=sys.stderr)
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) / 1e3 for s, e in events]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class ForwardTimeline:
    """Where each forward of a model with a list of blocks spends its time, in four parts that add up
    to the whole. Stamps are taken from hooks, each time the model is called:

      start   the model's forward begins (before its embeddings)
      blocks  its first block is called: the model's own prefix (embeddings, attention mask) is done
      body    that block's first submodule runs: the first block's pre-hooks have run (a capture's
              set-up for the forward, residtap's _on_first_block)
      end     the model's forward returns

    and per forward k: ``pre`` = start->blocks, ``hook`` = blocks->body, ``body`` = body->end, ``gap`` =
    end->start of forward k+1 (the caller's work between forwards), and ``period`` = start->start of
    forward k+1, their sum.

    On CUDA the stamps are timing events on the current stream, so the parts are the GPU's time: a
    part in which the GPU waited for the host (nothing queued) is as long as that wait. This tells a
    forward that slowed on the GPU (``body`` longer) from one whose host fell behind (``pre``,
    ``hook`` or ``gap`` longer), also where the forward synchronizes with the host itself, as
    transformers' causal-mask code does in GPT-2's prefix (``(packed_sequence_mask[:, -1] ==
    0).all()``, every forward without an attention mask or cache), which a host-side wait for the GPU
    outside the forward never sees. On CPU they are ``time.perf_counter()`` stamps: host time, as a
    CPU forward runs as it is called.

        with ForwardTimeline(model.base_model, model.base_model.h) as tl:
            for batch in batches: model(batch)
        tl.summary()  # {"forwards": n, "pre_ms": ..., "hook_ms": ..., "body_ms": ..., ...}
    """

    PARTS = ("pre", "hook", "body", "gap")

    def __init__(self, model: torch.nn.Module, blocks: Sequence[torch.nn.Module], cuda: bool | None = None):
        """``cuda``: stamp with CUDA events (True) or the host clock (False); by default CUDA events
        where the model's parameters are on a CUDA device."""
        first = blocks[0]
        self._modules = (model, first, next(iter(first.children()), first))
        self._stamps: list[list] = []  # per forward: start, blocks, body, end
        self._handles: list = []
        self._cuda_asked = cuda
        self._cuda = False

    def _stamp(self):
        if self._cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _on(self, k: int):
        def hook(*_):
            if k == 0:
                self._stamps.append([self._stamp()])
            elif self._stamps and len(self._stamps[-1]) == k:  # once per forward: the first block only
                self._stamps[-1].append(self._stamp())
        return hook

    def __enter__(self) -> "ForwardTimeline":
        model, first, sub = self._modules
        self._cuda = next(model.parameters()).is_cuda if self._cuda_asked is None else self._cuda_asked
        self._stamps = []
        # prepend: before any hook registered earlier on these modules (a capture's, whose work is then
        # inside the part it belongs to)
        self._handles = [model.register_forward_pre_hook(self._on(0), prepend=True),
                         first.register_forward_pre_hook(self._on(1), prepend=True),
                         model.register_forward_hook(self._on(3), prepend=True),
                         # a block without submodules: "body" after the block's other pre-hooks
                         sub.register_forward_pre_hook(self._on(2), prepend=sub is not first)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self._cuda else (b - a) * 1e3

    def summary(self, skip: int = 1) -> dict:
        """The mean of each part (milliseconds) over the forwards that have a next one (gap and
        period need it), less the first ``skip`` (first calls: allocation, kernel selection)."""
        full = [s for s in self._stamps if len(s) == 4]
        if self._cuda:
            torch.cuda.synchronize()
        rows = []
        for cur, nxt in zip(full[skip:], full[skip + 1:]):
            start, blocks, body, end = cur
            rows.append((self._ms(start, blocks), self._ms(blocks, body), self._ms(body, end),
                         self._ms(end, nxt[0]), self._ms(start, nxt[0])))
        out = {"forwards": len(rows), "clock": "cuda events" if self._cuda else "host"}
        for i, part in enumerate(self.PARTS + ("period",)):  # period measured on its own, not summed
            out[f"{part}_ms"] = statistics.fmean(r[i] for r in rows) if rows else float("nan")
        return out


def print_timelines(lines: Sequence[dict], keys: Sequence[str], how: str = "") -> None:
    """A table of ForwardTimeline summaries, each a dict of ``keys`` (which run) and the summary."""
    if lines:
        print(f"each forward in parts, mean ms ({lines[0]['clock']} clock; ForwardTimeline{how}):")
        print_table(lines, [*keys, "forwards", *(f"{p}_ms" for p in ForwardTimeline.PARTS), "period_ms"])


def interleaved_times(fns: dict, *, device: str | torch.device = "cpu", iters: int = 10, warmup: int = 3,
                      rounds: int = 5, seed: int = 0) -> dict[str, list[list[float]]]:
    """Per method, its per-call times (:func:`sample_times`) in each of ``rounds`` rounds; ``iters``
    calls in all, split over the rounds. Every method first gets its ``warmup`` calls (first use:
    allocation, kernel selection); each round then runs every method once, in a fresh random order
    (seeded), after 2 more untimed calls of it. Timing one method's calls all before the next's
    would leave a drift of clocks or temperature between them (and a fixed neighbour before each);
    interleaved, such drift lands on every method alike."""
    rounds = max(1, min(rounds, iters))
    per_round = [iters // rounds + (r < iters % rounds) for r in range(rounds)]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    order = random.Random(seed)
    names = list(fns)
    out: dict[str, list[list[float]]] = {n: [] for n in names}
    for n_calls in per_round:
        for name in order.sample(names, len(names)):
            out[name].append(sample_times(fns[name], device=device, iters=n_calls, warmup=min(2, warmup)))
    return out


def slug(name) -> str:
    """'nvidia-h200' from 'NVIDIA H200', for file names."""
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "unknown"


def medians(samples: dict[str, list[list[float]]]) -> dict[str, float]:
    """Per method, the median over all its calls of :func:`interleaved_times`' samples."""
    return {name: statistics.median(t for r in rounds for t in r) for name, rounds in samples.items()}


def device_slug(rows: Sequence[dict]) -> str:
    """'nvidia-h200', 'cpu', ... from the first row's hardware, for file names."""
    if not rows:
        return "empty"
    r = rows[0]
    return slug(r.get("hardware") if r.get("device") == "cuda" else "cpu")


def write_rows(rows: Sequence[dict], name: str, out_dir: str | Path | None = None,
               slug: str | None = None) -> Path:
    """Write ``rows`` as a JSON list to ``<out_dir>/<name>-<slug or device slug>.json``; returns the
    path. Atomic (a temporary file renamed over it): a benchmark killed at its time limit while
    writing leaves the previous complete file, never a truncated one."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{slug or device_slug(rows)}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(list(rows), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    return str(v)


def print_table(rows: Iterable[dict], columns: Sequence[str]) -> None:
    """A plain fixed-width table of the given columns (missing values print as '-')."""
    cells = [[_fmt(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def l2_problem(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when float32 ``got`` is within 2 ulp of ``want`` (a float64 norm rounded to float32,
    the contract's one tolerance) with the same non-finite entries; else what is wrong."""
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return "l2 is finite where the float64 norm is not, or the reverse"
    ulp = (got[finite].view(torch.int32).long() - want[finite].view(torch.int32).long()).abs()
    if ulp.numel() and int(ulp.max()) > 2:
        return f"l2 is {int(ulp.max())} ulp from the float64 norm (contract: <= 2)"
    return None


def finish(rows: Sequence[dict], columns: Sequence[str], name: str, out_dir, failed: Sequence[str],
           notes: Iterable[str] = ()) -> int:
    """The end of every benchmark: the table, any notes, the JSON file, the failed checks on stderr;
    returns the exit status (1 if a check failed)."""
    print_table(rows, columns)
    for note in notes:
        print(note)
    print(f"wrote {write_rows(rows, name, out_dir)}")
    for f in failed:
        print(f"CHECK FAILED (not timed): {f}", file=sys.stderr)
    return 1 if failed else 0
