"""The fused capture op vs torch's separate ops vs a plain copy of the same bytes (the ceiling).

For each shape [rows, d_model] and dtype, with the op writing every output it has (resid, delta,
normed through a LayerNorm with weight and bias, and the stats mean/rstd/l2/maxabs) into
preallocated buffers, measured in the same run:

  fused_op    residtap.ops.capture_block, the compiled op (C++ on CPU, CUDA on GPU)
  fused_op_staged  (CUDA only) the same op with the fast kernel's experimental staged variant
              (residtap.ops.staged_rows: each block copies its next rows into shared memory
              while it works on the current ones); checked like fused_op
  torch_ops   what the reference does with separate torch ops: clone (resid), sub (delta),
              F.layer_norm (normed), native_layer_norm(x.float()) (mean, rstd),
              linalg.vector_norm (l2), abs().amax (maxabs), all timed together as one row
  copy        dst.copy_(src) moving the same number of bytes (read + written) as the op

``bytes`` is what the op must move at least: each input read once (out, inp, weight, bias) and
each output written once (resid, delta, normed in the model dtype; 4 float32 stats per row).
Every method is charged those same bytes, so ``TB/s`` (``GB/s`` on CPU) compares like with like,
and ``frac_of_copy`` = copy time / method time is the fraction of the copy ceiling reached (the
issue's target for the fused op: >= 0.90). ``x_torch`` = torch_ops time / method time. The
methods are interleaved: every method is warmed up, then each of --rounds rounds (default 5) times
every method, in a fresh random order, for iters / rounds calls; ``median_s`` is the median of a
method's calls over all rounds, and ``frac_of_copy_range`` the lowest and highest of its per-round
fractions (each round's median against that round's copy), the spread drift would show.

Before timing, ``--check`` (on by default) runs the op once next to the torch ops and requires
torch.equal for resid, delta, normed, mean, rstd and maxabs, and l2 within 2 ulp of a float64
norm (the contract's one tolerance). A shape that fails is reported, not timed, and the script
exits 1 at the end.

    python benchmarks/bench_op.py                  # GPU shapes, bfloat16 and float32
    python benchmarks/bench_op.py --smoke          # CPU, tiny shapes, seconds
    python benchmarks/bench_op.py --device cpu --shapes 2048x768 --dtypes float32
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from _common import (base_parser, finish, interleaved_times, l2_problem, medians, parse_list, resolve_device,
                     row, write_rows)

SHAPES = [(16384, 768), (8192, 1600), (8192, 4096), (32768, 4096)]
SMOKE_SHAPES = [(256, 64), (128, 200)]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
EPS = 1e-5
STATS = ("mean", "rstd", "l2", "maxabs")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            rows, d = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected a comma list of ROWSxD_MODEL like 16384x768, got {part!r}")
        if rows < 1 or d < 1:
            raise SystemExit(f"--shapes: expected positive sizes, got {part!r}")
        shapes.append((rows, d))
    return shapes


def load_op(device: torch.device):
    """The compiled op, or exit saying why it is not there: timing the reference would mislead."""
    from residtap._build import load_extension

    info = load_extension()
    if not info.loaded:
        raise SystemExit(f"bench_op: the compiled residtap extension did not load: {info.error}")
    if device.type == "cuda" and not info.with_cuda:
        raise SystemExit(f"bench_op: the extension was built without CUDA ({info.cuda_skipped_because}); "
                         "the CUDA op cannot be timed")
    from residtap import ops

    return ops.capture_block


def make_inputs(rows: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    inp = randn(1, rows, d)
    inp[:, rows // 2:] += 30.0  # half the rows far from zero: the case where LayerNorm's order shows
    out = (inp + randn(1, rows, d)).to(dtype)
    return {"out": out, "inp": inp.to(dtype), "weight": (1 + 0.1 * randn(d)).to(dtype),
            "bias": (0.1 * randn(d)).to(dtype)}


def op_buffers(x: dict) -> dict:
    out = x["out"]
    bufs = {name: torch.empty_like(out) for name in ("resid", "delta", "normed")}
    for name in STATS:
        bufs[name] = torch.empty(out.shape[:2], dtype=torch.float32, device=out.device)
    return bufs


def run_fused(op, x: dict, bufs: dict) -> None:
    op(x["out"], x["inp"], None, norm_weight=x["weight"], norm_bias=x["bias"], norm_kind="layer_norm",
       eps=EPS, **bufs)


def run_torch(x: dict) -> dict:
    """The same outputs from torch's separate ops (what the reference computes), freshly allocated."""
    out, d = x["out"], x["out"].shape[-1]
    xf = out.float()
    _, mean, rstd = torch.native_layer_norm(xf, (d,), None, None, EPS)
    return {
        "resid": out.clone(),
        "delta": out - x["inp"],
        "normed": F.layer_norm(out, (d,), x["weight"], x["bias"], EPS),
        "mean": mean.squeeze(-1),
        "rstd": rstd.squeeze(-1),
        "l2": torch.linalg.vector_norm(xf, dim=-1),
        "maxabs": xf.abs().amax(dim=-1),
    }


def check(op, x: dict) -> str | None:
    """None when the op's outputs equal torch's (l2: within 2 ulp of float64), else what differs."""
    bufs = op_buffers(x)
    with torch.no_grad():
        run_fused(op, x, bufs)
        want = run_torch(x)
        want["l2"] = torch.linalg.vector_norm(x["out"].double(), dim=-1).float()
    for name, got in bufs.items():
        if name == "l2":
            if (problem := l2_problem(got, want["l2"])) is not None:
                return problem
        elif got.dtype != want[name].dtype or not torch.equal(got, want[name]):
            diff = (got.float() - want[name].float()).abs().max().item()
            return f"{name} differs from torch (max |diff| {diff:.3g})"
    return None


def op_bytes(rows: int, d: int, dtype: torch.dtype) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    return 2 * rows * d * e + 2 * d * e + 3 * rows * d * e + len(STATS) * rows * 4


def main() -> int:
    p = base_parser(__doc__)
    p.add_argument("--shapes", default=None, help="comma list of ROWSxD_MODEL (default: the issue's shapes)")
    p.add_argument("--dtypes", default=None, help=f"comma list of {','.join(DTYPES)} (default both)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the op with torch once per shape before timing (default on)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds over which the iterations are split (default 5)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds: expected a positive int, got {args.rounds}")
    device = resolve_device(args.device if not args.smoke else (args.device or "cpu"))
    shapes = parse_shapes(args.shapes) if args.shapes else (SMOKE_SHAPES if args.smoke else SHAPES)
    dtypes = parse_list(args.dtypes, DTYPES, "--dtypes")
    if args.smoke:  # tiny tensors: intra-op threads only add wake-ups, badly so on a busy 2-core CI box
        torch.set_num_threads(1)
    iters = args.iters or (5 if args.smoke else 100)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 20)
    op = load_op(device)
    cuda = device.type == "cuda"
    from residtap.ops import staged_rows
    unit, scale = ("TB/s", 1e12) if cuda else ("GB/s", 1e9)

    rows, failed = [], []
    for n, d in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            x = make_inputs(n, d, dtype, device)
            common = dict(bench="op", shape=[n, d], dtype=dname, bytes=op_bytes(n, d, dtype))
            problem = check(op, x) if args.check else None
            staged_problem = None
            if cuda and args.check and not problem:
                with staged_rows(True):
                    staged_problem = check(op, x)
            if staged_problem:  # reported and not timed; the plain op still is
                failed.append(f"{n}x{d} {dname} staged: {staged_problem}")
                rows.append(row(device, method="fused_op_staged", check=f"FAILED: {staged_problem}", **common))
            if problem:
                failed.append(f"{n}x{d} {dname}: {problem}")
                rows.append(row(device, method="fused_op", check=f"FAILED: {problem}", **common))
                del x
                continue
            bufs = op_buffers(x)
            # a flat byte buffer whose copy reads and writes the op's bytes: the same traffic
            src = torch.empty((common["bytes"] + 1) // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)

            def staged(fn):
                def run():
                    with staged_rows(True):
                        fn()
                return run

            fns = {"copy": lambda: dst.copy_(src), "fused_op": lambda: run_fused(op, x, bufs)}
            if cuda and not staged_problem:
                fns["fused_op_staged"] = staged(lambda: run_fused(op, x, bufs))
            fns["torch_ops"] = lambda: run_torch(x)
            with torch.no_grad():
                samples = interleaved_times(fns, device=device, iters=iters, warmup=warmup,
                                            rounds=args.rounds)
            times = medians(samples)
            t_copy, t_torch = times["copy"], times["torch_ops"]
            round_copy = [statistics.median(r) for r in samples["copy"]]
            for method in (m for m in ("fused_op", "fused_op_staged", "torch_ops", "copy") if m in times):
                t = times[method]
                rate = common["bytes"] / t
                fracs = [c / statistics.median(r) for c, r in zip(round_copy, samples[method])]
                extra = {"check": "passed" if args.check else "skipped"} if method.startswith("fused") else {}
                rows.append(row(device, method=method, median_s=t, bytes_per_s=rate, **{unit: rate / scale},
                                frac_of_copy=t_copy / t, frac_of_copy_range=[min(fracs), max(fracs)],
                                x_torch=t_torch / t, iters=iters, warmup=warmup, rounds=len(samples[method]),
                                **extra, **common))
            del x, bufs, src, dst
            if cuda:
                torch.cuda.empty_cache()
            write_rows(rows, "bench_op", args.out)  # so far: a run stopped at its time limit keeps these

    return finish(rows, ["shape", "dtype", "method", "bytes", "median_s", unit, "frac_of_copy", "x_torch",
                         "check"], "bench_op", args.out, failed)


if __name__ == "__main__":
    sys.exit(main())
