"""Extraction throughput: residtap.extract of all layers (or --layers) vs a plain forward vs a raw
write of the same bytes.

For each model (random-init GPT-2-small bf16 at 16x1024 and GPT-2-XL-size bf16 at 8x1024 on a GPU;
a 2-layer width-64 model at 2x32 with --smoke), measured in the same run over the same batches:

  forward_s        the bare model's forward over all batches (no capture), synchronized at the end
  timeline_forward, timeline_<t>  (one more pass of each, under _common.ForwardTimeline; <t> the
                   first target measured) each forward's time in four parts, mean milliseconds:
                   pre (embeddings and attention mask), hook (the first block's pre-hooks: a
                   capture's set-up), body (the blocks), gap (between forwards: extraction's copies
                   out, the next batch's input). On CUDA on the GPU's clock, so a part where the GPU
                   waited for the host shows as long as that wait: what tells a forward slowed on
                   the GPU from a host that fell behind. (A host-side wait cannot: GPT-2's mask code
                   synchronizes with the GPU inside every forward, so the host never waits outside
                   one, and inside one its wait is mixed with launching the forward.) On CPU, host
                   time.
  sync_behind_copy (CUDA) whether the sync GPT-2's forward makes waits behind one batch's
                   device-to-host copy queued just before it on another stream, as extraction's copy
                   of the previous batch is: the read-back alone, behind the copy, and the copy alone
                   (microseconds)
  extract_<t>_s    residtap.extract of every residual index (outputs=resid) to a RAM-backed directory
                   (t=ram, /dev/shm) and to a disk-backed one (t=disk, --disk-dir), from the first
                   forward to the last shard durable (fsynced, hashed, renamed, in the manifest)
  raw_<t>_s        writing the same number of bytes as shard-sized files with os.write + fsync, from
                   the same number of threads as the pipeline has writers

--layers 6 (a comma list of residual indices; default all) extracts fewer layers: few enough bytes per
forward that the output keeps up with the forward (bound "forward"), where the <= 1.05 target applies.
--text extracts from a JSONL corpus of random words through a BPE tokenizer trained on it (both made
here: no hub) rather than from token ids; the forward runs on the same tokens, so x_forward includes
whatever reading and tokenizing the input adds (its reader thread overlaps them with the forwards);
tokenize_s is that work alone, done once beforehand.
--targets ram (or disk) measures one target only.
--copies-at return,next-forward measures extraction both ways of queueing each batch's device-to-host
copies (residtap.extract's _Run.copies_at, an experiment): as each forward returns (the default,
"return") and once the next forward has launched its first block, past GPT-2's in-forward sync
("next-forward").
--mask-sync model,async measures extraction both ways of running transformers' packed-sequence check
in its forwards (residtap.extract's _Run.mask_sync, an experiment): as the model does, reading a flag
back to the host (the in-forward sync; the default, "model"), and on the device without that read
("async"); with "async" also the plain forward that way (forward_async_s, x_forward_async_vs_model,
timeline_forward_async): what the sync itself costs a forward.
The ways measured are every --copies-at with every --mask-sync. Extractions of the ways alternate;
the first way gives the fields above, each other way <v> (its --copies-at value, unless "return", and
its --mask-sync value, unless "model", joined with _, and _ for -; "return" if neither; printed
with + between them) gives
extract_<t>_<v>_s, x_forward_<t>_<v>, x_<v>_vs_first_<t> (its median time over the first way's),
waits_<t>_<v>, x_forward_marginal_<t>_<v> and timeline_<t>_<v>.

How many shards a run needs: each shard is hashed (sha256) by one publisher thread, so a run of N
shards with W writers and P publishers takes about max(N h / P, N w / W) + h + w, where h and w are one
shard's hash and write times: the last shard's write and hash cannot overlap anything. The raw write
takes N w / W. With few shards the fill and drain dominate (on the H200's host, 12 shards of 322 MB:
h ~ 0.3 s, w ~ 0.15 s per writer, so at most about 0.5 of the raw bandwidth however fast the steady
state); the steady state is what --batches 64 shows.

Each of forward, extract and raw is measured --repeats times (default 3; 1 with --smoke), extract and
raw alternating (extract first, then raw first, ...), each after an os.sync(); the rows give medians,
and bw_frac_<t>_range the lowest and highest ratio of a raw run to the extract run beside it. A
bw_frac above 1.02 (the pipeline "beating" the raw write) is flagged SUSPECT: the disk's own noise.

--marginal also runs each extraction over the first half of the batches and reports
x_forward_marginal_<t> = (extract(N) - extract(N/2)) / (forward(N) - forward(N/2)): the cost per batch
of a long extraction, without the fixed tail after the last forward (its last shard's copy, write,
hash and rename, some 30 ms on the H200's host), which keeps a short run's x_forward above 1.05
however well the pipeline keeps up.

Ratios: x_forward_<t> = extract / forward (target <= 1.05 while the disk keeps up) and
bw_frac_<t> = raw_s / extract_s = the fraction of the raw write bandwidth the pipeline reached (target
>= 0.90 when the disk is the bound). ``bound_<t>`` says which limit applied: "forward" when the raw
write of the bytes takes less time than the forward, else "write". ``waits_<t>`` is where the
pipeline's threads spent their time (seconds): the main thread on the model ("model": in the forward,
launching it and waiting for the GPU, and at extract's throttle before it), blocked for
the next block of input ("input": the reader, reading and tokenizing, is behind; --text) or blocked
for a free host buffer ("disk"); the writers blocked on device-to-host copies ("d2h") or writing
("write", summed over writers); the publishers hashing and renaming written shards ("hash", summed).

--host-only measures the host side alone, on synthetic shards (no model, any machine): the raw write
against the store's ways of writing a shard, from the same number of writer threads:

  serial_<t>_s     each thread writes, fsyncs, hashes (sha256, read back) and renames its shards
                   (store.write_shard: what the writers did before publishing got threads of its own)
  split_<t>_s      writer threads write and fsync (store.write_shard_file); as many publisher threads
                   hash and rename (store.publish_shard)
  wide_<t>_s       the same with ``publishers`` publisher threads (--publishers, default
                   residtap.extract.default_publishers(writers)): extract's pipeline until it hashed
                   during the fsync
  during_<t>_s     writer threads write (store.save_shard_file), hand the file to a publisher, then
                   fsync it (store.sync_shard_file); ``publishers`` publisher threads hash it meanwhile
                   and rename it once fsynced: extract's pipeline (the last shard's hash no longer
                   follows its fsync)
  busy_<t>_s       during, while the main thread runs Python meanwhile, as it does for most of a forward:
                   what the threads lose to the GIL (a thread taking it back waits up to 5 ms, the
                   interpreter's switch interval, while another runs Python)

each the fastest of --repeats passes (default 2, every other one in the reverse order), and
x_during_vs_wide_<t>, the median over the passes of during's time over wide's.

    python benchmarks/bench_extract.py                 # GPU sizes (about 40 GB written in all)
    python benchmarks/bench_extract.py --host-only     # 8 shards of 128 MiB per target, any machine
    python benchmarks/bench_extract.py --smoke         # CPU, seconds
    python benchmarks/bench_extract.py --disk-dir /scratch --batches 16
    python benchmarks/bench_extract.py --models gpt2-small --layers 6   # forward-bound
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from _common import (ForwardTimeline, base_parser, median_time, parse_list, print_table, print_timelines,
                     resolve_device, row, slug, sync, write_rows)

import residtap
from residtap.extract import default_publishers, parse_size
from residtap.models import random_gpt2

CONFIGS = {  # name → (size, overrides, dtype, batch, seq, batches)
    "gpt2-small": ("gpt2-small", {}, torch.bfloat16, 16, 1024, 24),
    "gpt2-xl": ("gpt2-xl", {}, torch.bfloat16, 8, 1024, 12),
}
SMOKE = {"tiny": ("gpt2-small", dict(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64),
                  torch.float32, 2, 32, 16)}


def time_forward(model, ids: torch.Tensor, batch: int, device, mask_sync: str = "model") -> float:
    """The bare model over all batches of ``ids`` (pinned where the device is a GPU, as extraction's
    inputs are: a pageable copy would put a gap before each batch), in seconds. On a GPU the host
    keeps at most two forwards queued, as extraction's main loop does. ``mask_sync`` "async": with
    transformers' packed-sequence check on the device, as extraction's _Run.mask_sync "async" runs it."""
    base = model.base_model
    cuda = device.type == "cuda"
    if cuda and not ids.is_pinned():
        ids = ids.pin_memory()
    on_device = sys.modules["residtap.extract"]._mask_check_on_device(mask_sync == "async")
    with torch.inference_mode(), on_device:
        x = ids[:batch].to(device)
        base(input_ids=x, use_cache=False)  # warm-up
        sync(device)
        queued = collections.deque()
        t0 = time.perf_counter()
        for b0 in range(0, len(ids), batch):
            if len(queued) >= 2:
                queued.popleft().synchronize()
            base(input_ids=ids[b0:b0 + batch].to(device, non_blocking=True), use_cache=False)
            if cuda:
                queued.append(torch.cuda.Event(blocking=True))  # sleeps in synchronize, as extract's
                queued[-1].record()
        sync(device)
        return time.perf_counter() - t0


def sync_behind_copy(n_bytes: int, device, repeats: int = 15) -> dict | None:
    """On CUDA, whether the sync GPT-2's forward makes (one element read back, ``bool(t.all())``)
    waits behind a device-to-host copy queued on another stream just before it, as extraction's
    copies of the previous batch are (they start when the previous forward ends, which is also what
    the next forward's sync waits for). Median microseconds of the read-back alone, the read-back
    with a copy of ``n_bytes`` into pinned memory queued just before it, and that copy alone. With
    the first near the third, the read-back queued behind the copy: the GPU then idles for the copy
    every forward. None on other devices."""
    if device.type != "cuda":
        return None
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    flag = torch.ones(1, dtype=torch.bool, device=device)
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def once(copy: bool) -> float:
        torch.cuda.synchronize(device)
        torch.cuda._sleep(100_000)  # the GPU busy for a moment, so the copy and the read-back start together
        if copy:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
        t0 = time.perf_counter()
        bool(flag.all())
        return (time.perf_counter() - t0) * 1e6

    once(False), once(True)  # first calls
    out = {"bytes": n_bytes,
           "readback_us": statistics.median(once(False) for _ in range(repeats)),
           "readback_behind_copy_us": statistics.median(once(True) for _ in range(repeats)),
           "copy_us": 1e6 * median_time(lambda: dst.copy_(src, non_blocking=True), device=device,
                                        iters=repeats, warmup=1)}
    torch.cuda.synchronize(device)
    return out


def raw_write(directory: str, n_bytes: int, file_bytes: int, threads: int) -> float:
    """Write n_bytes as files of file_bytes (fsync each) from `threads` threads; seconds."""
    buf = np.random.default_rng(0).integers(0, 255, size=file_bytes, dtype=np.uint8).tobytes()
    n_files = max(1, round(n_bytes / file_bytes))
    todo = list(range(n_files))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            path = os.path.join(directory, f"raw-{i}.bin")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(buf)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds = time.perf_counter() - t0
    for i in range(n_files):
        os.remove(os.path.join(directory, f"raw-{i}.bin"))
    return seconds


def store_write(directory: str, shards: int, tensors: dict, threads: int, publishers: int,
                busy: bool = False, during: bool = False) -> float:
    """Write `shards` copies of `tensors` as crash-safe shards from `threads` writer threads, either
    each thread doing everything (store.write_shard; publishers=0) or handing each written file to
    `publishers` publisher threads, after its fsync or (``during``, extract's pipeline) before it, to be
    hashed while the writer fsyncs it; seconds until the last shard is published. ``busy``: the
    calling thread runs Python meanwhile (a forward's host side, as far as the GIL sees)."""
    import concurrent.futures

    from residtap import store

    out = tempfile.mkdtemp(prefix="residtap-bench-store-", dir=directory)
    todo, lock = list(range(shards)), threading.Lock()
    published = queue.Queue(maxsize=2 * threads)
    split = publishers > 0

    def writer():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            if during:
                pending, synced = store.save_shard_file(out, i, tensors, {"bench": "1"}), concurrent.futures.Future()
                published.put((pending, synced))
                try:
                    store.sync_shard_file(pending)
                except BaseException as e:
                    synced.set_exception(e)  # raised in the publisher too, which then renames nothing
                    raise
                synced.set_result(True)
            elif split:
                published.put((store.write_shard_file(out, i, tensors, {"bench": "1"}), None))
            else:
                store.write_shard(out, i, tensors, {"bench": "1"})

    def publisher():
        while (item := published.get()) is not None:
            pending, synced = item
            hashed = store.hash_shard(pending)
            if synced is not None:
                synced.result()
            store.publish_shard(pending, hashed)

    ws = [threading.Thread(target=writer) for _ in range(threads)]
    ps = [threading.Thread(target=publisher) for _ in range(publishers)]
    def join(threads):
        while busy and any(t.is_alive() for t in threads):
            sum(range(2000))  # Python bytecode, holding the GIL between the interpreter's switches
        for t in threads:
            t.join()

    t0 = time.perf_counter()
    for t in ws + ps:
        t.start()
    join(ws)
    for _ in ps:
        published.put(None)
    join(ps)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


HOST_WAYS = ("serial", "split", "wide", "during", "busy")  # --host-only's ways (the docstring's rows)


def host_only(args, dirs: dict, writers: int, publishers: int, suspect: list) -> list:
    """The --host-only rows, for each target and directory of ``dirs``: raw write vs store.write_shard
    vs the pipelines of writer and publisher threads (a way faster than the raw write is appended to
    ``suspect``)."""
    shard = (parse_size(args.shard_size, "--shard-size") if args.shard_size
             else (8 << 20 if args.smoke else 128 << 20))
    shards = args.batches or (4 if args.smoke else 8)
    n_tensors = 8
    numel = shard // (2 * n_tensors)
    g = torch.Generator().manual_seed(0)
    tensors = {f"resid.{i}": torch.randn(numel, generator=g).to(torch.bfloat16) for i in range(n_tensors)}
    r = {"model": "synthetic", "shard_bytes": shard, "shards": shards, "writers": writers,
         "publishers": publishers}
    for tag, d in dirs.items():
        if shutil.disk_usage(d).free < 1.2 * shard * shards:
            r[f"skipped_{tag}"] = f"{d} has too little free space"
            continue
        ways = dict(zip(HOST_WAYS, (0, writers, publishers, publishers, publishers)))  # publisher threads
        runs = {"raw": lambda: raw_write(d, shard * shards, shard, writers),
                **{way: functools.partial(store_write, d, shards, tensors, writers, n, busy=way == "busy",
                                          during=way in ("during", "busy"))
                   for way, n in ways.items()}}
        times = {k: [] for k in runs}
        # --repeats passes (default 2), every other one in the reverse order (so that the raw write,
        # the ceiling, does not always run first, after nothing), each run after an os.sync(); the
        # fastest of each way
        for rep in range(args.repeats or 2):
            for k in list(runs)[::-1 if rep % 2 else 1]:
                os.sync()
                times[k].append(runs[k]())
        raw_s = min(times["raw"])
        r[f"raw_{tag}_s"] = raw_s
        for way in ways:
            r[f"{way}_{tag}_s"] = min(times[way])
            r[f"bw_frac_{way}_{tag}"] = frac = raw_s / min(times[way])
            if frac > 1.02:
                suspect.append(f"{tag} {way}: faster than the raw write of its bytes (bw_frac {frac:.2f}): "
                               "the raw write is not a ceiling in this run")
        # hashing during the fsync against after it, pass by pass (the two run side by side)
        r[f"x_during_vs_wide_{tag}"] = statistics.median(a / b for a, b in zip(times["during"], times["wide"]))
    # the CPU's numbers; on a GPU machine, which one (the file name says so too: see main)
    if torch.cuda.is_available():
        r["gpu_host"] = torch.cuda.get_device_name()
    return [row("cpu", bench="extract_host", **r)]


def text_input(directory: str, n_seqs: int, seq: int, vocab: int, seed: int = 0):
    """--text: a JSONL corpus of random words and a BPE tokenizer trained on it here (no hub), with
    enough text for ``n_seqs`` packed sequences of ``seq`` tokens; returns (path, tokenizer, the
    [n_seqs, seq] token ids extraction will see, the seconds tokenizing them took on one call)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from residtap import inputs

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(5000)]
    path = os.path.join(directory, "corpus.jsonl")
    lines, n_words = [], 0
    while n_words < 1.2 * n_seqs * seq:  # at least one token per word: enough, with the check below
        k = int(rng.integers(50, 300))
        lines.append(" ".join(rng.choice(words, k)))
        n_words += k
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(lines[:2000], trainers.BpeTrainer(vocab_size=min(8000, vocab),
                                                             special_tokens=["[UNK]", "[EOS]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", eos_token="[EOS]")
    t0 = time.perf_counter()
    source = inputs.open_source(path, seq_len=seq, packing="pack", max_tokens=n_seqs * seq, tokenizer=tok)
    ids = np.concatenate([b.input_ids for b in source.blocks(n_seqs, lambda i: True)])
    tokenize_s = time.perf_counter() - t0
    if len(ids) != n_seqs:
        raise RuntimeError(f"--text: the corpus made {len(ids)} sequences of {seq} tokens, {n_seqs} needed")
    return path, tok, torch.from_numpy(ids), tokenize_s


def run_extract(model, data: dict, directory, batch, writers, publishers, shard_size, host_memory, device,
                layers, way=("return", "model")):
    """residtap.extract of ``data`` (extract's keyword arguments for the input: data=, and for --text
    tokenizer=, seq_len=, max_tokens=), its way (copies_at, mask_sync): see --copies-at, --mask-sync."""
    run = sys.modules["residtap.extract"]._Run  # the module: residtap.extract is the function
    out = tempfile.mkdtemp(prefix="residtap-bench-", dir=directory)
    was = run.copies_at, run.mask_sync
    run.copies_at, run.mask_sync = way
    try:
        res = residtap.extract(model, out=out, layers=layers, batch_size=batch, writers=writers,
                               publishers=publishers, shard_size=shard_size, host_memory=host_memory,
                               progress=False, verify_existing=False, **data)
        sync(device)
        return res
    finally:
        run.copies_at, run.mask_sync = was
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    p = base_parser(__doc__)
    p.add_argument("--models", default=None, help=f"comma list of {','.join(CONFIGS)} (default all)")
    p.add_argument("--batches", type=int, default=None, help="batches per measurement (default per model)")
    p.add_argument("--ram-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    p.add_argument("--disk-dir", default=tempfile.gettempdir(), help="a directory on the disk to measure")
    p.add_argument("--writers", type=int, default=None, help="writer threads (default min(4, cores))")
    p.add_argument("--publishers", type=int, default=None,
                   help="publisher threads (default: extract's, default_publishers(writers))")
    p.add_argument("--shard-size", default=None, help="bytes per shard (default 1 batch's worth)")
    p.add_argument("--host-only", action="store_true",
                   help="the host side alone on synthetic shards: raw write vs the store's ways")
    p.add_argument("--targets", default="ram,disk", help="comma list of ram, disk (default both)")
    p.add_argument("--repeats", type=int, default=None,
                   help="measurements of each of forward, extract and raw (default 3; 1 with --smoke); "
                        "with --host-only, passes over its ways (default 2)")
    p.add_argument("--marginal", action="store_true",
                   help="also extract the first half of the batches: x_forward_marginal, without the tail")
    p.add_argument("--text", action="store_true",
                   help="extract from a JSONL corpus through a tokenizer (both made here) rather than "
                        "token ids: what reading and tokenizing adds (the forward runs on the same tokens)")
    p.add_argument("--copies-at", default="return",
                   help="comma list of return, next-forward: when extraction queues each batch's copies "
                        "to the host (default return; more than one: measured side by side)")
    p.add_argument("--mask-sync", default="model",
                   help="comma list of model, async: how transformers' packed-sequence check runs in "
                        "extraction's forwards (default model; more than one: measured side by side)")
    p.add_argument("--layers", default=None,
                   help="comma list of residual indices to extract (default all): fewer for a "
                        "forward-bound run")
    args = p.parse_args()
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        p.error(f"--layers: expected a comma list of residual indices such as 6 or 0,6,12, "
                f"got {args.layers!r}")
    dirs = {"ram": args.ram_dir, "disk": args.disk_dir}
    targets = parse_list(args.targets, dirs, "--targets")
    copies = parse_list(args.copies_at, ("return", "next-forward"), "--copies-at")
    masks = parse_list(args.mask_sync, ("model", "async"), "--mask-sync")
    ways = [(c, m) for c in copies for m in masks]  # (copies_at, mask_sync); the first: both lists' first
    # each way's name (what differs from the defaults, or "return"), and its field-name suffix: none for
    # the first, e.g. "_next_forward" or "_async"
    label = {w: "+".join(x for x, default in zip(w, ("return", "model")) if x != default) or "return"
             for w in ways}
    suffix = {w: "" if i == 0 else "_" + label[w].replace("-", "_").replace("+", "_") for i, w in enumerate(ways)}
    if args.host_only:
        writers = args.writers or max(1, min(4, (os.cpu_count() or 2) // 2))
        suspect = []
        rows = host_only(args, {t: dirs[t] for t in targets}, writers, args.publishers or default_publishers(writers),
                         suspect)
        print_table(rows, ["shard_bytes", "shards", "writers", "publishers"]
                    + [f"{k}_{t}_s" for t in targets for k in ("raw", *HOST_WAYS)]
                    + [f"bw_frac_{k}_{t}" for t in targets for k in HOST_WAYS]
                    + [f"x_during_vs_wide_{t}" for t in targets])
        for s in suspect:
            print(f"SUSPECT: {s}")
        gpu = rows[0].get("gpu_host")
        print(f"wrote {write_rows(rows, 'bench_extract_host', args.out, slug=f'{slug(gpu)}-host' if gpu else None)}")
        return 0
    device = resolve_device(args.device if not args.smoke else (args.device or "cpu"))
    configs = SMOKE if args.smoke else {k: CONFIGS[k] for k in (args.models.split(",") if args.models
                                                                 else CONFIGS)}
    writers = args.writers or max(1, min(4, (os.cpu_count() or 2)))
    repeats = args.repeats or (1 if args.smoke else 3)
    if args.smoke:  # tiny tensors: intra-op threads only add wake-ups, badly so on a busy 2-core CI box
        torch.set_num_threads(1)
    rows, suspect = [], []
    for name, (size, overrides, dtype, batch, seq, n_batches) in configs.items():
        n_batches = args.batches or n_batches
        model = random_gpt2(size, dtype=dtype, device=device, **overrides)
        cfg = model.config
        text_dir = tempfile.mkdtemp(prefix="residtap-bench-text-") if args.text else None
        if text_dir is not None:
            corpus, tokenizer, ids, tokenize_s = text_input(text_dir, n_batches * batch, seq, cfg.vocab_size)
        else:
            ids = torch.randint(0, cfg.vocab_size, (n_batches * batch, seq),
                                generator=torch.Generator().manual_seed(0))

        def data(n_rows):  # extract's input arguments for the first n_rows sequences
            if text_dir is None:
                return {"data": ids[:n_rows]}
            return {"data": corpus, "tokenizer": tokenizer, "seq_len": seq, "max_tokens": n_rows * seq}
        n_res = len(layers) if layers else cfg.n_layer + 1
        elem = torch.empty((), dtype=dtype).element_size()
        batch_bytes = batch * seq * n_res * cfg.n_embd * elem
        # one batch per shard by default: the most manifest traffic. In bytes, so that host_memory
        # below makes room for the shards asked for (else extract would make them smaller).
        shard = parse_size(args.shard_size, "--shard-size") if args.shard_size else batch_bytes
        # Room for writers + 1 shard buffers. Twice the bytes: pinned buffers come from torch's
        # caching host allocator, which rounds each up to a power of two (extract counts that).
        host_memory = 2 * max(shard, batch_bytes) * (writers + 1) + (1 << 20)
        if device.type == "cuda":
            ids = ids.pin_memory()
        half = max(1, n_batches // 2) * batch  # --marginal: the first half of the batches

        def fwd(n_rows):
            return statistics.median(time_forward(model, ids[:n_rows], batch, device) for _ in range(repeats))

        fwd_s = fwd(len(ids))
        if "async" in masks:  # the plain forward without its sync, alternating with it
            by_mask = {"model": [], "async": []}
            for k in range(repeats):
                for m in (("model", "async") if k % 2 == 0 else ("async", "model")):
                    by_mask[m].append(time_forward(model, ids, batch, device, m))
            fwd_async = {m: statistics.median(v) for m, v in by_mask.items()}
        try:  # a probe beside the measurements: it must not cost them
            behind = sync_behind_copy(batch_bytes, device)  # one batch's copies, as one
        except Exception as e:
            behind = {"error": f"{type(e).__name__}: {e}"}
        fwd_half_s = fwd(half) if args.marginal else None
        # a short warm-up extraction: allocator, pinned pool, captures, kernels
        run_extract(model, data(2 * batch), args.ram_dir, batch, writers, args.publishers, shard, host_memory,
                    device, layers)
        r = {"model": name, "dtype": str(dtype)[6:], "batch": batch, "seq": seq, "layers": n_res,
             "layer_ids": layers if layers else "all", "batches": n_batches, "writers_asked": writers,
             "shard_bytes": shard, "host_memory": host_memory, "repeats": repeats, "forward_s": fwd_s,
             "input": "ids" if text_dir is None else "jsonl", **({"sync_behind_copy": behind} if behind else {})}
        if "async" in masks:
            r["forward_async_s"] = fwd_async["async"]
            r["x_forward_async_vs_model"] = fwd_async["async"] / fwd_async["model"]
        if text_dir is not None:  # reading and tokenizing the corpus alone, on one call: what could add
            r["tokenize_s"] = tokenize_s
        for tag, d in ((t, dirs[t]) for t in targets):
            need, free = n_batches * batch_bytes * 1.1 + (64 << 20), shutil.disk_usage(d).free
            if free < need:  # e.g. a container's small /dev/shm: say so rather than fail on ENOSPC
                r[f"skipped_{tag}"] = f"{d} has {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed"
                continue
            r[f"dir_{tag}"] = d
            by_way, raws = {w: [] for w in ways}, []
            runs = by_way[ways[0]]
            for k in range(repeats):  # alternating, so that none always follows another
                for what in (("extract", "raw") if k % 2 == 0 else ("raw", "extract")):
                    if what == "extract":
                        for w in (ways if k % 2 == 0 else ways[::-1]):
                            os.sync()  # start each from a clean page cache writeback state
                            by_way[w].append(run_extract(model, data(len(ids)), d, batch, writers, args.publishers,
                                                         shard, host_memory, device, layers, w))
                    else:  # as many threads as the pipeline ran writers, shard-sized files: like for like
                        os.sync()
                        res = runs[-1]
                        raws.append(raw_write(d, res.bytes_written,
                                              res.bytes_written // max(res.shards_written, 1), res.writers))
            res = runs[-1]
            ext_s, raw_s = (statistics.median(x) for x in ([x.seconds for x in runs], raws))
            pairs = [w / x.seconds for w, x in zip(raws, runs)]
            r[f"writers_{tag}"] = res.writers
            r[f"publishers_{tag}"] = res.publishers
            r[f"extract_{tag}_s"] = ext_s
            r[f"raw_{tag}_s"] = raw_s
            r[f"GB_{tag}"] = res.bytes_written / 1e9
            r[f"x_forward_{tag}"] = ext_s / fwd_s
            r[f"bw_frac_{tag}"] = raw_s / ext_s
            r[f"bw_frac_{tag}_range"] = [min(pairs), max(pairs)]
            r[f"bound_{tag}"] = "forward" if raw_s < fwd_s else "write"
            r[f"waits_{tag}"] = {k: round(v, 4) for k, v in res.waits.items()}
            if raw_s / ext_s > 1.02:
                suspect.append(f"{name} {tag}: extraction came out faster than the raw write of its bytes "
                               f"(bw_frac {raw_s / ext_s:.2f}, per pair {min(pairs):.2f}-{max(pairs):.2f}): "
                               "the raw write is not a ceiling in this run")
            for w in ways[1:]:
                r[f"extract_{tag}{suffix[w]}_s"] = way_s = statistics.median(x.seconds for x in by_way[w])
                r[f"x_forward_{tag}{suffix[w]}"] = way_s / fwd_s
                r[f"x{suffix[w]}_vs_first_{tag}"] = way_s / ext_s
                r[f"waits_{tag}{suffix[w]}"] = {k: round(t, 4) for k, t in by_way[w][-1].waits.items()}
            if args.marginal and half < len(ids) and fwd_s > fwd_half_s:
                halves = {w: [] for w in ways}
                for k in range(repeats):
                    for w in (ways if k % 2 == 0 else ways[::-1]):
                        halves[w].append(run_extract(model, data(half), d, batch, writers, args.publishers, shard,
                                                     host_memory, device, layers, w).seconds)
                for w in ways:
                    r[f"x_forward_marginal_{tag}{suffix[w]}"] = \
                        (r[f"extract_{tag}{suffix[w]}_s"] - statistics.median(halves[w])) / (fwd_s - fwd_half_s)
            # so far: a run stopped at its time limit keeps the targets and models already measured
            write_rows(rows + [row(device, bench="extract", **r)], "bench_extract", args.out)
        measured = [t for t in targets if f"dir_{t}" in r]
        if measured:  # where the time goes, forward by forward: one more pass of each, timed in parts
            base = model.base_model
            with ForwardTimeline(base, base.h) as tl:
                time_forward(model, ids, batch, device)
            r["timeline_forward"] = tl.summary()
            if "async" in masks:
                with ForwardTimeline(base, base.h) as tl:
                    time_forward(model, ids, batch, device, "async")
                r["timeline_forward_async"] = tl.summary()
            for w in ways:
                with ForwardTimeline(base, base.h) as tl:
                    run_extract(model, data(len(ids)), dirs[measured[0]], batch, writers, args.publishers, shard,
                                host_memory, device, layers, w)
                r[f"timeline_{measured[0]}{suffix[w]}"] = tl.summary()
            write_rows(rows + [row(device, bench="extract", **r)], "bench_extract", args.out)
        rows.append(row(device, bench="extract", **r))
        if text_dir is not None:
            shutil.rmtree(text_dir, ignore_errors=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["model", "dtype", "batch", "seq", "layers", "batches", "forward_s", "extract_ram_s",
                       "raw_ram_s", "x_forward_ram", "bw_frac_ram", "bound_ram", "extract_disk_s",
                       "raw_disk_s", "x_forward_disk", "bw_frac_disk", "bound_disk"])
    print_timelines([dict(model=r["model"], run=k[len("timeline_"):], **r[k]) for r in rows for k in r
                     if k.startswith("timeline_")], ["model", "run"])
    for r in rows:
        b = r.get("sync_behind_copy")
        if b and "error" in b:
            print(f"{r['model']}: sync_behind_copy failed: {b['error']}")
        elif b:
            print(f"{r['model']}: the in-forward sync's read-back took {b['readback_us']:.0f} us alone, "
                  f"{b['readback_behind_copy_us']:.0f} us with a {b['bytes'] / 1e6:.0f} MB device-to-host copy "
                  f"queued before it on another stream (the copy alone: {b['copy_us']:.0f} us)")
        for tag in targets:
            what = r.get(f"waits_{tag}", r.get(f"skipped_{tag}"))
            print(f"{r['model']} {tag}: {'skipped: ' if f'skipped_{tag}' in r else 'waits '}{what}")
            if f"x_forward_marginal_{tag}" in r:
                print(f"{r['model']} {tag}: x_forward_marginal {r[f'x_forward_marginal_{tag}']:.3f}")
            for w in ways[1:]:
                v = f"{tag}{suffix[w]}"
                if f"x_forward_{v}" not in r:
                    continue
                marginal = r.get(f"x_forward_marginal_{v}")
                print(f"{r['model']} {tag}: way {label[w]}: x_forward {r[f'x_forward_{v}']:.3f}"
                      + ("" if marginal is None else f", x_forward_marginal {marginal:.3f}")
                      + f", {r[f'x{suffix[w]}_vs_first_{tag}']:.3f}x the time of {label[ways[0]]}; "
                      + f"waits {r[f'waits_{v}']}")
    for s in suspect:
        print(f"SUSPECT: {s}")
    print(f"wrote {write_rows(rows, 'bench_extract', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
