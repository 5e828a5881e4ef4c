"""The benchmarks' shared timing and result plumbing (benchmarks/_common.py) and bench_extract's
host-only ordering: what CI's --smoke runs cannot show (the order of the timed calls, the CUDA
branch of the timer with CUDA's events emulated, a file never left half-written)."""

import json
import os
import sys
import time
import types

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _common  # noqa: E402


def test_interleaved_times_orders_and_counts():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("copy", "op", "torch")}
    out = _common.interleaved_times(fns, iters=10, warmup=3, rounds=4, seed=1)
    assert [len(r) for r in out["op"]] == [3, 3, 2, 2]  # 10 calls split over 4 rounds
    assert all(sum(map(len, rs)) == 10 for rs in out.values())
    # warm-up first (3 each), then per round 2 untimed + the round's timed calls of one method at a time
    assert calls[:9] == ["copy"] * 3 + ["op"] * 3 + ["torch"] * 3
    rest = calls[9:]
    firsts, i = [], 0
    for n_calls in [3, 3, 2, 2]:
        order = []
        for _ in range(3):
            order.append(rest[i])
            assert rest[i:i + 2 + n_calls] == [rest[i]] * (2 + n_calls)
            i += 2 + n_calls
        assert sorted(order) == ["copy", "op", "torch"]
        firsts.append(order[0])
    assert i == len(rest)
    assert len(set(firsts)) > 1, "the same method first every round: not interleaved"


class _HostEvent:
    """A CUDA event that reads the host clock."""

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def query(self):
        return False

    def elapsed_time(self, end):  # milliseconds, as CUDA's
        return (end.t - self.t) * 1e3


def test_sample_times_cuda_branch(monkeypatch):
    """The CUDA branch, with events that read the host clock: seconds per call, the GPU held first."""
    slept = []
    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", slept.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    ts = _common.sample_times(lambda: time.sleep(0.002), device="cuda", iters=4, warmup=1)
    assert slept == [_common.HOLD_CYCLES_PER_CALL * 4]
    assert len(ts) == 4 and all(0.0015 < t < 0.5 for t in ts)  # seconds, not milliseconds


@pytest.mark.parametrize("cuda", [False, True], ids=["host-clock", "cuda-events"])
def test_forward_timeline_puts_each_part_where_it_happens(monkeypatch, cuda):
    """Known delays, one in each part: the model's prefix (a hook on its position embedding), a
    capture's first-block pre-hook (residtap's own, entered per forward as extract does), the blocks
    (the last block's forward hook) and the caller's work between forwards. Each part is at least its
    delay (a delay counted in the wrong part leaves its own part short of it), and the period, stamped
    apart from the parts, is their sum. The timeline's hooks are gone afterwards."""
    import residtap
    from residtap.capture import Capture
    from residtap.models import random_gpt2

    if cuda:  # the CUDA branch, with events on the host clock
        monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    delay = {"pre": 0.010, "hook": 0.020, "body": 0.030, "gap": 0.040}
    model = random_gpt2("gpt2-small", n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    base = model.base_model
    first_block = Capture._on_first_block

    def slow_first_block(self, *args):
        time.sleep(delay["hook"])
        return first_block(self, *args)

    monkeypatch.setattr(Capture, "_on_first_block", slow_first_block)
    hooks = [base.wpe.register_forward_hook(lambda *_: time.sleep(delay["pre"])),
             base.h[-1].register_forward_hook(lambda *_: time.sleep(delay["body"]))]
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    cap = residtap.Capture(base)
    before = [dict(m._forward_pre_hooks) for m in (base, base.h[0], base.h[0].ln_1)]
    with torch.no_grad(), _common.ForwardTimeline(base, base.h, cuda=cuda) as tl:
        for _ in range(5):
            with cap:
                base(input_ids=ids, use_cache=False)
            time.sleep(delay["gap"])
    for h in hooks:
        h.remove()
    assert [dict(m._forward_pre_hooks) for m in (base, base.h[0], base.h[0].ln_1)] == before
    assert not base._forward_hooks
    s = tl.summary(skip=1)
    assert s["forwards"] == 3 and s["clock"] == ("cuda events" if cuda else "host")
    for part, seconds in delay.items():
        assert s[f"{part}_ms"] >= seconds * 1e3, (part, s)
    assert s["period_ms"] == pytest.approx(sum(s[f"{p}_ms"] for p in _common.ForwardTimeline.PARTS), rel=1e-9)


def test_write_rows_atomic_and_slug(tmp_path, monkeypatch):
    rows = [_common.row("cpu", bench="x", median_s=1.0)]
    path = _common.write_rows(rows, "bench_x", tmp_path)
    assert path.name == "bench_x-cpu.json" and json.loads(path.read_text())[0]["median_s"] == 1.0
    assert _common.write_rows(rows, "bench_x", tmp_path, slug="gpu-host").name == "bench_x-gpu-host.json"

    def killed(self, text):  # the process dies while writing
        raise KeyboardInterrupt

    monkeypatch.setattr(type(path), "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        _common.write_rows(rows * 2, "bench_x", tmp_path)
    monkeypatch.undo()
    assert len(json.loads(path.read_text())) == 1  # the earlier complete file, not a truncated one
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["bench_x-cpu.json", "bench_x-gpu-host.json"]


def test_cpu_rows_name_the_cpu():
    assert _common.environment("cpu")["hardware"]


def test_host_only_alternates_syncs_and_flags(tmp_path, monkeypatch):
    import bench_extract

    log = []
    monkeypatch.setattr(bench_extract.os, "sync", lambda: log.append("sync"))
    monkeypatch.setattr(bench_extract, "raw_write", lambda *a: log.append("raw") or 1.0)

    def store_write(directory, shards, tensors, threads, publishers, busy=False, during=False):
        log.append(f"store{publishers}{'during' if during else ''}{'busy' if busy else ''}")
        return 0.5 if publishers == 3 and not busy and not during else 2.0  # "wide" beats the raw write

    monkeypatch.setattr(bench_extract, "store_write", store_write)
    args = types.SimpleNamespace(shard_size="1MiB", smoke=True, batches=2, repeats=None)
    suspect = []
    rows = bench_extract.host_only(args, {"ram": str(tmp_path), "disk": str(tmp_path)}, 2, 3, suspect)
    one_target = log[:len(log) // 2]
    runs = [x for x in one_target if x != "sync"]
    forward = ["raw", "store0", "store2", "store3", "store3during", "store3duringbusy"]
    assert runs == forward + forward[::-1]  # two passes by default, the second reversed
    assert one_target == [x for r in runs for x in ("sync", r)]  # an os.sync() before each
    assert rows[0]["bw_frac_wide_ram"] == 2.0 and any("wide" in s for s in suspect)
    assert rows[0]["x_during_vs_wide_ram"] == 4.0 and rows[0]["x_during_vs_wide_disk"] == 4.0
    log.clear()
    args.repeats = 3
    rows = bench_extract.host_only(args, {"disk": str(tmp_path)}, 2, 3, [])
    assert [x for x in log if x != "sync"] == forward + forward[::-1] + forward
    assert "raw_ram_s" not in rows[0] and rows[0]["raw_disk_s"] == 1.0


def test_extract_ways_of_queueing_copies_alternate_and_each_gets_its_fields(tmp_path, monkeypatch):
    """bench_extract --copies-at return,next-forward: every extraction runs with the way asked
    (residtap.extract's _Run.copies_at, put back after), the ways alternate between repeats, and the
    second way gets its own fields beside the first's."""
    import bench_extract

    run = sys.modules["residtap.extract"]._Run
    real, ways = bench_extract.residtap.extract, []

    def extract(*args, **kwargs):
        ways.append((run.copies_at, len(kwargs["data"])))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_extract.residtap, "extract", extract)
    monkeypatch.setattr(sys, "argv", ["bench_extract.py", "--smoke", "--layers", "1", "--targets", "ram",
                                      "--ram-dir", str(tmp_path), "--batches", "4", "--repeats", "2",
                                      "--marginal", "--copies-at", "return,next-forward",
                                      "--out", str(tmp_path / "out")])
    assert bench_extract.main() == 0
    assert run.copies_at == "return"
    full, half, warm = 8, 4, 4  # sequences: 4 batches of 2, half of them, the warm-up's 2 batches
    assert ways == [("return", warm),
                    ("return", full), ("next-forward", full), ("next-forward", full), ("return", full),
                    ("return", half), ("next-forward", half), ("next-forward", half), ("return", half),
                    ("return", full), ("next-forward", full)]  # the last two: the timelines
    (row,) = json.load(open(next((tmp_path / "out").glob("bench_extract-*.json"))))
    for key in ("x_forward_ram", "x_forward_ram_next_forward", "x_next_forward_vs_first_ram",
                "x_forward_marginal_ram", "x_forward_marginal_ram_next_forward", "timeline_ram",
                "timeline_ram_next_forward", "waits_ram_next_forward"):
        assert key in row, key
    assert row["x_next_forward_vs_first_ram"] == row["extract_ram_next_forward_s"] / row["extract_ram_s"]


def test_extract_ways_of_the_mask_check_cross_the_copies_ways_and_each_gets_its_fields(tmp_path, monkeypatch):
    """bench_extract --copies-at next-forward,return --mask-sync async,model: every pairing is a way
    (residtap.extract's _Run.copies_at and .mask_sync, both put back after), the first pairing gives the
    plain fields and each other its own suffix, even where neither of its values is a default; the plain
    forward is timed both ways of the mask check, alternating."""
    import bench_extract

    run = sys.modules["residtap.extract"]._Run
    real, ways, forwards = bench_extract.residtap.extract, [], []
    real_forward = bench_extract.time_forward

    def extract(*args, **kwargs):
        ways.append((run.copies_at, run.mask_sync, len(kwargs["data"])))
        return real(*args, **kwargs)

    def time_forward(model, ids, batch, device, mask_sync="model"):
        forwards.append(mask_sync)
        return real_forward(model, ids, batch, device, mask_sync)

    monkeypatch.setattr(bench_extract.residtap, "extract", extract)
    monkeypatch.setattr(bench_extract, "time_forward", time_forward)
    monkeypatch.setattr(sys, "argv", ["bench_extract.py", "--smoke", "--layers", "1", "--targets", "ram",
                                      "--ram-dir", str(tmp_path), "--batches", "4", "--repeats", "2",
                                      "--copies-at", "next-forward,return", "--mask-sync", "async,model",
                                      "--out", str(tmp_path / "out")])
    assert bench_extract.main() == 0
    assert (run.copies_at, run.mask_sync) == ("return", "model")
    order = [("next-forward", "async"), ("next-forward", "model"), ("return", "async"), ("return", "model")]
    assert ways == ([("return", "model", 4)] + [w + (8,) for w in order + order[::-1]]
                    + [w + (8,) for w in order])  # warm-up; two repeats, alternating; the timelines
    assert forwards == ["model"] * 2 + ["model", "async", "async", "model"] + ["model", "async"]
    (row,) = json.load(open(next((tmp_path / "out").glob("bench_extract-*.json"))))
    for v in ("", "_next_forward", "_async", "_return"):
        for key in (f"extract_ram{v}_s", f"x_forward_ram{v}", f"waits_ram{v}", f"timeline_ram{v}"):
            assert key in row, key
    for v in ("next_forward", "async", "return"):
        assert row[f"x_{v}_vs_first_ram"] == row[f"extract_ram_{v}_s"] / row["extract_ram_s"]
    assert row["x_forward_async_vs_model"] > 0 and "timeline_forward_async" in row
