"""The README's Python examples run as written, so that the documented API cannot drift from the code."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
import torch

import residtap
from helpers import ids_for, tiny_gpt2

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"README.md: expected one Python example containing {marker!r}, found {len(found)}"
    return found[0]


def test_the_use_example_runs(extension, capsys):
    model = tiny_gpt2(n_layer=3)
    input_ids = ids_for(model, 2, 8)
    ns = {"model": model, "input_ids": input_ids}
    exec(compile(_block("residtap.capture("), "README.md (Use)", "exec"), ns)
    assert ns["report"].ok and "OK" in capsys.readouterr().out
    cap = ns["cap"]
    assert cap.layer_ids == [0, 1, 2, 3]
    assert cap.resid.shape == cap.delta.shape == cap.normed.shape == (4, 2, 8, 64)
    assert cap.stats.l2.shape == (4, 2, 8) and cap.stats.l2.dtype == torch.float32
    with torch.no_grad():  # what the comments promise: the last normed entry is hidden_states[-1]
        hs = model(input_ids, output_hidden_states=True).hidden_states
    assert torch.equal(cap.normed[-1], hs[-1]) and torch.equal(cap.resid[1], hs[1])


def test_the_extraction_example_runs(extension, tmp_path, monkeypatch):
    model = tiny_gpt2(n_layer=6)
    np.save(tmp_path / "ids.npy", ids_for(model, 1, 12 * 16).reshape(-1).int().numpy())
    monkeypatch.chdir(tmp_path)
    residtap.extract(model, "ids.npy", "acts/", seq_len=16, batch_size=4, progress=False)
    ns = {"residtap": residtap, "torch": torch}
    exec(compile(_block("residtap.open("), "README.md (Extraction)", "exec"), ns)
    assert ns["acts"].layer(6).shape == (12 * 16, 64)
    batch = next(iter(ns["ds"]))
    assert batch.shape == (12 * 16, 64)  # fewer rows than batch_size: one batch of all of them
    assert [b.shape for b in ns["loader"]] == [(12 * 16, 64)]  # from whichever worker holds them


def test_the_pretokenizing_example_gives_the_jsonl_files_shards(tmp_path, monkeypatch):
    """What the README promises of its pre-tokenized dataset: extraction from it writes the very shards
    (bytes, tokens and sources) that extraction from the JSONL file through the tokenizer writes, packed
    and padded, with blank lines, CRLF line ends, empty texts and other fields in the file."""
    datasets = pytest.importorskip("datasets")  # optional: pip install 'residtap[data]'
    from test_extract import tokenizer_dir
    from transformers import AutoTokenizer

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path))
    rng = np.random.default_rng(0)
    with open("corpus.jsonl", "w", newline="") as f:
        for i in range(300):
            text = " ".join(f"w{v}" for v in rng.integers(0, 90, int(rng.integers(0, 40))))
            f.write(json.dumps({"n": i, "text": text}) + ("\r\n" if i % 7 == 0 else "\n"))
            if i % 11 == 0:
                f.write("\n")
    ns = {"tok": tok}
    exec(compile(_block("save_to_disk("), "README.md (pre-tokenizing)", "exec"), ns)
    model = tiny_gpt2(n_layer=2)
    for packing in ("pack", "pad"):
        manifests = []
        for data in ("corpus.jsonl", "corpus-ids/"):
            out = f"acts-{packing}-{data.strip('/')}"
            residtap.extract(model, data, out, seq_len=16, batch_size=4, packing=packing, tokenizer=tok,
                             shard_size="4KiB", progress=False)
            manifests.append(json.loads(pathlib.Path(out, "manifest.json").read_text()))
        text, ids = manifests
        assert text["settings"]["data"]["kind"] == "jsonl" and ids["settings"]["data"]["kind"] == "hf_dataset"
        assert len(text["shards"]) > 5, packing
        for m in manifests:
            del m["settings"]["data"]
        assert text == ids, packing


def test_every_python_example_is_run_here():
    assert len(BLOCKS) == 3, "README.md has a new Python example: run it in tests/test_readme.py"
