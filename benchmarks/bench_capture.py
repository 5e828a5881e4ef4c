"""Capturing every layer during a forward: residtap vs a plain forward, the reference and common baselines.

On random-init GPT-2-architecture models (``residtap.models.random_gpt2``, the bare ``GPT2Model``
without the LM head, so the denominator is the transformer alone): GPT-2-small size (12 layers,
d 768) at batch 16 x 1024 and GPT-2-XL size (48 layers, d 1600) at batch 8 x 1024, in bfloat16 and
float32 (--smoke: 2 layers, d 64, batch 2 x 32, on CPU). Methods, all under torch.no_grad with
use_cache=False, every residual index 0..n_layers:

  forward        the plain forward (the denominator)
  capture        residtap.Capture(outputs=resid, delta, normed, stats, backend="compiled"), built
                 once (its buffers are reused) and entered around each forward
  capture_overlap  the same with overlap=True: each layer's capture on a side stream, beside the
                 next blocks (residtap.overlap); on CPU it runs in place, like capture
  capture_overlap_gN  (with --overlap-grid-caps N,...; experimental) capture_overlap with at most N
                 thread blocks per side-stream launch of the op, so that it takes a few SMs beside
                 the next blocks' kernels instead of queueing behind or ahead of them
  capture_staged, capture_overlap_staged  (with --staged; experimental) capture and capture_overlap
                 with the op's fast kernel staged (residtap.ops.staged_rows: each thread block
                 copies its next rows into shared memory while it works on the current ones)
  capture_resid  residtap.Capture(outputs=("resid",)): every block's output and nothing else, like
                 hooks_copy, nnsight and TransformerLens (the use of SAE training)
  reference      residtap.reference.run_reference with the same outputs (hooks + clone + torch ops)
  hidden_states  HF output_hidden_states=True (no copies; the final entry is after ln_f)
  hooks_copy     plain forward hooks copying each block's output into one preallocated buffer
  bytes_floor    the plain forward, then one device copy per captured layer moving the bytes the
                 capture must move at least (block output and input read, resid/delta/normed
                 written): what a capture running at the copy ceiling, not overlapped with the
                 forward, would cost. capture's ratio cannot go below this one; only
                 capture_overlap can.
  nnsight        nnsight's trace saving every block's output (only if nnsight imports)
  tlens          TransformerLens run_with_cache of every resid_post (only if transformer_lens
                 imports). TransformerLens 4 has no HookedTransformer: its TransformerBridge wraps a
                 GPT2LMHeadModel copy of the bench model, whose forward always includes the LM head
  tlens_plain    that bridge's forward without a cache: the denominator for tlens's own overhead
                 (tlens / tlens_plain), since its ratio to the bare forward counts the LM head too

Each is timed as host wall time with the device synchronized before and after. Each round runs
every method once, in a fresh random order (seeded), so that clock or thermal drift hits all of them
alike and no method always follows the same one;
``ratio`` is the median over rounds of method time / forward time of the same round (target for
capture: <= 1.01). Before timing, ``--check`` (on by default) runs each capture method and the
reference once and requires torch.equal for every output (l2: within 2 ulp, the contract's
tolerance); a capture method that fails is reported and not timed.

After the timed rounds, forward, capture and capture_resid each make 6 more calls under
``_common.ForwardTimeline`` (row field ``timeline``, and a table): each forward's time in parts, mean
milliseconds, on the GPU's clock on CUDA: the model's prefix (embeddings; GPT-2's attention-mask code
synchronizes with the GPU there), the first block's pre-hooks (a capture's set-up), the blocks (the
capture's kernels among them), and the gap to the next call. A capture whose extra time is in the
blocks costs GPU time; one whose extra is in the prefix or the pre-hooks left the GPU waiting for
the host.

    python benchmarks/bench_capture.py                  # GPU sizes (estimated about a minute on an H200)
    python benchmarks/bench_capture.py --smoke          # CPU, seconds
    python benchmarks/bench_capture.py --models small --dtypes bfloat16 --iters 20
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time

import torch

from _common import (ForwardTimeline, base_parser, finish, l2_problem, parse_list, print_timelines, resolve_device,
                     row, sync, write_rows)

import residtap
from residtap._build import load_extension
from residtap.ops import staged_rows
from residtap.models import random_gpt2, random_input_ids
from residtap.reference import OUTPUTS, STAT_NAMES, run_reference

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CONFIGS = {  # name → (random_gpt2 size, overrides, batch, seq)
    "small": ("gpt2-small", {}, 16, 1024),
    "xl": ("gpt2-xl", {}, 8, 1024),
}
SMOKE = {"tiny": ("gpt2-small", dict(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64), 2, 32)}


def hooks_copy_method(model, ids):
    """Forward hooks that copy each block's output (and block 0's input) into one buffer."""
    blocks = model.h
    cfg = model.config
    buf = torch.empty(cfg.n_layer + 1, *ids.shape, cfg.n_embd, dtype=model.dtype, device=ids.device)

    def pre(_m, args, kwargs):
        buf[0].copy_(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def post(i):
        def hook(_m, _args, output):
            buf[i + 1].copy_(output[0] if isinstance(output, tuple) else output)
        return hook

    def run():
        handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
        try:
            handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
            model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return run


def nnsight_methods(model, ids):
    """nnsight's trace saving every block's output; None (with why) when it cannot run here."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None, "not installed"
    wrapped = NNsight(copy.deepcopy(model))  # it instruments the modules it wraps, for good
    n = len(model.h)

    def run():
        with wrapped.trace(input_ids=ids, use_cache=False):
            saved = [wrapped.h[i].output.save() for i in range(n)]  # noqa: F841 (kept by the trace)
    return {"nnsight": run}, None


def tlens_methods(model, ids):
    """TransformerLens run_with_cache of every resid_post, and the same model's plain forward."""
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError:
        return None, "not installed (or older than 4.0, which this benchmark does not drive)"
    from transformers import GPT2LMHeadModel

    # The bridge replaces submodules of the model it wraps: give it a copy, with an LM head (its
    # GPT-2 adapter expects one) tied to the copied embeddings.
    lm = GPT2LMHeadModel(model.config).to(device=ids.device, dtype=model.dtype)
    lm.transformer = copy.deepcopy(model)
    lm.tie_weights()
    bridge = build_bridge_from_module(lm.eval(), "GPT2LMHeadModel", hf_config=model.config)

    def run():
        bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_post"))

    def plain():
        bridge(ids)
    return {"tlens": run, "tlens_plain": plain}, None


def bytes_floor_method(model, ids):
    """The forward, then per captured layer a copy moving that layer's minimum capture bytes."""
    n_layers, d = model.config.n_layer, model.config.n_embd
    elt = next(model.parameters()).element_size()
    per_layer = ids.numel() * d * elt * 5 // 2  # read + write = 2 reads + 3 writes of the layer
    src = torch.empty(per_layer, dtype=torch.uint8, device=ids.device)
    dst = torch.empty_like(src)

    def run():
        model(input_ids=ids, use_cache=False)
        for _ in range(n_layers + 1):
            dst.copy_(src)
    return run


def check_capture(cap, model, ids, outputs=OUTPUTS) -> str | None:
    """None when one capture equals the reference (l2 within 2 ulp of float64), else what differs."""
    with cap:
        model(input_ids=ids, use_cache=False)
    ref = run_reference(model, input_ids=ids, outputs=outputs, use_cache=False).outputs
    for name in ("resid", "delta", "normed"):
        if name in outputs and not torch.equal(getattr(cap, name), ref[name]):
            return f"{name} differs from the reference"
    for stat in STAT_NAMES if "stats" in outputs else ():
        got, want = getattr(cap.stats, stat), getattr(ref["stats"], stat)
        if stat != "l2":
            if not torch.equal(got, want):
                return f"stats.{stat} differs from the reference"
            continue
        if (problem := l2_problem(got, want)) is not None:
            return f"stats.{problem}"
    return None


ORDER_SEED = 0


def time_round_robin(methods: dict, device, iters: int, warmup: int) -> dict:
    """Per method, the list of ``iters`` wall times, one per round, each round in a fresh random
    order (seeded: ORDER_SEED). A rotation would keep every method's predecessor the same, so
    whatever one method leaves behind (clocks after heavy GEMMs, allocator state, Python garbage)
    would land on the same neighbour, the plain forward included, every round."""
    names = list(methods)
    times = {n: [] for n in names}
    order = random.Random(ORDER_SEED)
    for r in range(warmup + iters):
        for name in order.sample(names, len(names)):
            sync(device)
            t0 = time.perf_counter()
            methods[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


# method -> (outputs, overlap, side-stream grid cap, staged kernel). capture_resid is the
# like-for-like row for hooks_copy, nnsight and TransformerLens, which keep each block's output and
# nothing else.
CAPTURES = {"capture": (OUTPUTS, False, 0, False), "capture_overlap": (OUTPUTS, True, 0, False),
            "capture_resid": (("resid",), False, 0, False)}


def capture_methods(grid_caps=(), staged: bool = False) -> dict:
    """CAPTURES, plus capture_overlap_g<N> per grid cap N (overlap with at most N thread blocks per
    side-stream launch of the op: see residtap.overlap.SideStreams.grid_cap), plus, if ``staged``,
    capture and capture_overlap with the staged kernel (residtap.ops.staged_rows)."""
    methods = {**CAPTURES, **{f"capture_overlap_g{n}": (OUTPUTS, True, n, False) for n in grid_caps}}
    if staged:
        methods.update({"capture_staged": (OUTPUTS, False, 0, True),
                        "capture_overlap_staged": (OUTPUTS, True, 0, True)})
    return methods


TIMELINE_METHODS = ("forward", "capture", "capture_resid")
TIMELINE_CALLS = 6  # the first is left out of the means; each mean is over the 4 with a next call


def measure(model, ids, device, iters: int, warmup: int, check: bool, captures: dict):
    """(times per method, {capture method: what its check found wrong}, {optional method: why
    skipped}, {method in TIMELINE_METHODS: its ForwardTimeline summary}).

    Everything built here (capture buffers, hook buffers, optional wrappers) is freed on return."""
    skipped, problems = {}, {}
    with torch.no_grad():
        def capture_method(cap, staged):
            def run():
                with staged_rows(staged), cap:
                    model(input_ids=ids, use_cache=False)
            return run

        methods = {"forward": lambda: model(input_ids=ids, use_cache=False)}
        for name, (outputs, overlap, grid_cap, staged) in captures.items():
            cap = residtap.Capture(model, outputs=outputs, backend="compiled", overlap=overlap)
            if grid_cap:
                cap._side.grid_cap = grid_cap  # experimental, not public
            with staged_rows(staged):
                problem = check_capture(cap, model, ids, outputs) if check else None
            if problem:  # never time wrong code
                problems[name] = problem
            else:
                methods[name] = capture_method(cap, staged)
        methods.update({
            "reference": lambda: run_reference(model, input_ids=ids, outputs=OUTPUTS, use_cache=False),
            "hidden_states": lambda: model(input_ids=ids, use_cache=False, output_hidden_states=True),
            "hooks_copy": hooks_copy_method(model, ids),
            "bytes_floor": bytes_floor_method(model, ids),
        })
        for name, make in (("nnsight", nnsight_methods), ("tlens", tlens_methods)):
            try:
                fns, why = make(model, ids)  # {method: run} or None
                for fn in (fns or {}).values():
                    fn()  # fail here, before timing, if the API differs from what we expect
            except Exception as e:  # an optional baseline must not stop the benchmark
                fns, why = None, f"{type(e).__name__}: {e}"
            if fns is None:
                skipped[name] = why
            else:
                methods.update(fns)
        times = time_round_robin(methods, device, iters, warmup)
        # Then each forward in parts (ForwardTimeline), for the plain forward and the captures of the
        # target: whether a capture's extra time is on the GPU (the blocks) or where the GPU waited for
        # the host (the prefix, the first block's pre-hooks).
        timelines = {}
        for name in TIMELINE_METHODS:
            if name in methods:
                with ForwardTimeline(model, model.h) as tl:
                    for _ in range(TIMELINE_CALLS):
                        methods[name]()
                timelines[name] = tl.summary()
        return times, problems, skipped, timelines


def main() -> int:
    p = base_parser(__doc__)
    p.add_argument("--models", default=None, help=f"comma list of {','.join(CONFIGS)} (default all)")
    p.add_argument("--dtypes", default=None, help=f"comma list of {','.join(DTYPES)} (default both)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--seq", type=int, default=None, help="override every model's sequence length")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare one capture with the reference before timing (default on)")
    p.add_argument("--overlap-grid-caps", default="",
                   help="comma list of N: also time overlap with at most N thread blocks per side-stream "
                        "launch (rows capture_overlap_gN; experimental)")
    p.add_argument("--staged", action="store_true",
                   help="also time capture and capture_overlap with the op's staged kernel (rows "
                        "capture_staged, capture_overlap_staged; experimental)")
    args = p.parse_args()
    try:
        grid_caps = [int(v) for v in args.overlap_grid_caps.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--overlap-grid-caps: expected a comma list of positive ints, got "
                         f"{args.overlap_grid_caps!r}")
    if any(n < 1 for n in grid_caps):
        raise SystemExit(f"--overlap-grid-caps: expected positive ints, got {args.overlap_grid_caps!r}")
    captures = capture_methods(grid_caps, args.staged)
    device = resolve_device(args.device if not args.smoke else (args.device or "cpu"))
    configs = SMOKE if args.smoke else {k: CONFIGS[k] for k in parse_list(args.models, CONFIGS, "--models")}
    dtypes = parse_list(args.dtypes, DTYPES, "--dtypes")
    if args.smoke:  # tiny tensors: intra-op threads only add wake-ups, badly so on a busy 2-core CI box
        torch.set_num_threads(1)
    iters = args.iters or (5 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)

    info = load_extension()
    if not info.loaded:
        raise SystemExit(f"bench_capture: the compiled residtap extension did not load: {info.error}")
    if device.type == "cuda" and not info.with_cuda:
        raise SystemExit(f"bench_capture: the extension was built without CUDA ({info.cuda_skipped_because})")

    rows, failed, skipped, suspect, parts = [], [], {}, [], []
    for name, (size, overrides, batch, seq) in configs.items():
        batch, seq = args.batch or batch, args.seq or seq
        for dname in dtypes:
            model = random_gpt2(size, dtype=DTYPES[dname], device=device, lm_head=False, **overrides)
            common = dict(bench="capture", model=name, layers=model.config.n_layer,
                          d_model=model.config.n_embd, batch=batch, seq=seq, dtype=dname)
            times, problems, why_not, timelines = measure(
                model, random_input_ids(model, batch, seq, device=device), device, iters, warmup, args.check,
                captures)
            del model  # free it (and the caches below) before the next size is built
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            skipped.update(why_not)
            for method, problem in problems.items():
                failed.append(f"{name} {dname} {method}: {problem}")
                rows.append(row(device, method=method, check=f"FAILED: {problem}", **common))
            fwd = times["forward"]
            for method, ts in times.items():
                extra = {"check": "passed" if args.check else "skipped"} if method in captures else {}
                if method in timelines:
                    extra["timeline"] = timelines[method]
                    parts.append(dict(model=name, dtype=dname, method=method, **timelines[method]))
                ratios = sorted(t / f for t, f in zip(ts, fwd))
                rows.append(row(device, method=method, median_s=statistics.median(ts),
                                ratio=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1],
                                iters=iters, warmup=warmup, order=f"random per round, seed {ORDER_SEED}",
                                **extra, **common))
            for floor in ("hidden_states", "bytes_floor"):  # each does at least a forward's work
                r = statistics.median(t / f for t, f in zip(times[floor], fwd))
                if r < 0.99:
                    suspect.append(f"{name} {dname}: {floor} came out at {r:.3f} x the forward, which it "
                                   "cannot be: the forward baseline of this run is unreliable")
            write_rows(rows, "bench_capture", args.out)  # so far: a run stopped at its time limit keeps these

    print_timelines(parts, ["model", "dtype", "method"], f", {TIMELINE_CALLS} calls after the timed rounds")
    return finish(rows, ["model", "dtype", "batch", "seq", "method", "median_s", "ratio", "ratio_min",
                         "ratio_max", "check"],
                  "bench_capture", args.out, failed,
                  notes=[*(f"{extra}: skipped: {why}" for extra, why in skipped.items()),
                         *(f"SUSPECT: {s}" for s in suspect)])


if __name__ == "__main__":
    sys.exit(main())
