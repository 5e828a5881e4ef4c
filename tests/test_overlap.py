"""Capture with overlap=True: the side-stream discipline, emulated on the CPU.

helpers.DeferredStreams stands in for a CUDA side stream. Each capture is queued and runs only when
the main stream "waits" for it, which is the latest moment the discipline allows. So a join that is missing,
or a tensor changed in place before the capture read it, shows up here as a wrong value or a capture
still queued. What only a GPU can show (the caching allocator's reuse, real concurrency, CUDA graphs)
is tested in test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import residtap
from helpers import (DeferredStreams, assert_same_outputs, batch_minor_outputs, ids_for, padded, snapshot,
                     tiny_gpt2)
from residtap.arch import resolve_layout
from residtap.overlap import OverlapError, SideStreams
from residtap.reference import OUTPUTS, run_reference


def deferred_capture(model, **kwargs) -> residtap.Capture:
    cap = residtap.Capture(model, overlap=True, **kwargs)
    cap._side = DeferredStreams()
    return cap


def tiny_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=97, max_position_embeddings=64)
    return T.LlamaForCausalLM(cfg).eval()


def no_hooks_left(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("positions", [None, [0, -1, 3], "last", "mask"], ids=str)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_deferred_captures_match_the_reference(extension, family, positions):
    # gpt2: the fused op writes normed; llama: RMSNorm, the module's own code (also on the side).
    model = tiny_gpt2(3, 64, 4) if family == "gpt2" else tiny_llama()
    ids = ids_for(model, 3, 9)
    positions, kwargs = padded(ids, positions, left=(0, 3), right=(2, 7))
    cap = deferred_capture(model, positions=positions, outputs=OUTPUTS, backend="compiled")
    with cap, torch.no_grad():
        for _ in range(2):  # a second forward reuses the buffers the first one's captures wrote
            model(ids, **kwargs)
            assert cap._side.queue == [] and cap._side.pending == 0  # joined when the model returned
    ref = run_reference(model, ids, positions=positions, outputs=OUTPUTS, **kwargs)
    assert_same_outputs(cap, ref, OUTPUTS)
    # It did defer: with 4 captured layers, up to window + 1 of them were queued at once, never more.
    assert cap._side.max_queued == cap._side.window + 1 == 3
    assert no_hooks_left(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_capture_of_non_contiguous_outputs_holds_the_copy_it_reads(extension, family):
    # positions=mask packs [batch, seq, d] into one row; a batch-minor block output cannot be
    # viewed that way, so the main stream makes a copy that only the side-stream capture reads.
    # On a GPU its memory could go to the next block if it were not held until the capture ran.
    model = tiny_gpt2(3, 64, 4) if family == "gpt2" else tiny_llama()
    ids = ids_for(model, 3, 9)
    positions, kwargs = padded(ids, "mask", left=(0, 3), right=(2, 7))
    handles = batch_minor_outputs(model, resolve_layout(model).blocks)
    try:
        cap = deferred_capture(model, positions=positions, outputs=OUTPUTS, backend="compiled")
        with cap, torch.no_grad():
            model(ids, **kwargs)
        ref = run_reference(model, ids, positions=positions, outputs=OUTPUTS, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert_same_outputs(cap, ref, OUTPUTS)
    copies = [out for full_out, out, *_ in cap._side.held
              if not full_out.is_contiguous() and out.untyped_storage().data_ptr()
              != full_out.untyped_storage().data_ptr()]
    assert len(copies) == 3  # layers 1-3 (layer 0, the embeddings, is contiguous)


def test_deferred_capture_follows_a_change_of_shape(extension):
    model = tiny_gpt2(3, 64, 4)
    cap = deferred_capture(model, outputs=OUTPUTS, backend="compiled")
    with cap, torch.no_grad():
        for batch, seq in ((2, 5), (3, 11)):
            ids = ids_for(model, batch, seq, seed=seq)
            model(ids)
            assert_same_outputs(snapshot(cap, OUTPUTS), run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


def test_blocks_called_without_the_model_are_joined_at_the_last_layer(extension):
    model = tiny_gpt2(3, 64, 4)
    ids = ids_for(model, 2, 7)
    cap = deferred_capture(model, outputs=OUTPUTS, backend="compiled")
    with cap, torch.no_grad():
        model.transformer(ids)  # the LM's own forward (and its hook) never runs
        assert cap._side.queue == []
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


def test_an_in_place_change_to_a_hidden_state_is_an_error_not_a_silent_wrong_capture(extension):
    model = tiny_gpt2(4, 64, 4)
    ids = ids_for(model, 2, 7)

    def doubles_its_input(_module, args):
        args[0].mul_(2)  # block 1 changes block 0's output, which layer 1's capture reads

    handle = model.transformer.h[1].register_forward_pre_hook(doubles_its_input)
    try:
        # On one stream the capture reads layer 1 before the change: exact.
        with residtap.capture(model, outputs=OUTPUTS, backend="compiled") as cap, torch.no_grad():
            model(ids)
        before = cap.resid[1].clone()
        cap = deferred_capture(model, outputs=OUTPUTS, backend="compiled")
        with pytest.raises(OverlapError, match="residual index 1 was modified in place.*overlap=False"):
            with cap, torch.no_grad():
                model(ids)
        # The emulated side stream did read the doubled values: without the check, they would
        # have been presented as layer 1.
        assert torch.equal(cap._buffers["resid"][1], before * 2)
    finally:
        handle.remove()
    with pytest.raises(residtap.CaptureError, match="raised"):
        cap.resid
    assert cap._side.queue == [] and no_hooks_left(model)


def test_inference_mode_has_no_version_counters_and_no_false_alarm(extension):
    model = tiny_gpt2(3, 64, 4)
    ids = ids_for(model, 2, 7)
    cap = deferred_capture(model, outputs=OUTPUTS, backend="compiled")
    with cap, torch.inference_mode():
        model(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


def test_a_forward_that_raises_leaves_nothing_queued(extension):
    model = tiny_gpt2(4, 64, 4)
    ids = ids_for(model, 2, 7)

    def fails(_module, _args):
        raise ValueError("block 3 failed")

    cap = deferred_capture(model, outputs=OUTPUTS, backend="compiled")
    handle = model.transformer.h[3].register_forward_pre_hook(fails)
    try:
        with pytest.raises(ValueError, match="block 3 failed"), cap, torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    assert cap._side.queue == [] and no_hooks_left(model)
    with pytest.raises(residtap.CaptureError, match="raised"):
        cap.resid
    with cap, torch.no_grad():  # the same capture works again
        model(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


def test_without_a_cuda_device_overlap_runs_in_place(extension):
    model = tiny_gpt2(2, 64, 4)
    ids = ids_for(model, 2, 7)
    with residtap.capture(model, outputs=OUTPUTS, backend="compiled", overlap=True) as cap:
        model(ids)
        assert cap._side.pending == 0
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


def test_bad_overlap_arguments_are_clear_errors():
    model = tiny_gpt2(2, 64, 4)
    with pytest.raises(ValueError, match="overlap: expected True or False, got 'yes'"):
        residtap.capture(model, overlap="yes")
    with pytest.raises(ValueError, match="window: expected an int >= 1, got 0"):
        SideStreams(window=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_read_inside_the_forward_after_the_last_block_waits_for_the_side_stream(extension, family):
    """A hook that runs after the last block but before the model returns (here on the LM head)
    reads complete buffers: the read joins the side-stream captures still in flight."""
    model = tiny_gpt2(3, 64, 4) if family == "gpt2" else tiny_llama()
    ids = ids_for(model, 2, 5)
    cap = deferred_capture(model, outputs=OUTPUTS, backend="compiled")
    seen = {}

    def read(_module, _args):
        seen["resid"], seen["normed"] = cap.resid.clone(), cap.layer("normed", -1).clone()

    handle = model.lm_head.register_forward_pre_hook(read)
    try:
        with cap, torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    ref = run_reference(model, ids, outputs=OUTPUTS)
    assert torch.equal(seen["resid"], ref.outputs["resid"])
    assert torch.equal(seen["normed"], ref.outputs["normed"][-1])
    assert_same_outputs(cap, ref, OUTPUTS)


class _EagerStreams(SideStreams):
    """A side stream whose Python runs at launch (as on a GPU) and whose "kernels" (each op call)
    only count as done when the main stream waits for the launch that queued them."""

    def __init__(self):
        super().__init__(window=2)
        self.launches = 0
        self.kernels: dict[int, int] = {}  # launch -> kernels it queued
        self.waited: set[int] = set()

    def has_stream(self, device):
        return True

    def _fork(self, device):
        self.launches += 1
        return "main", None

    def _on_side(self, device, side, fn):
        fn()

    def _record_done(self, device, side):
        return self.launches

    def _wait(self, pending):
        self.waited.add(pending.done)


def test_a_side_stream_capture_that_raises_after_queuing_work_is_still_waited_for(extension):
    """The op's kernels are queued before the final norm's module runs (a hook on it here); if that
    raises, the launch must still end in a done event the main stream waits for, with its reads
    held until then: else the kernels could run on memory already handed to the next forward."""
    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 5)
    cap = residtap.Capture(model, outputs=("resid", "normed"), overlap=True)
    side = cap._side = _EagerStreams()
    calls = 0

    def op_as_kernel(*args, **kwargs):  # each op call: a kernel queued by the current launch
        side.kernels[side.launches] = side.kernels.get(side.launches, 0) + 1
        return real(*args, **kwargs)

    def boom(_module, _args, _out):
        nonlocal calls
        calls += 1
        if calls == 2:  # the second layer's normed: after its op call was queued
            raise RuntimeError("from a hook on the final norm")

    h = model.transformer.ln_f.register_forward_hook(boom)  # normed: the module's, on the side stream
    import residtap.ops as ops_mod

    real = ops_mod.capture_block
    try:
        ops_mod.capture_block = op_as_kernel
        with pytest.raises(RuntimeError, match="from a hook on the final norm"):
            with cap:
                model(ids)
    finally:
        ops_mod.capture_block = real
        h.remove()
    assert side.kernels, "no op call was seen"
    assert set(side.kernels) <= side.waited, (side.kernels, side.waited)
    assert side.pending == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid_cap=-1), r"grid_cap: expected an int >= 0 \(0: no cap\), got -1"),
    (dict(grid_cap=2.5), r"grid_cap: expected an int >= 0 \(0: no cap\), got 2.5"),
    (dict(window=True), r"window: expected an int >= 1, got True"),
    (dict(window=1.5), r"window: expected an int >= 1, got 1.5"),
])
def test_bad_side_stream_settings_are_refused_when_made(kwargs, match):
    """A bad grid_cap was accepted here and refused at the first launch, inside the forward, as
    'blocks' (ops.grid_cap's argument), with that launch already queued; window=1.5 or True ran."""
    with pytest.raises(ValueError, match=match):
        SideStreams(**kwargs)
