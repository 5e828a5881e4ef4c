"""The parity guard's plumbing, on CPU: what a capture asks the op for when the guard says the
fused norm differs from torch (on a GPU the guard itself runs in tests/test_cuda.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import residtap
from helpers import DTYPES, assert_same_outputs, ids_for, tiny_gpt2
from residtap import backend, ops
from residtap.reference import OUTPUTS, run_reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probe_runs_and_agrees_on_cpu(extension, dtype):
    w = torch.randn(96).to(dtype)
    b = torch.randn(96).to(dtype)
    assert backend._probe_parity(torch.device("cpu"), dtype, 96, w, b, 1e-5) == (True, "")
    assert backend._probe_parity(torch.device("cpu"), dtype, 96, None, None, 1e-5) == (True, "")
    # a LayerNorm without weight and bias: normed is probed too, not only the moments
    assert backend._probe_parity(torch.device("cpu"), dtype, 96, None, None, 1e-5, True) == (True, "")


def test_the_probe_of_a_layer_norm_without_weight_and_bias_checks_normed(extension, monkeypatch):
    kinds = []
    real = ops.capture_block

    def spy(*args, **kwargs):
        kinds.append(kwargs["norm_kind"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "capture_block", spy)
    assert backend._probe_parity(torch.device("cpu"), torch.float32, 64, None, None, 1e-5, True)[0]
    assert set(kinds) == {"layer_norm"}
    kinds.clear()
    assert backend._probe_parity(torch.device("cpu"), torch.float32, 64, None, None, 1e-5)[0]
    assert set(kinds) == {"none"}  # the stats-only moments


def test_only_cuda_is_probed():
    assert backend.norm_parity("cpu", torch.float32, 64) is True
    assert backend.norm_parity("cpu", torch.float32, 64, probe=False) is True


@pytest.mark.parametrize("verdict,outputs,kind", [
    (True, OUTPUTS, "layer_norm"),
    (False, OUTPUTS, "torch_layer_norm"),
    (None, OUTPUTS, "torch_layer_norm"),  # never probed (first seen inside a forward): torch's norm
    (False, ("resid", "stats"), "torch_layer_norm"),
    (True, ("resid", "stats"), "none"),
    (False, ("resid", "delta"), "none"),  # nothing norm-related requested: nothing to guard
])
def test_capture_follows_the_guard(extension, monkeypatch, verdict, outputs, kind):
    """Pretend the model runs where the guard applies; the op must be asked for torch's norm when
    the guard failed or never ran, and the outputs stay exactly the reference's."""
    seen_kinds, probes = [], []

    def fake_parity(device, dtype, d_model, weight=None, bias=None, eps=1e-5, *, normed=None, probe=True):
        probes.append(probe)
        return verdict

    real_op = ops.capture_block

    def spy(*args, **kwargs):
        seen_kinds.append(kwargs["norm_kind"])
        return real_op(*args, **kwargs)

    monkeypatch.setattr(backend, "norm_parity", fake_parity)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(ops, "capture_block", spy)
    model = tiny_gpt2()
    ids = ids_for(model, 2, 7)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):  # a second capture of the same combination does not warn again
            cap = residtap.Capture(model, outputs=outputs, backend="compiled")
            with cap, torch.no_grad():
                model(ids)
    assert set(seen_kinds) == {kind}
    assert all(p is False for p in probes)  # nothing probes inside a forward
    assert_same_outputs(cap, run_reference(model, ids, outputs=outputs), outputs)
    # Never probed: exact all the same, and one warning says why it is slower.
    unprobed = [w for w in record if "not checked against torch" in str(w.message)]
    assert len(unprobed) == (1 if verdict is None and kind != "none" else 0)
