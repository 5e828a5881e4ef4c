"""Input reading: how fast residtap.extract's reader turns each kind of input into packed sequences,
against the least work that kind of input needs, on the host alone (no model, no GPU).

The reader runs on a thread beside the forwards and must keep ahead of them; under torchrun every
rank reads (and, for text, tokenizes) the whole input to find its own interleaved blocks, so one
rank's reader has to keep ahead of all N GPUs together. For each kind, measured in the same run:

  read_s      every block wanted (a single process): the tokens read, packed and stacked into blocks
  rank_s      only every --world-th block wanted (one rank of --world; default 8): what one rank
              spends reading the whole input
  skip_s      no block wanted (a resumed run passing blocks already on disk)
  floor_s     the least work the input needs: jsonl: reading the lines, json.loads and the tokenizer
              on 1000 texts per call (the tokenizer is most of it); dataset: Arrow batches of
              input_ids flattened to one numpy array; npy: reading the 1-D token stream into int64
  x_floor     read_s / floor_s (1.0: packing costs nothing beyond reading)
  Mtok_s      tokens / read_s (millions per second); Mtok_s_rank: tokens / rank_s, the rate --world
              GPUs can consume together before this reader becomes their bound

Kinds: jsonl (random words through a BPE tokenizer trained here: no hub; bench_extract's --text
corpus), dataset (a dataset saved with save_to_disk whose input_ids column holds one document per
row, each joined to the next by an EOS the reader adds; skipped, with a note, when the datasets
package is missing), npy (a 1-D token stream). Each arm --repeats times (default 3), arms in a fresh
random order each time, medians.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

from _common import base_parser, finish, parse_list, row

KINDS = ("jsonl", "dataset", "npy")


def _drain(source, seqs_per_block, wanted) -> int:
    n = 0
    for b in source.blocks(seqs_per_block, wanted):
        n += 0 if getattr(b, "input_ids", None) is None else b.input_ids.size
    return n


class _EosOnly:
    """What reading a dataset's input_ids asks of a tokenizer: its EOS id (none of it tokenizes)."""

    eos_token_id = 0
    pad_token_id = None


def make_dataset(directory: str, n_tokens: int, vocab: int, seed: int = 0) -> str | None:
    try:
        import datasets
        import pyarrow as pa
    except ImportError:
        return None
    datasets.disable_progress_bars()
    rng = np.random.default_rng(seed)
    ends = np.cumsum(rng.integers(50, 1000, n_tokens // 50 + 1))  # documents of 50 to 999 tokens
    ends = ends[:int(np.searchsorted(ends, n_tokens)) + 1]  # up to the first that reaches n_tokens
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    ids = rng.integers(1, vocab, int(offsets[-1]), dtype=np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
    path = os.path.join(directory, "dataset")
    datasets.Dataset(pa.table({"input_ids": column})).save_to_disk(path)
    return path


def floors(kind: str, path: str, tokenizer, limit: int):
    """The floor arm for ``kind``: it reads until it has ``limit`` tokens, as the reader does (which
    stops at max_tokens)."""
    if kind == "jsonl":
        def floor():
            n, texts = 0, []
            with open(path) as f:
                for line in f:
                    texts.append(json.loads(line)["text"])
                    if len(texts) == 1000:
                        n += sum(map(len, tokenizer(texts)["input_ids"]))
                        texts = []
                        if n >= limit:
                            return n
            if texts:
                n += sum(map(len, tokenizer(texts)["input_ids"]))
            return n
    elif kind == "dataset":
        def floor():
            import datasets
            import pyarrow.compute as pc
            n = 0
            ds = datasets.load_from_disk(path).select_columns(["input_ids"])
            for batch in ds.with_format("arrow").iter(batch_size=1000):
                n += pc.list_flatten(batch.column("input_ids").combine_chunks()).to_numpy().size
                if n >= limit:
                    break
            return n
    else:
        def floor():
            return np.asarray(np.load(path, mmap_mode="r")[:limit], dtype=np.int64).size
    return floor


def main() -> int:
    p = base_parser(__doc__)
    p.add_argument("--kinds", default=None, help=f"comma list of {','.join(KINDS)} (default all)")
    p.add_argument("--tokens", type=float, default=None,
                   help="millions of tokens per kind (default 20; jsonl 2, tokenizing is slow; smoke 0.02)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 1024, smoke 64)")
    p.add_argument("--batch", type=int, default=None, help="sequences per block (default 16, smoke 4)")
    p.add_argument("--world", type=int, default=8, help="ranks for rank_s (default 8)")
    p.add_argument("--repeats", type=int, default=None, help="times each arm runs (default 3, smoke 1)")
    p.add_argument("--dir", default=None, help="where the inputs are written (default a temporary "
                   "directory, removed at the end)")
    args = p.parse_args()
    kinds = parse_list(args.kinds, KINDS, "--kinds")
    seq = args.seq or (64 if args.smoke else 1024)
    batch = args.batch or (4 if args.smoke else 16)
    repeats = args.repeats or (1 if args.smoke else 3)
    if args.world < 2:
        raise SystemExit(f"--world: expected 2 or more ranks, got {args.world}")

    from bench_extract import text_input
    from residtap import inputs

    rows, notes = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for kind in kinds:
            mtok = args.tokens or (0.02 if args.smoke else 2.0 if kind == "jsonl" else 20.0)
            n_seqs = max(1, int(mtok * 1e6) // seq)
            tokenizer = None
            t0 = time.perf_counter()
            if kind == "jsonl":
                path, tokenizer, _, _ = text_input(d, n_seqs, seq, 8000)
            elif kind == "dataset":
                path = make_dataset(d, n_seqs * seq, 50000)  # ids from 1: the reader adds EOS 0 after each
                tokenizer = _EosOnly()
                if path is None:
                    notes.append("dataset: skipped (the datasets package is missing: pip install datasets)")
                    continue
            else:
                path = os.path.join(d, "tokens.npy")
                np.save(path, np.random.default_rng(0).integers(0, 50000, n_seqs * seq, dtype=np.int32))
            build_s = time.perf_counter() - t0

            def source():
                return inputs.open_source(path, seq_len=seq, packing="pack", max_tokens=n_seqs * seq,
                                          tokenizer=tokenizer)
            arms = {
                "read": lambda: _drain(source(), batch, lambda i: True),
                "rank": lambda: _drain(source(), batch, lambda i: i % args.world == 0),
                "skip": lambda: _drain(source(), batch, lambda i: False),
                "floor": floors(kind, path, tokenizer, n_seqs * seq),
            }
            times = {a: [] for a in arms}
            counts = {}
            rng = random.Random(0)
            for _ in range(repeats):
                order = list(arms)
                rng.shuffle(order)
                for a in order:
                    t = time.perf_counter()
                    counts[a] = arms[a]()
                    times[a].append(time.perf_counter() - t)
            med = {a: statistics.median(v) for a, v in times.items()}
            tokens = counts["read"]
            rank_tokens = seq * sum(min(batch, n_seqs - a) for a in range(0, n_seqs, batch * args.world))
            if (tokens, counts["rank"], counts["skip"]) != (n_seqs * seq, rank_tokens, 0):
                raise SystemExit(f"{kind}: the reader gave {tokens} tokens, {counts['rank']} as rank 0 of "
                                 f"{args.world} and {counts['skip']} skipping; expected {n_seqs * seq}, "
                                 f"{rank_tokens} and 0")
            rows.append(row(device="cpu", bench="inputs", kind=kind, tokens=tokens, seq=seq, batch=batch,
                            world=args.world, repeats=repeats, build_s=build_s,
                            read_s=med["read"], rank_s=med["rank"], skip_s=med["skip"],
                            floor_s=med["floor"], x_floor=med["read"] / med["floor"],
                            Mtok_s=tokens / med["read"] / 1e6, Mtok_s_rank=tokens / med["rank"] / 1e6,
                            Mtok_s_skip=tokens / med["skip"] / 1e6, times=times))
            print(f"{kind}: {tokens} tokens, read {med['read']:.3f}s, rank of {args.world} "
                  f"{med['rank']:.3f}s, skip {med['skip']:.3f}s, floor {med['floor']:.3f}s", flush=True)
    return finish(rows, ["kind", "tokens", "read_s", "rank_s", "skip_s", "floor_s", "x_floor", "Mtok_s",
                         "Mtok_s_rank"], "bench_inputs", args.out, [], notes)


if __name__ == "__main__":
    sys.exit(main())
