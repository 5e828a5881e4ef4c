"""The README's Python examples run as written, so that the documented API cannot drift from the code."""

from __future__ import annotations

import pathlib
import re

import numpy as np
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


def test_every_python_example_is_run_here():
    assert len(BLOCKS) == 2, "README.md has a new Python example: run it in tests/test_readme.py"
