"""Models dispatched by accelerate (the machinery behind HF's ``device_map``), on the CPU: weights
offloaded to the meta device or to disk and loaded into each module by accelerate's hooks at its
forward. This is the real integration residtap meets under ``device_map``, minus the second device
(tests/test_device_map.py has those); outputs must equal the reference on the same model, not
dispatched, bit for bit."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import residtap
from helpers import assert_same_outputs, ids_for, tiny_gpt2
from residtap.reference import OUTPUTS, run_reference

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[dev]')")


def dispatched(kind, tmp_path):
    model = copy.deepcopy(tiny_gpt2(n_layer=3, n_embd=64, n_head=2))
    if kind == "cpu_offload":  # every weight on the meta device, brought in per module
        return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    if kind == "disk_offload":
        return accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    # a device_map: blocks 1-2 and the final norm offloaded to disk, the rest kept on the CPU
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk",
                  "transformer.ln_f": "disk", "lm_head": "cpu"}
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "map"))


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload", "device_map"])
@pytest.mark.parametrize("positions", [None, "last", [0, -1]], ids=["all", "last", "list"])
def test_dispatched_model_matches_reference(extension, tmp_path, kind, positions):
    plain = tiny_gpt2(n_layer=3, n_embd=64, n_head=2)
    model = dispatched(kind, tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    ids = ids_for(plain, 2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = run_reference(plain, ids, attention_mask=mask, positions=positions, outputs=OUTPUTS)
    cap = residtap.Capture(model, positions=positions, outputs=OUTPUTS, backend="compiled")
    for _ in range(2):  # a second forward reuses what the first set up
        with cap, torch.no_grad():
            model(ids, attention_mask=mask)
    assert cap.devices == [torch.device("cpu")] * len(cap.layer_ids)
    assert_same_outputs(cap, ref, OUTPUTS)
    # The reference itself runs on the dispatched model too (final norm weights on meta or disk).
    on_model = run_reference(model, ids, attention_mask=mask, positions=positions, outputs=OUTPUTS)
    assert_same_outputs(cap, on_model, OUTPUTS)


def test_verify_on_an_offloaded_model(extension, tmp_path):
    model = dispatched("cpu_offload", tmp_path)
    ids = ids_for(model, 2, 9)
    report = residtap.verify(model, ids)
    assert report.ok and report.has_final_norm
    assert report.rows[-1].matches == "normed"


def _same_extraction(a, b, layer_ids, outputs):
    acts_a, acts_b = residtap.open(a, verify=True), residtap.open(b, verify=True)
    assert acts_a.n_rows == acts_b.n_rows > 0
    for lid in layer_ids:
        for name in outputs:
            x, y = acts_a.layer(lid, name), acts_b.layer(lid, name)
            assert torch.equal(x[0:len(x)], y[0:len(y)]), (lid, name)


def test_inputs_go_where_the_embeddings_compute(tmp_path):
    from residtap.extract import _input_device

    model = dispatched("cpu_offload", tmp_path)
    assert next(model.parameters()).device.type == "meta"
    assert _input_device(model, torch.device("meta")) == torch.device("cpu")


def test_extract_an_offloaded_module(extension, tmp_path):
    """Every weight on "meta", brought in by accelerate's hooks: the same shards as the plain model."""
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 97, size=8 * 12).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    kw = dict(layers=[0, 2, 3], outputs=("resid", "normed", "stats"), seq_len=8, batch_size=4,
              progress=False)
    residtap.extract(tiny_gpt2(n_layer=3, n_embd=64, n_head=2), str(tmp_path / "ids.npy"),
                     tmp_path / "plain", **kw)
    residtap.extract(dispatched("cpu_offload", tmp_path), str(tmp_path / "ids.npy"), tmp_path / "off",
                     model_name=None, **kw)
    _same_extraction(tmp_path / "plain", tmp_path / "off", [0, 2, 3], ("resid", "normed", "mean", "rstd"))


def test_extract_device_map_flag(extension, tmp_path):
    """--device-map loads a saved model through accelerate (on this CPU-only machine everything
    lands on the CPU, offloaded where the map says so) and extracts what the plain load gives."""
    import json
    import subprocess
    import sys

    import numpy as np

    model_dir = tmp_path / "model"
    tiny_gpt2(n_layer=3, n_embd=64, n_head=2).save_pretrained(model_dir)
    np.save(tmp_path / "ids.npy", np.random.default_rng(1).integers(0, 97, size=6 * 10).astype(np.int32))
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h": "cpu",
                  "transformer.ln_f": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    common = [sys.executable, "-m", "residtap", "extract", "--model", str(model_dir), "--data",
              str(tmp_path / "ids.npy"), "--layers", "0,3", "--outputs", "resid,normed", "--seq-len", "10",
              "--batch-size", "3", "--no-progress"]
    runs = (("plain", ["--device", "cpu"]), ("mapped", ["--device-map", str(tmp_path / "map.json")]),
            ("auto", ["--device-map", "auto"]))
    for out, extra in runs:
        r = subprocess.run(common + ["--out", str(tmp_path / out), *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    _same_extraction(tmp_path / "plain", tmp_path / "mapped", [0, 3], ("resid", "normed"))
    _same_extraction(tmp_path / "plain", tmp_path / "auto", [0, 3], ("resid", "normed"))


def test_extract_device_map_needs_a_model_by_name(tmp_path):
    with pytest.raises(ValueError, match="device_map: only applies"):
        residtap.extract(tiny_gpt2(), "unused.npy", tmp_path / "out", device_map="auto")


def _module_device_as_before(module):
    """arch.module_device as it was written first: accelerate's hook through getattr, then the first
    parameter not on the meta device that ``module.parameters()`` yields."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next((p.device for p in module.parameters() if p.device.type != "meta"), None)


@pytest.mark.parametrize("kind", ["plain", "cpu_offload", "disk_offload", "device_map"])
def test_module_device_walk_agrees_with_parameters(tmp_path, kind):
    """module_device's own walk of the modules (cheaper than ``parameters()``) gives the same device
    for every module of a model, dispatched by accelerate or not, and of modules built to trip it: the
    first submodule's weights on the meta device, all of them, a None parameter and submodule, a
    module shared twice, no parameters at all."""
    from residtap.arch import module_device

    model = (copy.deepcopy(tiny_gpt2(n_layer=3, n_embd=64, n_head=2)) if kind == "plain"
             else dispatched(kind, tmp_path))
    odd = torch.nn.Module()
    odd.register_parameter("absent", None)
    odd.register_module("missing", None)
    odd.meta = torch.nn.Linear(2, 2, device="meta")
    shared = torch.nn.Linear(2, 2)
    odd.inner = torch.nn.Sequential(torch.nn.ReLU(), shared, shared)
    all_meta = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"))
    modules = [*model.modules(), odd, all_meta, torch.nn.Sequential()]
    got = [module_device(m) for m in modules]
    assert got == [_module_device_as_before(m) for m in modules]
    assert module_device(odd) == torch.device("cpu") and module_device(all_meta) is None
    # The order, with a device per parameter (a CPU machine has one real device): stand-ins that carry
    # only a device, put where parameters() finds them
    class Stub:
        def __init__(self, name):
            self.device = torch.device("meta") if name == "meta" else types.SimpleNamespace(type=name)

    def holder(*names, children=()):
        m = torch.nn.Module()
        for i, name in enumerate(names):
            m._parameters[f"p{i}"] = Stub(name)
        for i, child in enumerate(children):
            m.add_module(f"c{i}", child)
        return m

    tree = holder(children=[holder("meta"), holder(children=[holder(), holder("a", "b")]), holder("c")])
    assert module_device(tree).type == "a" == _module_device_as_before(tree).type
    tree = holder("meta", children=[holder("meta"), holder(children=[holder(), holder("meta")]),
                                   holder("meta", "d"), holder("e")])
    assert module_device(tree).type == "d" == _module_device_as_before(tree).type
    if kind == "cpu_offload":  # weights on the meta device: the device comes from accelerate's hook alone
        block = model.transformer.h[0].ln_1
        assert all(p.device.type == "meta" for p in block.parameters())
        assert module_device(block) == torch.device("cpu")
