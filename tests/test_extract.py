"""residtap.extract / residtap.open: shards equal the capture bit for bit, crash-safe resume, clear
errors, and the multi-process split. Tiny models (2 layers, width 64), a few dozen batches."""

from __future__ import annotations

import builtins
import collections
import concurrent.futures
import copy
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
import torch

import residtap
from helpers import DeferredStreams, assert_same_dirs, ids_file, ids_for, shard_files, tiny_gpt2
from residtap import inputs, store
from residtap.cli import main as cli_main

RANDOM = "random:gpt2-small,n_layer=2,n_embd=64,n_head=2,vocab_size=100,n_positions=64"
# The pipeline on the CPU everywhere; on a GPU also its CUDA side (pinned double buffers, copy
# streams, events), which these tests check against captures of the same batches.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def model_on(device, dtype=torch.float32):
    """helpers.tiny_gpt2 on ``device`` (a copy off the CPU: the cached one stays where it is)."""
    model = tiny_gpt2(dtype=dtype)
    return model if device == "cpu" else copy.deepcopy(model).to(device)


def tokenizer_dir(tmp_path, eos=True, pad_id=1, name="tok"):
    """A word-level tokenizer built locally: words w0..w89 → ids 3..92, [PAD]=pad_id, [EOS]=2 (none
    without ``eos``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": pad_id, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(90)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   **({"eos_token": "[EOS]"} if eos else {}))
    path = tmp_path / name
    fast.save_pretrained(path)
    return str(path)


def documents(n_docs=23, seed=1):
    rng = np.random.default_rng(seed)
    return [[int(v) for v in rng.integers(0, 90, size=int(rng.integers(1, 30)))] for _ in range(n_docs)]


def captured(model, ids, mask=None, **sel):
    """What residtap.capture gives for one batch of the bare model (the pipeline's source of truth),
    on the model's device."""
    base = model.base_model
    device = next(base.parameters()).device
    kw = {} if mask is None else {"attention_mask": torch.as_tensor(mask, dtype=torch.long, device=device)}
    with torch.inference_mode(), residtap.capture(base, **sel) as cap:
        base(input_ids=torch.as_tensor(ids, dtype=torch.long, device=device), use_cache=False, **kw)
    return cap


# ------------------------------------------------------------------------------------------ content
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["model-dtype", "bf16"])
def test_shards_equal_capture(tmp_path, dtype, device):
    model = model_on(device)
    path, arr = ids_file(tmp_path, 16 * 21 + 5)  # 21 sequences of 16: last shard and batch partial
    sel = dict(layers=[0, 2], positions=slice(2, 14, 3), dtype=dtype,
               outputs=("resid", "delta", "normed", "stats"))
    res = residtap.extract(model, path, tmp_path / "out", seq_len=16, batch_size=4, shard_size="6KiB",
                           progress=False, **sel)
    assert res.complete and res.n_shards == res.shards_written > 2
    acts = residtap.open(tmp_path / "out", verify=True)
    assert acts.layer_ids == [0, 2] and acts.d_model == 64
    per_shard = acts.manifest["settings"]["seqs_per_shard"]
    assert per_shard % 4 == 0
    seqs = arr[:16 * 21].reshape(21, 16)
    pos = np.arange(2, 14, 3)
    want = {k: [] for k in ("resid", "delta", "normed", "mean", "rstd", "l2", "maxabs")}
    for b0 in range(0, 21, 4):  # the pipeline's batches never straddle a shard
        cap = captured(model, seqs[b0:b0 + 4], **sel)
        for k in want:
            src = getattr(cap, k) if k in ("resid", "delta", "normed") else getattr(cap.stats, k)
            want[k].append(src.reshape(2, -1, *src.shape[3:]).cpu())
    for k, parts in want.items():
        full = torch.cat(parts, 1)
        for i, lid in enumerate([0, 2]):
            got = acts.layer(lid, k).to_tensor()
            assert got.dtype == full.dtype and torch.equal(got, full[i]), f"{k}.{lid}"
    assert acts.n_rows == 21 * len(pos)
    assert torch.equal(acts.column("seq_index").to_tensor(), torch.arange(21).repeat_interleave(len(pos)))
    assert torch.equal(acts.column("position").to_tensor(), torch.from_numpy(np.tile(pos, 21)).int())
    assert torch.equal(acts.sequences("input_ids"), torch.from_numpy(seqs).int())
    assert torch.equal(acts.sequences("source")[:, 1], torch.arange(21) * 16)
    m = acts.manifest
    assert m["totals"]["n_rows"] == 21 * len(pos) and m["totals"]["n_tokens"] == 21 * 16
    # what this call reports it wrote is what the manifest (and the directory) holds
    assert res.n_rows == m["totals"]["n_rows"] and res.n_tokens == m["totals"]["n_tokens"]
    assert res.bytes_written == m["totals"]["bytes"] == sum(
        os.path.getsize(tmp_path / "out" / r["file"]) for r in m["shards"]) > 0
    for r in m["shards"]:
        assert store.sha256_file(tmp_path / "out" / r["file"]) == r["sha256"]
        assert r["source_first"] == [0, 16 * r["seq_start"]]
        assert r["source_last"] == [0, 16 * (r["seq_stop"] - 1)]
    s = m["settings"]
    assert s["positions"] == "2:14:3" and s["layer_ids"] == [0, 2] and s["dtype"] == (
        "bfloat16" if dtype else "float32")
    assert {"residtap", "torch", "transformers"} <= set(m["versions"])


@pytest.mark.parametrize("device", DEVICES)
def test_text_padded_and_packed(tmp_path, device):
    model = model_on(device)
    tok = tokenizer_dir(tmp_path)
    docs = documents()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(f"w{t}" for t in d), "id": i}) + "\n"
                             for i, d in enumerate(docs)))
    # pad: one document piece per sequence, right-padded; rows only for real tokens
    residtap.extract(model, str(jsonl), tmp_path / "pad", tokenizer=tok, seq_len=8, batch_size=3,
                     packing="pad", shard_size="4KiB", outputs=("resid",), progress=False)
    acts = residtap.open(tmp_path / "pad")
    pieces = [(i, off, d[off:off + 8]) for i, d in enumerate(docs) for off in range(0, len(d), 8)]
    mask = acts.sequences("attention_mask").bool()
    ids = acts.sequences("input_ids")
    assert mask.shape == (len(pieces), 8)
    for k, (doc_i, off, p) in enumerate(pieces):
        assert ids[k, :len(p)].tolist() == [t + 3 for t in p] and mask[k].sum() == len(p)
        assert ids[k, len(p):].eq(1).all()  # [PAD]
        assert acts.sequences("source")[k].tolist() == [doc_i, off]
    assert acts.n_rows == sum(len(d) for d in docs)
    got = acts.layer(2).to_tensor()
    seq_index, position = acts.column("seq_index").to_tensor(), acts.column("position").to_tensor()
    settings = acts.manifest["settings"]
    for b0 in range(0, len(pieces), 3):  # the pipeline's batches (seqs_per_shard is a multiple of 3)
        cap = captured(model, ids[b0:b0 + 3].long(), mask[b0:b0 + 3], layers=[2])
        for r in range(min(3, len(pieces) - b0)):
            rows = seq_index == b0 + r
            assert torch.equal(position[rows], torch.nonzero(mask[b0 + r]).flatten().int())
            assert torch.equal(got[rows], cap.resid[0, r].cpu()[mask[b0 + r]])
    assert settings["packing"] == "pad" and settings["data"]["tokenizer"]["eos"] == 2
    # pack: documents joined with [EOS], cut into 8; the tail is dropped
    residtap.extract(model, str(jsonl), tmp_path / "pack", tokenizer=tok, seq_len=8, batch_size=3,
                     shard_size="4KiB", layers=[1], positions="last", progress=False)
    acts = residtap.open(tmp_path / "pack")
    stream = [t + 3 for d in docs for t in d + [-1]]  # -1 + 3 = [EOS]
    n = len(stream) // 8
    assert acts.sequences("input_ids").flatten().tolist() == stream[:n * 8]
    assert acts.n_rows == n and acts.column("position").to_tensor().eq(7).all()
    first = acts.sequences("source")[1].tolist()  # where token 8 of the stream came from
    lens = np.cumsum([len(d) + 1 for d in docs])
    doc = int(np.searchsorted(lens, 8, side="right"))
    assert first == [doc, 8 - (int(lens[doc - 1]) if doc else 0)]
    cap = captured(model, acts.sequences("input_ids")[:3].long(), layers=[1], positions=-1)
    assert torch.equal(acts.layer(1)[0:3], cap.resid[0, :, 0].cpu())


def test_pad_last_stores_each_last_real_token_and_records_the_shards_sources(tmp_path):
    """packing="pad", positions="last": the position column is each sequence's last real token (right
    padding: its mask's sum - 1), the row stored is the capture's at that token, and each shard's record
    names the sources of its first and last sequences."""
    model = tiny_gpt2()
    docs = documents()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(f"w{t}" for t in d)}) + "\n" for d in docs))
    residtap.extract(model, str(jsonl), tmp_path / "out", tokenizer=tokenizer_dir(tmp_path), seq_len=8,
                     batch_size=3, packing="pad", positions="last", shard_size="2KiB", progress=False)
    acts = residtap.open(tmp_path / "out")
    mask = acts.sequences("attention_mask").bool()
    n_real = mask.sum(1)
    assert (n_real < 8).any() and (n_real == 8).any()  # padded sequences and full ones
    last = torch.tensor([int(torch.nonzero(m).max()) for m in mask], dtype=torch.int32)
    assert acts.n_rows == len(mask)
    assert torch.equal(acts.column("position").to_tensor(), last)
    assert acts.column("seq_index").to_tensor().tolist() == list(range(len(mask)))
    ids = acts.sequences("input_ids")
    cap = captured(model, ids[:3].long(), mask[:3], layers=[1], positions="last")
    assert torch.equal(acts.layer(1)[0:3], cap.resid[0, :, 0])
    src = acts.sequences("source").tolist()
    records = acts.manifest["shards"]
    assert len(records) > 2 and all(r["n_seqs"] > 1 for r in records)
    for r in records:
        assert r["source_first"] == src[r["seq_start"]] and r["source_last"] == src[r["seq_stop"] - 1], r


def sequences_of(src):
    """(input_ids, attention_mask or None, source) of every sequence of an inputs source, as lists."""
    blocks = list(src.blocks(1000, lambda i: True))
    cat = lambda k: np.concatenate([getattr(b, k) for b in blocks]).tolist()  # noqa: E731
    mask = None if blocks[0].attention_mask is None else cat("attention_mask")
    return cat("input_ids"), mask, cat("source")


def test_text_inputs_line_numbers_bom_and_separators(tmp_path):
    """A .txt document is numbered by its line (blank lines count, as JSONL records do); a UTF-8 BOM
    is not text; packing without an EOS to put between documents warns; a pad token the model
    cannot embed is replaced by the EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path))
    txt = tmp_path / "docs.txt"
    txt.write_bytes("\ufeffw1 w2\n\nw3 w4\n   \nw5 w6\n".encode("utf-8"))
    ids, mask, src = sequences_of(inputs.open_source(str(txt), seq_len=4, packing="pad", max_tokens=None,
                                                     tokenizer=tok))
    assert ids == [[4, 5, 1, 1], [6, 7, 1, 1], [8, 9, 1, 1]] and src == [[0, 0], [2, 0], [4, 0]]
    # in the settings: a run started under the old numbering is refused on resume as other settings
    assert inputs.open_source(str(txt), seq_len=4, packing="pad", max_tokens=None,
                              tokenizer=tok).describe()["documents"] == "one per line, numbered by line"
    assert mask == [[True, True, False, False]] * 3
    no_eos = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path, eos=False, name="no_eos"))
    src = inputs.open_source(str(txt), seq_len=4, packing="pack", max_tokens=None, tokenizer=no_eos)
    with pytest.warns(UserWarning, match="the tokenizer has no EOS token, so the documents are joined"):
        src.warn_if_glued()
    assert sequences_of(src)[0] == [[4, 5, 6, 7]]
    # a pad token beyond the model's 97 embeddings: padding (masked, never stored) uses the EOS
    far = tokenizer_dir(tmp_path, pad_id=120, name="far_pad")
    res = residtap.extract(tiny_gpt2(), str(txt), tmp_path / "out", seq_len=4, packing="pad", tokenizer=far,
                           progress=False)
    stored = residtap.open(res.out).sequences("input_ids").tolist()
    assert stored == [[4, 5, 2, 2], [6, 7, 2, 2], [8, 9, 2, 2]]


def test_lines_end_at_newlines_only(tmp_path):
    """Lines end at "\\n" (or "\\r\\n"), as wc -l, sed -n Np and JSON Lines count them: a lone "\\r" in a line
    neither splits its document nor shifts the numbers of the documents after it (Python's universal
    newlines did both), and is whitespace inside a JSON line as JSON says."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path))
    raw = b"w1 w2\rw3\nw4\r\n\nw5\r w6\nw7"
    txt = tmp_path / "docs.txt"
    txt.write_bytes(raw)
    ids, _, src = sequences_of(inputs.open_source(str(txt), seq_len=4, packing="pad", max_tokens=None,
                                                  tokenizer=tok))
    assert ids == [[4, 5, 6, 1], [7, 1, 1, 1], [8, 9, 1, 1], [10, 1, 1, 1]]
    assert [d for d, _ in src] == [0, 1, 3, 4]
    lines = raw.split(b"\n")
    assert [lines[d].split() for d, _ in src] == [[b"w1", b"w2", b"w3"], [b"w4"], [b"w5", b"w6"], [b"w7"]]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b'{"text":\r"w1 w2"}\r\n{"text": "w3"}\n')
    ids, _, src = sequences_of(inputs.open_source(str(jsonl), seq_len=4, packing="pad", max_tokens=None,
                                                  tokenizer=tok))
    assert ids == [[4, 5, 1, 1], [6, 1, 1, 1]] and src == [[0, 0], [1, 0]]


def test_a_documents_own_eos_is_not_doubled_and_jsonl_documents_are_records(tmp_path):
    """Packing appends the EOS only to a document that does not already end with it; a JSONL document
    is numbered by its record (blank lines are not records, unlike a .txt file's lines)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path))
    txt = tmp_path / "eos.txt"
    txt.write_text("w0 w1 [EOS]\nw2 w3\n")
    ids, mask, src = sequences_of(inputs.open_source(str(txt), seq_len=3, packing="pack", max_tokens=None,
                                                     tokenizer=tok))
    assert ids == [[3, 4, 2], [5, 6, 2]] and mask is None and src == [[0, 0], [1, 0]]
    jsonl = tmp_path / "gaps.jsonl"
    jsonl.write_text(json.dumps({"text": "w0 w1"}) + "\n\n" + json.dumps({"text": "w2"}) + "\n   \n"
                     + json.dumps({"text": "w3 w4 w5"}) + "\n")
    ids, mask, src = sequences_of(inputs.open_source(str(jsonl), seq_len=2, packing="pad", max_tokens=None,
                                                     tokenizer=tok))
    assert ids == [[3, 4], [5, 1], [6, 7], [8, 1]] and src == [[0, 0], [1, 0], [2, 0], [2, 2]]
    _, _, src = sequences_of(inputs.open_source(str(jsonl), seq_len=3, packing="pack", max_tokens=None,
                                                tokenizer=tok))
    assert src == [[0, 0], [1, 0], [2, 1]]  # w0 w1 [EOS] | w2 [EOS] w3 | w4 w5 [EOS]
    res = residtap.extract(tiny_gpt2(), str(jsonl), tmp_path / "out", tokenizer=tokenizer_dir(tmp_path),
                           seq_len=2, packing="pad", progress=False)
    assert residtap.open(res.out).sequences("source")[:, 0].tolist() == [0, 1, 2, 2]


def test_read_ahead_gives_the_items_and_the_error_in_order_and_stops_when_closed():
    """inputs.ReadAhead makes a source's blocks on a thread of its own, at most ``depth`` ahead: the items,
    then an error raised while making the next one, come as from the iterator itself; closed early, it
    makes no more than the one in hand and closes the iterator on its thread."""
    def items(n, fail_at=None, log=None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise ValueError(f"data: item {i} is bad")
                if log is not None:
                    log.append((i, threading.current_thread().name))
                yield i
        finally:
            if log is not None:
                log.append(("closed", threading.current_thread().name))

    with inputs.ReadAhead(items(50)) as r:
        assert list(r) == list(range(50))
    got = []
    with inputs.ReadAhead(items(10, fail_at=7), depth=1) as r, pytest.raises(ValueError, match="item 7 is bad"):
        for x in r:
            got.append(x)
    assert got == list(range(7))
    log = []
    r = inputs.ReadAhead(items(1000, log=log), depth=2)
    it = iter(r)
    assert [next(it), next(it)] == [0, 1]
    deadline = time.monotonic() + 30
    while len(log) < 4 and time.monotonic() < deadline:  # 2 taken, 2 queued
        time.sleep(0.01)
    r.close()
    made = [i for i, _ in log if i != "closed"]
    assert made == list(range(len(made))) and 4 <= len(made) <= 5, log  # at most one more: the one in hand
    assert log[-1] == ("closed", "residtap-reader") and {name for _, name in log} == {"residtap-reader"}
    assert not any(t.name == "residtap-reader" for t in threading.enumerate())


def test_a_capture_that_cannot_be_set_up_leaves_no_thread_behind(tmp_path, monkeypatch):
    """The pipeline's captures are made before its writer and publisher threads start (and before its
    progress bar): one that fails (its parity probe, say) ends the run with nothing left running. Before,
    the threads were started first and stayed blocked for good."""
    ex = sys.modules["residtap.extract"]
    made, real = [], ex.Capture

    def second_fails(*a, **k):
        made.append(1)
        if len(made) == 2:  # the first is extract's probe of the settings; the pipeline's come next
            raise RuntimeError("parity probe failed")
        return real(*a, **k)

    monkeypatch.setattr(ex, "Capture", second_fails)
    path, _ = ids_file(tmp_path, 8 * 8)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="parity probe failed"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, progress=False)
    assert len(made) == 2 and not (tmp_path / "out").exists()  # a first run that failed is taken back
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith("residtap-")]


def test_documents_are_tokenized_ahead_on_their_own_thread(tmp_path, monkeypatch):
    """Extraction reads and tokenizes the next shards' documents on a thread of its own (ReadAhead) while the
    forwards run, rather than between them with the GPU idle; the thread is gone when extract returns, and
    when it fails."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path))
    called_on = set()
    encode = type(tok).__call__

    def tokenizing(self, *a, **k):
        called_on.add(threading.current_thread().name)
        return encode(self, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", tokenizing)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(f"w{t}" for t in d)}) + "\n" for d in documents()))
    res = residtap.extract(tiny_gpt2(), str(jsonl), tmp_path / "out", tokenizer=tok, seq_len=8, batch_size=2,
                           shard_size="2KiB", progress=False)
    assert res.complete and res.n_shards > 2 and called_on == {"residtap-reader"}
    assert not any(t.name == "residtap-reader" for t in threading.enumerate())
    # A bad record past the first thousand documents (texts are tokenized a thousand at a time): raised on
    # the reader thread once shards were written, in its turn; the shards before it are kept.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": "w1 w2 w3 w4 w5 w6 w7"}) + "\n" for _ in range(1001))
                   + '{"text": null}\n')
    with pytest.raises(ValueError, match=r"text_field: line 1002 of .*bad.jsonl.* got NoneType"):
        residtap.extract(tiny_gpt2(), str(bad), tmp_path / "bad", tokenizer=tok, seq_len=8, batch_size=16,
                         shard_size="64KiB", progress=False)
    # one sequence per document (7 words and EOS), one batch of 16 per shard: every whole shard before it
    assert residtap.open(tmp_path / "bad", allow_partial=True).n_shards == 1001 // 16
    assert not any(t.name == "residtap-reader" for t in threading.enumerate())


def test_the_wait_for_input_is_counted_and_shown(tmp_path, monkeypatch, capsys):
    """The main thread's time blocked on the reader (reading, tokenizing: a text input under torchrun,
    where every rank reads the whole input, say) is its own wait, "input", in the result and in the
    progress bar: a reader that takes 0.3 s per block makes the main thread wait at least that for the
    first (it starts waiting as the reader starts), and a fast one leaves it near zero."""
    path, _ = ids_file(tmp_path, 8 * 12)
    fast = residtap.extract(tiny_gpt2(), path, tmp_path / "fast", seq_len=8, batch_size=2,
                            shard_size="2KiB", progress=False)
    blocks = inputs.NpySource.blocks

    def slow(self, *a, **k):
        for item in blocks(self, *a, **k):
            time.sleep(0.3)
            yield item

    monkeypatch.setattr(inputs.NpySource, "blocks", slow)
    res = residtap.extract(tiny_gpt2(), path, tmp_path / "slow", seq_len=8, batch_size=2,
                           shard_size="2KiB", progress=True)
    assert res.n_shards == fast.n_shards > 2
    assert set(res.waits) == set(fast.waits) == {"model", "input", "disk", "d2h", "write", "hash"}
    assert 0.3 <= res.waits["input"] <= res.seconds, res.waits
    assert fast.waits["input"] < 0.3 * fast.seconds + 0.1, fast.waits  # generous: a loaded CI machine
    shown = re.findall(r"input (\d+)%", capsys.readouterr().err)
    assert shown and int(shown[-1]) >= 100 * 0.3 / res.seconds - 1, shown


@pytest.mark.parametrize("name,content,match", [
    ("latin1.txt", "w1 caf\xe9\n".encode("latin-1"), r"data: .*latin1.txt' is not UTF-8 text \(after line 1"),
    ("null.jsonl", b'{"text": null}\n',
     r"text_field: line 1 of .*: expected the field 'text' to be a string, got NoneType"),
    ("array.json", b'[\n {"text": "w1"}\n]\n',
     r"is not valid JSON .*expected JSON Lines: one JSON object per line"),
    ("lists.jsonl", b'{"text": "w1"}\n["w1", "w2"]\n',
     r"^data: line 2 of .*lists.jsonl' is a JSON array; expected JSON Lines with one JSON object per line, "
     r"each with the document in a field \('text'\)$"),
    ("strings.jsonl", b'"w1 w2"\n', r"^data: line 1 of .* is a JSON string; expected JSON Lines"),
    ("nofield.jsonl", b'{"body": "w1"}\n',
     r"^text_field: line 1 of .* has no field 'text' \(it has \['body'\]\); pass text_field= / --text-field$"),
    ("wide0.npy", None, r"data: the 2-D .npy .* holds sequences of length 0"),
])
def test_unreadable_inputs_are_clear_errors(tmp_path, name, content, match):
    from transformers import AutoTokenizer

    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((3, 0), dtype=np.int64))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        sequences_of(inputs.open_source(str(path), seq_len=None if content is None else 4,
                                        packing="pack" if content is None else "pad",
                                        max_tokens=None,
                                        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path))))


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")  # optional: pip install 'residtap[data]'
    from transformers import AutoTokenizer

    docs = documents(9)
    datasets.Dataset.from_dict({"input_ids": docs}).save_to_disk(tmp_path / "ids")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"text": [" ".join(f"w{t}" for t in d) for d in docs]})}).save_to_disk(tmp_path / "text")
    kw = dict(seq_len=8, batch_size=2, packing="pad", shard_size="2KiB", progress=False)
    residtap.extract(tiny_gpt2(), str(tmp_path / "ids"), tmp_path / "a", **kw)
    residtap.extract(tiny_gpt2(), str(tmp_path / "text"), tmp_path / "b", tokenizer=tokenizer_dir(tmp_path),
                     **kw)
    a, b = residtap.open(tmp_path / "a"), residtap.open(tmp_path / "b")
    mask = b.sequences("attention_mask").bool()
    assert a.n_rows == b.n_rows == sum(map(len, docs))
    assert torch.equal(a.sequences("input_ids")[mask], b.sequences("input_ids")[mask] - 3)
    assert b.manifest["settings"]["data"]["split"] == "train"
    with pytest.raises(ValueError, match=r"split: .* holds one Dataset \(no split name\), not a DatasetDict"
                                         r" of splits; got 'test'"):
        residtap.extract(tiny_gpt2(), str(tmp_path / "ids"), tmp_path / "c", split="test", **kw)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match=r"split: the dataset .* has splits \['train'\]; got 'test'"):
        residtap.extract(tiny_gpt2(), str(tmp_path / "text"), tmp_path / "c", split="test", **kw)
    # input_ids beside a text column: read as they are, unless text_field names the column to tokenize
    both = tmp_path / "both"
    datasets.Dataset.from_dict({"input_ids": [[50, 51], [52]],
                                "content": ["w1 w2 w3", "w4"]}).save_to_disk(both)
    for field, want in ((None, [[50, 51], [52, 1]]), ("content", [[4, 5], [6, 1], [7, 1]])):
        src = inputs.open_source(str(both), seq_len=2, packing="pad", max_tokens=None, text_field=field,
                                 tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path)))
        assert sequences_of(src)[0] == want, field
    datasets.Dataset.from_dict({"text": ["w1", None]}).save_to_disk(tmp_path / "none")
    with pytest.raises(ValueError, match=r"text_field: row 1 of the dataset .*: expected the column "
                                         r"'text' to hold strings, got NoneType"):
        residtap.extract(tiny_gpt2(), str(tmp_path / "none"), tmp_path / "d",
                         tokenizer=tokenizer_dir(tmp_path), **kw)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "state.json").write_text("{}")  # someone else's state.json
    with pytest.raises(ValueError, match=r"data: .*other' could not be loaded as a dataset saved with"):
        residtap.extract(tiny_gpt2(), str(tmp_path / "other"), tmp_path / "e", **kw)


def test_overlap_writes_the_same_bytes(tmp_path, monkeypatch):
    """extract(overlap=True) with each capture deferred until the main stream waits for it (the CPU
    stand-in for a side stream): the copies that follow the forward read complete buffers."""
    model = tiny_gpt2()
    path, _ = ids_file(tmp_path, 8 * 13)
    kw = dict(seq_len=8, batch_size=3, shard_size="4KiB", outputs=("resid", "delta", "normed", "stats"),
              positions=[0, -1], progress=False)
    residtap.extract(model, path, tmp_path / "plain", **kw)
    made = []

    def deferred():
        made.append(DeferredStreams())
        return made[-1]

    monkeypatch.setattr(sys.modules["residtap.capture"], "SideStreams", deferred)
    residtap.extract(model, path, tmp_path / "overlap", overlap=True, **kw)
    assert made and max(s.max_queued for s in made) == 3  # the captures really were deferred
    assert all(s.queue == [] for s in made)
    assert_same_dirs(tmp_path / "plain", tmp_path / "overlap")


class DeferredCopies:
    """extract's _CudaQueues emulated on the CPU, as late as its events allow: the compute stream is
    the host (a forward has happened when it returns), and each copy to a host buffer is queued and
    runs only when something waits for it (a forward about to reuse the capture, or a writer about to
    read the buffer). A missing wait in the pipeline then shows as wrong bytes, deterministically."""

    class Event:
        def __init__(self, queues, token):
            self.queues, self.token = queues, token

        def synchronize(self):
            self.queues.flush(self.token)

    def __init__(self, device):
        self.lock = threading.Lock()  # the writer threads wait too
        self.queue: list = []  # (token, [(src, dst), ...]) not yet copied
        self.tokens = self.max_queued = 0

    def handles(self, device):
        return True

    def compute_done(self, device):
        return self.Event(self, 0)  # the forward has happened

    def compute_waits(self, device, event):
        event.synchronize()

    def copy(self, device, after, pairs):
        after.synchronize()
        with self.lock:
            self.tokens += 1
            self.queue.append((self.tokens, list(pairs)))
            self.max_queued = max(self.max_queued, len(self.queue))
            return self.Event(self, self.tokens)

    def copies_done(self):
        with self.lock:
            return [self.Event(self, self.tokens)]

    def flush(self, token):
        with self.lock:
            while self.queue and self.queue[0][0] <= token:
                for src, dst in self.queue.pop(0)[1]:
                    dst.copy_(src)


@pytest.mark.parametrize("copies_at", ["return", "next-forward"])
@pytest.mark.parametrize("writers", [1, 3])
def test_asynchronous_copies_are_waited_for_where_they_must_be(tmp_path, monkeypatch, writers, copies_at):
    """The pipeline's CUDA ordering, run on the CPU with the copies emulated (DeferredCopies): each
    shard holds 3 batches and each capture is reused every other batch, so a forward that did not
    wait for its capture's last copy, or a writer that did not wait for its buffer's, changes bytes.
    The last shard is short, with a partial batch (a reallocation of the capture's buffers). Both
    times of queueing the copies (_Run.copies_at); with one writer, two host buffers in all."""
    monkeypatch.setattr(sys.modules["residtap.extract"]._Run, "copies_at", copies_at)
    model = tiny_gpt2()
    path, _ = ids_file(tmp_path, 8 * 31 + 3)
    kw = dict(seq_len=8, batch_size=3, outputs=("resid", "delta", "normed", "stats"), positions=[0, 3, -1],
              layers=[0, 2], writers=writers, progress=False)
    shard = 9 * 3 * 2 * (3 * 64 + 4) * 4  # 9 sequences x 3 positions x 2 layers x (3 vectors, 4 stats)
    residtap.extract(model, path, tmp_path / "plain", shard_size=shard, **kw)
    made = []

    def deferred(device):
        made.append(DeferredCopies(device))
        return made[-1]

    monkeypatch.setattr(sys.modules["residtap.extract"], "_queues_for", deferred)
    res = residtap.extract(model, path, tmp_path / "async", shard_size=shard, **kw)
    assert res.n_shards == 4 and residtap.open(tmp_path / "async").manifest["settings"]["seqs_per_shard"] == 9
    assert res.writers == writers  # the default host_memory has room for writers + 1 shard buffers
    assert len(made) == 1 and made[0].max_queued >= 2 and made[0].queue == []
    assert_same_dirs(tmp_path / "plain", tmp_path / "async")


def test_next_forward_queues_each_batchs_copies_once_the_next_forward_launched_its_first_block(
        tmp_path, monkeypatch):
    """_Run.copies_at "next-forward": a batch's copies are queued once the next forward has launched
    its first block (after GPT-2's in-forward sync; before the second block), or before that forward
    where the main thread would otherwise wait for a host buffer (a shard's last batch), the last
    batch's after the loop; the bytes are those of copies queued as each forward returns."""
    ex = sys.modules["residtap.extract"]
    model = tiny_gpt2()
    base = model.base_model
    path, _ = ids_file(tmp_path, 8 * 31 + 3)
    kw = dict(seq_len=8, batch_size=3, layers=[0, 2], writers=2, progress=False, shard_size=9 * 2 * 8 * 64 * 4)
    monkeypatch.setattr(ex, "_queues_for", DeferredCopies)
    residtap.extract(model, path, tmp_path / "at-return", **kw)
    state = {"forwards": 0, "blocks": 0}  # forwards started; blocks of the current one returned
    where = []  # per batch, where its copies were queued: (forwards started, blocks of the last returned)

    class Where(DeferredCopies):
        def copy(self, device, after, pairs):
            where.append((state["forwards"], state["blocks"]))
            return super().copy(device, after, pairs)

    hooks = [base.register_forward_pre_hook(lambda *_: state.update(forwards=state["forwards"] + 1, blocks=0))]
    hooks += [b.register_forward_hook(lambda *_: state.update(blocks=state["blocks"] + 1)) for b in base.h]
    monkeypatch.setattr(ex, "_queues_for", Where)
    monkeypatch.setattr(ex._Run, "copies_at", "next-forward")
    try:
        residtap.extract(model, path, tmp_path / "next-forward", **kw)
    finally:
        for h in hooks:
            h.remove()
    n = state["forwards"]
    assert n == 11 and len(where) == n  # 31 sequences: 10 batches of 3 and one of 1
    for j, at in enumerate(where[:-1]):
        after_first_block = (j + 2, 1)  # forward j + 1's first block returned, its second not yet
        if j % 3 == 2:  # a shard's last batch: may go before the next forward, for a host buffer
            assert at in (after_first_block, (j + 1, 2)), (j, at)
        else:
            assert at == after_first_block, (j, at)
    assert where[-1] == (n, 2)  # after the loop
    assert_same_dirs(tmp_path / "at-return", tmp_path / "next-forward")


class HostReads:
    """Counts the reads of a tensor's value by the host (bool(), item(), ...: what is a sync on a GPU)
    while inside, by the function that made each."""

    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.where = collections.Counter()
        self._was = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def counting(name):
            def read(t, *a, **k):
                self.where[sys._getframe(1).f_code.co_name] += 1
                return self._was[name](t, *a, **k)
            return read
        for n in self.NAMES:
            setattr(torch.Tensor, n, counting(n))
        return self

    def __exit__(self, *exc):
        for n, f in self._was.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_mask_sync_async_takes_the_models_host_read_out_of_extracts_forwards_and_changes_no_byte(
        tmp_path, monkeypatch, packing):
    """_Run.mask_sync "async" (an experiment): transformers' packed-sequence check, a host read inside
    every forward without an attention mask (a sync on a GPU), runs on the device in extract's forwards
    of packed inputs, and the shards are byte for byte those of the model's own check; padded inputs,
    which pass a mask, never made that check (theirs is another, in SDPA's is_causal choice). The check is
    transformers' own again afterwards."""
    import transformers.masking_utils as mu

    ex = sys.modules["residtap.extract"]
    original = mu.find_packed_sequence_indices
    forwards = []
    model = tiny_gpt2()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"w{t}" for t in d)}) + "\n" for d in documents(40)))
    from transformers import AutoTokenizer
    kw = dict(seq_len=8, batch_size=3, layers=[0, 2], progress=False, shard_size="4KiB", packing=packing,
              tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path)))
    reads = {}
    for way in ("model", "async"):
        monkeypatch.setattr(ex._Run, "mask_sync", way)
        forwards.clear()
        hook = model.base_model.register_forward_pre_hook(lambda *_: forwards.append(1))  # (a cached model)
        try:
            with HostReads() as hr:
                residtap.extract(model, str(path), tmp_path / way, **kw)
        finally:
            hook.remove()
        reads[way] = dict(hr.where)
        assert mu.find_packed_sequence_indices is original
    n = len(forwards)
    assert n > 5
    if packing == "pack":  # no host read at all is left in the run (with transformers 5.17 to 5.24)
        assert reads == {"model": {"find_packed_sequence_indices": n}, "async": {}}
    else:  # a padded batch's mask is read back for SDPA's is_causal choice: another sync, not this one's
        assert reads["model"] == reads["async"] and "find_packed_sequence_indices" not in reads["model"]
    assert_same_dirs(tmp_path / "model", tmp_path / "async")


def test_the_on_device_packed_check_is_the_models_elsewhere_and_stops_on_packed_positions():
    """The stand-in for transformers' check returns None, as the original does for consecutive position
    ids, only on a thread inside _mask_check_on_device; everywhere else (another thread, outside) the
    original runs; position ids with a jump fail its assertion rather than get the wrong mask."""
    import transformers.masking_utils as mu

    ex = sys.modules["residtap.extract"]
    original = mu.find_packed_sequence_indices
    flat = torch.arange(6).repeat(2, 1)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    assert original(flat) is None and original(packed).tolist() == [[0, 0, 0, 1, 1, 1], [0] * 6]
    seen = {}
    with ex._mask_check_on_device():
        assert mu.find_packed_sequence_indices is not original
        assert mu.find_packed_sequence_indices(flat) is None
        with pytest.raises(RuntimeError, match="position ids are not consecutive"):
            mu.find_packed_sequence_indices(packed)
        t = threading.Thread(target=lambda: seen.update(other=mu.find_packed_sequence_indices(packed)))
        t.start()
        t.join()
        with ex._mask_check_on_device(False):  # a no-op: still on
            assert mu.find_packed_sequence_indices(flat) is None
        with ex._mask_check_on_device():  # nested: still patched when the inner one leaves
            pass
        assert mu.find_packed_sequence_indices is not original
    assert seen["other"].tolist() == [[0, 0, 0, 1, 1, 1], [0] * 6]
    assert mu.find_packed_sequence_indices is original and original(packed) is not None


def test_next_forward_copies_are_queued_all_the_same_where_no_first_block_runs(tmp_path, monkeypatch):
    """copies_at "next-forward" with its hook on a module no forward calls: each forward's copies
    are queued after the next forward returns instead, and the bytes are the same."""
    ex = sys.modules["residtap.extract"]
    model = tiny_gpt2()
    path, _ = ids_file(tmp_path, 8 * 31 + 3)
    kw = dict(seq_len=8, batch_size=3, layers=[0, 2], writers=2, progress=False, shard_size=9 * 2 * 8 * 64 * 4)
    monkeypatch.setattr(ex, "_queues_for", DeferredCopies)
    residtap.extract(model, path, tmp_path / "at-return", **kw)
    never_called = torch.nn.Identity()
    monkeypatch.setattr(ex._Run, "_first_block", lambda self: never_called)
    monkeypatch.setattr(ex._Run, "copies_at", "next-forward")
    residtap.extract(model, path, tmp_path / "next-forward", **kw)
    assert not never_called._forward_pre_hooks  # and the hook is gone
    assert_same_dirs(tmp_path / "at-return", tmp_path / "next-forward")


@pytest.mark.parametrize("copies_at", ["return", "next-forward"])
def test_an_error_queueing_the_last_batchs_copies_is_raised(tmp_path, monkeypatch, copies_at):
    """The last batch's copies fail to queue: the run raises that error, not a quietly incomplete
    extraction; the shards before are recorded."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 8 * 12)
    kw = dict(seq_len=8, batch_size=2, writers=1, progress=False, shard_size=4 * 3 * 8 * 64 * 4)
    calls = []

    class FailLast(DeferredCopies):
        def copy(self, device, after, pairs):
            calls.append(1)
            if len(calls) == 6:  # 12 sequences in batches of 2
                raise RuntimeError("copy engine on fire")
            return super().copy(device, after, pairs)

    monkeypatch.setattr(ex, "_queues_for", FailLast)
    monkeypatch.setattr(ex._Run, "copies_at", copies_at)
    with pytest.raises(RuntimeError, match="copy engine on fire"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "out", **kw)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert [r["index"] for r in m["shards"]] == [0, 1] and not m["complete"]


@pytest.mark.parametrize("copies_at", ["return", "next-forward"])
def test_a_forward_failing_after_a_complete_shard_keeps_that_shard(tmp_path, monkeypatch, copies_at):
    """A forward that fails before its first block: the shard completed by the forward before it is
    written and recorded, whenever its copies are queued (with "next-forward" they were still waiting
    for that block), the failure is raised, and a rerun completes the extraction byte-identically."""
    ex = sys.modules["residtap.extract"]
    model = tiny_gpt2()
    path, _ = ids_file(tmp_path, 8 * 18)
    kw = dict(seq_len=8, batch_size=3, writers=1, progress=False, shard_size=6 * 3 * 8 * 64 * 4)
    monkeypatch.setattr(ex, "_queues_for", DeferredCopies)
    monkeypatch.setattr(ex._Run, "copies_at", copies_at)
    residtap.extract(model, path, tmp_path / "ref", **kw)
    calls = []

    def fail_third(*_):
        calls.append(1)
        if len(calls) == 3:  # shard 1's first batch, after shard 0's two
            raise RuntimeError("the model failed")

    h = model.base_model.register_forward_pre_hook(fail_third)
    try:
        with pytest.raises(RuntimeError, match="the model failed"):
            residtap.extract(model, path, tmp_path / "out", **kw)
    finally:
        h.remove()
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert [r["index"] for r in m["shards"]] == [0] and not m["complete"]
    res = residtap.extract(model, path, tmp_path / "out", **kw)
    assert res.shards_skipped == 1 and res.complete
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")


def _one_batch_shards(tmp_path, n_shards=6):
    """A tiny model, its token file and extract's keywords for ``n_shards`` shards of one batch each."""
    path, _ = ids_file(tmp_path, 8 * 2 * n_shards)
    kw = dict(seq_len=8, batch_size=2, outputs=("resid", "stats"), layers=[0, 2], progress=False,
              shard_size=2 * 8 * 2 * (64 + 4) * 4)
    return tiny_gpt2(), path, kw


@pytest.mark.parametrize("publishers", [1, 4])
def test_publishers_run_as_many_as_asked_and_change_no_byte(tmp_path, monkeypatch, publishers):
    """Publisher threads (hash, rename, record) are as many as asked, each of them used, and the
    shards and the manifest's records are the same whatever their number (against one writer and
    one publisher, the serial order)."""
    ex = sys.modules["residtap.extract"]
    model, path, kw = _one_batch_shards(tmp_path, 12)
    residtap.extract(model, path, tmp_path / "serial", writers=1, publishers=1, **kw)

    used, first = set(), threading.Barrier(publishers, timeout=30)
    publish = store.publish_shard

    def slow_publish(pending, *args):
        used.add(threading.current_thread().name)
        if pending.index < publishers:
            first.wait()  # the first shards wait until every publisher holds one: all of them run
        return publish(pending, *args)

    monkeypatch.setattr(ex._store, "publish_shard", slow_publish)
    res = residtap.extract(model, path, tmp_path / "wide", writers=2, publishers=publishers, **kw)
    assert (res.writers, res.publishers, res.shards_written) == (2, publishers, 12)
    assert used == {f"residtap-publisher-{k}" for k in range(publishers)}
    assert_same_dirs(tmp_path / "serial", tmp_path / "wide")


@pytest.mark.parametrize("writers,publishers", [(1, 1), (2, 4)])
def test_a_shard_is_hashed_while_it_is_fsynced_and_renamed_only_after(tmp_path, monkeypatch, writers, publishers):
    """Each shard's fsync (its writer's) waits until a publisher has begun hashing that shard, so a
    pipeline that hashes only after the fsync waits out the 10 s and fails here; the rename comes after
    the fsync, and the bytes are those of a run left alone."""
    ex = sys.modules["residtap.extract"]
    model, path, kw = _one_batch_shards(tmp_path)
    residtap.extract(model, path, tmp_path / "ref", **kw)
    real_sync, real_hash, real_publish = store.sync_shard_file, store.hash_shard, store.publish_shard
    lock, hashing, log = threading.Lock(), collections.defaultdict(threading.Event), []

    def event(i):
        with lock:
            return hashing[i]

    def sync(pending):
        overlapped = event(pending.index).wait(10)
        real_sync(pending)
        log.append(("synced", pending.index, overlapped))

    def hash_shard(pending):
        log.append(("hashing", pending.index, os.path.exists(pending.tmp)))
        event(pending.index).set()
        return real_hash(pending)

    def publish(pending, *args):
        log.append(("renamed", pending.index, os.path.exists(pending.tmp)))
        return real_publish(pending, *args)

    monkeypatch.setattr(ex._store, "sync_shard_file", sync)
    monkeypatch.setattr(ex._store, "hash_shard", hash_shard)
    monkeypatch.setattr(ex._store, "publish_shard", publish)
    res = residtap.extract(model, path, tmp_path / "out", writers=writers, publishers=publishers, **kw)
    assert (res.shards_written, res.writers, res.publishers) == (6, writers, publishers)
    for i in range(6):
        mine = [(what, ok) for what, j, ok in log if j == i]
        assert mine == [("hashing", True), ("synced", True), ("renamed", True)], (i, log)
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")


def test_a_host_buffer_is_free_again_before_its_shard_is_fsynced(tmp_path, monkeypatch):
    """One writer, so two host buffers: shard 2's forward needs shard 0's buffer back. Shard 0's fsync
    waits (up to 10 s) for that forward: a writer that frees the buffer only after the fsync fails."""
    ex = sys.modules["residtap.extract"]
    model, path, kw = _one_batch_shards(tmp_path)
    residtap.extract(model, path, tmp_path / "ref", **kw)
    real_sync, forwards, third = store.sync_shard_file, [], threading.Event()
    waited = []

    def count(module, args):
        forwards.append(1)
        if len(forwards) == 3:
            third.set()

    def sync(pending):
        if pending.index == 0:
            waited.append(third.wait(10))
        real_sync(pending)

    monkeypatch.setattr(ex._store, "sync_shard_file", sync)
    h = model.base_model.register_forward_pre_hook(count)
    try:
        res = residtap.extract(model, path, tmp_path / "out", writers=1, **kw)
    finally:
        h.remove()
    assert res.writers == 1 and res.shards_written == 6
    assert waited == [True]
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")


@pytest.mark.parametrize("fails", ["fsync", "hash"])
def test_a_failed_fsync_or_hash_is_the_error_and_leaves_no_shard_of_it(tmp_path, monkeypatch, fails):
    """Shard 2's fsync fails once its hash is done (so both ran), or its hash fails once its fsync is
    done (os.fsync and the sha256 fail, under the store's own handling): the error raised is that one,
    naming shard 2; shards 0 and 1 are recorded (and any after 2 written meanwhile), nothing of shard 2
    remains, and the same command then completes with the bytes of a run left alone."""
    model, path, kw = _one_batch_shards(tmp_path)
    residtap.extract(model, path, tmp_path / "ref", **kw)
    victim = os.path.join(tmp_path / "out", f".{store.shard_name(2)}.tmp", store.shard_name(2))
    real_fsync, real_sha = os.fsync, store.sha256_file
    hashed, synced = threading.Event(), threading.Event()

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") != victim:
            return real_fsync(fd)
        if fails == "fsync":
            assert hashed.wait(10)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)
        synced.set()

    def sha256_file(file, *args):
        if file != victim:
            return real_sha(file, *args)
        try:
            if fails == "hash":
                assert synced.wait(10)
                raise OSError(errno.EIO, "Input/output error")
            return real_sha(file, *args)
        finally:
            hashed.set()

    monkeypatch.setattr(store.os, "fsync", fsync)
    monkeypatch.setattr(store, "sha256_file", sha256_file)
    want = "writing shard 2 to" if fails == "fsync" else "publishing shard 2 as"
    with pytest.raises(store.StoreError, match=f"^{want} .*Input/output error \\(OSError errno 5\\)"):
        residtap.extract(model, path, tmp_path / "out", writers=1, publishers=1, **kw)
    assert hashed.is_set() and synced.is_set() == (fails == "hash")
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    recorded = [r["index"] for r in m["shards"]]  # a shard after 2 written before the error was seen
    assert recorded[:2] == [0, 1] and 2 not in recorded and not m["complete"]  # is recorded as well
    assert shard_files(tmp_path / "out") == [store.shard_name(i) for i in recorded]
    assert not [f for f in os.listdir(tmp_path / "out") if store.shard_name(2) in f]  # nor its temporaries
    monkeypatch.undo()
    res = residtap.extract(model, path, tmp_path / "out", **kw)
    assert res.complete and res.shards_skipped == len(recorded)
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")


def test_default_publishers_follow_the_cores(tmp_path, monkeypatch):
    ex = sys.modules["residtap.extract"]
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, writers, want in [(16, 2, 4), (16, 4, 8), (8, 4, 4), (2, 2, 2), (1, 1, 1), (64, 3, 6)]:
        monkeypatch.setattr(ex.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert ex.default_publishers(writers) == want, (cores, writers)
    monkeypatch.setattr(ex.os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert store.hash_threads() == 8  # checking shards: the cores, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes share the node's 16 cores
    assert ex.default_publishers(2) == 2 and store.hash_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more processes than cores: one thread each
    assert ex.default_publishers(2) == 2 and store.hash_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")  # not torchrun's: ignored
    assert ex.default_publishers(2) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    path, _ = ids_file(tmp_path, 8 * 4)
    res = residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, writers=3, progress=False)
    assert (res.writers, res.publishers) == (3, 6)  # what extract runs when not told
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"publishers: expected a positive int or None, got {bad!r}"):
            residtap.extract(tiny_gpt2(), path, tmp_path / "bad", seq_len=8, publishers=bad)
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("copies_at", ["return", "next-forward"])
def test_cuda_copies_and_forwards_made_slow_still_give_the_same_bytes(tmp_path, monkeypatch, copies_at):
    """The real CUDA queues, with a long sleep queued on the compute stream before each forward and
    on the copy stream before each batch's copies. A copy that did not wait for its forward, a
    forward that overwrote a capture still being copied, or a writer that read a host buffer before
    its copies finished then shows as wrong bytes instead of passing by luck. Both times of queueing
    the copies (_Run.copies_at)."""
    ex = sys.modules["residtap.extract"]  # the module: residtap.extract is the function
    monkeypatch.setattr(ex._Run, "copies_at", copies_at)

    class SlowCopies(ex._CudaQueues):
        def copy(self, device, after, pairs):
            stream = self.streams.get(device) or self.streams.setdefault(device, torch.cuda.Stream(device))
            stream.wait_event(after)
            with torch.cuda.stream(stream):
                torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time
            return super().copy(device, after, pairs)

    model = model_on("cuda")
    path, _ = ids_file(tmp_path, 8 * 31 + 3)
    kw = dict(seq_len=8, batch_size=3, outputs=("resid", "delta", "normed", "stats"), positions=[0, 3, -1],
              layers=[0, 2], writers=3, progress=False, shard_size=9 * 3 * 2 * (3 * 64 + 4) * 4)
    # The bytes to get: every copy made by a blocking copy_ in stream order (DeferredCopies).
    monkeypatch.setattr(ex, "_queues_for", DeferredCopies)
    residtap.extract(model, path, tmp_path / "in-order", **kw)
    monkeypatch.setattr(ex, "_queues_for", SlowCopies)
    slow_forward = model.base_model.register_forward_pre_hook(lambda *_: torch.cuda._sleep(20_000_000))
    try:
        residtap.extract(model, path, tmp_path / "slow", **kw)
    finally:
        slow_forward.remove()
    assert_same_dirs(tmp_path / "in-order", tmp_path / "slow")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_makes_no_sync_with_the_packed_check_on_the_device(tmp_path, monkeypatch):
    """On the GPU, GPT-2's forward without a mask synchronizes with it (transformers' packed-sequence
    check; CUDA's sync debug mode raises there) and, with that check on the device (_Run.mask_sync
    "async"), does not, with the same output bits; extraction then writes the same bytes."""
    ex = sys.modules["residtap.extract"]
    model = model_on("cuda")
    base = model.base_model
    ids = ids_for(model, 3, 16).cuda()
    with torch.inference_mode():
        want = base(input_ids=ids, use_cache=False).last_hidden_state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError, match="synchroniz"):
                base(input_ids=ids, use_cache=False)
            with ex._mask_check_on_device():
                got = base(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    assert torch.equal(got, want)
    path, _ = ids_file(tmp_path, 8 * 31 + 3)
    kw = dict(seq_len=8, batch_size=3, layers=[0, 2], outputs=("resid", "stats"), progress=False,
              shard_size="8KiB")
    for way in ("model", "async"):
        monkeypatch.setattr(ex._Run, "mask_sync", way)
        residtap.extract(model, path, tmp_path / way, **kw)
    assert_same_dirs(tmp_path / "model", tmp_path / "async")


def test_reader_array_and_shuffled_rows(tmp_path):
    path, _ = ids_file(tmp_path, 8 * 30)
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, shard_size="5KiB",
                     layers=[1, 2], progress=False)
    acts = residtap.open(tmp_path / "out")
    a = acts.layer(1)
    full = a.to_tensor()
    assert a.shape == (240, 64) and len(a.shards) == acts.n_shards > 3
    idx = np.array([239, 0, 17, 17, 100, -1])
    assert torch.equal(a[idx], full[idx]) and torch.equal(a[5:77:3], full[5:77:3])
    assert torch.equal(a[-2], full[-2])
    for sl in (slice(None, None, -7), slice(-5, None), slice(300, None), slice(10, 2)):
        assert torch.equal(a[sl], full[torch.as_tensor(np.arange(240)[sl].copy(), dtype=torch.long)]), sl
    with pytest.raises(IndexError):
        a[240]
    # -n is the first row, as Python and torch index; -n - 1 is out of range
    assert torch.equal(a[[-240]], full[:1]) and torch.equal(a[torch.tensor([-240, -1])], full[[0, 239]])
    assert torch.equal(a[-240], full[0])
    for bad in ([-241], np.array([0, -241]), torch.tensor([-241])):
        with pytest.raises(IndexError):
            a[bad]
    # a tuple indexes rows, then within them, as numpy and torch do; a 0-d index is the row it holds
    assert torch.equal(a[0, 3], full[0, 3]) and torch.equal(a[[0, 5], 3], full[[0, 5], 3])
    assert torch.equal(a[2:5, :4], full[2:5, :4]) and torch.equal(a[-1, -2:], full[-1, -2:])
    assert torch.equal(a[()], full) and torch.equal(a[(7,)], full[7])
    for zero_d in (torch.tensor(5), np.array(5), np.int32(5)):
        assert torch.equal(a[zero_d], full[5])
    for bad in (torch.tensor(5.0), np.array(5.0), torch.tensor(True)):
        with pytest.raises(IndexError, match="expected an int, a slice or a 1-D integer index"):
            a[bad]
    with pytest.raises(IndexError):
        a[0, 64]
    # seed and epoch are checked when given, not when iterated; a seed of any size mixes with the epoch
    for bad in (None, "3", 1.5, -1, True):
        with pytest.raises(ValueError, match=r"seed: expected an int >= 0, got"):
            acts.dataset(1, seed=bad)
    for bad in (-1, 2**63, 1.0, "1"):
        with pytest.raises(ValueError, match=r"epoch: expected an int in \[0, 2\*\*63\), got"):
            acts.dataset(1).set_epoch(bad)
    huge = acts.dataset(1, batch_size=240, seed=2**62)
    huge.epoch = 2**63 - 1
    assert torch.equal(torch.sort(next(iter(huge)), dim=0).values, torch.sort(full, dim=0).values)
    ds = acts.dataset(1, batch_size=32, seed=3, buffer_size="2KiB")
    batches = list(ds)
    assert len(batches) == len(ds) == 8 and all(b.shape == (32, 64) for b in batches[:-1])
    rows = torch.cat(batches)
    # every row exactly once, in a different order; the same order again for the same seed
    assert not torch.equal(rows, full)
    assert torch.equal(rows[torch.argsort(rows[:, 0])], full[torch.argsort(full[:, 0])])
    assert torch.equal(torch.cat(list(acts.dataset(1, batch_size=32, seed=3, buffer_size="2KiB"))), rows)
    # seeds and epochs do not alias: seed 0's second epoch (or its 1000003rd) is not seed 1's first
    seed1 = torch.cat(list(acts.dataset(1, batch_size=32, seed=1)))
    for epoch in (1, 1_000_003):
        seed0 = acts.dataset(1, batch_size=32, seed=0)
        seed0.set_epoch(epoch)
        assert not torch.equal(torch.cat(list(seed0)), seed1), epoch
    two = next(iter(acts.dataset([1, 2], shuffle=False)))
    assert torch.equal(two, torch.stack([full[0], acts.layer(2)[0]]))
    loader = torch.utils.data.DataLoader(acts.dataset(2, batch_size=50), batch_size=None, num_workers=0)
    assert sum(len(b) for b in loader) == 240
    assert acts.layer(1)[[]].shape == (0, 64)
    with pytest.raises(ValueError, match="'attention_mask' is not stored in this extraction"):
        acts.sequences("attention_mask")  # packed inputs have none
    # max_tokens: the first ceil(50 / 8) sequences; the progress bar path runs too
    res = residtap.extract(tiny_gpt2(), path, tmp_path / "few", seq_len=8, batch_size=2, max_tokens=50,
                           layers=[1, 2], progress=True)
    assert res.n_tokens == 56 and torch.equal(residtap.open(tmp_path / "few").layer(1).to_tensor(), full[:56])
    with pytest.raises(ValueError, match="layer_id"):
        acts.layer(0)
    # the memory-mapped shard tensors are copy-on-write: writing through them never changes a file
    shard0 = a.shards[0]
    shard0[0].zero_()
    acts.layer(2).part(1).fill_(7.0)
    assert shard0[0].eq(0).all() and not full[0].eq(0).all()
    del a, acts, shard0
    import gc

    gc.collect()
    again = residtap.open(tmp_path / "out", verify=True)
    assert torch.equal(again.layer(1).to_tensor(), full)
    # mapping every shard keeps no file open (an extraction of thousands of shards is read whole
    # under the usual limit of 1024 open files)
    if os.path.isdir("/proc/self/fd"):
        fresh = residtap.open(tmp_path / "out")  # (again's shards are mapped already)
        before = len(os.listdir("/proc/self/fd"))
        mapped = fresh.layer(2).shards + fresh.column("seq_index").shards
        assert len(mapped) > 6 and len(os.listdir("/proc/self/fd")) == before


def test_shuffled_rows_with_dataloader_workers(tmp_path):
    """With workers, the loader yields len() batches, every row once, one short batch at most
    (drop_last drops fewer than batch_size rows), and set_epoch reaches persistent workers."""
    path, _ = ids_file(tmp_path, 8 * 30)
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, shard_size="5KiB",
                     layers=[1], progress=False)
    acts = residtap.open(tmp_path / "out")
    full = acts.layer(1).to_tensor()
    key = lambda rows: rows[torch.argsort(rows[:, 0])]  # noqa: E731

    def load(ds, **kw):
        return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, **kw))

    for batch_size, drop_last in ((32, False), (32, True), (48, False), (7, True), (None, False)):
        ds = acts.dataset(1, batch_size=batch_size, seed=3, buffer_size="2KiB", drop_last=drop_last)
        got = load(ds)
        assert len(got) == len(ds), (batch_size, drop_last)
        rows = torch.stack(got) if batch_size is None else torch.cat(got)
        if batch_size is not None:
            assert sum(len(b) < batch_size for b in got) <= (0 if drop_last else 1)
            assert len(rows) == (240 // batch_size * batch_size if drop_last else 240)
        if not drop_last:
            assert torch.equal(key(rows), key(full))
    ds = acts.dataset(1, batch_size=32, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    first = torch.cat(list(loader))
    ds.set_epoch(1)
    second = torch.cat(list(loader))
    assert not torch.equal(first, second) and torch.equal(key(first), key(second))
    fresh = acts.dataset(1, batch_size=32, seed=3)
    fresh.set_epoch(1)
    assert torch.equal(torch.cat(load(fresh)), second)


def test_shuffled_rows_windows_are_buffer_size_bytes_of_the_rows_asked_for(tmp_path, monkeypatch):
    """Rows mix within windows of buffer_size bytes of the rows read (not of whole shards, whose other
    layers are not read): each window is that many rows, cut across shards, the last shorter; batches
    run on across windows; the default mixes rows from the whole of this small extraction."""
    path, _ = ids_file(tmp_path, 8 * 30)
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, shard_size="5KiB",
                     layers=[1, 2], progress=False)
    acts = residtap.open(tmp_path / "out")
    full = acts.layer(1).to_tensor()  # [240, 64] float32: 256 bytes a row; 16 rows a shard
    assert acts.n_shards > 10
    # a row's index (a few rows repeat: sequences that begin with the same tokens; so do their layers)
    row_of = {tuple(r.tolist()): i for i, r in enumerate(full)}
    sizes = []
    window = store.ShuffledRows._window
    monkeypatch.setattr(store.ShuffledRows, "_window", lambda self, p: sizes.append(sum(
        b - a for _, a, b in p)) or window(self, p))
    for layers, buffer_size, rows in ((1, 2560, 10), ([1, 2], 2560, 5), (1, "1GiB", 240), (1, 100, 1)):
        for batch_size in (None, 7, 32):
            sizes.clear()
            batches = list(acts.dataset(layers, batch_size=batch_size, seed=4, buffer_size=buffer_size))
            assert sizes == [rows] * (240 // rows) + ([240 % rows] if 240 % rows else []), (layers, rows)
            if batch_size:
                assert [len(b) for b in batches] == [batch_size] * (240 // batch_size) + [240 % batch_size]
            got = torch.stack(batches) if batch_size is None else torch.cat(batches)
            one = got if isinstance(layers, int) else got[:, 0]
            assert torch.equal(one[torch.argsort(one[:, 0])], full[torch.argsort(full[:, 0])])
            if not isinstance(layers, int):  # a row's layers stay together
                at = [row_of[tuple(r.tolist())] for r in one]
                assert torch.equal(got[:, 1], acts.layer(2).to_tensor()[at])
    # the first batch of the default window comes from far more than the 4 shards one window once held
    first = next(iter(acts.dataset(1, batch_size=32, seed=4)))
    assert len({row_of[tuple(r.tolist())] // 8 for r in first}) > 12  # sequences of 8 rows
    with pytest.raises(ValueError, match=r"buffer_size: expected a byte count .* got '1 row'"):
        acts.dataset(1, buffer_size="1 row")


def test_shuffled_rows_hold_one_window_at_a_time(tmp_path, monkeypatch):
    """A window is let go before the next is read: a worker holds one window of buffer_size bytes
    (and the batch it is filling), not two, one row at a time as in batches."""
    path, _ = ids_file(tmp_path, 8 * 12)
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, shard_size="5KiB",
                     layers=[1], progress=False)
    acts = residtap.open(tmp_path / "out")
    windows, alive = [], []
    window = store.ShuffledRows._window

    def spy(self, pieces):  # how many earlier windows are still held when the next is read
        alive.append(sum(w() is not None for w in windows))
        out = window(self, pieces)
        windows.append(weakref.ref(out))
        return out

    monkeypatch.setattr(store.ShuffledRows, "_window", spy)
    for batch_size in (None, 7, 32):
        windows.clear()
        alive.clear()
        for batch in acts.dataset(1, batch_size=batch_size, buffer_size=10 * 256):  # 10 rows a window
            del batch
        assert alive == [0] * 10, (batch_size, alive)


def test_shuffled_rows_split_among_data_parallel_ranks(tmp_path):
    """rank / world_size: every rank yields as many rows and batches (DDP's collectives need that),
    the ranks' rows are disjoint, and together they are the epoch's rows but the fewer than world_size
    left at the end of its order; with workers as without; each argument checked."""
    path, _ = ids_file(tmp_path, 8 * 30)
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, shard_size="5KiB",
                     layers=[1], progress=False)
    acts = residtap.open(tmp_path / "out")
    full = acts.layer(1).to_tensor()
    assert len(full) == 240
    world, share = 7, 240 // 7  # 34 rows a rank, 2 left out of each epoch

    def within(rows, of):  # whether ``rows`` is a sub-multiset of ``of`` (rows may repeat: same context)
        from collections import Counter

        have, pool = Counter(map(tuple, rows.tolist())), Counter(map(tuple, of.tolist()))
        return all(pool[r] >= n for r, n in have.items())

    def rows_of(ds, workers):
        got = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        assert len(got) == len(ds)
        return got

    # in order (no shuffle), rank r's rows are rows [34 r, 34 r + 34) of the extraction
    for r in range(world):
        ds = acts.dataset(1, batch_size=8, shuffle=False, rank=r, world_size=world)
        assert torch.equal(torch.cat(rows_of(ds, 0)), full[r * share:(r + 1) * share])
    for workers in (0, 2):
        for batch_size, drop_last in ((8, False), (8, True), (None, False)):
            per_rank = [rows_of(acts.dataset(1, batch_size=batch_size, seed=5, drop_last=drop_last, rank=r,
                                             world_size=world), workers) for r in range(world)]
            assert len({len(b) for b in per_rank}) == 1, (workers, batch_size, drop_last)  # as many batches
            union = torch.cat([torch.stack(b) if batch_size is None else torch.cat(b) for b in per_rank])
            assert len(union) == (world * (share // 8 * 8) if drop_last else world * share)
            assert within(union, full)  # no row twice (but where the extraction has it twice)
    for kw, msg in [({"rank": 1}, r"rank, world_size: expected both or neither, got rank=1 and world_size=None"),
                    ({"world_size": 2}, r"expected both or neither, got rank=None and world_size=2"),
                    ({"rank": 2, "world_size": 2}, r"rank: expected an int in \[0, world_size = 2\), got 2"),
                    ({"rank": -1, "world_size": 2}, r"rank: expected an int in \[0, world_size = 2\), got -1"),
                    ({"rank": True, "world_size": 2}, r"rank: expected an int .*got True"),
                    ({"rank": 0, "world_size": 0}, r"world_size: expected a positive int, got 0")]:
        with pytest.raises(ValueError, match=msg):
            acts.dataset(1, **kw)


def _joined_token_by_token(docs, t, eos, pad, packing):
    """What the sources must give, computed the plainest way: (ids, mask or None, (document, offset))
    of every sequence, the documents joined (or cut into pieces) one token at a time."""
    out = []
    if packing == "pad":
        for doc_i, doc in docs:
            for off in range(0, len(doc), t):
                piece = doc[off:off + t]
                out.append((piece + [pad] * (t - len(piece)), [True] * len(piece) + [False] * (t - len(piece)),
                            (doc_i, off)))
        return out
    stream = []  # (token, document, offset)
    for doc_i, doc in docs:
        if doc:
            doc = doc + ([eos] if eos is not None and doc[-1] != eos else [])
            stream += [(tok, doc_i, off) for off, tok in enumerate(doc)]
    return [([tok for tok, _, _ in stream[k:k + t]], None, stream[k][1:])
            for k in range(0, len(stream) // t * t, t)]


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_documents_are_packed_and_padded_by_chunks_as_if_one_token_at_a_time(packing):
    """Documents are packed (or padded) a chunk of documents at a time, with array operations: the same
    sequences, masks and (document, offset) sources as joining them one token at a time, wherever the
    chunks, the sequences and the documents begin and end (empty documents, documents that already end
    with the EOS, documents longer than many sequences, no EOS at all)."""
    rng = np.random.default_rng(7)

    class Docs(inputs.DocumentSource):
        kind = "text"

        def __init__(self, docs, chunk, **kw):
            super().__init__("docs", packing=packing, max_seqs=None, tokenizer=None, text_field=None, **kw)
            self.docs, self.chunk = docs, chunk

        def _id_chunks(self):
            for i in range(0, len(self.docs), self.chunk):
                yield [d for d, _ in self.docs[i:i + self.chunk]], [ids for _, ids in self.docs[i:i + self.chunk]]

    n_seqs = 0
    for trial in range(150):
        eos = (None, 0, 3)[trial % 3]
        t = int(rng.integers(1, 24))
        docs, doc_i = [], 0
        for _ in range(int(rng.integers(0, 40))):
            n = int(rng.choice([0, 1, 2, t - 1, t, t + 1, 3 * t + 2, int(rng.integers(0, 8 * t))]))
            doc = rng.integers(0, 5, max(n, 0)).tolist()  # ids 0..4: an EOS of 0 or 3 ends some by chance
            docs.append((doc_i, doc))
            doc_i += int(rng.integers(1, 3))  # sources are the documents' own numbers, gaps and all
        src = Docs(docs, chunk=int(rng.integers(1, 12)), seq_len=t)
        src.eos, src.pad = eos, 9
        got = [(ids.tolist(), None if mask is None else mask.tolist(), src_) for ids, mask, src_ in src._sequences()]
        assert got == _joined_token_by_token(docs, t, eos, 9, packing), (trial, t, eos)
        assert all(type(v) is int for _, _, where in got for v in where)  # JSON-ready, as recorded
        n_seqs += len(got)
    assert n_seqs > 1000


def test_a_datasets_input_ids_are_read_from_arrow_and_bad_columns_are_clear_errors(tmp_path):
    """An ``input_ids`` column is read as Arrow holds it, a thousand rows at a time: the same sequences as
    its lists read one by one, whatever integer type or list layout it has and across the chunks of
    rows, of only the rows a saved ``select`` kept; a column of other values is a clear error."""
    datasets = pytest.importorskip("datasets")

    docs = documents(2500, seed=3)
    docs[5] = []  # an empty row: a document with nothing in it
    want = {"pad": _joined_token_by_token(list(enumerate(docs)), 8, None, 0, "pad"),
            "pack": _joined_token_by_token(list(enumerate(docs)), 8, None, 0, "pack")}
    read = lambda path, packing: sequences_of(inputs.open_source(  # noqa: E731
        str(path), seq_len=8, packing=packing, max_tokens=None))
    for dtype in ("int32", "int64", "uint16"):
        features = datasets.Features({"input_ids": datasets.List(datasets.Value(dtype))})
        datasets.Dataset.from_dict({"input_ids": docs}, features=features).save_to_disk(tmp_path / dtype)
        for packing in ("pad", "pack"):
            ids, mask, source = read(tmp_path / dtype, packing)  # no tokenizer: no EOS between documents
            assert ids == [w[0] for w in want[packing]] and source == [list(w[2]) for w in want[packing]]
            assert mask == (None if packing == "pack" else [w[1] for w in want[packing]])
    # fixed-length rows (a fixed-size list in Arrow), of only the rows a select kept, in its order
    fixed = datasets.Dataset.from_dict({"input_ids": [[r, r + 1, r + 2] for r in range(1200)]},
                                       features=datasets.Features({"input_ids": datasets.List(
                                           datasets.Value("int64"), length=3)}))
    fixed.select(range(1199, 0, -2)).save_to_disk(tmp_path / "fixed")
    ids, _, source = read(tmp_path / "fixed", "pad")
    assert ids == [[r, r + 1, r + 2, 0, 0, 0, 0, 0] for r in range(1199, 0, -2)]
    assert source == [[row, 0] for row in range(600)]  # the saved dataset's rows
    # values that are not token ids
    bad = {"float": ({"input_ids": [[1.5, 2.0]]}, r"has an 'input_ids' column of list<item: double>; "
                                                    r"expected lists of integer token ids"),
           "null_row": ({"input_ids": [[1, 2]] * 1001 + [None]},
                        r"data: row 1001 of the dataset .* has no input_ids \(null\); expected a list"),
           "null_id": ({"input_ids": [[1], [2, None]]}, r"has a null token id in its 'input_ids' \(rows 0 to 1\)"),
           "huge": ({"input_ids": [[2 ** 63]]}, r"has a token id of 9223372036854775808 in its 'input_ids'")}
    for name, (data, match) in bad.items():
        if name == "huge":  # (datasets' own conversion of Python ints stops at int64)
            import pyarrow as pa
            ds = datasets.Dataset(pa.table({"input_ids": pa.array(data["input_ids"], pa.list_(pa.uint64()))}))
        else:
            ds = datasets.Dataset.from_dict(data)
        ds.save_to_disk(tmp_path / name)
        with pytest.raises(ValueError, match=match):
            read(tmp_path / name, "pad")


def test_a_dataset_pickles_without_the_rows_it_has_read(tmp_path):
    """DataLoader workers started by spawn or forkserver (macOS's default, Linux's from Python 3.14, and
    what a parent that has initialized CUDA must use) get the dataset pickled: that must not carry a copy
    of every shard the parent has read (a memory map pickles as its whole file), and the copy must read
    the same rows."""
    import pickle

    path, _ = ids_file(tmp_path, 8 * 30)
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, shard_size="5KiB",
                     layers=[1, 2], progress=False)
    acts = residtap.open(tmp_path / "out")
    ds = acts.dataset([1, 2], batch_size=32, seed=3)
    unread = len(pickle.dumps(ds))
    full = acts.layer(1).to_tensor()
    epoch = list(ds)  # the parent reads every shard, as an evaluation pass or a look at the data would
    assert len(pickle.dumps(ds)) == unread
    assert len(pickle.dumps(acts.layer(1))) < full.numel() * full.element_size()
    again = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(a, b) for a, b in zip(epoch, again, strict=True))
    assert torch.equal(pickle.loads(pickle.dumps(acts.layer(1))).to_tensor(), full)


# ------------------------------------------------------------------------------------------ reliability
@pytest.mark.parametrize("device", DEVICES)
def test_disk_full_then_resume_is_byte_identical(tmp_path, monkeypatch, device):
    model = model_on(device)
    path, _ = ids_file(tmp_path, 8 * 24)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", outputs=("resid", "stats"), progress=False)
    residtap.extract(model, path, tmp_path / "ref", **kw)
    real = store._save_file
    calls = []

    def full_disk(tensors, p, metadata):
        calls.append(p)
        if len(calls) == 4:  # part of the file reaches the disk, then the device is full
            with open(p, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, p, metadata)

    monkeypatch.setattr(store, "_save_file", full_disk)
    with pytest.raises(store.StoreError, match="no space left on device") as e:
        residtap.extract(model, path, tmp_path / "out", writers=1, **kw)
    assert "resumes" in str(e.value)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert not m["complete"] and len(m["shards"]) == 3  # the three shards before the failure, no more
    assert all(os.path.exists(tmp_path / "out" / r["file"]) for r in m["shards"])
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
    with pytest.raises(store.StoreError, match="not complete"):
        residtap.open(tmp_path / "out")
    assert residtap.open(tmp_path / "out", allow_partial=True).n_shards == 3
    monkeypatch.setattr(store, "_save_file", real)
    res = residtap.extract(model, path, tmp_path / "out", **kw)
    assert res.shards_skipped == 3 and res.shards_written == res.n_shards - 3
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")
    again = residtap.extract(model, path, tmp_path / "out", **kw)  # complete: nothing to do
    assert again.complete and again.shards_written == 0


def test_a_shard_that_fails_to_publish_is_not_recorded_and_a_rerun_completes(tmp_path, monkeypatch):
    """Publishing (hash, rename, record) runs on threads of its own, after the shard's host buffer
    went back to the pool. A failure there is a clear error; that shard is neither recorded nor left
    behind, the shards written whole around it are, and a rerun fills the gap byte-identically."""
    path, _ = ids_file(tmp_path, 8 * 24)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", outputs=("resid", "stats"), progress=False)
    residtap.extract(tiny_gpt2(), path, tmp_path / "ref", **kw)
    real = store.sha256_file

    def failing(p, *args, **kwargs):
        if os.path.basename(p) == store.shard_name(2):
            raise OSError(errno.EIO, "Input/output error")
        return real(p, *args, **kwargs)

    monkeypatch.setattr(store, "sha256_file", failing)
    with pytest.raises(store.StoreError, match=r"publishing shard 2 .*Input/output error"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "out", writers=2, **kw)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    recorded = [r["index"] for r in m["shards"]]
    assert not m["complete"] and 2 not in recorded and {0, 1} <= set(recorded)
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")) == \
        [store.shard_name(i) for i in sorted(recorded)]
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
    monkeypatch.setattr(store, "sha256_file", real)
    res = residtap.extract(tiny_gpt2(), path, tmp_path / "out", **kw)
    assert res.complete and res.shards_skipped == len(recorded)
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")


def test_a_full_disk_reported_by_safetensors_is_a_clear_error(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError, not OSError, when a write fails; the message
    ends in the OS error number (format checked against safetensors' real error for a missing
    directory). It must read like any other I/O error, with the hint that a rerun resumes."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file
    with pytest.raises(SafetensorError, match=r"\(os error 2\)"):
        real({"x": torch.zeros(2)}, str(tmp_path / "missing" / "x.safetensors"))
    path, _ = ids_file(tmp_path, 8 * 12)
    calls = []

    def full_disk(tensors, p, metadata=None):
        calls.append(p)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, p, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(store.StoreError, match="no space left on device.*resumes"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2,
                         shard_size="3KiB", writers=1, progress=False)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert not m["complete"] and len(m["shards"]) == 1
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_a_memory_mapped_npy_gives_no_warning(tmp_path):
    """Every .npy run printed torch's "The given NumPy array is not writable" warning: the ids come
    from a read-only memory map."""
    import warnings

    path = tmp_path / "ids64.npy"  # int64, what the model takes: no conversion copies them
    np.save(path, np.random.default_rng(0).integers(0, 97, size=8 * 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, progress=False).complete


def test_a_model_type_residtap_lacks_takes_blocks_and_final_norm(tmp_path, capsys):
    """extract took no blocks= / final_norm=, so a model outside residtap's table could not be extracted
    at all, though the error said to pass them. Paths are relative to the model as given (here the LM,
    while the captures hook its bare model); the manifest records them."""
    model = copy.deepcopy(tiny_gpt2())  # (tiny_gpt2 is shared: cached)
    model.config.model_type = "my-arch"  # unknown to residtap, the same modules otherwise
    path, ids = ids_file(tmp_path, 8 * 4)
    with pytest.raises(ValueError, match=r"does not know the model type 'my-arch'.*--blocks model.layers"):
        residtap.extract(model, path, tmp_path / "none", seq_len=8, progress=False)
    sel = dict(blocks="transformer.h", final_norm="transformer.ln_f")
    res = residtap.extract(model, path, tmp_path / "out", seq_len=8, batch_size=4, layers=[0, 2],
                           outputs=("resid", "normed"), progress=False, **sel)
    assert {k: res.manifest["settings"][k] for k in sel} == sel
    acts = residtap.open(tmp_path / "out")
    cap = captured(model, ids.reshape(4, 8), layers=[0, 2], outputs=("resid", "normed"),
                   blocks=model.transformer.h, final_norm=model.transformer.ln_f)
    for i, lid in enumerate((0, 2)):
        assert torch.equal(acts.layer(lid)[:], cap.resid[i].reshape(-1, 64))
        assert torch.equal(acts.layer(lid, "normed")[:], cap.normed[i].reshape(-1, 64))
    none = residtap.extract(model, path, tmp_path / "no_norm", seq_len=8, blocks=model.transformer.h,
                            final_norm=None, progress=False)
    assert none.manifest["settings"]["blocks"] == "transformer.h" and none.manifest["settings"]["final_norm"] is None
    with pytest.raises(residtap.ManifestMismatchError, match="final_norm"):  # another norm: other settings
        residtap.extract(model, path, tmp_path / "no_norm", seq_len=8, progress=False,
                         blocks="transformer.h", final_norm="transformer.ln_f")


@pytest.mark.parametrize("made_dir", [True, False])
def test_a_first_run_failing_after_its_first_rename_leaves_nothing_in_the_way(tmp_path, monkeypatch, made_dir):
    """The directory sync after shard 0's rename fails (a full disk): the shard is in place but never
    recorded. The error says a rerun resumes, so the rerun must not find "not empty" there; before, the
    run took its manifest back and left the shard."""
    path, _ = ids_file(tmp_path, 8 * 12)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", writers=1, publishers=1, progress=False)
    residtap.extract(tiny_gpt2(), path, tmp_path / "ref", **kw)
    out = tmp_path / "out"
    if not made_dir:
        out.mkdir()
    real = store.fsync_dir

    def full_after_rename(directory):
        if os.path.exists(os.path.join(directory, store.shard_name(0))):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(directory)

    monkeypatch.setattr(store, "fsync_dir", full_after_rename)
    with pytest.raises(store.StoreError, match=r"publishing shard 0 .*no space left on device.*resumes"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    assert not out.exists() if made_dir else os.listdir(out) == []
    monkeypatch.setattr(store, "fsync_dir", real)
    assert residtap.extract(tiny_gpt2(), path, out, **kw).complete
    assert_same_dirs(tmp_path / "ref", out)


def test_a_second_run_into_a_directory_being_written_is_refused(tmp_path):
    """Two runs into one directory used to delete each other's temporaries and share the manifest's
    temporary name. While a run holds the directory's lock, another is refused before touching it."""
    path, _ = ids_file(tmp_path, 8 * 6)
    out = tmp_path / "out"
    out.mkdir()
    held = store.lock_directory(str(out))  # as a run in another process holds it
    assert held is not None
    try:
        with pytest.raises(store.StoreError, match=r"^out: another extraction is writing to .* now \(it holds "
                                                   r"the lock on .*\.residtap\.lock'\)"):
            residtap.extract(tiny_gpt2(), path, out, seq_len=8, progress=False)
        assert os.listdir(out) == [store.LOCK]
    finally:
        os.close(held)
    assert residtap.extract(tiny_gpt2(), path, out, seq_len=8, progress=False).complete


def _store_flock(monkeypatch, flock) -> None:
    """``flock`` as store's own fcntl.flock (torch's build lock keeps the real one)."""
    import fcntl
    import types

    monkeypatch.setattr(store, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX,
                                                              LOCK_NB=fcntl.LOCK_NB))


def test_only_one_run_holds_the_lock_when_its_holder_removes_the_file(tmp_path, monkeypatch):
    """A run that leaves nothing behind removes the lock file before letting go. A run that had opened
    the file just before (B) then locked a file no longer in the directory, while a third run (C) made a
    new one: both held "the" lock. A lock counts only while the file at the path is the one locked."""
    import fcntl

    from residtap.extract import _tidy_if_nothing_there

    out = tmp_path / "out"
    out.mkdir()
    a = store.lock_directory(str(out))

    def b_flock(fd, op):  # B has opened the file; A finishes (removes it, lets go) before B locks
        monkeypatch.setattr(store, "fcntl", fcntl)
        _tidy_if_nothing_there(str(out), made_dir=None)
        os.close(a)
        return fcntl.flock(fd, op)

    _store_flock(monkeypatch, b_flock)
    b = store.lock_directory(str(out))
    assert b is not None and os.listdir(out) == [store.LOCK]
    with pytest.raises(store.StoreError, match="another extraction is writing"):
        store.lock_directory(str(out))  # C
    os.close(b)


def test_without_flock_a_failed_first_run_still_leaves_no_directory(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    _store_flock(monkeypatch, no_locks)
    bad, _ = ids_file(tmp_path, 100, vocab=200)
    with pytest.raises(ValueError, match="outside"):
        residtap.extract(tiny_gpt2(), bad, tmp_path / "out", seq_len=8, progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_shard_is_a_clear_error(tmp_path, monkeypatch):
    """A bad sector (EIO) under a finished shard: the resume's check and residtap.open say which shard
    could not be read, as a StoreError (the CLI's one line), not a bare OSError."""
    path, _ = ids_file(tmp_path, 8 * 12)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    out = tmp_path / "out"
    residtap.extract(tiny_gpt2(), path, out, **kw)
    m = json.loads((out / "manifest.json").read_text())
    bad = str(out / store.shard_name(2))
    real_hash, real_open = store.sha256_file, builtins.open

    def eio_hash(p, *args, **kwargs):
        if str(p) == bad:
            raise OSError(errno.EIO, "Input/output error", str(p))
        return real_hash(p, *args, **kwargs)

    def eio_open(p, *args, **kwargs):
        if str(p) == bad:
            raise OSError(errno.EIO, "Input/output error", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(store, "sha256_file", eio_hash)
    with pytest.raises(store.StoreError, match=r"reading shard 2 '.*shard-000002.safetensors' failed: "
                                               r"Input/output error"):
        residtap.open(out, verify=True)
    store.write_json_atomic(str(out / "manifest.json"),
                            {k: v for k, v in m.items() if k not in ("n_shards", "totals")} | {"complete": False})
    with pytest.raises(store.StoreError, match=r"reading shard 2 .*Input/output error"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    monkeypatch.setattr(builtins, "open", eio_open)
    with pytest.raises(store.StoreError, match=r"reading the shard '.*shard-000002.safetensors' failed: "
                                               r"Input/output error"):
        residtap.open(out, allow_partial=True)


def test_a_part_manifest_keeps_every_shard_done_when_the_run_started(tmp_path):
    """A resume with another process count gives shards new owners. Each rank's part used to list only
    the shards it owns now, so until their new owner wrote its part, finished shards were in no manifest
    on disk, and a kill then cost their recomputation."""
    from residtap.extract import _Manifest

    done = {i: {"index": i, "file": store.shard_name(i)} for i in (0, 1, 2, 3, 5)}
    part = _Manifest(str(tmp_path), {"format": "x"}, dict(done), rank=1, world=3)
    part.add({"index": 4, "file": store.shard_name(4)})
    written = json.loads((tmp_path / store.part_name(1)).read_text())
    assert [r["index"] for r in written["shards"]] == [0, 1, 2, 3, 4, 5]


def _unfinished(out, shards=()):
    """A multi-process run's manifest.json as rank 0 starts it: settings, no shard."""
    header = {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "settings": {"seq_len": 8}}
    store.write_json_atomic(str(out / "manifest.json"), {**header, "complete": False, "shards": list(shards)})
    return header


def test_rank_0_takes_a_multi_process_run_back_only_where_no_rank_recorded_a_shard(tmp_path, monkeypatch):
    """Rank 0, failing before its first shard, decides for the whole run from the parts on disk, under
    the record lock: a run with a shard recorded anywhere keeps everything a resume needs; one without
    leaves nothing a rerun refuses (its manifest, a part's temporary, a shard renamed but not recorded),
    only another rank's temporary, which that rank may be writing; the lock not had in time keeps it all."""
    ex = sys.modules["residtap.extract"]  # the module: residtap.extract is the function

    out = tmp_path / "out"
    out.mkdir()
    header = _unfinished(out)
    (out / store.shard_name(1)).write_bytes(b"recorded")
    store.write_json_atomic(str(out / store.part_name(1)), {**header, "complete": False, "shards": [
        {"index": 1, "file": store.shard_name(1)}]})
    (out / store.shard_name(0)).write_bytes(b"not recorded")
    kept = sorted(os.listdir(out))
    ex._take_back(str(out), made_dir=os.path.abspath(out), world=2)
    assert sorted(os.listdir(out)) == kept

    os.remove(out / store.part_name(1))
    os.remove(out / store.shard_name(1))
    for i in (0, 1):
        (out / f".{store.shard_name(i)}.tmp").mkdir()
    (out / "manifest.rank1.json.tmp").write_text("{")  # a first record's part, its writer killed
    monkeypatch.setattr(ex, "_TAKE_BACK_WAIT", 0.2)
    held = store.lock_records(str(out))  # another rank publishing its first shard
    assert held is not None
    try:
        t0 = time.monotonic()
        ex._take_back(str(out), made_dir=os.path.abspath(out), world=2)
        assert time.monotonic() - t0 >= 0.2
        assert "manifest.json" in os.listdir(out)
    finally:
        os.close(held)
    ex._take_back(str(out), made_dir=os.path.abspath(out), world=2)
    assert os.listdir(out) == [f".{store.shard_name(1)}.tmp"]


def test_another_rank_records_its_first_shard_only_while_the_run_is_not_taken_back(tmp_path, monkeypatch):
    """A rank other than 0 publishes and records its first shard under the record lock, only while
    manifest.json holds its run's settings; refused, it removes what it wrote and says why. After its
    first record rank 0 sees its part, and it takes the lock no more."""
    from residtap.extract import _Manifest

    out = tmp_path / "out"
    out.mkdir()
    header = _unfinished(out)
    taken = []
    real = store.lock_records
    monkeypatch.setattr(store, "lock_records", lambda d, *a, **k: taken.append(d) or real(d, *a, **k))

    def pending(i):
        work = out / f".{store.shard_name(i)}.tmp"
        work.mkdir(exist_ok=True)
        (work / store.shard_name(i)).write_bytes(b"written")
        return store.PendingShard(i, str(work), str(work / store.shard_name(i)), str(out / store.shard_name(i)))

    def publish(part, i):
        written = pending(i)
        with part.recording(written):
            part.add({"index": i, **store.publish_shard(written)})

    os.remove(out / "manifest.json")  # rank 0 took the run back
    part = _Manifest(str(out), header, {}, rank=1, world=2)
    with pytest.raises(store.StoreError, match=r"^out: '.*out' no longer holds this run's manifest: rank 0 failed "
                                               r"before any shard was recorded and took it back \(rank 0's error "
                                               r"says why\); rank 1 stops without recording shard 1$"):
        publish(part, 1)
    assert os.listdir(out) == [] and taken == [str(out)]
    _unfinished(out)
    other = {**header, "settings": {"seq_len": 16}}  # a rerun's, started once rank 0 let the directory go
    with pytest.raises(store.StoreError, match="no longer holds this run's manifest"):
        publish(_Manifest(str(out), other, {}, rank=1, world=2), 1)
    assert os.listdir(out) == ["manifest.json"]
    publish(part, 1)
    publish(part, 3)
    assert taken == [str(out)] * 3
    assert [r["index"] for r in json.loads((out / store.part_name(1)).read_text())["shards"]] == [1, 3]
    rank0 = _Manifest(str(out), header, {}, rank=0, world=2)
    os.remove(out / "manifest.json")
    publish(rank0, 2)  # rank 0 decides itself, once its own threads have stopped
    assert taken == [str(out)] * 3


def test_a_ranks_first_shard_is_hashed_before_it_takes_the_record_lock(tmp_path, monkeypatch):
    """The record lock is held for a rank's first publish and record only, not its hashing (a second per
    GiB): otherwise every rank's first record would queue behind the others' hashing."""
    import contextlib
    import queue
    import types

    ex = sys.modules["residtap.extract"]
    out = tmp_path / "out"
    out.mkdir()
    header = _unfinished(out)
    held, hashed_while = [False], []
    recording = ex._Manifest.recording

    @contextlib.contextmanager
    def watched(self, pending):
        with recording(self, pending):
            held[0] = True
            try:
                yield
            finally:
                held[0] = False

    real_hash = store.sha256_file
    monkeypatch.setattr(ex._Manifest, "recording", watched)
    monkeypatch.setattr(store, "sha256_file", lambda *a, **k: hashed_while.append(held[0]) or real_hash(*a, **k))
    work = out / f".{store.shard_name(1)}.tmp"
    work.mkdir()
    (work / store.shard_name(1)).write_bytes(b"written")
    pending = store.PendingShard(1, str(work), str(work / store.shard_name(1)), str(out / store.shard_name(1)))
    published, synced = queue.Queue(), concurrent.futures.Future()
    synced.set_result(True)  # its writer's fsync done
    published.put((pending, {"n_rows": 4}, synced))
    published.put(None)
    run = types.SimpleNamespace(errors=[], waits=ex._Waits(), _stats_lock=threading.Lock(), written=0, n_rows=0,
                                bytes=0, manifest=ex._Manifest(str(out), header, {}, rank=1, world=2))
    ex._Run._publisher(run, published, None)
    assert run.errors == [] and hashed_while == [False] and run.written == 1
    part = json.loads((out / store.part_name(1)).read_text())
    assert [(r["index"], r["sha256"]) for r in part["shards"]] == [(1, hashlib.sha256(b"written").hexdigest())]


def test_a_rank_writing_into_a_directory_rank_0_took_back_says_so(tmp_path, monkeypatch):
    """Rank 0 removes a directory it made when it takes the run back and nothing is left there: another
    rank's next shard then fails to be written, and the error says why (not just "no such file")."""
    import queue
    import types

    ex = sys.modules["residtap.extract"]
    out = tmp_path / "out"
    out.mkdir()
    header = _unfinished(out)

    def gone(directory, index, tensors, metadata):
        raise store.os_error(FileNotFoundError(errno.ENOENT, "No such file or directory"),
                             f"writing shard {index} to", directory)

    monkeypatch.setattr(store, "save_shard_file", gone)
    block = types.SimpleNamespace(index=3, seq_start=24, n_seqs=8, n_tokens=64, digest=lambda: "0" * 64,
                                  source=np.zeros((8, 2), dtype=np.int64))
    errors = []
    for taken in (False, True):
        if taken:
            os.remove(out / "manifest.json")
        jobs, pool, published = queue.Queue(), queue.Queue(), queue.Queue()
        jobs.put(types.SimpleNamespace(block=block, events=[]))
        jobs.put(None)
        run = types.SimpleNamespace(errors=[], cuda=False, waits=ex._Waits(), cfg=types.SimpleNamespace(layer_ids=[1]),
                                    manifest=ex._Manifest(str(out), header, {}, rank=1, world=2),
                                    _shard_tensors=lambda host: ({}, 64))
        run._write_failed = lambda index, e, run=run: ex._Run._write_failed(run, index, e)
        ex._Run._writer(run, jobs, pool, published)
        assert pool.qsize() == 1 and published.empty() and len(run.errors) == 1
        errors.append(str(run.errors[0]))
    assert errors[0].startswith("writing shard 3 to") and "No such file or directory" in errors[0]
    assert errors[1] == (f"out: {str(out)!r} no longer holds this run's manifest: rank 0 failed before any shard "
                         "was recorded and took it back (rank 0's error says why); rank 1 stops without recording "
                         "shard 3")


def test_numpy_integers_are_taken_where_ints_are(tmp_path):
    """positions passed validation as numpy ints and then failed writing the manifest (a TypeError
    from json, after the directory was made); counts took no numpy int at all; bool is no int."""
    path, _ = ids_file(tmp_path, 8 * 6)
    res = residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=np.int64(8),
                           positions=[np.int64(1), np.int64(3)], max_tokens=np.int64(32),
                           batch_size=np.int32(2), progress=False)
    assert res.complete and res.manifest["settings"]["positions"] == [1, 3]
    assert res.manifest["totals"]["n_rows"] == 4 * 2
    scalar = residtap.extract(tiny_gpt2(), path, tmp_path / "scalar", seq_len=8, positions=np.int64(3),
                              rank=np.int64(0), world_size=np.int64(1), progress=False)
    assert scalar.complete and scalar.manifest["settings"]["positions"] == 3
    again = residtap.extract(tiny_gpt2(), path, tmp_path / "scalar", seq_len=8, positions=3, progress=False)
    assert again.complete and again.all_processes == {"shards_written": 0, "shards_skipped": again.n_shards,
                                                      "n_tokens": 0, "n_rows": 0, "bytes_written": 0,
                                                      "seconds": 0.0}
    with pytest.raises(ValueError, match=r"^seq_len: expected a positive int or None, got True$"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "bool", seq_len=True, progress=False)
    assert not (tmp_path / "bool").exists()


def test_negative_lists_and_ranges_on_the_command_line_are_values(tmp_path, capsys):
    """argparse reads "-3,-1" or "-4:" after an option as another option ("expected one argument"):
    after --layers and --positions they are values, as in the Python API."""
    path, _ = ids_file(tmp_path, 8 * 4)
    for layers, positions in (("-3,-1", "-4:"), ("-1", "-2,-1"), ("0,-1", "-8::3")):
        out = tmp_path / f"cli{layers}{positions}"
        assert cli_rc(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8",
                       "--batch-size", "2", "--no-progress", "--layers", layers, "--positions", positions]) == 0
        api = residtap.extract(RANDOM, path, tmp_path / "api", seq_len=8, batch_size=2, progress=False,
                               layers=[int(v) for v in layers.split(",")],
                               positions=sys.modules["residtap.extract"]._parse_ints(positions, "positions"))
        got = residtap.open(out)
        assert got.layer_ids == residtap.open(tmp_path / "api").layer_ids and got.n_rows > 0
        for lid in got.layer_ids:
            assert torch.equal(got.layer(lid).to_tensor(), residtap.open(tmp_path / "api").layer(lid).to_tensor())
        shutil.rmtree(tmp_path / "api")
    capsys.readouterr()


def test_extract_gives_the_model_back_in_the_modes_it_had(tmp_path):
    """extract runs the forward in eval mode; a model extracted from in the middle of training (one
    submodule in eval mode of its own) gets each mode back, whether extract returned or raised."""
    path, _ = ids_file(tmp_path, 8 * 4)
    model = copy.deepcopy(tiny_gpt2()).train()
    model.transformer.h[1].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    residtap.extract(model, path, tmp_path / "out", seq_len=8, batch_size=2, progress=False)
    assert seen and not any(seen)  # the forwards ran in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes
    with pytest.raises(ValueError, match="positions"):
        residtap.extract(model, path, tmp_path / "bad", seq_len=8, positions=[9], progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_token_arrays_in_any_memory_order_give_the_same_shards(tmp_path):
    """A 2-D .npy in Fortran order, or a transposed array or tensor, holds the same sequences as its
    row-major copy (safetensors refused the non-contiguous rows, after the forwards had run)."""
    ids = np.random.default_rng(0).integers(0, 97, size=(10, 8))
    np.save(tmp_path / "c.npy", ids)
    np.save(tmp_path / "f.npy", np.asfortranarray(ids))
    kw = dict(batch_size=2, progress=False, layers=[1])
    want = residtap.extract(tiny_gpt2(), str(tmp_path / "c.npy"), tmp_path / "c", **kw)
    for name, data in (("f", str(tmp_path / "f.npy")), ("t", np.ascontiguousarray(ids.T).T),
                       ("tt", torch.from_numpy(np.ascontiguousarray(ids.T)).T)):
        got = residtap.extract(tiny_gpt2(), data, tmp_path / name, **kw)
        assert got.complete and torch.equal(residtap.open(tmp_path / name).sequences(),
                                            residtap.open(tmp_path / "c").sequences())
        assert [r["sha256"] for r in got.manifest["shards"]] == [r["sha256"] for r in want.manifest["shards"]]


def test_mismatched_settings_or_model_are_refused(tmp_path, capsys):
    path, _ = ids_file(tmp_path, 8 * 6)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", **kw)
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    with pytest.raises(residtap.ManifestMismatchError, match="layer_ids"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "out", layers=[1], **kw)
    with pytest.raises(residtap.ManifestMismatchError, match="model_weights_fingerprint"):
        residtap.extract(tiny_gpt2(seed=1), path, tmp_path / "out", **kw)
    other, _ = ids_file(tmp_path, 8 * 6, seed=5)
    with pytest.raises(residtap.ManifestMismatchError, match="data"):
        residtap.extract(tiny_gpt2(), other, tmp_path / "out", **kw)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    # Another backend (or device type) is not a different setting, but its bytes may differ: a warning.
    assert residtap.open(tmp_path / "out").manifest["environment"] == {"device": "cpu", "backend": "compiled"}
    capsys.readouterr()
    residtap.extract(tiny_gpt2(), path, tmp_path / "out", backend="reference", **kw)
    err = capsys.readouterr().err
    assert "was started with environment" in err and "'backend': 'reference'" in err
    # a directory with someone else's files
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(store.StoreError, match="not empty"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "foreign", **kw)


def test_corrupted_shard_is_an_error_until_recomputed(tmp_path):
    path, _ = ids_file(tmp_path, 8 * 10)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    out = tmp_path / "out"
    residtap.extract(tiny_gpt2(), path, out, **kw)
    victim = out / shard_files(out)[1]
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0x40
    victim.write_bytes(bytes(bad))
    residtap.open(out)  # sizes match: only the checksum can tell
    with pytest.raises(residtap.ShardCorruptError, match="shard 1 .*checksum"):
        residtap.open(out, verify=True)
    # rerunning over the complete extraction checks it: the corrupted shard is an error, not "complete"
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(residtap.ShardCorruptError, match="shard 1 .*checksum"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    assert (out / "manifest.json").read_bytes() == manifest and victim.read_bytes() == bytes(bad)
    # an unfinished extraction resumes only over intact shards
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    store.write_json_atomic(str(out / "manifest.json"), m)
    with pytest.raises(residtap.ShardCorruptError, match="shard 1 .*corrupted"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    victim.write_bytes(good[:-3])
    with pytest.raises(residtap.ShardCorruptError, match="bytes"):
        residtap.open(out, allow_partial=True)
    other = out / shard_files(out)[2]  # the same size as shard 1: only its header tells them apart
    victim.write_bytes(other.read_bytes())
    assert victim.stat().st_size == len(good)
    with pytest.raises(residtap.ShardCorruptError, match="shard 1 .* is shard 2 .*by its own header"):
        residtap.open(out, allow_partial=True)
    huge = bytearray(good)  # a garbage header length (the size still matches)
    huge[:8] = (1 << 62).to_bytes(8, "little")
    victim.write_bytes(bytes(huge))
    with pytest.raises(residtap.ShardCorruptError, match="implausible header length 4611686018427387904"):
        residtap.open(out, allow_partial=True)
    victim.unlink()  # the remedy the message gives: delete it and run again
    res = residtap.extract(tiny_gpt2(), path, out, **kw)
    assert res.shards_written == 1 and victim.read_bytes() == good
    residtap.open(out, verify=True)


def test_shards_are_hashed_several_at_once_and_their_errors_come_in_order(tmp_path, monkeypatch):
    """open(verify=True) and a resume check the shards' sha256 on several threads at once (before, one
    after another: a resume of a large extraction ran at one core's hashing speed). The first corrupted
    shard in index order is the one named even when a later one is hashed first, and a check stopped
    early starts no further hashes."""
    path, _ = ids_file(tmp_path, 8 * 16)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    out = tmp_path / "out"
    residtap.extract(tiny_gpt2(), path, out, **kw)
    files = shard_files(out)
    assert len(files) >= 6
    for k in (2, 4):
        bad = bytearray((out / files[k]).read_bytes())
        bad[-5] ^= 0x40
        (out / files[k]).write_bytes(bytes(bad))
    hash_file = store.sha256_file
    together = threading.Barrier(2, timeout=30)  # the first two hashes wait for each other: not one by one
    fourth = threading.Event()
    started = []

    def shard_2_after_shard_4(p):
        started.append(os.path.basename(p))
        if len(started) <= 2:
            together.wait()
        if os.path.basename(p) == files[4]:
            fourth.set()
        elif os.path.basename(p) == files[2]:
            assert fourth.wait(30)  # shard 4 is hashed before shard 2: its mismatch is found first
        return hash_file(p)

    monkeypatch.setattr(store, "sha256_file", shard_2_after_shard_4)
    monkeypatch.setattr(store, "hash_threads", lambda: 4)
    with pytest.raises(residtap.ShardCorruptError, match="shard 2 .*checksum"):
        residtap.open(out, verify=True)
    assert fourth.is_set()
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    store.write_json_atomic(str(out / "manifest.json"), m)
    started.clear()
    together.reset()
    fourth.clear()
    with pytest.raises(residtap.ShardCorruptError, match=f"shard 2 .*{files[2]}.*sha256 differs"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    # closed after its first digest, sha256_shards starts no more than the threads already running
    started.clear()
    monkeypatch.setattr(store, "sha256_file", lambda p: started.append(p) or
                        time.sleep(0 if p == str(out / files[0]) else 0.2) or "x" * 64)
    digests = store.sha256_shards([(str(out / f), i) for i, f in enumerate(files)], threads=2)
    assert next(digests) == "x" * 64
    digests.close()
    assert len(started) <= 3 and str(out / files[-1]) not in started, started


def test_a_directory_another_tool_wrote_a_manifest_in_is_refused_before_anything_is_made_there(tmp_path, capsys):
    path, _ = ids_file(tmp_path, 8 * 4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"foo": 1}')
    code = cli_rc(["extract", "--model", RANDOM, "--data", path, "--out", str(other), "--seq-len", "8",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and re.search(r"error: --out: '.*other' holds a manifest.json that residtap cannot resume "
                                   r"\(.*not a residtap activation manifest.*\); choose a new or empty directory", err)
    assert sorted(os.listdir(other)) == ["manifest.json"]  # no lock file left there
    assert cli_rc(["extract", "--model", RANDOM, "--data", path, "--out", "", "--seq-len", "8"]) == 2
    assert "--out: expected a directory path, got ''" in capsys.readouterr().err


@pytest.mark.parametrize("edit", ["no sha256", "bytes as text", "a path elsewhere", "not a record"])
def test_a_shard_record_edited_by_hand_is_a_clear_error_to_readers_and_resumes(tmp_path, edit):
    path, _ = ids_file(tmp_path, 8 * 4)
    out = tmp_path / "out"
    residtap.extract(tiny_gpt2(), path, out, seq_len=8, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    record = m["shards"][0]
    if edit == "no sha256":
        del record["sha256"]
    elif edit == "bytes as text":
        record["bytes"] = str(record["bytes"])
    elif edit == "a path elsewhere":
        record["file"] = "../" + record["file"]
    else:
        m["shards"][0] = "shard-00000.safetensors"
    (out / "manifest.json").write_text(json.dumps(m))
    for read in (lambda: residtap.open(out, verify=True),
                 lambda: residtap.extract(tiny_gpt2(), path, out, seq_len=8, progress=False)):
        with pytest.raises(residtap.StoreError, match=r"the manifest '.*manifest.json': shard record 0 lacks or "
                                                      r"misstates \['(sha256|bytes|file|index)'.*was edited"):
            read()


def test_a_failed_first_run_removes_the_parents_it_made_too(tmp_path, capsys):
    """Taken back, a first run leaves no directory it made: out, and the missing parents it made for it;
    never a parent that was there before."""
    ids = np.arange(8 * 4) % 97
    ids[3] = 500  # outside the vocabulary: the first batch fails, after the directory was made
    np.save(tmp_path / "bad.npy", ids)
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        residtap.extract(tiny_gpt2(), str(tmp_path / "bad.npy"), tmp_path / "kept" / "a" / "b" / "out",
                         seq_len=8, progress=False)
    assert os.listdir(tmp_path / "kept") == []
    # a uint64 token id past int64 is said as it is, not wrapped to a negative one
    big = (np.arange(8 * 4) % 97).astype(np.uint64)
    big[5] = 2**63 + 5
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(ValueError, match=rf"data: token id {2**63 + 5} in sequences 0\.\.3 does not fit in int64"):
        residtap.extract(tiny_gpt2(), str(tmp_path / "big.npy"), tmp_path / "big", seq_len=8, progress=False)
    assert not (tmp_path / "big").exists()


def test_the_same_run_written_otherwise_resumes(tmp_path, capsys, monkeypatch):
    """The same model and input at other paths (a model copied to node-local scratch, './m' for 'm'),
    positions -1 for 7 at length 8, and the family's blocks and final norm named explicitly are the
    same run: it resumes, says so once, and keeps the directory's own settings. A setting that
    changes the bytes is still refused."""
    ids, _ = ids_file(tmp_path, 8 * 10)
    tiny_gpt2().save_pretrained(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    shutil.copy(ids, tmp_path / "moved.npy")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    base = ["extract", "--data", ids, "--out", str(out), "--seq-len", "8", "--batch-size", "2",
            "--shard-size", "1KiB", "--no-progress"]
    assert cli_rc([*base, "--model", "m", "--positions", "7"]) == 0
    before = {f: (out / f).read_bytes() for f in shard_files(out)}
    settings = residtap.open(out).manifest["settings"]
    capsys.readouterr()
    for k, again in enumerate((["--model", "./m/", "--positions", "-1"],
                               ["--model", str(tmp_path / "copy"), "--positions=-1:"],
                               ["--model", "m", "--positions", "7", "--blocks", "transformer.h",
                                "--final-norm", "transformer.ln_f", "--data", str(tmp_path / "moved.npy")])):
        (out / shard_files(out)[k + 1]).unlink()
        assert cli_rc([*base, *again]) == 0, again
        err = capsys.readouterr().err
        assert err.count("was started with the same model, input and settings, written otherwise") == 1, err
        assert {f: (out / f).read_bytes() for f in shard_files(out)} == before
        m = residtap.open(out, verify=True).manifest
        assert m["complete"] and m["settings"] == settings
    for other, what in ((["--positions", "6"], "positions"), (["--layers", "1"], "layer_ids")):
        (out / shard_files(out)[0]).unlink()
        assert cli_rc([*base, "--model", "m", "--positions", "7", *other]) == 1  # (a store error: the run failed, as other refusals of a directory)
        assert re.search(rf"holds an extraction made with different settings .*{what}:", capsys.readouterr().err)


def test_a_deleted_shard_of_a_complete_extraction_is_recomputed(tmp_path, capsys):
    """The checksum error's advice (delete the file, run the same command again) works on a complete
    extraction too; a run resumed with another backend keeps the environment the extraction was
    started with and lists the other under "resumed_with"."""
    path, _ = ids_file(tmp_path, 8 * 10)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    out = tmp_path / "out"
    residtap.extract(tiny_gpt2(), path, out, **kw)
    before = {f: (out / f).read_bytes() for f in shard_files(out)}
    victim = out / shard_files(out)[1]
    victim.unlink()
    with pytest.raises(residtap.ShardCorruptError, match="shard 1 .*listed in the manifest but missing"):
        residtap.open(out)
    capsys.readouterr()
    res = residtap.extract(tiny_gpt2(), path, out, **kw)
    assert "1 shard(s) of the complete extraction" in capsys.readouterr().err
    assert res.complete and res.shards_written == 1
    assert {f: (out / f).read_bytes() for f in shard_files(out)} == before
    m = residtap.open(out, verify=True).manifest
    assert m["complete"] and m["n_shards"] == len(before) and "resumed_with" not in m
    victim.unlink()
    res = residtap.extract(tiny_gpt2(), path, out, backend="reference", **kw)  # bytes may differ (l2)
    m = residtap.open(out, verify=True).manifest
    assert res.shards_written == 1 and m["complete"] and m["n_shards"] == len(before)
    assert m["environment"] == {"device": "cpu", "backend": "compiled"}
    assert [r["environment"] for r in m["resumed_with"]] == [{"device": "cpu", "backend": "reference"}]
    # resumed with the same other backend again: it is listed once, not once per resume
    victim.unlink()
    res = residtap.extract(tiny_gpt2(), path, out, backend="reference", **kw)
    m = residtap.open(out, verify=True).manifest
    assert res.shards_written == 1 and m["complete"]
    assert [r["environment"] for r in m["resumed_with"]] == [{"device": "cpu", "backend": "reference"}]
    # a rank part a killed merge left beside the complete manifest is removed by a rerun
    part = {k: v for k, v in m.items() if k not in ("n_shards", "totals")} | {"complete": False, "done": True}
    store.write_json_atomic(str(out / store.part_name(1)), part)
    res = residtap.extract(tiny_gpt2(), path, out, backend="reference", **kw)
    assert res.complete and res.shards_written == 0
    assert not (out / store.part_name(1)).exists()
    assert sorted(f for f in os.listdir(out) if f.startswith("manifest")) == ["manifest.json"]


def test_a_failed_start_leaves_no_manifest_in_the_way_and_seq_len_is_checked(tmp_path):
    """A first run that fails before its first shard takes its manifest (and the directory it made)
    back, so the corrected command is not refused as another extraction; one killed there leaves it,
    and the refusal says what to do. A seq_len beyond a learned position table is an error before
    anything is written; rotary positions are not limited by the config."""
    model = tiny_gpt2()
    bad, _ = ids_file(tmp_path, 100, vocab=200)
    ok, _ = ids_file(tmp_path, 64, seed=7)
    with pytest.raises(ValueError, match="outside"):
        residtap.extract(model, bad, tmp_path / "out", seq_len=8, progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="outside"):
        residtap.extract(model, bad, tmp_path / "kept", seq_len=8, progress=False)
    assert (tmp_path / "kept").exists() and os.listdir(tmp_path / "kept") == []
    assert residtap.extract(model, ok, tmp_path / "out", seq_len=8, progress=False).complete
    # what a run killed before its first shard leaves: a manifest of its settings and no shard
    residtap.extract(model, ok, tmp_path / "killed", seq_len=8, progress=False)
    m = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    for f in shard_files(tmp_path / "killed"):
        (tmp_path / "killed" / f).unlink()
    store.write_json_atomic(str(tmp_path / "killed" / "manifest.json"),
                            {**m, "complete": False, "shards": []})
    with pytest.raises(residtap.ManifestMismatchError, match="It holds no shard yet: if no other run is "
                                                             "writing there"):
        residtap.extract(model, ok, tmp_path / "killed", seq_len=4, progress=False)
    with pytest.raises(ValueError, match=r"seq_len: expected at most 256 \(the model's .*\), got 300"):
        residtap.extract(model, ok, tmp_path / "long", seq_len=300, progress=False)
    assert not (tmp_path / "long").exists()
    import transformers as T

    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=97,
                                             max_position_embeddings=4)).eval()
    assert residtap.extract(llama, ok, tmp_path / "rotary", seq_len=8, progress=False).complete
    # OPT's learned table has max_position_embeddings + 2 rows (an offset of 2): still a limit of 8
    opt = T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                       num_attention_heads=4, max_position_embeddings=8,
                                       word_embed_proj_dim=32)).eval()
    with pytest.raises(ValueError, match=r"seq_len: expected at most 8 \(the model's .*\), got 16"):
        residtap.extract(opt, ok, tmp_path / "opt", seq_len=16, progress=False)
    assert not (tmp_path / "opt").exists()
    assert residtap.extract(opt, ok, tmp_path / "opt", seq_len=8, progress=False).complete


def test_unwritable_output(tmp_path, monkeypatch, capsys):
    path, _ = ids_file(tmp_path, 8 * 4)
    (tmp_path / "file").write_text("x")
    args = ["extract", "--model", RANDOM, "--data", path, "--seq-len", "8", "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "file" / "out")]) == 1
    err = capsys.readouterr().err
    assert "creating the output directory" in err and "not a directory" in err
    real = builtins.open

    def deny(p, mode="r", *a, **k):
        if str(p).startswith(str(tmp_path / "ro")) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real(p, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)  # as root, chmod cannot make a directory unwritable
    (tmp_path / "ro").mkdir()
    assert cli_main(args + ["--out", str(tmp_path / "ro")]) == 1
    err = capsys.readouterr().err
    assert "writing the manifest" in err and "permission denied" in err
    assert os.listdir(tmp_path / "ro") == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_shards_get_the_mode_new_files_get_like_the_manifest(tmp_path, umask):
    """safetensors writes a shard as 0600 (its temporary file's mode): the shard takes the umask's
    mode instead, the manifest's, so that a shared extraction's readers can read its shards."""
    path, _ = ids_file(tmp_path, 8 * 4)
    old = os.umask(umask)
    try:
        residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, batch_size=2, shard_size="3KiB",
                         progress=False)
    finally:
        os.umask(old)
    modes = {f: (tmp_path / "out" / f).stat().st_mode & 0o777 for f in shard_files(tmp_path / "out")}
    assert len(modes) > 1 and set(modes.values()) == {0o666 & ~umask}, modes
    assert (tmp_path / "out" / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_selection_parsing():
    from residtap.extract import _parse_ints, _parse_layers, parse_size

    assert _parse_layers("all") is None and _parse_layers("0:3") == [0, 1, 2] and _parse_layers("-1") == -1
    assert _parse_layers("0,6,12") == [0, 6, 12]
    assert _parse_ints("1:9:2", "--positions") == slice(1, 9, 2) and _parse_ints("-1", "--positions") == -1
    assert parse_size("1GiB", "x") == 2**30 and parse_size("1.5kB", "x") == 1500 and parse_size(7, "x") == 7
    assert _parse_layers("0:5:2") == [0, 2, 4]
    for bad in ("0:", "a,b", "0:3:0"):
        with pytest.raises(ValueError, match="--layers"):
            _parse_layers(bad)
    with pytest.raises(ValueError, match="shard_size"):
        parse_size("-1GiB", "shard_size")


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]"])
def test_an_unreadable_device_map_file_is_a_bad_argument(tmp_path, capsys, content):
    """Exit status 2 and one "error:" line naming --device-map, as for every other bad argument (not 1,
    a failed run's status), and nothing made."""
    path, _ = ids_file(tmp_path, 64)
    device_map = tmp_path / "map.json"
    if content is not None:
        device_map.write_text(content)
    code = cli_main(["extract", "--model", "random:gpt2-small,n_layer=1,n_embd=32,n_head=2", "--data", path,
                     "--out", str(tmp_path / "out"), "--seq-len", "8", "--device-map", str(device_map)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("residtap extract: error: --device-map:"), (code, err)
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    """--out naming an existing file: one "error:" line and exit status 1, as for an unwritable directory
    (not an unexpected error's traceback), and the file left as it was."""
    path, _ = ids_file(tmp_path, 64)
    taken = tmp_path / "taken"
    taken.write_text("someone's notes\n")
    code = cli_main(["extract", "--model", "random:gpt2-small,n_layer=1,n_embd=32,n_head=2", "--data", path,
                     "--out", str(taken), "--seq-len", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "residtap extract: error: --out:" in err and "is not a directory" in err, (code, err)
    assert taken.read_text() == "someone's notes\n"


def test_bad_arguments(tmp_path, capsys):
    model = tiny_gpt2()
    path, _ = ids_file(tmp_path, 100, vocab=200)
    with pytest.raises(ValueError, match=r"token id \d+ in sequence \d+ is outside .*\[0, 97\)"):
        residtap.extract(model, path, tmp_path / "a", seq_len=8, progress=False)
    edge = tmp_path / "edge.npy"  # the bound itself: id 97 is outside [0, 97), id 96 is the last one in
    arr = np.zeros((2, 8), dtype=np.int64)
    arr[1, 3] = 97
    np.save(edge, arr)
    with pytest.raises(ValueError, match=r"token id 97 in sequence 1 is outside the model's vocabulary "
                                         r"\[0, 97\)"):
        residtap.extract(model, str(edge), tmp_path / "a97", progress=False)
    assert not (tmp_path / "a97").exists()
    arr[1, 3] = 96
    np.save(edge, arr)
    assert residtap.extract(model, str(edge), tmp_path / "a96", progress=False).complete
    ok, _ = ids_file(tmp_path, 64)
    with pytest.raises(ValueError, match="packing"):
        residtap.extract(model, ok, tmp_path / "b", seq_len=8, packing="pad")
    two, _ = ids_file(tmp_path, 64, seed=2, shape=(8, 8))
    with pytest.raises(ValueError, match="seq_len: the 2-D"):
        residtap.extract(model, two, tmp_path / "c", seq_len=4)
    # rows that are sequences already have nothing to pad (a padded run claimed an attention_mask it lacked)
    for data, what in ((two, r"a 2-D \.npy \(.*\) holds"), (np.load(two), "a 2-D token array holds")):
        with pytest.raises(ValueError, match=rf"packing: {what} its sequences already, one per row, every "
                                             r"token real, so there is nothing to pad and only packing='pack' "
                                             r"\(each row as it is\) applies; got 'pad'$"):
            residtap.extract(model, data, tmp_path / "c2", packing="pad")
        assert not (tmp_path / "c2").exists()
    with pytest.raises(ValueError, match="positions"):
        residtap.extract(model, ok, tmp_path / "d", seq_len=8, positions=[9])
    with pytest.raises(ValueError, match="host_memory"):
        residtap.extract(model, ok, tmp_path / "e", seq_len=8, shard_size="1MiB", host_memory="1MiB")
    with pytest.raises(ValueError, match="shard_size"):
        residtap.extract(model, ok, tmp_path / "f", seq_len=8, shard_size="lots")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"body": "w1 w2"}\n')
    with pytest.raises(ValueError, match="text_field.*body"):
        residtap.extract(model, str(jsonl), tmp_path / "g", seq_len=8, tokenizer=tokenizer_dir(tmp_path))
    with pytest.raises(ValueError, match="tokenizer"):
        residtap.extract(model, str(jsonl), tmp_path / "h", seq_len=8)
    assert cli_main(["extract", "--model", RANDOM, "--data", ok, "--out", str(tmp_path / "i"),
                     "--layers", "0,9"]) == 2
    assert "layers" in capsys.readouterr().err
    assert cli_rc(["extract", "--model", RANDOM, "--data", ok, "--out", str(tmp_path / "j"),
                   "--publishers", "0"]) == 2
    assert "--publishers: expected an int >= 1, got '0'" in capsys.readouterr().err
    for args, match in ((["--device", "tpu"], "device: expected a device that computes, .*got 'tpu'"),
                        (["--model", RANDOM + ",n_layr=1"], r"--model: .*got unknown \['n_layr'\]"),
                        (["--model", RANDOM + ",n_layer=x"], "with int or float values, got 'n_layer=x'")):
        base = ["extract", "--model", RANDOM, "--data", ok, "--out", str(tmp_path / "k")]
        assert cli_main(base + args) == 2, args
        assert re.search(match, capsys.readouterr().err), args
    for d in "abcdefghijk":
        assert not (tmp_path / d).exists() or not shard_files(tmp_path / d)


def cli_rc(argv) -> int:
    """The command line's exit status, argparse's own errors (SystemExit) included."""
    try:
        return cli_main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "0"], r"--batch-size: expected an int >= 1, got '0'"),
    (["--seq-len", "0"], r"--seq-len: expected an int >= 1, got '0'"),
    (["--max-tokens", "-5"], r"--max-tokens: expected an int >= 1, got '-5'"),
    (["--writers", "0"], r"--writers: expected an int >= 1, got '0'"),
    # a range the model lacks: the range as typed and the valid one, not its first bad index
    (["--layers", "0:33"], r"--layers: expected residual indices in \[-3, 2\] \(the model has 2 blocks.*\), "
                           r"got 0:33$"),
    (["--layers", "0,9"], r"--layers: expected residual indices in \[-3, 2\] .*got 9$"),
    (["--positions", "9"], r"--positions: expected positions in \[-8, 8\) .*got 9$"),
    (["--outputs", "resid,foo"], r"--outputs: expected a non-empty subset of"),
    (["--dtype", "float64"], r"--dtype: invalid choice: 'float64' \(choose from 'bf16', .*'float32'"),
    (["--model-dtype", "int8"], r"--model-dtype: invalid choice: 'int8'"),
    (["--shard-size", "lots"], r"--shard-size: expected a byte count .*got 'lots'"),
    (["--host-memory", "lots"], r"--host-memory: expected a byte count .*got 'lots'"),
    (["--host-memory", "1KiB"], r"--host-memory: a shard of \d+ sequences takes \d+ bytes of host buffers "
                                r".* but the budget is 1024 bytes; raise it, or lower the shard size or the "
                                r"batch size$"),
    (["--positions", "20:30"], r"--positions: the slice 20:30 selects no position of a sequence of length 8$"),
    # settings the input would ignore
    (["--text-field", "body"], r"--text-field: applies to .jsonl files and saved datasets, whose records have "
                               r"fields; the input '.*ids0.npy' is token ids \(.npy\), got 'body'$"),
    (["--split", "train"], r"--split: applies to a saved HF dataset directory; the input '.*ids0.npy' is "
                           r"token ids \(.npy\), got 'train'$"),
    (["--packing", "pad"], r"--packing: a 1-D .npy .* only packing='pack' applies"),
    (["--device", "tpu"], r"--device: expected a device that computes, .*got 'tpu'"),
    (["--device", "cpu", "--device-map", "auto"], r"--device-map: only applies to a model given by name"),
    (["--seed", str(2**64)], r"--seed: expected an int in \[-2\*\*63, 2\*\*64\) .*got 18446744073709551616"),
    (["--model", "random:gpt2-tiny"], r"--model: expected one of \['gpt2-medium', .*got 'gpt2-tiny'"),
    (["--model", RANDOM + ",n_layr=1"], r"--model: expected GPT2Config fields .*got unknown \['n_layr'\]"),
    (["--model", "random:gpt2-small,n_layer"], r"--model: expected 'random:SIZE\[,key=value...\]'"),
    (["--model", "random:gpt2-small,n_layer=0"], r"--model: expected n_layer to be an int >= 1, got n_layer=0$"),
    (["--blocks", "nowhere"], r"--blocks: expected a module path inside"),
    (["--final-norm", "nowhere"], r"--final-norm: expected a module path inside"),
    (["--tokenizer", "no-such-dir/x/y"], r"--tokenizer: 'no-such-dir/x/y' could not be loaded offline"),
    (["--device-map", "bogus"], r"--device-map: expected auto, balanced, balanced_low_0, sequential or a JSON file "
                                r"of \{module: device\} \(a name ending in .json\), got 'bogus'; for one device, "
                                r"--device$"),
    (["--positions", "LAST"], r"--positions: expected 'all', 'last', an int, .*got 'LAST'$"),
    (["--positions", "::0"], r"--positions: expected .*\(step not 0\), got '::0'$"),
    (["--layers", "-1:2"], r"--layers: a range needs both ends, non-negative, e.g. 0:13; got '-1:2'$"),
])
def test_command_line_errors_name_the_flag(tmp_path, capsys, args, match):
    """On the command line an error names the flag, as verify's do (--seq), not extract()'s parameter
    (batch_size), and says what was expected and what was given: exit status 2, one line, nothing made.
    The Python API keeps the parameter names."""
    ok, _ = ids_file(tmp_path, 64)
    code = cli_rc(["extract", "--model", RANDOM, "--data", ok, "--out", str(tmp_path / "out"),
                   "--seq-len", "8", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"^residtap extract: error: (argument )?" + match, err, re.M), (code, err)
    assert "Traceback" not in err and "None" not in err  # (None: the Python API's default, not typed)
    assert not (tmp_path / "out").exists()


def test_command_line_errors_about_the_data_and_output_name_the_flag(tmp_path, capsys):
    """--data and --out: a missing or too short input names --data and the file (before, an input with
    no whole sequence said only "in the input"), a jsonl without the field names --text-field, an
    output that is a file names --out (exit status 1, as every run that fails on its directory)."""
    short, _ = ids_file(tmp_path, 5)
    base = ["extract", "--model", RANDOM, "--out", str(tmp_path / "out"), "--seq-len", "8", "--no-progress"]
    assert cli_rc(base + ["--data", short]) == 2
    assert capsys.readouterr().err == (f"residtap extract: error: --data: no complete sequence of 8 tokens "
                                       f"in {short!r}\n")
    assert cli_rc(base + ["--data", str(tmp_path / "none.npy")]) == 2
    assert f"error: --data: {str(tmp_path / 'none.npy')!r} does not exist" in capsys.readouterr().err
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"body": "w1 w2"}\n')
    assert cli_rc(base + ["--data", str(jsonl), "--tokenizer", tokenizer_dir(tmp_path)]) == 2
    assert "error: --text-field: line 1 of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^data: no complete sequence of 8 tokens in the input array$"):
        residtap.extract(tiny_gpt2(), np.zeros(5, dtype=np.int64), tmp_path / "out", seq_len=8, progress=False)
    with pytest.raises(ValueError, match=r"^batch_size: expected a positive int, got 0$"):  # the API's names
        residtap.extract(tiny_gpt2(), short, tmp_path / "out", seq_len=8, batch_size=0)
    assert not (tmp_path / "out").exists()


def test_a_model_path_that_is_a_file_says_so(tmp_path, capsys):
    """--model naming a regular file: said to be a file, not "no such directory" (it exists)."""
    ok, _ = ids_file(tmp_path, 64)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    assert cli_rc(["extract", "--model", str(weights), "--data", ok, "--out", str(tmp_path / "out"),
                   "--seq-len", "8"]) == 2
    assert capsys.readouterr().err == (f"residtap extract: error: --model: {str(weights)!r} is a file, not a "
                                       "model directory or hub name (a local model is a directory holding "
                                       "config.json and the weights)\n")
    assert not (tmp_path / "out").exists()


def test_the_manifest_lists_the_per_sequence_tensors_the_shards_hold(tmp_path):
    """Packed runs store no attention_mask, so their manifest does not list one (before, every manifest
    did); padded runs list and store it. The field is description, not a setting: a directory whose
    manifest still lists it for a packed run resumes, and its manifest then says what is stored."""
    model = tiny_gpt2()
    path, _ = ids_file(tmp_path, 8 * 24)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    residtap.extract(model, path, tmp_path / "pack", **kw)
    docs = tmp_path / "d.txt"
    docs.write_text("w1 w2 w3\nw4\n")
    residtap.extract(model, str(docs), tmp_path / "pad", packing="pad", tokenizer=tokenizer_dir(tmp_path),
                     **kw)
    for name, listed in (("pack", ["input_ids", "source"]),
                         ("pad", ["input_ids", "attention_mask", "source"])):
        acts = residtap.open(tmp_path / name)
        assert acts.manifest["tensors"]["per_sequence"] == listed
        stored = set(acts.tensor_names)
        assert set(listed) <= stored and not set(store.SEQ_TENSORS) - set(listed) & stored, (name, stored)
    # a packed run as an earlier version left it when killed: its manifest lists attention_mask
    finished = _interrupted(tmp_path / "pack", tmp_path / "old", keep=3)
    m = json.loads((tmp_path / "old" / "manifest.json").read_text())
    m["tensors"]["per_sequence"] = list(store.SEQ_TENSORS)
    store.write_json_atomic(str(tmp_path / "old" / "manifest.json"), m)
    res = residtap.extract(model, path, tmp_path / "old", **kw)
    assert res.complete and res.shards_skipped == 3
    assert all((tmp_path / "old" / f).read_bytes() == b for f, b in finished.items())
    assert_same_dirs(tmp_path / "pack", tmp_path / "old")
    assert residtap.open(tmp_path / "old").manifest["tensors"]["per_sequence"] == ["input_ids", "source"]


# ------------------------------------------------------------------------------------------ processes
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", RESIDTAP_NO_CUDA="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


CLI_ARGS = ["--seq-len", "8", "--batch-size", "2", "--shard-size", "2KiB", "--outputs", "resid,stats",
            "--publishers", "3"]  # more publishers than the 2 writers: the bytes must not depend on it


def _cli(path, out):
    return [sys.executable, "-m", "residtap", "extract", "--model", RANDOM, "--data", path, "--out",
            str(out), "--no-progress", *CLI_ARGS]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted single-process run, in this process, single-threaded like the subprocesses
    (so that every run computes with the same kernels): the bytes the others must reproduce."""
    d = tmp_path_factory.mktemp("reference")
    path, _ = ids_file(d, 8 * 400, vocab=100)
    _single_threaded_run(path, d / "ref")
    return path, d / "ref"


def _single_threaded_run(path, out):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--no-progress",
                         *CLI_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_byte_identical(tmp_path, reference_run):
    path, ref = reference_run
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(path, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= 20:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = json.loads(manifest.read_text())
    assert not m["complete"] and 20 <= len(m["shards"]) < 200
    rerun = subprocess.run(_cli(path, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(m['shards'])} already done)" in rerun.stdout
    assert_same_dirs(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # no temporary file left behind


def _until(proc, done, timeout=90) -> None:
    """Wait until ``done()`` or ``proc`` ends (a run that finishes first cannot be interrupted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not done():
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted; make the input larger"


def _listed(*manifests) -> list[int]:
    """The shards each manifest file lists (0 where it cannot be read yet)."""
    counts = []
    for p in manifests:
        try:
            counts.append(len(json.loads(p.read_text())["shards"]))
        except (OSError, ValueError, KeyError):
            counts.append(0)
    return counts


def _popen_interruptible(args, **kw) -> subprocess.Popen:
    """Popen with SIGINT at its default disposition in the child, as a terminal's Ctrl-C finds a
    foreground command. A signal ignored is inherited across exec (only handlers are reset): under a
    background job of a non-interactive shell (``pytest ... &``, ``nohup``) SIGINT is ignored, Python
    then installs no KeyboardInterrupt handler, and the run would go on to complete instead."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # SIG_DFL in the child after exec
    try:
        return subprocess.Popen(args, **kw)
    finally:
        if before is not None:  # (None: a handler not set from Python, which cannot be put back)
            signal.signal(signal.SIGINT, before)


@pytest.mark.slow
@pytest.mark.parametrize("signum,how", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated (SIGTERM)")])
def test_a_signal_after_some_shards_is_said_in_one_line_and_ends_the_process(tmp_path, reference_run, signum,
                                                                             how):
    """Ctrl-C, and SIGTERM (the command line's handler) after some shards: the cleanup runs first (the
    threads finish the shards handed to them; nothing partial is listed, no temporary is left), then one
    line says what is kept and that the same command resumes (before: a traceback through transformers, or
    for SIGTERM nothing), and the process still ends by that signal, so that a shell script stops there (a
    scheduler sees what it expects). The rerun resumes and ends as the uninterrupted run."""
    path, ref = reference_run
    out = tmp_path / "out"
    proc = _popen_interruptible(_cli(path, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    _until(proc, lambda: _listed(out / "manifest.json")[0] >= 5)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signum, (proc.returncode, stderr[-3000:])
    m = json.loads((out / "manifest.json").read_text())
    n = len(m["shards"])
    assert not m["complete"] and 5 <= n < 200
    assert stdout == "" and stderr == (f"residtap extract: {how}; {str(out)!r} keeps its {n} complete shards "
                                       "and nothing partial. Run the same command again to resume.\n")
    assert sorted(os.listdir(out)) == sorted([store.LOCK, store.MANIFEST, *(r["file"] for r in m["shards"])])
    rerun = subprocess.run(_cli(path, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({n} already done)" in rerun.stdout
    assert_same_dirs(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("to", ["torchrun", "its process group"])
def test_ctrl_c_under_torchrun_gives_one_line_per_rank(tmp_path, reference_run, to):
    """torchrun passes the SIGINT on to each worker: each rank says its line once, and no rank prints a
    traceback (torchrun's own report is torchrun's). A terminal's Ctrl-C goes to the whole process group,
    so each worker gets it twice (the terminal's, then torchrun's), the second often during its cleanup,
    which it must not cut short: nothing temporary is left and every shard file is listed. The rerun
    resumes and ends as one uninterrupted process."""
    path, ref = reference_run
    out = tmp_path / "out"
    proc = _popen_interruptible(_torchrun(path, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    _until(proc, lambda: min(_listed(*(out / store.part_name(r) for r in range(2)))) >= 5, timeout=120)
    if to == "torchrun":
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    for r in range(2):
        line = (rf"^residtap extract: rank {r}: interrupted; {re.escape(repr(str(out)))} keeps its \d+ complete "
                r"shards and nothing partial\. Run the same command again to resume\.$")
        assert len(re.findall(line, stderr, re.M)) == 1, stderr[-5000:]
    assert "KeyboardInterrupt" not in stderr and "residtap" not in stderr.replace("residtap extract: rank", "")
    files = set(os.listdir(out))
    parts = {f for f in files if f.startswith(store.PART_PREFIX) and f.endswith(".json")}
    listed = {r["file"] for p in parts | {store.MANIFEST} for r in json.loads((out / p).read_text())["shards"]}
    assert files - parts == {store.LOCK, store.MANIFEST} | listed, sorted(files - parts - listed)
    rerun = subprocess.run(_torchrun(path, out), env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_dirs(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


def test_ctrl_c_before_the_first_shard_takes_the_run_back_then_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C before any shard of a run that made its directory: the run is taken back (as on any failure
    there) before the line is printed and the process ends by SIGINT."""
    ex = sys.modules["residtap.extract"]  # (residtap.extract is the function)
    path, _ = ids_file(tmp_path, 64)
    out = tmp_path / "out"

    def interrupt(self, ids, first_seq):
        assert out.exists()
        raise KeyboardInterrupt

    ended = []
    monkeypatch.setattr(ex._Run, "_check_ids", interrupt)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # not this process's handlers
    monkeypatch.setattr(ex, "_end_by_sigint", lambda: ended.append(out.exists()) or 130)
    assert cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8",
                     "--no-progress"]) == 130
    assert ended == [False]  # taken back first
    assert capsys.readouterr().err == ("residtap extract: interrupted; no shard was complete yet, so nothing is "
                                       "kept. Run the same command again to resume.\n")


def test_a_second_ctrl_c_during_the_cleanup_does_not_cut_it_short(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the command line while extract holds the directory is noted and taken at the next
    checkpoint, as SIGTERM is, and a second one while go() waits for its threads (a second Ctrl-C; under
    torchrun every time: the terminal sends the Ctrl-C to every worker and torchrun passes it on again) is
    ignored. The publisher holding a shard then still renames and records it: the directory lists every
    shard it holds, nothing temporary is left, and the one line says what is kept. Before, the second raised
    a KeyboardInterrupt in go()'s joins, and the process said "nothing partial" and ended with that shard
    half done (a temporary, or a shard file the manifest does not list, or a first run not taken back)."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 8 * 64, vocab=100)
    out = tmp_path / "out"
    publish, sent = store.publish_shard, []
    main = threading.main_thread().ident

    def interrupted_twice(pending, hashed=None):
        if pending.index == 2 and not sent:
            for _ in range(2):  # to the main thread, as a terminal's Ctrl-C comes; the second while it joins
                sent.append(pending.index)
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.3)
        return publish(pending, hashed)

    ended = []
    monkeypatch.setattr(store, "publish_shard", interrupted_twice)
    monkeypatch.setattr(ex, "_end_by_sigint", lambda: ended.append(signal.getsignal(signal.SIGINT)) or 130)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, as a terminal's command has
    try:
        rc = cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8",
                       "--batch-size", "2", "--shard-size", "1KiB", "--no-progress"])
        files = sorted(os.listdir(out))  # at once: before, the publisher was still asleep with its shard
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert sent == [2, 2] and rc == 130 and ended == [signal.SIG_IGN], err
    m = json.loads((out / "manifest.json").read_text())
    n = len(m["shards"])
    assert not m["complete"] and "shard-000002.safetensors" in {r["file"] for r in m["shards"]}
    assert files == sorted([store.LOCK, store.MANIFEST, *(r["file"] for r in m["shards"])])
    assert err == (f"residtap extract: interrupted; {str(out)!r} keeps its {n} complete shards and nothing "
                   "partial. Run the same command again to resume.\n")
    assert not ex._SIGNALS.asked and not ex._SIGNALS.deferring


def test_ctrl_c_outside_the_window_is_raised_at_once_and_an_ignored_one_stays_ignored(tmp_path, monkeypatch,
                                                                                      capsys):
    """Ctrl-C while the model loads (nothing to clean up) raises KeyboardInterrupt at once, as Python's own
    handler does: no directory, the line, the end by SIGINT. Where SIGINT is ignored (a background job,
    which a terminal's Ctrl-C is not for) the command line leaves it so."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 64)
    out = tmp_path / "out"

    def interrupted_load(*a, **k):
        signal.raise_signal(signal.SIGINT)  # its handler has run when this returns
        raise AssertionError("SIGINT was not raised at once")

    ended = []
    monkeypatch.setattr(ex, "load_model", interrupted_load)
    monkeypatch.setattr(ex, "_end_by_sigint", lambda: ended.append(signal.getsignal(signal.SIGINT)) or 130)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8",
                       "--no-progress"])
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with ex._SIGNALS.install():
            inside = signal.getsignal(signal.SIGINT)
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert rc == 130 and ended == [signal.SIG_IGN] and not out.exists()
    assert capsys.readouterr().err == ("residtap extract: interrupted; no shard was complete yet, so nothing is "
                                       "kept. Run the same command again to resume.\n")
    assert inside is signal.SIG_IGN and after is signal.SIG_IGN


class _Writes:
    """A stand-in for stderr that keeps each write apart."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("case", ["bad flag", "store error", "interrupted"])
def test_each_line_the_command_line_says_is_one_write(tmp_path, monkeypatch, case):
    """Under torchrun every rank says its line on one stderr: one written in two parts (print's text,
    then its newline, each passed straight on) let another rank's line land between them ("... to
    resume.residtap extract: rank 0: ..."), seen in a test of torchrun's Ctrl-C. Each line is one
    write, newline included."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 64)
    out = tmp_path / "out"
    extra = []
    if case == "bad flag":
        extra = ["--positions", "9"]
    elif case == "store error":
        out.write_text("a file")
    else:
        def interrupted_load(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(ex, "load_model", interrupted_load)
        monkeypatch.setattr(ex, "_end_by_sigint", lambda: 130)
    err = _Writes()
    monkeypatch.setattr(sys, "stderr", err)
    before = signal.getsignal(signal.SIGINT)
    try:
        rc = cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8",
                       "--no-progress", *extra])
    finally:
        signal.signal(signal.SIGINT, before)
    assert rc == {"bad flag": 2, "store error": 1, "interrupted": 130}[case]
    said = [w for w in err.writes if w]
    assert len(said) == 1 and said[0].startswith("residtap extract: ") and said[0].count("\n") == 1 \
        and said[0].endswith("\n"), err.writes


def test_a_manifest_write_cut_short_leaves_the_manifest_as_it_was_and_no_temporary(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the middle of a manifest's write (Ctrl-C outside extract's window, where it is
    raised at once: the final manifest) leaves the manifest as it was and no temporary beside it. Before,
    only an OSError removed the temporary."""
    path = tmp_path / "manifest.json"
    store.write_json_atomic(str(path), {"shards": 1})

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.write_json_atomic(str(path), {"shards": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"shards": 1} and os.listdir(tmp_path) == ["manifest.json"]


def test_manifest_text_is_the_json_of_its_fields_with_one_shard_record_per_line():
    """The manifests are written by json's C encoder piece by piece (manifest_text), not json.dumps with an
    indent (its pure-Python encoder): the text must still be exactly the JSON of the object, for any value
    the manifests hold, and read as one top-level key per line, and one item per line of a top-level list
    of objects (the shard records, resumed_with)."""
    records = [{"index": i, "file": f"shard-{i:06d}.safetensors", "sha256": "ab" * 32, "n_rows": 7 * i,
                "source_first": [i, 0], "name": "é \\ \" \n ✓"} for i in range(3)]
    resumed = [{"versions": {"torch": "2.11"}, "environment": {"device": "cuda"}}]
    fields = {"format": store.FORMAT, "settings": {"layers": [0, 6], "positions": None, "dtype": "bfloat16"},
              "complete": False, "empty": [], "nested": {"z": [1.5, {"a": True}], "a": {}}, "layer_ids": [3, 1, 2],
              "ratio": 0.1, "big": 2 ** 70, "text": "line\nbreak", "resumed_with": resumed}
    want = {**fields, "shards": records}
    for text in (store.manifest_text(want),
                 store.manifest_text(fields, [store.json_line(r) for r in records])):
        assert json.loads(text) == want
        lines = text.splitlines()
        assert lines[0] == "{" and lines[-1] == "}" and text.endswith("}\n")
        one_line = [json.loads("{" + ln.rstrip(",") + "}") for ln in lines[1:-1]
                    if ln.startswith(' "') and not ln.endswith("[")]
        assert [k for d in one_line for k in d] == sorted(set(want) - {"shards", "resumed_with"})
        for key, items in (("shards", records), ("resumed_with", resumed)):
            first = lines.index(f' "{key}": [')
            assert [json.loads(ln.strip().rstrip(",")) for ln in lines[first + 1:first + 1 + len(items)]] == items
            assert lines[first + 1 + len(items)].strip() in ("]", "],")
    assert store.manifest_text({"shards": []}) == '{\n "shards": []\n}\n'
    assert store.manifest_text({"a": 1}, []) == '{\n "a": 1,\n "shards": []\n}\n'


def test_each_shard_record_is_encoded_once_however_often_the_manifest_is_rewritten(tmp_path, monkeypatch):
    """The manifest is rewritten after every shard. Before, each rewrite encoded every record again with
    json's pure-Python encoder: quadratic in the shards, and all of it holding the GIL the forwards need
    (at 1,000 shards 22 ms a rewrite). Each record is now encoded once, when its shard is recorded, and a
    resumed run encodes the records it found once."""
    encoded = collections.Counter()
    line = store.json_line

    def counting(value):
        if isinstance(value, dict) and "sha256" in value:
            encoded[value["index"]] += 1
        return line(value)

    monkeypatch.setattr(store, "json_line", counting)
    model = tiny_gpt2()
    path, _ = ids_file(tmp_path, 8 * 24)
    kw = dict(seq_len=8, batch_size=2, shard_size="2KiB", progress=False)
    res = residtap.extract(model, path, tmp_path / "out", **kw)
    assert res.n_shards >= 8 and res.shards_written == res.n_shards
    # once when recorded, once more in the final manifest (written whole by _finish)
    assert encoded == {i: 2 for i in range(res.n_shards)}, encoded
    _interrupted(tmp_path / "out", tmp_path / "again", keep=5)
    encoded.clear()
    res = residtap.extract(model, path, tmp_path / "again", **kw)
    assert res.shards_skipped == 5 and encoded == {i: 2 for i in range(res.n_shards)}, encoded
    assert_same_dirs(tmp_path / "out", tmp_path / "again")


class _Stray(Exception):
    """Raised by _stray: a stand-in for SIGTERM's previous action (the default would end pytest)."""


def _stray(signum, frame):
    raise _Stray


class _Ended(BaseException):
    """Raised by _end: a stand-in for the process's end by SIGTERM."""


def _end():
    raise _Ended


def test_sigterm_in_the_command_line_is_taken_at_the_next_batch_once(tmp_path, monkeypatch, capsys):
    """SIGTERM in a first run's first batch: the handler only notes it (the batch goes on), the next
    checkpoint raises, and the run is taken back (as on any failure there) before the line is printed and
    the process ends by SIGTERM; a second SIGTERM during the cleanup does not cut it short. Before, SIGTERM's
    action (here a stand-in that raises, not the default, which would end pytest) cut through it all."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 64)
    out = tmp_path / "out"

    check, seen = ex._Run._check_ids, []

    def terminated(self, ids, first_seq):
        assert out.exists()
        if not seen:
            signal.raise_signal(signal.SIGTERM)  # its handler has run when this returns
        seen.append(first_seq)
        return check(self, ids, first_seq)

    take_back = ex._take_back

    def again(*a):
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM during the cleanup
        take_back(*a)

    ended = []
    monkeypatch.setattr(ex._Run, "_check_ids", terminated)
    monkeypatch.setattr(ex, "_take_back", again)
    monkeypatch.setattr(ex, "_end_by_sigterm",
                        lambda: ended.append((out.exists(), signal.getsignal(signal.SIGTERM))) or 143)
    previous = signal.signal(signal.SIGTERM, _stray)
    try:
        rc = cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8",
                       "--batch-size", "2", "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert seen == [0], seen  # the batch the signal came in ran to its end; the next never started
    assert rc == 143 and ended == [(False, signal.SIG_IGN)], err  # taken back first; SIGTERM ignored then
    assert not ex._SIGNALS.asked and not ex._SIGNALS.deferring  # nothing left for a later extract here
    assert err == ("residtap extract: terminated (SIGTERM); no shard was complete yet, so nothing is kept. Run "
                   "the same command again to resume.\n")


def test_sigterm_is_taken_where_extract_holds_the_directory_and_acts_at_once_elsewhere(tmp_path, monkeypatch):
    """Before the run makes its directory (loading the model, tokenizing) and once the complete directory's
    shards are being checked, nothing needs cleaning up: SIGTERM ends the process at once, as without the
    handler. In a resume's check of the shards it owns, it is taken at the next shard."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 64)
    out = tmp_path / "out"
    args = ["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8", "--batch-size",
            "2", "--shard-size", "1KiB", "--no-progress"]

    monkeypatch.setattr(ex, "_end_by_sigterm", _end)
    monkeypatch.setattr(ex, "_end_at_once", _end)  # the handler's, outside the window
    load = ex.load_model

    def signalled_load(*a, **k):
        signal.raise_signal(signal.SIGTERM)
        return load(*a, **k)

    monkeypatch.setattr(ex, "load_model", signalled_load)
    with pytest.raises(_Ended):
        cli_main(args)
    assert not out.exists()
    monkeypatch.setattr(ex, "load_model", load)
    assert cli_main(args) == 0
    n = len(residtap.open(out).records)
    assert n > 2

    checked, hash_file = [], store.sha256_file

    def signalled_check(path):
        checked.append(int(re.search(r"(\d+)\.safetensors$", path).group(1)))
        if len(checked) == 2:
            signal.raise_signal(signal.SIGTERM)
        return hash_file(path)

    monkeypatch.setattr(store, "sha256_file", signalled_check)
    monkeypatch.setattr(store, "hash_threads", lambda: 1)  # one at a time: the order below is exact
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))  # as a run killed before its final manifest
    monkeypatch.setattr(ex, "_end_by_sigterm", lambda: 143)
    assert cli_main(args) == 143
    assert checked == [0, 1]  # taken before the third shard's check
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == n

    m["complete"] = True
    (out / "manifest.json").write_text(json.dumps(m))
    verify = store.Activations.verify

    def signalled_verify(self):
        signal.raise_signal(signal.SIGTERM)
        return verify(self)

    monkeypatch.setattr(store.Activations, "verify", signalled_verify)
    monkeypatch.setattr(ex, "_end_by_sigterm", _end)
    with pytest.raises(_Ended):
        cli_main(args)
    assert json.loads((out / "manifest.json").read_text()) == m


def test_a_writers_error_is_reported_rather_than_a_sigterm_noted_with_it(tmp_path, monkeypatch, capsys):
    """A writer fails (a full disk) and a SIGTERM is noted before the main thread's next checkpoint: the
    run ends as on the writer's error, which says what to do, not as terminated."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 64)
    check = ex._Run._check_ids

    def both(self, ids, first_seq):
        if first_seq == 2:
            self.errors.append(store.StoreError("no space left on device (a stand-in)"))
            signal.raise_signal(signal.SIGTERM)  # noted by the handler when this returns
        return check(self, ids, first_seq)

    monkeypatch.setattr(ex._Run, "_check_ids", both)
    monkeypatch.setattr(ex, "_end_by_sigterm", lambda: 143)
    rc = cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(tmp_path / "out"), "--seq-len",
                   "8", "--batch-size", "2", "--no-progress"])
    assert rc == 1 and capsys.readouterr().err == ("residtap extract: error: no space left on device (a "
                                                   "stand-in)\n")
    assert not ex._SIGNALS.asked

def test_only_the_command_line_handles_sigterm_and_only_from_the_main_thread(tmp_path, monkeypatch):
    """The Python API installs no handler (it is library code); the command line's is installed only from
    the main thread (signal.signal's rule: a caller running it in another thread gets no error) and the
    previous one is back afterwards."""
    ex = sys.modules["residtap.extract"]
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    check = ex._Run._check_ids
    monkeypatch.setattr(ex._Run, "_check_ids",
                        lambda self, *a: seen.append(signal.getsignal(signal.SIGTERM)) or check(self, *a))
    path, _ = ids_file(tmp_path, 64)
    residtap.extract(tiny_gpt2(), path, tmp_path / "api", seq_len=32, batch_size=2, progress=False)
    assert seen and set(seen) == {before}

    def in_a_thread():
        with ex._SIGNALS.install():
            seen.append(("thread", signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    with ex._SIGNALS.install():
        main = signal.getsignal(signal.SIGTERM)
    assert seen[-1] == ("thread", before) and main not in (before, signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) is before


def test_joining_the_process_group_leaves_sigint_and_sigterm_to_their_default_actions(monkeypatch):
    """A worker joining torchrun's group waits in C++ (gloo's connect) for every rank, where no Python
    handler runs: one whose peer a Ctrl-C ended before it joined sat there through its own Ctrl-C and
    torchrun's SIGINT until torchrun's SIGKILL 30 s later. Outside extract's window nothing needs
    cleaning up, so there the command line's signals take their default actions (the end at once); the
    handlers are back afterwards, and a caller's own (the Python API) are left alone."""
    import torch.distributed as dist

    ex = sys.modules["residtap.extract"]
    seen = []
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: seen.append(
        (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ex._SIGNALS.install():
            ex._init_group(2)
            inside = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        ex._init_group(2)  # the Python API: no handler of residtap's to set aside
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen[0] == (signal.SIG_DFL, signal.SIG_DFL)
    assert inside == (ex._SIGNALS._handler, ex._SIGNALS._handler)
    assert seen[1] == after and ex._SIGNALS._handler not in after


@pytest.mark.parametrize("where", ["after the last shard", "checking a complete directory"])
def test_a_sigterm_that_comes_just_after_the_windows_last_check_is_not_lost(tmp_path, monkeypatch, where):
    """A SIGTERM whose handler runs just after the window's last check (after go(), or in a complete
    directory's undefer) is taken there or ends the process at once. Before, the window ended after that
    check: the signal was noted and taken nowhere, the run went on to exit 0, and the handler ignored
    every later SIGTERM (a rank 0 then waiting in _finish's collectives could only be SIGKILLed)."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 64)
    out = tmp_path / "out"
    args = ["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8", "--batch-size",
            "2", "--shard-size", "1KiB", "--no-progress"]
    if where == "checking a complete directory":
        assert cli_main(args) == 0
    returned, sent = [], []
    go, check = ex._Run.go, ex._Signals.check
    monkeypatch.setattr(ex._Run, "go", lambda self: go(self) or returned.append(True))

    def late(self):
        check(self)
        if (returned or where == "checking a complete directory") and not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGTERM)  # its handler has run when this returns: after the check

    monkeypatch.setattr(ex._Signals, "check", late)
    monkeypatch.setattr(ex, "_end_at_once", _end)
    monkeypatch.setattr(ex, "_end_by_sigterm", lambda: 143)  # taken at a checkpoint (or, before, at once)
    try:
        rc = cli_main(args)
    except _Ended:
        rc = "ended at once"
    assert sent and rc in ("ended at once", 143), rc
    assert not ex._SIGNALS.asked and not ex._SIGNALS.deferring


def test_a_second_sigterm_as_the_handler_is_taken_down_does_not_cut_the_line_short(tmp_path, monkeypatch,
                                                                                    capsys):
    """Once a SIGTERM was taken, the command line prints its line and then ends by SIGTERM; a second
    SIGTERM in between stays ignored. Before, leaving extract restored the previous action (here a
    stand-in that raises, for the default, which ends the process) before the line set SIGTERM to
    SIG_IGN, and a second SIGTERM just then ended the process without its line."""
    ex = sys.modules["residtap.extract"]
    path, _ = ids_file(tmp_path, 64)
    out = tmp_path / "out"

    check = ex._Run._check_ids
    real_signal = signal.signal

    def terminated(self, ids, first_seq):
        if first_seq == 0:
            signal.raise_signal(signal.SIGTERM)
        return check(self, ids, first_seq)

    def signal_then_another(signum, action):  # a second SIGTERM just after each change of SIGTERM's action
        previous = real_signal(signum, action)
        if signum == signal.SIGTERM and action != ex._SIGNALS._handler:
            signal.raise_signal(signal.SIGTERM)
        return previous

    monkeypatch.setattr(ex._Run, "_check_ids", terminated)
    monkeypatch.setattr(ex, "_end_by_sigterm", lambda: 143)
    previous = real_signal(signal.SIGTERM, _stray)
    try:
        monkeypatch.setattr(ex.signal, "signal", signal_then_another)
        rc = cli_main(["extract", "--model", RANDOM, "--data", path, "--out", str(out), "--seq-len", "8",
                       "--batch-size", "2", "--no-progress"])
    finally:
        monkeypatch.undo()
        real_signal(signal.SIGTERM, previous)
    assert rc == 143
    assert capsys.readouterr().err == ("residtap extract: terminated (SIGTERM); no shard was complete yet, so "
                                       "nothing is kept. Run the same command again to resume.\n")


# Python run as the command line (sys.argv: its arguments) whose model loading writes to stderr without
# end, as a loading's warnings may: with stderr a pipe nobody reads, the main thread blocks in that write.
_WRITING_TO_STDERR_WHILE_LOADING = """
import os, sys
import residtap
ex = sys.modules["residtap.extract"]
def chatty_load(*a, **k):
    open(os.environ["RESIDTAP_TEST_HELD"], "w").close()
    while True:
        sys.stderr.write("warning: " + "x" * 1000 + "\\n")
ex.load_model = chatty_load
from residtap.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_outside_the_window_ends_a_process_blocked_writing_to_stderr(tmp_path, reference_run):
    """Outside extract's window SIGTERM ends the process at once, as the default action does, even where
    its handler runs inside a write to stderr (blocked: a pipe nobody reads; stderr buffered, as without
    PYTHONUNBUFFERED). Before, the handler flushed stdout and stderr first: "reentrant call" (a
    RuntimeError) instead of the death, and the traceback then blocked on the same full pipe."""
    path, _ = reference_run
    out, held, script = tmp_path / "out", tmp_path / "held", tmp_path / "chatty.py"
    script.write_text(_WRITING_TO_STDERR_WHILE_LOADING)
    env = dict(_env(), RESIDTAP_TEST_HELD=str(held))
    env.pop("PYTHONUNBUFFERED")
    proc = subprocess.Popen([sys.executable, str(script), *_cli(path, out)[3:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _until(proc, held.exists)
        time.sleep(1)  # the pipe (64 KiB) is full long before: the process waits in its write
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = "still running 30 s after SIGTERM"
    finally:
        proc.kill()
        proc.communicate()
    assert rc == -signal.SIGTERM
    assert not out.exists()


# Python run as the command line (sys.argv: its arguments): rank 0's first batch waits there until the
# command line's SIGTERM handler has noted a signal, so that no shard of it can be recorded before one comes;
# it says so by creating $RESIDTAP_TEST_HELD. 60 s without one: it ends at once, leaving the directory as it
# is (which the tests then find).
_HELD_IN_ITS_FIRST_BATCH = """
import os, sys, time
import residtap
ex = sys.modules["residtap.extract"]
check = ex._Run._check_ids
def held(self, ids, first_seq):
    if self.rank == 0 and first_seq == 0:
        open(os.environ["RESIDTAP_TEST_HELD"], "w").close()
        deadline = time.monotonic() + 60
        while not ex._SIGNALS.asked:
            if time.monotonic() > deadline:
                os._exit(99)
            time.sleep(0.01)
    return check(self, ids, first_seq)
ex._Run._check_ids = held
from residtap.cli import main
sys.exit(main(sys.argv[1:]))
"""

TERMINATED_WITH_NOTHING = ("terminated (SIGTERM); no shard was complete yet, so nothing is kept. Run the same "
                           "command again to resume.")


@pytest.mark.slow
def test_sigterm_before_the_first_shard_takes_the_run_back_and_ends_by_sigterm(tmp_path, reference_run):
    """SIGTERM (a scheduler's time limit, kill) while a first run is in its first batch: the cleanup Ctrl-C
    gets runs, so the run is taken back, then one line says so and the process still ends by SIGTERM.
    Before, SIGTERM ended it at once and its manifest refused the corrected command (other settings)."""
    path, _ = reference_run
    out, held, script = tmp_path / "out", tmp_path / "held", tmp_path / "held.py"
    script.write_text(_HELD_IN_ITS_FIRST_BATCH)
    proc = subprocess.Popen([sys.executable, str(script), *_cli(path, out)[3:]], text=True,
                            env=dict(_env(), RESIDTAP_TEST_HELD=str(held)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _until(proc, held.exists)
    assert (out / "manifest.json").exists()  # the run has started the directory
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert not out.exists(), sorted(os.listdir(out))
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, stderr[-3000:])
    assert stdout == "" and stderr == f"residtap extract: {TERMINATED_WITH_NOTHING}\n"


@pytest.mark.slow
def test_a_first_run_that_torchrun_ends_for_another_ranks_failure_is_taken_back(tmp_path, reference_run):
    """Rank 1 fails on its first batch (a token id outside the vocabulary, in its first shard only) and
    torchrun ends rank 0 with SIGTERM while rank 0 is still in its first batch (held there until the signal
    is noted, so that no shard of it is recorded first, however the two are scheduled). Rank 0 then takes the
    run back as when it fails itself (no rank recorded a shard), says so in one line and ends by SIGTERM;
    the corrected command runs to completion. Before, rank 0 died at once and its manifest refused the
    corrected command (other data) as another extraction."""
    path, ref = reference_run
    per_shard = json.loads((ref / "manifest.json").read_text())["settings"]["seqs_per_shard"]
    ids = np.load(path)
    ids[8 * per_shard] = 100  # sequence per_shard: the first of shard 1, rank 1's first (vocabulary 100)
    bad = tmp_path / "bad.npy"
    np.save(bad, ids)
    out, held, script = tmp_path / "out", tmp_path / "held", tmp_path / "held.py"
    script.write_text(_HELD_IN_ITS_FIRST_BATCH)
    first = subprocess.run(_torchrun(bad, out, script=script),
                           env=dict(_env(), RESIDTAP_TEST_HELD=str(held)), capture_output=True, text=True,
                           timeout=180)
    assert first.returncode != 0 and held.exists(), first.stderr[-5000:]  # rank 0 was held when it ended
    assert re.search(rf"data: token id 100 in sequence {per_shard} is outside the model's vocabulary",
                     first.stderr), first.stderr[-5000:]
    assert not out.exists(), (sorted(os.listdir(out)), first.stderr[-5000:])
    assert first.stderr.count(f"residtap extract: rank 0: {TERMINATED_WITH_NOTHING}\n") == 1, first.stderr[-5000:]
    rerun = subprocess.run(_torchrun(path, out), env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_dirs(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


@pytest.mark.slow
def test_a_rank_waiting_for_one_that_failed_says_so_without_a_traceback(tmp_path, reference_run):
    """Rank 1 fails in its eleventh shard (a token id outside the vocabulary); rank 0, with no torchrun to
    end it, goes on and then waits for rank 1 in a collective, which fails as rank 1 is gone. Rank 0
    says that another process stopped and what the directory keeps, in one line, exit status 1: before,
    gloo's error came as a traceback that read as rank 0's own failure. Rank 1's line counts every
    rank's complete shards. The corrected command then resumes to the reference's bytes."""
    import socket

    path, ref = reference_run
    per_shard = json.loads((ref / "manifest.json").read_text())["settings"]["seqs_per_shard"]
    ids = np.load(path)
    first = 21 * per_shard  # the first sequence of shard 21, rank 1's eleventh
    ids[8 * first] = 100  # (vocabulary 100)
    bad, out = tmp_path / "bad.npy", tmp_path / "out"
    np.save(bad, ids)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(_cli(bad, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(_env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in (0, 1)]
    (_, err0), (_, err1) = (p.communicate(timeout=240) for p in procs)
    assert "Traceback" not in err0 + err1, err0[-3000:] + err1[-3000:]
    assert procs[1].returncode != 0
    kept = re.search(rf"^residtap extract: error: --data: token id 100 in sequence {first} is outside the "
                     rf"model's vocabulary \[0, 100\)\. '{re.escape(str(out))}' keeps its (\d+) complete shards: "
                     r"once the input is corrected, the same command resumes after them$", err1, re.M)
    assert kept, err1[-3000:]
    assert procs[0].returncode == 1, err0[-3000:]
    said = re.search(r"^residtap extract: error: rank 0: another process of this run stopped while this one "
                     r"waited for it \(its own error says why; here: Connection closed by peer [^)]*\); "
                     rf"'{re.escape(str(out))}' keeps its (\d+) complete shards and nothing partial\. Once that "
                     r"is mended, the same command resumes$", err0, re.M)
    assert said, err0[-3000:]
    n = len(residtap.store.merged_records([json.loads(open(p).read())
                                           for p in residtap.store.manifest_paths(str(out))]))
    assert int(said.group(1)) == n >= int(kept.group(1)) > 10  # more than rank 1 had of its own: 10
    rerun = subprocess.run(_torchrun(path, out), env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_dirs(ref, out)


# Python run as the command line under torchrun: rank 1 checks the shards it owns slowly (a resume), so that
# rank 0, done with its own, waits in the barrier after them; rank 0 creates $RESIDTAP_TEST_HELD on its way
# there.
_RANK_1_CHECKS_SLOWLY = """
import os, sys, time
import residtap
from residtap import store
ex = sys.modules["residtap.extract"]
hash_file, history = store.sha256_file, ex._with_history
def slow(path):
    if int(os.environ["RANK"]) == 1:
        time.sleep(0.2)
    return hash_file(path)
def held(out, header):
    if int(os.environ["RANK"]) == 0:
        open(os.environ["RESIDTAP_TEST_HELD"], "w").close()
    return history(out, header)
store.sha256_file, ex._with_history = slow, held
store.hash_threads = lambda: 1  # one shard at a time: rank 1's checks take some 20 s
from residtap.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_ended_while_rank_0_waits_for_a_rank_checking_its_shards(tmp_path, reference_run):
    """torchrun's SIGTERM while a resume's rank 1 still checks its shards and rank 0, done, waits for it in
    the barrier: rank 1 takes it at its next check and ends, and rank 0, whose barrier then fails (the peer
    is gone), takes the SIGTERM it noted there too: one line each, no traceback. Before, rank 0 reported
    the barrier's error (gloo's "Connection closed by peer") as an unexpected error with its traceback."""
    path, ref = reference_run
    out, held, script = tmp_path / "out", tmp_path / "held", tmp_path / "slow.py"
    shutil.copytree(ref, out)
    m = json.loads((out / "manifest.json").read_text())
    del m["n_shards"], m["totals"]
    (out / "manifest.json").write_text(json.dumps({**m, "complete": False}))  # as a run killed in its merge
    script.write_text(_RANK_1_CHECKS_SLOWLY)
    proc = subprocess.Popen(_torchrun(path, out, script=script),
                            env=dict(_env(), RESIDTAP_TEST_HELD=str(held)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _until(proc, held.exists, timeout=120)
    time.sleep(2)  # rank 0 is in the barrier; rank 1 has some 20 s of checks left
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert "unexpected error" not in stderr and "Connection closed" not in stderr, stderr[-5000:]
    for rank in (0, 1):
        assert stderr.count(f"residtap extract: rank {rank}: terminated (SIGTERM); {str(out)!r} keeps its 200 "
                            "complete shards and nothing partial.") == 1, stderr[-5000:]
    rerun = subprocess.run(_torchrun(path, out), env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_dirs(ref, out)


def _kill_every_process_writing(out) -> None:
    """SIGKILL every process whose command line names ``out`` (Linux: read from /proc)."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc to find torchrun's workers")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if os.fsencode(str(out)) in args:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _torchrun(path, out, n=2, script=None):
    """torchrun running the command line, or ``script`` (Python run as the command line) in its place."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            *(["-m", "residtap"] if script is None else [str(script)]), *_cli(path, out)[3:]]


@pytest.mark.slow
def test_torchrun_killed_then_rerun_resumes_byte_identical(tmp_path, reference_run):
    """Each rank's part manifest keeps the shards an earlier run finished: before, a rerun's first
    write replaced a part with this run's shards only, and the merge found the others missing."""
    path, ref = reference_run
    out = tmp_path / "out"
    proc = subprocess.Popen(_torchrun(path, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parts = [out / store.part_name(r) for r in range(2)]

    def done():
        try:
            return [len(json.loads(p.read_text())["shards"]) for p in parts]
        except (OSError, ValueError, KeyError):
            return [0, 0]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and min(done()) < 10:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make the input larger"
    _kill_every_process_writing(out)  # torchrun and both workers (each in a session of its own)
    proc.wait()
    before = done()
    assert min(before) >= 10 and sum(before) < 200
    finished = len(store.merged_records([json.loads(p.read_text()) for p in parts]))
    (out / "manifest.rank2.json.tmp").write_text("{")  # a part of a 3-process run, killed mid-write
    rerun = subprocess.run(_torchrun(path, out), env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({finished} already done)" in rerun.stdout
    assert_same_dirs(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, reference_run):
    path, ref = reference_run
    two = subprocess.run(_torchrun(path, tmp_path / "two"), env=_env(), capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    n = json.loads((ref / "manifest.json").read_text())["n_shards"]  # both processes' shards, not rank 0's
    assert f"this run wrote {n} shards (0 already done)" in two.stdout and "over 2 processes" in two.stdout
    assert_same_dirs(ref, tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(ref))  # rank parts merged away


@pytest.mark.slow
def test_a_shard_recomputed_by_torchrun_wins_over_the_stale_record_of_a_single_process_run(tmp_path,
                                                                                           reference_run):
    """An unfinished single-process run lists shard 3 in manifest.json; the file is deleted (after a
    checksum error, say) and a 2-process rerun recomputes it into rank 1's part. Where the two
    records disagree (here the old one is made stale, as bytes from another version would be), the
    merge keeps the one that describes the file: before, manifest.json's came first and won."""
    import shutil

    path, ref = reference_run
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    m = json.loads((out / "manifest.json").read_text())
    done = m["shards"][:12]
    for r in m["shards"][12:]:
        os.remove(out / r["file"])
    os.remove(out / done[3]["file"])
    done[3] = {**done[3], "sha256": "0" * 64}
    unfinished = {k: v for k, v in m.items() if k not in ("n_shards", "totals")}
    (out / "manifest.json").write_text(json.dumps({**unfinished, "complete": False, "shards": done}))
    rerun = subprocess.run(_torchrun(path, out), env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "shard 3 is listed but missing" in rerun.stderr
    assert_same_dirs(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    residtap.open(out, verify=True)


def _ranks(path, out, n=2, before="", timeout=180):
    """The CLI's extraction as ranks 0..n-1 of one gloo group, each process left to its own end (under
    torchrun the first to fail ends the others); ``before``: Python each runs first, with RANK set.
    Returns (returncode, stdout, stderr) per rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = before + "\nimport sys\nfrom residtap.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    procs = [subprocess.Popen([sys.executable, "-c", code, *_cli(path, out)[3:]], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(n)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append((p.returncode, stdout, stderr))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _failing_writes(fails: str, until: str) -> str:
    """Python for _ranks' ``before``: the shard writes for which ``fails`` (of ``i``, the index, and
    ``rank``) is true fail as a full disk does, each once ``until`` is (or after 30 s)."""
    return f"fails = lambda i: {fails}\nuntil = lambda: {until}\n" + _FAIL_WRITES


_FAIL_WRITES = """
import errno, json, os, sys, time
from residtap import store
rank, out, real = int(os.environ["RANK"]), sys.argv[sys.argv.index("--out") + 1], store.save_shard_file
def listed(i):  # the shard rank 1's part lists
    try:
        return any(r["index"] == i for r in json.load(open(os.path.join(out, store.part_name(1))))["shards"])
    except (OSError, ValueError):
        return False
def write(directory, index, tensors, metadata):
    if not fails(index):
        return real(directory, index, tensors, metadata)
    deadline = time.monotonic() + 30
    while not until() and time.monotonic() < deadline:
        time.sleep(0.01)
    raise store.os_error(OSError(errno.ENOSPC, "No space left on device"), f"writing shard {index} to",
                         directory)
store.save_shard_file = write
"""


@pytest.mark.slow
def test_ranks_failing_before_any_shard_take_their_run_back(tmp_path, reference_run):
    """Both ranks of a first run fail before any shard (ids outside the vocabulary): rank 0 takes the
    run back as one process does, so the corrected command is not refused as another extraction (the
    run's data differs) and equals a single-process run. Before, the manifest stayed. Rank 1 is slow to
    read the directory: rank 0 takes the run back only once it has (else rank 1 finds no directory)."""
    path, ref = reference_run
    bad, _ = ids_file(tmp_path, 8 * 40, vocab=200)
    out = tmp_path / "out"
    slow = ("import os, sys, time\nimport residtap\nex = sys.modules['residtap.extract']\nread = ex._with_history\n"
            "ex._with_history = lambda *a: (os.environ['RANK'] == '1' and time.sleep(3)) or read(*a)\n")
    for rc, _, err in _ranks(bad, out, before=slow):
        assert rc == 2 and re.search(r"data: token id \d+ in sequence \d+ is outside the model's vocabulary",
                                     err), err[-3000:]
    assert not out.exists()
    for rc, _, err in _ranks(path, out):
        assert rc == 0, err[-3000:]
    assert_same_dirs(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


@pytest.mark.slow
def test_ranks_resume_an_input_that_changed_past_their_finished_shards(tmp_path):
    """Two processes resume an extraction whose input has changed since (its fingerprint differs): each
    checks its own finished shards and neither computes anything unless both found theirs unchanged (one
    changed under rank 1's shard 3: both refuse, nothing new is written). Grown only, it resumes, rank 0
    alone says so, and the result is a run on the grown input. Rank 0's first shard is held back, so rank 1
    records its first while manifest.json still holds the old fingerprint, which it must not take for its
    run taken back by rank 0."""
    path, arr = ids_file(tmp_path, 8 * 60, vocab=100)
    _single_threaded_run(path, tmp_path / "ref")
    out = tmp_path / "out"
    finished = _interrupted(tmp_path / "ref", out, keep=6)
    grown = np.concatenate([arr, arr[:80]])
    np.save(path, grown)
    _single_threaded_run(path, tmp_path / "grown")
    changed = grown.copy()
    shard_3 = json.loads((out / "manifest.json").read_text())["shards"][3]
    changed[shard_3["seq_start"] * 8] ^= 1  # under rank 1's finished shard 3: both refuse at once
    np.save(path, changed)
    results = _ranks(path, out)
    assert [rc for rc, _, _ in results] == [1, 1], results[1][2][-3000:]
    assert "--data: another process of this run could not match its finished shards" in results[0][2]
    assert "--data: the token sequences of shard 3 differ" in results[1][2]
    assert {f: (out / f).read_bytes() for f in shard_files(out)} == finished
    np.save(path, grown)
    slow = ("import os, sys, time\nimport residtap\nfrom residtap import store\n"
            "real, first = store.save_shard_file, [1]\n"
            "store.save_shard_file = lambda *a: (os.environ['RANK'] == '0' and first and first.pop() and "
            "time.sleep(3)) or real(*a)\n")
    results = _ranks(path, out, before=slow)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "(6 already done)" in results[0][1]
    said = [re.findall(r"the input has changed since .* checking the sequences of its (\d+) finished shards", err)
            for _, _, err in results]
    assert said == [["6"], []]  # the directory's, which the two check three each
    assert_same_dirs(tmp_path / "grown", out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "grown"))


@pytest.mark.slow
def test_a_run_another_rank_recorded_a_shard_of_is_kept_and_resumes(tmp_path, reference_run):
    """Rank 1 records shard 1, then both ranks fail, rank 0 before any shard of its own: the run is
    not taken back (its manifest, rank 1's part and shard stay) and the same command resumes it."""
    path, ref = reference_run
    out = tmp_path / "out"
    before = _failing_writes("rank == 0 or i != 1", "listed(1)")
    for rc, _, err in _ranks(path, out, before=before):
        assert rc == 1 and "no space left on device" in err, err[-3000:]
    assert sorted(os.listdir(out)) == [".residtap.lock", "manifest.json", store.part_name(1), store.shard_name(1)]
    kept = os.stat(out / store.shard_name(1)).st_ino
    results = _ranks(path, out)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "(1 already done)" in results[0][1]
    assert os.stat(out / store.shard_name(1)).st_ino == kept
    assert_same_dirs(ref, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


@pytest.mark.slow
@pytest.mark.parametrize("late_tidy", [False, True], ids=["prompt", "rank-0-slow-to-tidy"])
def test_a_rank_does_not_record_its_first_shard_once_rank_0_took_the_run_back(tmp_path, reference_run, late_tidy):
    """Rank 0 fails before any shard and takes the run back while rank 1's first shard is written but
    not yet published: rank 1 then neither publishes nor records it, nor any other it wrote (that would
    leave a part and a shard without a manifest), removes them and says why; the directory is left empty,
    or gone where rank 1 removed its temporaries before rank 0 tidied up (a loaded machine may delay rank 0
    between the two: late_tidy makes rank 0 tidy up only once they are gone)."""
    path, _ = reference_run
    out = tmp_path / "out"
    # rank 0's write fails once rank 1's shard 1 is being written (the directory is not empty then)
    before = _failing_writes("rank == 0", "os.path.isdir(os.path.join(out, '.shard-000001.safetensors.tmp'))")
    before += """
def written(directory, index, tensors, metadata):  # rank 1: once written, wait for rank 0's take-back
    pending = real(directory, index, tensors, metadata)
    deadline = time.monotonic() + 30
    while os.path.exists(os.path.join(out, store.MANIFEST)):
        if time.monotonic() > deadline:
            raise RuntimeError("rank 0 kept its manifest")
        time.sleep(0.01)
    return pending
if rank == 1:
    store.save_shard_file = written
import residtap
ex = sys.modules["residtap.extract"]
tidy = ex._tidy_if_nothing_there
def late(*a):  # rank 0: once rank 1's temporaries are gone (or after 30 s)
    deadline = time.monotonic() + 30
    while any(f.endswith(".tmp") for f in os.listdir(out)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return tidy(*a)
if rank == 0 and %r:
    ex._tidy_if_nothing_there = late
""" % late_tidy
    (rc0, _, err0), (rc1, _, err1) = _ranks(path, out, before=before)
    assert rc0 == 1 and "no space left on device" in err0, err0[-3000:]
    assert rc1 == 1 and re.search(r"no longer holds this run's manifest: rank 0 failed before any shard was "
                                  r"recorded and took it back .*; rank 1 stops without recording shard "
                                  r"\d*[13579]$", err1, re.M), err1[-3000:]  # one of its own, 1 or one after
    assert not out.exists() if late_tidy else (not out.exists() or os.listdir(out) == [])


@pytest.mark.parametrize("mappable", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("n", [0, 1, 4097, 3 * 1024 + 5])
def test_sha256_file_is_hashlibs_digest_of_the_bytes(tmp_path, monkeypatch, n, mappable):
    """Mapped, in one update; for an empty file, which cannot be memory-mapped, and on a file system where
    mmap fails, read in chunks (1 KiB here: several chunks and a partial last one)."""
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    if not mappable:
        def no_mmap(*_a, **_k):
            raise OSError(errno.ENODEV, "No such device")

        monkeypatch.setattr(store.mmap, "mmap", no_mmap)
    updates, sha256 = [], hashlib.sha256

    class Counting:  # hashlib's sha256, counting its updates
        def __init__(self):
            self.h = sha256()

        def update(self, b):
            updates.append(len(b))
            self.h.update(b)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(store.hashlib, "sha256", Counting)
    assert store.sha256_file(tmp_path / "f", chunk=1024) == sha256(data).hexdigest()
    # Mapped, the whole file in one update, which releases the GIL once: a thread taking it back after
    # each chunk waits up to the switch interval while the forwards' thread runs Python.
    assert updates == ([n] if mappable and n else [min(1024, n - k) for k in range(0, n, 1024)])


def test_merged_records_prefer_the_record_that_describes_the_file(tmp_path):
    data = b"shard bytes"
    (tmp_path / "s.safetensors").write_bytes(data)
    good = {"index": 0, "file": "s.safetensors", "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    stale_size = {**good, "bytes": 3}
    stale_sha = {**good, "sha256": "0" * 64}
    other = {"index": 1, "file": "t.safetensors", "bytes": 1, "sha256": "1" * 64}
    for first in (stale_size, stale_sha):
        manifests = [{"shards": [first, other]}, {"shards": [good]}]
        assert store.merged_records(manifests, str(tmp_path)) == {0: good, 1: other}
        assert store.merged_records(manifests) == {0: first, 1: other}  # no directory: the first
    assert store.merged_records([{"shards": [stale_sha]}, {"shards": [stale_size]}], str(tmp_path))[0] == stale_sha


def test_an_empty_document_adds_nothing_packed_or_padded(tmp_path):
    """An empty text (a JSONL record with "text": "") has no tokens: no sequence when padded and no lone
    [EOS] when packed; the documents after it keep their record index as their source."""
    model = model_on("cpu")
    tok = tokenizer_dir(tmp_path)
    docs = documents(n_docs=6)
    docs[2] = []
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(f"w{t}" for t in d)}) + "\n" for d in docs))
    residtap.extract(model, str(jsonl), tmp_path / "pad", tokenizer=tok, seq_len=8, batch_size=2,
                     packing="pad", progress=False)
    sources = residtap.open(tmp_path / "pad").sequences("source")[:, 0].tolist()
    assert 2 not in sources and sources == [i for i, d in enumerate(docs) for _ in range(0, len(d), 8)]
    residtap.extract(model, str(jsonl), tmp_path / "pack", tokenizer=tok, seq_len=8, batch_size=2,
                     progress=False)
    acts = residtap.open(tmp_path / "pack")
    stream = [t + 3 for d in docs if d for t in d + [-1]]  # -1 + 3 = [EOS], once per non-empty document
    assert acts.sequences("input_ids").flatten().tolist() == stream[:len(stream) // 8 * 8]
    where = [(i, off) for i, d in enumerate(docs) if d for off in range(len(d) + 1)]
    assert acts.sequences("source").tolist() == [list(where[k]) for k in range(0, len(stream) // 8 * 8, 8)]


def test_data_changed_under_a_finished_shard_is_refused_on_resume(tmp_path, monkeypatch):
    """Each shard records the sha256 of the token ids, mask and sources it was made from. A resumed run
    checks the finished shards' inputs against it: a change the file fingerprint (size, first and last
    MiB) cannot see is an error naming the shard, and nothing finished is touched."""
    monkeypatch.setattr(inputs, "_file_fingerprint", lambda path: {"bytes": os.path.getsize(path)})
    path, arr = ids_file(tmp_path, 8 * 24)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    residtap.extract(tiny_gpt2(), path, tmp_path / "ref", **kw)
    ref = residtap.open(tmp_path / "ref")
    records = ref.manifest["shards"]
    for r in records:  # the digest is of what the shard itself stores
        seqs = slice(r["seq_start"], r["seq_stop"])
        block = inputs.Block(r["index"], r["seq_start"], ref.sequences("input_ids")[seqs].numpy(), None,
                             ref.sequences("source")[seqs].numpy())
        assert r["input_sha256"] == block.digest()
    # an interrupted run: the first three shards finished
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    m = json.loads((out / "manifest.json").read_text())
    for r in m["shards"][3:]:
        os.remove(out / r["file"])
    m.update(complete=False, shards=m["shards"][:3])
    for key in ("n_shards", "totals"):
        m.pop(key, None)
    store.write_json_atomic(str(out / "manifest.json"), m)
    finished = {f: (out / f).read_bytes() for f in shard_files(out)}
    changed = arr.copy()
    changed[records[1]["seq_start"] * 8 + 3] ^= 1  # one token of shard 1, same file size
    np.save(path, changed)
    with pytest.raises(residtap.ManifestMismatchError, match=r"data: the token sequences of shard 1 differ"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    assert {f: (out / f).read_bytes() for f in shard_files(out)} == finished
    np.save(path, arr)  # the data restored: the run resumes and ends as the uninterrupted one
    res = residtap.extract(tiny_gpt2(), path, out, **kw)
    assert res.shards_skipped == 3 and res.complete
    assert_same_dirs(tmp_path / "ref", out)


def _interrupted(src, out, keep):
    """A copy of the complete extraction ``src`` as a run killed after its first ``keep`` shards leaves it
    (or, ``keep`` a set of indices, after those: shards finish out of order)."""
    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    kept = (lambda r: r["index"] < keep) if isinstance(keep, int) else (lambda r: r["index"] in keep)
    for r in m["shards"]:
        if not kept(r):
            os.remove(out / r["file"])
    m.update(complete=False, shards=list(filter(kept, m["shards"])))
    for key in ("n_shards", "totals"):
        m.pop(key, None)
    store.write_json_atomic(str(out / "manifest.json"), m)
    return {f: (out / f).read_bytes() for f in shard_files(out)}


def test_the_input_digest_covers_the_attention_mask():
    ids, src = np.array([[3, 1, 1]]), np.array([[0, 0]])
    a = inputs.Block(0, 0, ids, np.array([[1, 0, 0]], bool), src)
    b = inputs.Block(0, 0, ids, np.array([[1, 1, 0]], bool), src)
    assert a.digest() != b.digest() != inputs.Block(0, 0, ids, None, src).digest()
    assert a.digest() == inputs.Block(0, 0, ids.copy(), a.attention_mask.copy(), src.copy()).digest()


def test_a_text_input_resumes_byte_identical_and_refuses_changed_documents(tmp_path, monkeypatch):
    """A resume over a streamed input (JSONL: its finished shards' sequences are read past, not seeked
    over, and their digests checked) after a full disk ends as the uninterrupted run. A document of a
    finished shard changed, or only its padding (same ids and sources: the mask alone differs), where the
    file fingerprint cannot see it, is refused naming the shard, and nothing finished is touched."""
    monkeypatch.setattr(inputs, "_file_fingerprint", lambda path: {})  # blind to any change
    model = tiny_gpt2()
    texts = [" ".join(f"w{t}" for t in d) for d in documents(12)]
    jsonl = tmp_path / "docs.jsonl"

    def write(texts):
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    write(texts)
    kw = dict(tokenizer=tokenizer_dir(tmp_path), seq_len=8, batch_size=2, packing="pad", shard_size="5KiB",
              layers=[2], progress=False)
    residtap.extract(model, str(jsonl), tmp_path / "ref", **kw)
    real, calls = store._save_file, []

    def full_disk(tensors, p, metadata):
        calls.append(p)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, p, metadata)

    monkeypatch.setattr(store, "_save_file", full_disk)
    with pytest.raises(store.StoreError, match="no space left on device"):
        residtap.extract(model, str(jsonl), tmp_path / "out", writers=1, **kw)
    monkeypatch.setattr(store, "_save_file", real)
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]) == 3
    res = residtap.extract(model, str(jsonl), tmp_path / "out", **kw)
    assert res.shards_skipped == 3 and res.shards_written == res.n_shards - 3 > 0
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")

    ref = residtap.open(tmp_path / "ref")
    records, mask = ref.manifest["shards"], ref.sequences("attention_mask")
    finished = _interrupted(tmp_path / "ref", tmp_path / "part", keep=3)
    doc = records[1]["source_first"][0]
    words = texts[doc].split()
    words[0] = "w0" if words[0] != "w0" else "w1"
    write([" ".join(words) if i == doc else t for i, t in enumerate(texts)])
    with pytest.raises(residtap.ManifestMismatchError, match=r"data: the token sequences of shard 1 differ"):
        residtap.extract(model, str(jsonl), tmp_path / "part", **kw)
    # a [PAD] (id 1, the padding's id) at the end of a short last piece: only the mask changes
    shard, k = next((i, k) for i, r in enumerate(records[:3]) for k in range(r["seq_start"], r["seq_stop"])
                    if mask[k].sum() < 8)
    doc = ref.sequences("source")[k, 0].item()
    write([t + " [PAD]" if i == doc else t for i, t in enumerate(texts)])
    with pytest.raises(residtap.ManifestMismatchError,
                       match=rf"data: the token sequences of shard {shard} differ"):
        residtap.extract(model, str(jsonl), tmp_path / "part", **kw)
    assert {f: (tmp_path / "part" / f).read_bytes() for f in shard_files(tmp_path / "part")} == finished
    write(texts)
    assert residtap.extract(model, str(jsonl), tmp_path / "part", **kw).shards_skipped == 3
    assert_same_dirs(tmp_path / "ref", tmp_path / "part")


def test_an_input_fixed_after_a_bad_record_resumes_where_the_run_failed(tmp_path, capsys):
    """A bad record far into a JSONL input fails the run after its first shards. Fixing it changes the file
    (its size, its last MiB), which used to make the directory "an extraction with different settings" for
    good. Each finished shard recorded the digest of its sequences: the run checks them against the fixed
    input and resumes, and ends exactly as a run on the fixed input from the start."""
    docs = [json.dumps({"text": " ".join(f"w{(7 * i + j) % 50}" for j in range(7))}) + "\n" for i in range(1100)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(docs[:1040]) + '{"text": null}\n' + "".join(docs[1041:]))
    kw = dict(tokenizer=tokenizer_dir(tmp_path), seq_len=8, batch_size=16, shard_size="64KiB", progress=False)
    with pytest.raises(ValueError, match=r"text_field: line 1041 of .*docs.jsonl.*got NoneType\. .*out' keeps "
                                         r"its (\d+) complete shards: once the input is corrected, the same "
                                         r"command resumes after them$") as e:
        residtap.extract(tiny_gpt2(), str(path), tmp_path / "out", **kw)
    kept = residtap.open(tmp_path / "out", allow_partial=True).n_shards
    assert f"its {kept} complete shards" in str(e.value)
    assert kept > 50
    finished = {f: (tmp_path / "out" / f).read_bytes() for f in shard_files(tmp_path / "out")}
    path.write_text("".join(docs))
    capsys.readouterr()
    res = residtap.extract(tiny_gpt2(), str(path), tmp_path / "out", **kw)
    assert res.complete and res.shards_skipped == kept and res.shards_written == res.n_shards - kept > 0
    err = capsys.readouterr().err
    assert re.search(r"warning: the input has changed since .*out' was started \(bytes \d+ -> \d+; "
                     r"sha256_head_tail \w+… -> \w+…\); checking the sequences of its "
                     rf"{kept} finished shards", err)
    assert all((tmp_path / "out" / f).read_bytes() == b for f, b in finished.items())
    residtap.extract(tiny_gpt2(), str(path), tmp_path / "ref", **kw)
    assert_same_dirs(tmp_path / "ref", tmp_path / "out")
    ref, out = (residtap.open(tmp_path / d).manifest["settings"] for d in ("ref", "out"))
    assert out == ref  # the fixed input's fingerprint, as a run on it from the start records


def test_a_changed_input_is_checked_against_every_finished_shard_before_anything_is_computed(tmp_path):
    """Where the input's fingerprint changed, the finished shards' sequences are all checked before the first
    forward: a changed one that comes after shards still to compute is refused with nothing new written (the
    check in passing would have written those first), and so is an input that now ends before a finished
    shard. An input that only grew resumes. A complete extraction, or one whose manifest has no input
    digests, is refused as before."""
    path, arr = ids_file(tmp_path, 8 * 40)
    kw = dict(seq_len=8, batch_size=2, shard_size="3KiB", progress=False)
    residtap.extract(tiny_gpt2(), path, tmp_path / "ref", **kw)
    records = residtap.open(tmp_path / "ref").manifest["shards"]
    assert len(records) >= 8
    out = tmp_path / "out"
    finished = _interrupted(tmp_path / "ref", out, keep={0, 1, 2, 5})  # finished out of order
    changed = np.concatenate([arr, arr[:16]])
    changed[records[5]["seq_start"] * 8 + 3] ^= 1
    np.save(path, changed)
    with pytest.raises(residtap.ManifestMismatchError, match=r"data: the token sequences of shard 5 differ"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    assert {f: (out / f).read_bytes() for f in shard_files(out)} == finished
    np.save(path, arr[:records[4]["seq_stop"] * 8])  # now ends with shard 4
    with pytest.raises(residtap.ManifestMismatchError,
                       match=r"data: the input now ends after shard 4, but shard 5 \('shard-0*5.safetensors'\) "
                             r"was finished from it"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    assert {f: (out / f).read_bytes() for f in shard_files(out)} == finished
    grown = np.concatenate([arr, arr[:16]])
    np.save(path, grown)
    res = residtap.extract(tiny_gpt2(), path, out, **kw)
    assert res.complete and res.shards_skipped == 4
    residtap.extract(tiny_gpt2(), path, tmp_path / "grown", **kw)
    assert_same_dirs(tmp_path / "grown", out)

    np.save(path, arr)  # the complete extraction of the grown input, now given the original
    with pytest.raises(residtap.ManifestMismatchError,
                       match=r"data: .*out' holds a complete extraction of an input that has changed since "
                             r"\(bytes \d+ -> \d+; sha256_head_tail \w+… -> \w+…; shape \[\d+\] -> \[\d+\]\)"):
        residtap.extract(tiny_gpt2(), path, out, **kw)
    shutil.rmtree(out)
    _interrupted(tmp_path / "ref", out, keep=2)  # of the original input
    m = json.loads((out / "manifest.json").read_text())
    for r in m["shards"]:
        del r["input_sha256"]  # as residtap wrote them before it recorded input digests
    store.write_json_atomic(str(out / "manifest.json"), m)
    np.save(path, grown)
    with pytest.raises(residtap.ManifestMismatchError, match=r"did not record each shard's input digest"):
        residtap.extract(tiny_gpt2(), path, out, **kw)


def test_a_shard_buffer_is_one_host_allocation():
    """torch's pinned allocator rounds every request up to a power of two. One request per shard buffer
    (views for each output and layer) keeps a default 1GiB shard of GPT-2-small within 1GiB pinned,
    where one request per layer took 13 x 128MiB for 13 x 75MiB."""
    from residtap.extract import _HOST_ALIGN, _HostShard, _host_shard_bytes

    specs = {"resid": ((768,), torch.bfloat16)}
    rows = 48 * 1024  # what shard_size="1GiB" gives for 13 layers, batch 8 x 1024 tokens
    assert _host_shard_bytes(specs, 13, rows, pinned=True) == 1 << 30
    assert _host_shard_bytes(specs, 13, rows, pinned=False) == 13 * rows * 768 * 2
    # a buffer of exactly a power of two is not rounded up to the next one
    assert _host_shard_bytes({"resid": ((1024,), torch.float32)}, 1, 262144, pinned=True) == 1 << 30
    assert _host_shard_bytes({"resid": ((1024,), torch.float32)}, 1, 262144, pinned=False) == 1 << 30
    assert _host_shard_bytes({"resid": ((1024,), torch.float32)}, 1, 262145, pinned=True) == 1 << 31
    specs = {"resid": ((68,), torch.bfloat16), "normed": ((68,), torch.float16), "l2": ((), torch.float32)}
    host = _HostShard(specs, 3, 7, pin=False)
    base, end = host.memory.data_ptr(), 0
    for name, (tail, dtype) in specs.items():
        assert len(host.out[name]) == 3
        for t in host.out[name]:
            start = t.data_ptr() - base
            assert t.shape == (7, *tail) and t.dtype == dtype and t.is_contiguous()
            assert start % _HOST_ALIGN == 0 and start >= end  # aligned, in order, disjoint
            end = start + t.numel() * t.element_size()
    assert end <= host.memory.numel() == _host_shard_bytes(specs, 3, 7, pinned=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_shard_buffer_views_are_pinned_and_take_asynchronous_copies():
    from residtap.extract import _HostShard

    specs = {"resid": ((768,), torch.bfloat16), "mean": ((), torch.float32)}
    host = _HostShard(specs, 3, 4096, pin=True)
    assert host.memory.is_pinned() and all(t.is_pinned() for ts in host.out.values() for t in ts)
    src = torch.randn(3, 4096, 768, device="cuda").bfloat16()
    for layer, dst in enumerate(host.out["resid"]):
        dst.copy_(src[layer], non_blocking=True)
    torch.cuda.synchronize()
    assert all(torch.equal(dst, src[k].cpu()) for k, dst in enumerate(host.out["resid"]))


# ------------------------------------------------------------------------------ store and size units
def test_manifest_and_shard_temporaries_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    """Crash safety (store's docstring): written, fsynced, then renamed. Without the fsync of the
    temporary a power loss after the rename can leave an empty or partial manifest or shard."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(store.os, "fsync", fsync)
    monkeypatch.setattr(store.os, "replace", replace)
    d = os.path.realpath(tmp_path)
    for write, final in ((lambda: store.write_json_atomic(os.path.join(d, "manifest.json"), {"a": 1}),
                          os.path.join(d, "manifest.json")),
                         (lambda: store.write_shard(d, 0, {"x": torch.arange(3.0)}, {"shard": 0}),
                          os.path.join(d, store.shard_name(0)))):
        events.clear()
        write()
        renames = [e for e in events if e[0] == "replace" and e[2] == final]
        assert len(renames) == 1, events
        tmp = renames[0][1]
        assert tmp != final and ("fsync", tmp) in events, events
        assert events.index(("fsync", tmp)) < events.index(renames[0]), events
        assert events[-1] == ("fsync", d)  # and the rename itself made durable
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}


def test_stale_temporaries_are_removed_only_for_the_shards_this_rank_owns(tmp_path):
    """Under torchrun another rank may be writing its shard's temporary while this one cleans up."""
    for i in (0, 1):  # the current naming: a directory per shard
        (tmp_path / f".{store.shard_name(i)}.tmp").mkdir()
        (tmp_path / f".{store.shard_name(i)}.tmp" / store.shard_name(i)).write_bytes(b"partial")
    for i in (2, 3):  # bare temporary files, as earlier builds wrote
        (tmp_path / f".{store.shard_name(i)}.tmp").write_bytes(b"partial")
    (tmp_path / ".shard-x.safetensors.tmp").write_bytes(b"not a shard's")
    store.remove_stale_temporaries(str(tmp_path), lambda i: i % 2 == 1)  # rank 1 of 2
    assert sorted(os.listdir(tmp_path)) == [f".{store.shard_name(0)}.tmp", f".{store.shard_name(2)}.tmp",
                                            ".shard-x.safetensors.tmp"]
    assert (tmp_path / f".{store.shard_name(0)}.tmp" / store.shard_name(0)).read_bytes() == b"partial"
    store.remove_stale_temporaries(str(tmp_path), lambda i: True)
    assert os.listdir(tmp_path) == [".shard-x.safetensors.tmp"]


def test_a_full_disk_or_quota_says_that_a_rerun_resumes():
    for code, why in ((errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")):
        msg = str(store.os_error(OSError(code, os.strerror(code)), "writing shard 3 to", "/x"))
        assert why in msg and "resumes" in msg and f"errno {code}" in msg, msg
    msg = str(store.os_error(OSError(errno.EIO, "Input/output error"), "reading shard 3", "/x"))
    assert "resumes" not in msg and "Input/output error" in msg


def test_parse_size():
    from residtap.extract import parse_size

    table = {"1B": 1, "1b": 1, "7": 7, "1kB": 1000, "1kb": 1000, "1MB": 10**6, "1GB": 10**9,
             "1TB": 10**12, "1KiB": 1024, "1MiB": 2**20, "1GiB": 2**30, "1TiB": 2**40,
             "2.5GB": 2_500_000_000, "512MB": 512 * 10**6, "512MiB": 512 * 2**20, " 3 KiB ": 3072,
             4096: 4096, np.int64(5): 5}
    for value, want in table.items():
        got = parse_size(value, "shard_size")
        assert got == want and type(got) is int, (value, got)
    for value in ("0", "0.4", "0B", "0.0004kB", 0, -1):
        with pytest.raises(ValueError, match=r"^shard_size: expected a positive size"):
            parse_size(value, "shard_size")
    for value in ("lots", "1 XB", "-1", "", True, 1.5, None):
        with pytest.raises(ValueError, match=r"^host_memory: expected a byte count"):
            parse_size(value, "host_memory")


def test_another_format_version_and_unfinished_rank_parts(tmp_path):
    """A manifest of another format_version is refused, not read as this one. An unfinished
    multi-process run (rank parts, each rank's shards) read with allow_partial gives its rows in
    extraction order, whatever order the parts list them in."""
    path, _ = ids_file(tmp_path, 8 * 30)
    out = tmp_path / "out"
    residtap.extract(tiny_gpt2(), path, out, seq_len=8, batch_size=2, shard_size="5KiB", layers=[1],
                     progress=False)
    full = residtap.open(out)
    rows, seq_index = full.layer(1).to_tensor(), full.column("seq_index").to_tensor()
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["shards"]) >= 4
    for version in (2, None):
        store.write_json_atomic(str(out / "manifest.json"), {**m, "format_version": version})
        with pytest.raises(store.StoreError, match=f"format_version {version}"):
            residtap.open(out)
    head = {k: v for k, v in m.items() if k not in ("n_shards", "totals", "shards")} | {"complete": False}
    store.write_json_atomic(str(out / "manifest.json"), head | {"shards": []})
    for r in (0, 1):
        store.write_json_atomic(str(out / store.part_name(r)),
                                head | {"shards": [s for s in m["shards"] if s["index"] % 2 == r]})
    for keep_main in (True, False):
        if not keep_main:
            (out / "manifest.json").unlink()
        acts = residtap.open(out, allow_partial=True)
        assert [r["index"] for r in acts.records] == list(range(len(m["shards"])))
        si = acts.column("seq_index").to_tensor()
        assert bool((si[1:] >= si[:-1]).all()) and torch.equal(si, seq_index)
        assert torch.equal(acts.layer(1).to_tensor(), rows)


def test_an_input_shorter_than_one_sequence_is_an_error(tmp_path):
    path, _ = ids_file(tmp_path, 5)
    with pytest.raises(ValueError, match="no complete sequence of 8 tokens"):
        residtap.extract(tiny_gpt2(), path, tmp_path / "out", seq_len=8, progress=False)
    assert not (tmp_path / "out").exists()  # not an extraction "complete" with no shard


def test_padded_rows_compacted_by_a_writer_count_in_host_memory(tmp_path):
    """packing="pad" with positions other than "last": each writer compacts the real-token rows into a
    copy of the shard buffer, which host_memory must pay for too (4KiB shards here: 8KiB each)."""
    docs = tmp_path / "d.txt"
    docs.write_text("\n".join(["w1 w2 w3"] * 40) + "\n")
    kw = dict(seq_len=8, batch_size=2, packing="pad", tokenizer=tokenizer_dir(tmp_path), shard_size="4KiB",
              layers=[1], progress=False)
    with pytest.raises(ValueError, match="host_memory: a shard of 2 sequences takes 8192 bytes"):
        residtap.extract(tiny_gpt2(), str(docs), tmp_path / "tight", host_memory="12KiB", **kw)
    assert residtap.extract(tiny_gpt2(), str(docs), tmp_path / "two", host_memory="16KiB", **kw).writers == 1
    assert residtap.extract(tiny_gpt2(), str(docs), tmp_path / "three", host_memory="24KiB",
                            **kw).writers == 2


def _reopen_last_shard(out):
    """Make a complete extraction an unfinished one whose last shard is still to be written."""
    m = json.loads((out / "manifest.json").read_text())
    os.remove(out / m["shards"][-1]["file"])
    store.write_json_atomic(str(out / "manifest.json"),
                            {k: v for k, v in m.items() if k not in ("n_shards", "totals")}
                            | {"complete": False, "shards": m["shards"][:-1]})
    return sorted(r["index"] for r in m["shards"][:-1])


def test_a_resume_hashes_the_finished_shards_unless_told_not_to(tmp_path, monkeypatch, capsys):
    """verify_existing=False (--no-verify-existing) checks finished shards by size only; by default a
    resume hashes every one of them."""
    hashed = []
    real = store._sha256_of_shard
    monkeypatch.setattr(store, "_sha256_of_shard", lambda p, i: hashed.append(int(i)) or real(p, i))
    path, _ = ids_file(tmp_path, 8 * 30, vocab=90)  # within tiny_gpt2's and RANDOM's vocabularies
    out = tmp_path / "out"
    kw = dict(seq_len=8, batch_size=2, shard_size="5KiB", layers=[1], progress=False)
    residtap.extract(tiny_gpt2(), path, out, **kw)
    for verify in (False, True):
        finished = _reopen_last_shard(out)
        assert len(finished) > 2
        hashed.clear()
        res = residtap.extract(tiny_gpt2(), path, out, verify_existing=verify, **kw)
        assert res.complete and res.shards_written == 1
        assert sorted(hashed) == (finished if verify else []), (verify, hashed)
    cli = tmp_path / "cli"
    args = ["extract", "--model", RANDOM, "--data", path, "--out", str(cli), "--no-progress", "--seq-len", "8",
            "--batch-size", "2", "--shard-size", "5KiB", "--layers", "1"]
    assert cli_main(args) == 0
    for flag in (["--no-verify-existing"], []):
        finished = _reopen_last_shard(cli)
        hashed.clear()
        assert cli_main(args + flag) == 0
        assert sorted(hashed) == ([] if flag else finished), (flag, hashed)
    residtap.open(cli, verify=True)
    capsys.readouterr()
