"""Where the fused op's time goes, without hardware counters and with them.

``time`` (the default): the CUDA op asked for subsets of its outputs, each timed against a plain
device copy of the bytes that subset must move (its inputs read once, its outputs written once),
measured side by side in one run. The op reads a row once and keeps it in registers whatever it
is asked for, so the subsets tell the phases apart: ``resid`` alone is a copy through the kernel,
``stats`` alone is the read plus the row reductions (``mean+rstd`` and ``l2+maxabs`` split them),
``normed`` adds the second phase, and ``all`` is what bench_op times. A subset far below its own
ceiling is where the kernel loses time. Prints a table and writes ``profile_op-<gpu>.json`` to --out.

Each subset and its copy are interleaved: 5 rounds, each timing both in a random order for
--iters / 5 calls; the medians are over all the calls.

``all`` is timed again with the launch capped at 1-8 blocks per SM (``grid_cap``; 0 is no cap): the
blocks then loop over several groups of rows each, like a persistent kernel, which tells whether
launching one block per group of rows costs time. ``resid+delta``, ``normed`` and ``all`` are also
timed with the fast kernel's experimental staged variant (``staged`` = 1: rows copied ahead into
shared memory, ``ops.staged_rows``), which sizes its own grid to the GPU.

``ncu``: per shape and dtype (the narrowest, furthest from the target, first), a warm-up call of
the op with every output and then one call inside an NVTX range "profile", plain and then staged
(the kernel's name ends in ``false`` or ``true``), which is all that Nsight Compute is asked to
profile::

    python scripts/profile_op.py time --out results/
    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats --csv --page details \\
        --log-file ncu_op.csv python scripts/profile_op.py ncu

scripts/gpu_check.sh runs both (parts ``op``/``all``: ``time``; part ``profile``: both).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from _common import interleaved_times, medians, parse_list, print_table, row, write_rows  # noqa: E402
from bench_op import DTYPES, EPS, SHAPES, STATS, make_inputs  # noqa: E402  (the same inputs as bench_op)

from residtap import ops  # noqa: E402

# output subsets; what a subset reads follows from it (inp for delta, weight and bias for normed)
SUBSETS = {
    "resid": ("resid",),
    "stats": STATS,
    # the stats split: torch's Welford and merge tree alone, or the float64 sum of squares and the
    # max alone (the kernel computes those two whatever is asked; resid alone pays them too)
    "mean+rstd": ("mean", "rstd"),
    "l2+maxabs": ("l2", "maxabs"),
    "resid+stats": ("resid", *STATS),
    "resid+delta": ("resid", "delta"),
    "normed": ("normed",),
    "all": ("resid", "delta", "normed", *STATS),
}
# "all" again with the grid capped at these multiples of the SM count (ops.grid_cap): blocks that
# loop over several row groups instead of one block per group, as a persistent kernel would
GRID_WAVES = (1, 2, 3, 4, 8)


def buffers(x: dict, names) -> dict:
    out = x["out"]
    return {n: (torch.empty(out.shape[:2], device=out.device) if n in STATS else torch.empty_like(out))
            for n in names}


def call(x: dict, bufs: dict) -> None:
    normed = "normed" in bufs
    ops.capture_block(x["out"], x["inp"] if "delta" in bufs else None, None,
                      norm_weight=x["weight"] if normed else None, norm_bias=x["bias"] if normed else None,
                      norm_kind="layer_norm" if normed or "mean" in bufs else "none", eps=EPS, **bufs)


def subset_bytes(rows: int, d: int, dtype: torch.dtype, names) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    reads = rows * d * e * (1 + ("delta" in names)) + (2 * d * e if "normed" in names else 0)
    writes = sum(rows * d * e for n in names if n not in STATS) + sum(rows * 4 for n in names if n in STATS)
    return reads + writes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="time", choices=["time", "ncu"])
    p.add_argument("--dtypes", default=None, help=f"comma list of {','.join(DTYPES)} (default both)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script on tiny shapes")
    p.add_argument("--out", default=None, help="directory for the JSON rows (default benchmarks/results)")
    args = p.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_op: needs a CUDA device (--device cpu: a dry run)")
    from residtap._build import load_extension

    info = load_extension()
    if not info.loaded or (dev == "cuda" and not info.with_cuda):
        raise SystemExit(f"profile_op: no compiled op ({info.error or info.cuda_skipped_because})")
    dtypes = parse_list(args.dtypes, DTYPES, "--dtypes")
    rows = []
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev == "cuda" else 1
    runs = [(subset, names, 0, False) for subset, names in SUBSETS.items()]
    runs += [("all", SUBSETS["all"], k * sms, False) for k in GRID_WAVES]
    runs += [(subset, SUBSETS[subset], 0, True) for subset in ("resid+delta", "normed", "all")]

    def op_call(x, bufs, grid, staged):
        def run():
            with ops.grid_cap(grid), ops.staged_rows(staged):
                call(x, bufs)
        return run

    with torch.no_grad():
        for n, d in (SHAPES if dev == "cuda" else [(64, 768), (32, 1600)]):
            for dname in dtypes:
                x = make_inputs(n, d, DTYPES[dname], torch.device(dev))
                if args.mode == "ncu":
                    bufs = buffers(x, SUBSETS["all"])
                    for staged in (False, True):
                        with ops.staged_rows(staged):
                            call(x, bufs)
                            sync()
                            with torch.cuda.nvtx.range("profile") if dev == "cuda" else contextlib.nullcontext():
                                call(x, bufs)
                            sync()
                    continue
                for subset, names, grid, staged in runs:
                    bufs = buffers(x, names)
                    nbytes = subset_bytes(n, d, DTYPES[dname], names)
                    src = torch.empty((nbytes + 1) // 2, dtype=torch.uint8, device=dev)
                    dst = torch.empty_like(src)
                    # copy and op interleaved (rounds in a random order), not the op between two copies
                    samples = interleaved_times({"copy": lambda: dst.copy_(src),
                                                 "op": op_call(x, bufs, grid, staged)},
                                                device=dev, iters=args.iters, warmup=10, rounds=5)
                    t_copy, t_op = (medians(samples)[k] for k in ("copy", "op"))
                    rows.append(row(dev, bench="profile_op", shape=[n, d], dtype=dname, subset=subset,
                                    grid_cap=grid, staged=int(staged), bytes=nbytes, op_s=t_op, copy_s=t_copy,
                                    frac_of_copy=t_copy / t_op, TBps=nbytes / t_op / 1e12))
                    del bufs, src, dst
                del x
                if dev == "cuda":
                    torch.cuda.empty_cache()
                if args.mode == "time":  # so far: a run stopped at its time limit keeps these
                    write_rows(rows, "profile_op", args.out)
    if args.mode == "time":
        print_table(rows, ["shape", "dtype", "subset", "grid_cap", "staged", "bytes", "op_s", "copy_s", "TBps",
                           "frac_of_copy"])
        print(f"wrote {write_rows(rows, 'profile_op', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
