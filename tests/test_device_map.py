"""Models spread over several devices: each layer's buffers on its own device, the per-layer
accessors, and extract copying each layer out from where it is.

Most machines running these tests have one device, so the first tests force the storage a model on
several devices gets (``Capture._stacked_on`` patched: a buffer per layer) or make residtap expect
the layers elsewhere than they arrive, and compare with the reference bit for bit. The tests at the
end move blocks to a second real device (the CPU and a GPU, or two GPUs) and skip where there is
none.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

import residtap
from helpers import DTYPES, assert_l2_close, assert_same_dirs, ids_file, ids_for, padded, tiny_gpt2
from residtap import reference
from residtap.reference import OUTPUTS, STAT_NAMES, Stats, run_reference
from residtap.selection import resolve_positions

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.fixture
def per_layer(monkeypatch):
    """The storage a model on several devices gets, on this machine's one device: a buffer per layer."""
    monkeypatch.setattr(residtap.Capture, "_stacked_on", lambda self, devices: False)


def ref_layer(ref, name, k):
    """Layer ``k`` of a stacked reference output."""
    if name == "stats":
        return Stats(*(s[k] for s in ref.outputs["stats"]))
    return ref.outputs[name][k]


def assert_layer_equal(got, want, what):
    """One layer's output (a tensor or Stats) equals the reference bit for bit; l2 within 2 ulp."""
    if isinstance(want, Stats):
        for stat in ("mean", "rstd", "maxabs"):
            g, w = getattr(got, stat), getattr(want, stat)
            assert g.device == w.device and torch.equal(g, w), f"{what}: stats.{stat} differs"
        assert_l2_close(got.l2.cpu(), want.l2.cpu().double())
    else:
        assert got.dtype == want.dtype and got.shape == want.shape, \
            f"{what}: {got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}"
        assert got.device == want.device, f"{what}: on {got.device}, the reference on {want.device}"
        assert torch.equal(got, want), f"{what} differs"


# ------------------------------------------------------------------------------ one buffer per layer
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positions", [None, [4, 0, -1], slice(1, 5), "last", "mask"], ids=str)
def test_per_layer_buffers_match_reference(extension, per_layer, dtype, positions):
    model = tiny_gpt2(3, 66, 3, dtype)
    ids = ids_for(model, 3, 7)
    positions, kwargs = padded(ids, positions, left=(0, 2), right=(2, 5))
    cap = residtap.Capture(model, positions=positions, outputs=OUTPUTS, backend="compiled")
    ref = run_reference(model, ids, positions=positions, outputs=OUTPUTS, **kwargs)
    for _ in range(2):  # the second forward reuses the per-layer buffers
        with cap, torch.no_grad():
            model(ids, **kwargs)
        for name in OUTPUTS:
            per_layer_out = cap.per_layer(name)
            assert len(per_layer_out) == len(cap.layer_ids) == 4
            for k, lid in enumerate(cap.layer_ids):
                want = ref_layer(ref, name, k)
                assert_layer_equal(cap.layer(name, lid), want, f"{name}[{lid}]")
                assert_layer_equal(per_layer_out[k], want, f"per_layer {name}[{k}]")
    storages = {cap.layer("resid", lid).untyped_storage().data_ptr() for lid in cap.layer_ids}
    assert len(storages) == 4  # really one buffer per layer, not views into one stack
    assert cap.devices == [torch.device("cpu")] * 4


@pytest.mark.parametrize("layers", [[0, 2], [-1], 1], ids=str)
@pytest.mark.parametrize("outputs", [("resid",), ("normed", "stats"), ("delta",)], ids=str)
def test_per_layer_buffers_layer_and_output_subsets(extension, per_layer, layers, outputs):
    model = tiny_gpt2(2, 64, 2, torch.bfloat16)
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, layers=layers, outputs=outputs, dtype=torch.float32) as cap, \
            torch.no_grad():
        model(ids)
    ref = run_reference(model, ids, layers=layers, outputs=outputs, dtype=torch.float32)
    assert cap.layer_ids == ref.layer_ids
    for name in outputs:
        for k, lid in enumerate(cap.layer_ids):
            assert_layer_equal(cap.layer(name, lid), ref_layer(ref, name, k), f"{name}[{lid}]")


def test_stacked_outputs_refuse_clearly_when_stored_per_layer(extension, per_layer):
    model = tiny_gpt2()
    with residtap.capture(model, layers=[0, 2], outputs=OUTPUTS) as cap, torch.no_grad():
        model(ids_for(model, 1, 4))
    for name in OUTPUTS:
        with pytest.raises(residtap.CaptureError, match=rf"cap\.{name}: the captured layers live on several "
                                                        r"devices \(cpu: layers \[0, 2\]\)") as e:
            getattr(cap, name)
        assert f"cap.layer({name!r}, layer_id)" in str(e.value)
        assert f"cap.per_layer({name!r})" in str(e.value) and "torch.stack" in str(e.value)
    gathered = torch.stack([t.to("cpu") for t in cap.per_layer("resid")])  # the gather the error shows
    assert gathered.shape == (2, 1, 4, 64)


# ------------------------------------------------------------------------------ accessors, one device
def test_layer_is_a_view_into_the_stacked_buffer(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 6)
    with residtap.capture(model, layers=[0, 2], positions=[1, -1], outputs=OUTPUTS) as cap, \
            torch.no_grad():
        model(ids)
    assert cap.devices == [torch.device("cpu")] * 2
    for k, lid in enumerate(cap.layer_ids):
        for name in ("resid", "delta", "normed"):
            view = cap.layer(name, lid)
            assert view.shape == (2, 2, 64) and view.data_ptr() == getattr(cap, name)[k].data_ptr()
        stats = cap.layer("stats", lid)
        for stat in STAT_NAMES:
            assert getattr(stats, stat).data_ptr() == getattr(cap.stats, stat)[k].data_ptr()
    assert cap.layer("resid", -1).data_ptr() == cap.resid[1].data_ptr()  # -1: the last residual, 2
    assert [t.data_ptr() for t in cap.per_layer("resid")] == [cap.resid[0].data_ptr(),
                                                              cap.resid[1].data_ptr()]


def test_layer_with_a_bool_mask_is_packed(extension):
    model = tiny_gpt2()
    ids = ids_for(model, 2, 5)
    keep = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    with residtap.capture(model, positions=keep, outputs=("resid", "stats")) as cap, torch.no_grad():
        model(ids)
    assert cap.layer("resid", 1).shape == (4, 64) and torch.equal(cap.layer("resid", 1), cap.resid[1])
    assert cap.layer("stats", 1).mean.shape == (4,)


def test_layer_errors(extension):
    model = tiny_gpt2()
    cap = residtap.Capture(model, layers=[0, 2], outputs=("resid",))
    with pytest.raises(residtap.CaptureError, match="no forward has run"):
        cap.layer("resid", 0)
    with pytest.raises(residtap.CaptureError, match="cap.devices: no forward has run"):
        cap.devices
    with cap, torch.no_grad():
        model(ids_for(model, 1, 3))
    with pytest.raises(residtap.CaptureError, match=r"index 1 was not captured \(layer_ids=\[0, 2\]\)"):
        cap.layer("resid", 1)
    with pytest.raises(residtap.CaptureError, match="'normed' was not requested"):
        cap.layer("normed", 0)
    with pytest.raises(ValueError, match=r"output: expected one of .* got 'mean'"):
        cap.layer("mean", 0)
    with pytest.raises(ValueError, match="layer_id: expected an int residual index, got str"):
        cap.layer("resid", "0")
    with pytest.raises(ValueError, match="layer_id: expected an int residual index, got bool"):
        cap.layer("resid", True)


# ------------------------------------------------------------------------------ layers seen elsewhere
def _claim_blocks_run_on(model, device):
    """Give every block what accelerate's dispatch leaves on it, saying it runs on ``device``, while
    the blocks really run where their weights are: residtap's guess of where each layer arrives is
    then wrong, and the forward must correct it."""
    for block in model.transformer.h:
        block._hf_hook = types.SimpleNamespace(execution_device=device)


def test_layers_arriving_elsewhere_than_expected_get_buffers_where_they_are(extension, monkeypatch):
    model = copy.deepcopy(tiny_gpt2(2, 64, 2, torch.float32))
    _claim_blocks_run_on(model, "meta")
    ids = ids_for(model, 2, 6)
    ref = run_reference(model, ids, outputs=OUTPUTS)
    cap = residtap.Capture(model, outputs=OUTPUTS)
    assert cap._homes == [None, torch.device("meta"), torch.device("meta")]
    rehomed = []
    real_rehome = residtap.Capture._rehome
    monkeypatch.setattr(residtap.Capture, "_rehome",
                        lambda self, k, device: rehomed.append((k, device)) or real_rehome(self, k, device))
    ptrs = []
    for _ in range(3):
        with cap, torch.no_grad():
            model(ids)
        # All three layers turned out to be on the CPU: stacked again, so cap.resid works.
        assert cap.devices == [torch.device("cpu")] * 3
        for name in OUTPUTS:
            for k, lid in enumerate(cap.layer_ids):
                assert_layer_equal(cap.layer(name, lid), ref_layer(ref, name, k), f"{name}[{lid}]")
        assert torch.equal(cap.resid, ref.outputs["resid"])
        ptrs.append(cap.resid.data_ptr())
    assert rehomed == [(1, torch.device("cpu")), (2, torch.device("cpu"))]  # in the first forward only
    assert ptrs[0] == ptrs[1] == ptrs[2]  # stacked at its end, then that stack is reused


def test_run_reference_per_layer_matches_its_stacked_outputs(extension):
    model = tiny_gpt2(3, 64, 4, torch.float32, lm_head=False)
    ids = ids_for(model, 2, 9)
    ref = run_reference(model, ids, layers=[3, 0, 2], positions=[1, -1], outputs=OUTPUTS)
    assert ref.layer_ids == [0, 2, 3] and len(ref.per_layer) == 3
    for k, lid in enumerate(ref.layer_ids):
        for name in OUTPUTS:
            assert_layer_equal(ref.layer(name, lid), ref_layer(ref, name, k), f"{name}[{lid}]")


def test_run_reference_on_several_devices_is_read_per_layer():
    """The stacked view refuses, naming the devices (a real split runs in the GPU tests above)."""
    layers = [{"resid": torch.zeros(2, 3, 4)}, {"resid": torch.zeros(2, 3, 4, device="meta")}]
    ref = reference.ReferenceResult([0, 1], layers, None, None)
    with pytest.raises(ValueError, match=r"several devices \(cpu, meta\).*ref.layer\(name, layer_id\)"):
        ref.outputs
    assert ref.layer("resid", 1).device.type == "meta"


def test_norm_stamp_sees_moves_replacements_and_in_place_updates():
    """The stamp that decides when a copy of the final norm's weights must be made again."""
    model = copy.deepcopy(tiny_gpt2())
    cap = residtap.Capture(model, outputs=("normed",))
    stamps = [cap._norm_stamp()]
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1.0)  # in place, as an optimizer step
    stamps.append(cap._norm_stamp())
    model.transformer.ln_f.bias.data = torch.zeros(64)  # a new tensor under the same Parameter
    stamps.append(cap._norm_stamp())
    assert len(set(stamps)) == 3
    assert cap._norm_stamp() == stamps[-1]
    assert cap._norm_params_on(torch.device("cpu"))[1] is None  # on its own device: no copy


# ------------------------------------------------------------------------------ extract
@pytest.mark.parametrize("sel", [dict(layers=[0, 2], positions=slice(2, 14, 3), dtype=torch.bfloat16,
                                      outputs=OUTPUTS),
                                 dict(positions="last", outputs=("resid",))], ids=["slice-all", "last"])
def test_extract_per_layer_path_writes_the_same_bytes(tmp_path, monkeypatch, sel):
    path = ids_file(tmp_path, 16 * 11 + 3)[0]
    kw = dict(seq_len=16, batch_size=4, shard_size="6KiB", progress=False, **sel)
    residtap.extract(tiny_gpt2(), path, tmp_path / "stacked", **kw)
    monkeypatch.setattr(residtap.Capture, "_stacked_on", lambda self, devices: False)
    residtap.extract(tiny_gpt2(), path, tmp_path / "per_layer", **kw)
    assert_same_dirs(tmp_path / "stacked", tmp_path / "per_layer")


# ------------------------------------------------------------------------------ real second devices
def _move_args(device, args, kwargs):
    def mv(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x
    return tuple(mv(a) for a in args), {k: mv(v) for k, v in kwargs.items()}


def split_gpt2(devices, style, n_layer=4, n_embd=128, dtype=torch.float32):
    """A bare tiny GPT-2 with its blocks moved by hand: block i to ``devices[i]``, the final norm with
    the last block, the embeddings on ``devices[0]``. ``style`` "pre_hook": a forward pre-hook moves
    each moved module's inputs, so hooks see them there; "in_forward": the move happens inside
    forward, as accelerate's hooks do, so a block's forward hook sees its input where the previous
    block left it."""
    model = copy.deepcopy(tiny_gpt2(n_layer, n_embd, 4, dtype, lm_head=False))
    model.wte.to(devices[0])
    model.wpe.to(devices[0])
    for mod, device in [*zip(model.h, devices), (model.ln_f, devices[-1])]:
        mod.to(device)
        if style == "pre_hook":
            mod.register_forward_pre_hook(lambda _m, a, kw, d=device: _move_args(d, a, kw), with_kwargs=True)
        else:
            def forward(*a, _inner=mod.forward, _device=device, **kw):
                a, kw = _move_args(_device, a, kw)
                return _inner(*a, **kw)
            mod.forward = forward
    return model


def split_reference(model, ids, outputs, positions=None):
    """The contract, layer by layer, on a model spread over devices: each block's output where it
    is, its input moved there, and the final norm applied on its own device (as the model would)."""
    norm = model.ln_f
    norm_device = norm.weight.device
    saved = {}

    def first(_m, a, kw):
        saved[0] = (a[0].detach().clone(), None)

    def make(i):
        def hook(_m, a, kw, out):
            out = out[0] if isinstance(out, tuple) else out
            saved[i + 1] = (out.detach().clone(), a[0].detach().to(out.device))
        return hook

    handles = [model.h[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [blk.register_forward_hook(make(i), with_kwargs=True) for i, blk in enumerate(model.h)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    per_layer = []
    for lid in sorted(saved):
        out, inp = saved[lid]
        sel = resolve_positions(positions, out.shape[1]).as_selection(out.device)
        per_layer.append(reference.block_outputs(
            out, inp, sel=sel, final_norm=lambda x: norm(x.to(norm_device)).to(x.device),
            eps=norm.eps, outputs=outputs))
    return per_layer


def check_split(model, ids, devices, positions=None, sync_free=False):
    cap = residtap.Capture(model, positions=positions, outputs=OUTPUTS)
    if sync_free:
        from test_cuda import _SyncIsAnError

        _SyncIsAnError(cap)
        torch.cuda.synchronize()
    for _ in range(2):  # set-up, then reuse
        with cap, torch.no_grad():
            model(ids, use_cache=False)
    want = split_reference(model, ids, OUTPUTS, positions)
    ref = run_reference(model, ids, positions=positions, outputs=OUTPUTS, use_cache=False)
    assert ref.layer_ids == cap.layer_ids and ref.stacked is None  # on several devices: per layer
    for k, lid in enumerate(cap.layer_ids):
        for name in OUTPUTS:
            assert_layer_equal(cap.layer(name, lid), want[k][name], f"{name}[{lid}]")
            # run_reference's own split handling agrees with this file's hand-written one
            assert_layer_equal(ref.layer(name, lid), want[k][name], f"run_reference {name}[{lid}]")
    with pytest.raises(residtap.CaptureError, match="several devices"):
        cap.resid
    return cap


@needs_cuda
@pytest.mark.parametrize("style", ["pre_hook", "in_forward"])
@pytest.mark.parametrize("order", ["gpu-cpu", "cpu-gpu"])
@pytest.mark.parametrize("positions", [None, [0, -1, 3]], ids=str)
def test_cpu_and_gpu_split(extension, style, order, positions):
    """Half the blocks on the GPU, half on the CPU (the final norm with the last half): every layer
    captured on its own device, normed by the norm's own device's arithmetic."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    devices = [gpu, gpu, cpu, cpu] if order == "gpu-cpu" else [cpu, cpu, gpu, gpu]
    model = split_gpt2(devices, style)
    ids = ids_for(model, 2, 9).to(devices[0])
    cap = check_split(model, ids, devices, positions)
    assert cap.devices == [devices[0], *devices]  # layer 0, the embeddings: with block 0


@needs_2_gpus
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("style", ["pre_hook", "in_forward"])
@pytest.mark.parametrize("positions", [None, [0, -1, 3]], ids=str)
def test_two_gpus_half_the_blocks_on_cuda1(extension, dtype, style, positions):
    """Blocks 2, 3 and the final norm on cuda:1: layers 0-2 are captured on cuda:0 (normed by the op
    with a copy of the norm's weights), 3-4 on cuda:1, without a host sync in residtap's code."""
    devices = [torch.device("cuda", i) for i in (0, 0, 1, 1)]
    model = split_gpt2(devices, style, dtype=dtype)
    ids = ids_for(model, 3, 11).to("cuda:0")
    cap = check_split(model, ids, devices, positions, sync_free=True)
    assert cap.devices == [devices[0], *devices]
    # Splitting changes no value: the same model on cuda:0 alone gives the same bits (one GPU model).
    if torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1):
        whole = copy.deepcopy(tiny_gpt2(4, 128, 4, dtype, lm_head=False)).to("cuda:0")
        ref = run_reference(whole, ids, positions=positions, outputs=OUTPUTS, use_cache=False)
        for k, lid in enumerate(cap.layer_ids):
            for name in ("resid", "delta", "normed"):
                assert torch.equal(cap.layer(name, lid).to("cuda:0"), ref.outputs[name][k]), f"{name}[{lid}]"


@pytest.mark.parametrize("devices", [
    pytest.param(("cuda:0", "cuda:0", "cpu", "cpu"), marks=needs_cuda, id="gpu-cpu"),
    pytest.param(("cuda:0", "cuda:0", "cuda:1", "cuda:1"), marks=needs_2_gpus, id="gpu0-gpu1")])
def test_extract_accepts_a_split_model(extension, tmp_path, devices):
    """extract no longer refuses a model on several devices: each layer is copied out from its own
    device, and the shards hold exactly what a capture of the same batches holds."""
    devices = [torch.device(d) for d in devices]
    model = split_gpt2(devices, "in_forward")
    path = ids_file(tmp_path, 16 * 10)[0]
    res = residtap.extract(model, path, tmp_path / "out", seq_len=16, batch_size=4, shard_size="24KiB",
                           outputs=OUTPUTS, positions=[0, 5, -1], progress=False)
    assert res.complete and res.n_shards > 1
    acts = residtap.open(tmp_path / "out", verify=True)
    seqs = torch.from_numpy(np.load(path)[:160].reshape(10, 16)).long()
    for b0 in range(0, 10, 4):
        with torch.inference_mode(), residtap.capture(model, positions=[0, 5, -1], outputs=OUTPUTS) as cap:
            model(input_ids=seqs[b0:b0 + 4].to(devices[0]), use_cache=False)
        rows = slice(b0 * 3, (b0 + 4) * 3)
        for lid in cap.layer_ids:
            for name in ("resid", "delta", "normed"):
                want = cap.layer(name, lid).reshape(-1, 128).cpu()
                got = acts.layer(lid, name).to_tensor()[rows]
                assert torch.equal(got, want), f"{name}[{lid}] rows {rows}"
            for stat in STAT_NAMES:
                want = getattr(cap.layer("stats", lid), stat).reshape(-1).cpu()
                assert torch.equal(acts.layer(lid, stat).to_tensor()[rows], want), f"{stat}[{lid}]"
