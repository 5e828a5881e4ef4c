"""residtap.capture on GPT-2 against the hook reference, bit for bit."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import residtap
from helpers import DTYPES, assert_same_outputs, check_misaligned_block_outputs, ids_for, snapshot, tiny_gpt2
from residtap.reference import OUTPUTS, run_reference

CONFIGS = {  # (n_layer, n_embd, n_head)
    "1layer-d64": (1, 64, 2),
    "2layer-d66": (2, 66, 3),  # d_model not divisible by 4
    "3layer-d129": (3, 129, 3),
}


def check(model, ids, backend="compiled", **sel):
    outputs = sel.pop("outputs", OUTPUTS)
    with residtap.capture(model, outputs=outputs, backend=backend, **sel) as cap:
        model(ids)
    ref = run_reference(model, ids, outputs=outputs, **sel)
    assert cap.layer_ids == ref.layer_ids
    assert_same_outputs(cap, ref, outputs)
    return cap


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 7), (3, 17)])
def test_all_layers_all_outputs(extension, dtype, config, batch, seq):
    n_layer, d, heads = CONFIGS[config]
    model = tiny_gpt2(n_layer, d, heads, dtype)
    cap = check(model, ids_for(model, batch, seq))
    assert cap.resid.shape == (n_layer + 1, batch, seq, d)
    assert cap.stats.mean.shape == (n_layer + 1, batch, seq)
    assert cap.backend == "compiled"


@pytest.mark.parametrize("layers", [None, 0, [-1], [2, 0], [1, -3]], ids=str)
@pytest.mark.parametrize("positions", [None, 0, -1, [4, 0, 0], slice(1, None, 2), slice(2, 5),
                                       torch.tensor([3, -7])], ids=str)
def test_layer_and_position_selection(extension, layers, positions):
    model = tiny_gpt2(2, 66, 3, torch.float32)
    ids = ids_for(model, 2, 7)
    cap = check(model, ids, layers=layers, positions=positions)
    # the positions as Python indexes them, apart from residtap's own resolution (which the reference
    # shares: a slice's step dropped there would pass the comparison with it)
    index = (list(range(7)) if positions is None else list(range(7))[positions] if isinstance(positions, slice)
             else torch.as_tensor(positions).reshape(-1).tolist())
    with residtap.capture(model, layers=layers) as every:
        model(ids)
    assert torch.equal(cap.resid, every.resid[:, :, index])
    if layers == [1, -3]:
        assert cap.layer_ids == [0, 1]  # negatives count from the end, ids come back ascending
    assert cap.resid.shape[0] == len(cap.layer_ids)


def test_repeated_layer_after_negative_resolution_is_an_error():
    model = tiny_gpt2(2, 66, 3, torch.float32)
    with pytest.raises(ValueError, match="layers: expected distinct"):
        residtap.capture(model, layers=[1, -2])


@pytest.mark.parametrize("name,want", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16)])
def test_every_dtype_name(extension, name, want):
    """Each name the dtype arguments take, to the dtype it names (the table written out again here)."""
    assert set(residtap.selection.DTYPES) == {"float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16",
                                              "half"}
    model = tiny_gpt2(2, 64, 2, torch.float32)
    cap = check(model, ids_for(model, 1, 3), dtype=name)
    assert cap.resid.dtype == want


@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cap_dtype", [torch.float32, torch.bfloat16, torch.float16, "bf16"], ids=str)
def test_capture_dtype(extension, model_dtype, cap_dtype):
    model = tiny_gpt2(2, 64, 2, model_dtype)
    cap = check(model, ids_for(model, 2, 5), dtype=cap_dtype, positions=[1, 3])
    want = residtap.selection.resolve_dtype(cap_dtype)
    assert cap.resid.dtype == cap.delta.dtype == cap.normed.dtype == want
    assert cap.stats.rstd.dtype == torch.float32


@pytest.mark.parametrize("outputs", [("resid",), ("delta",), ("normed", "stats"), ("stats",)], ids=str)
def test_output_subsets(extension, outputs):
    model = tiny_gpt2(2, 64, 2, torch.bfloat16)
    cap = check(model, ids_for(model, 2, 5), outputs=outputs)
    for name in OUTPUTS:
        if name not in outputs:
            with pytest.raises(residtap.CaptureError, match="was not requested"):
                getattr(cap, name)


def test_reuse_across_shapes_keeps_buffers_per_shape(extension):
    model = tiny_gpt2(2, 66, 3, torch.float32)
    cap = residtap.Capture(model, positions=[0, -1], outputs=OUTPUTS)
    ptrs = []
    for batch, seq in [(2, 7), (2, 7), (3, 5), (3, 5), (2, 7)]:
        ids = ids_for(model, batch, seq, seed=batch * seq + len(ptrs))
        with cap:
            model(ids)
        ref = run_reference(model, ids, positions=[0, -1], outputs=OUTPUTS)
        assert_same_outputs(cap, ref, OUTPUTS)
        ptrs.append(cap.resid.data_ptr())
    assert ptrs[0] == ptrs[1] and ptrs[2] == ptrs[3]  # same shape: the same buffer, reused
    assert cap.resid.shape == (3, 2, 2, 66)
    # every position: a new length alone (same batch) is a new shape too
    every = residtap.Capture(model, outputs=OUTPUTS)
    for seq in (5, 7, 5):
        ids = ids_for(model, 2, seq, seed=seq)
        with every:
            model(ids)
        assert every.resid.shape == (3, 2, seq, 66)
        assert_same_outputs(every, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


@pytest.mark.parametrize("container", [list, tuple])
def test_blocks_kept_in_a_plain_sequence_at_a_path_keep_their_buffers(extension, container):
    """A path to a list or tuple of blocks is read again at each forward (a block replaced there is
    hooked); unchanged, the capture keeps its hooks and buffers, as for an nn.ModuleList (it used to
    take every forward for a replacement and allocate anew)."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    model.block_seq = container(model.transformer.h)
    cap = residtap.Capture(model, outputs=OUTPUTS, blocks="block_seq", final_norm="transformer.ln_f")
    ptrs = []
    with cap:
        for seed in (0, 1):
            ids = ids_for(model, 2, 5, seed=seed)
            handles = list(cap._block_handles)
            model(ids)
            assert_same_outputs(snapshot(cap, OUTPUTS), run_reference(model, ids, outputs=OUTPUTS, blocks="block_seq",
                                                                      final_norm="transformer.ln_f"), OUTPUTS)
            ptrs.append(cap.resid.data_ptr())
        assert cap._block_handles == handles
    assert ptrs[0] == ptrs[1]


def test_views_are_overwritten_by_the_next_forward_and_clone_keeps_a_copy(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    a, b = ids_for(model, 1, 6, seed=1), ids_for(model, 1, 6, seed=2)
    with residtap.capture(model) as cap:
        model(a)
        view, kept = cap.resid, cap.resid.clone()
        model(b)
    assert torch.equal(view, cap.resid) and not torch.equal(kept, cap.resid)
    assert torch.equal(kept, run_reference(model, a).outputs["resid"])


def test_two_captures_on_one_model_are_independent(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 6)
    with residtap.capture(model, layers=[0], outputs=("resid",)) as c1, \
            residtap.capture(model, layers=[2, 1], positions=[-1], outputs=("normed", "stats")) as c2:
        model(ids)
    assert_same_outputs(c1, run_reference(model, ids, layers=[0]), ("resid",))
    assert_same_outputs(c2, run_reference(model, ids, layers=[2, 1], positions=[-1],
                                          outputs=("normed", "stats")), ("normed", "stats"))


def test_a_forward_from_another_thread_inside_with_is_captured(extension):
    """As a streaming generate runs the model: hooks fire on whichever thread calls the model."""
    import threading

    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 6)
    with residtap.capture(model, outputs=OUTPUTS) as cap:
        worker = threading.Thread(target=model, args=(ids,))
        worker.start()
        worker.join()
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


@pytest.mark.parametrize("waits_at", ["block 0", "lm_head"])
@pytest.mark.parametrize("positions", [None, "last"], ids=str)
def test_a_call_from_a_second_thread_while_a_forward_runs_is_refused(extension, positions, waits_at):
    """Two threads calling one captured model at once would write the buffers in turns (and, for
    "last", the second call's mask would replace the first's): the second call is refused before its
    blocks run, and the first forward is captured whole. A thread whose call ended by KeyboardInterrupt
    leaves no call running: another thread's next call is captured as usual."""
    import threading

    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids, ids2 = ids_for(model, 2, 6), ids_for(model, 2, 6, seed=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask2 = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    inside, go, errors = threading.Event(), threading.Event(), []

    def wait_in_block_0(*_):  # the first thread's forward waits here, inside the model: before block 0,
        # or after the last block (every layer written)
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            go.wait(30)

    def first():
        try:
            model(ids, attention_mask=mask)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    with residtap.capture(model, outputs=OUTPUTS, positions=positions) as cap:
        where = model.transformer.h[0] if waits_at == "block 0" else model.lm_head
        handle = where.register_forward_pre_hook(wait_in_block_0)
        worker = threading.Thread(target=first)
        worker.start()
        assert inside.wait(30)
        with pytest.raises(residtap.UnsupportedStreamError, match="called from two threads at once inside one "
                                                                  "capture"):
            model(ids2, attention_mask=mask2)
        go.set()
        worker.join(30)
        handle.remove()
        assert not errors
        assert_same_outputs(snapshot(cap, OUTPUTS), run_reference(model, ids, outputs=OUTPUTS, positions=positions,
                                                                  attention_mask=mask), OUTPUTS)

        def interrupted():
            def stop(*_):
                raise KeyboardInterrupt
            h = model.transformer.h[1].register_forward_hook(stop)
            try:
                model(ids)
            except KeyboardInterrupt:
                pass
            h.remove()

        worker = threading.Thread(target=interrupted)
        worker.start()
        worker.join(30)
        model(ids2, attention_mask=mask2)
    assert_same_outputs(cap, run_reference(model, ids2, outputs=OUTPUTS, positions=positions,
                                           attention_mask=mask2), OUTPUTS)


def test_a_dataparallel_replica_is_refused_and_one_device_dataparallel_is_captured(extension):
    """torch.nn.DataParallel over several GPUs calls replicas that share the model's hooks (made by
    _replicate_for_data_parallel, as here): refused, where they were silently ignored and the previous
    forward's buffers read as complete. On one device (here the CPU) it calls the model itself, and a
    capture of the DataParallel finds its family through it."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids, ids2 = ids_for(model, 2, 5), ids_for(model, 2, 5, seed=1)
    with residtap.capture(model, outputs=OUTPUTS) as cap:
        model(ids)
        for replica, call in ((model, lambda r: r(ids2)),
                              (model.transformer.h[0], lambda r: r(model.transformer.wte(ids2)))):
            with pytest.raises(residtap.UnsupportedStreamError, match=r"a replica of (GPT2LMHeadModel|GPT2Block) "
                                                                      r"made by torch.nn.DataParallel ran"):
                call(replica._replicate_for_data_parallel())
            with pytest.raises(residtap.CaptureError):
                cap.resid
        model(ids2)
    assert_same_outputs(cap, run_reference(model, ids2, outputs=OUTPUTS), OUTPUTS)
    parallel = nn.DataParallel(model)
    with residtap.capture(parallel, outputs=OUTPUTS, positions="last") as cap:
        parallel(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS, positions="last"), OUTPUTS)
    # the set-up probe's width is read through the wrapper too (an RMSNorm model: from the config)
    import transformers as T
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    assert residtap.Capture(nn.DataParallel(llama), outputs=("stats",))._guess_d_model() == 32


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("cap_dtype", [None, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_hooked", [False, True], ids=["fused-norm", "module-norm"])
def test_a_forward_under_autocast_is_captured_as_the_reference_computes_it(extension, backend, cap_dtype,
                                                                           norm_hooked):
    """The outputs are defined without autocast, whatever the model's forward runs under: the fused op
    ignores it, and the reference (run_reference, the reference backend, the module's own norm) turns it
    off (run_reference raised in torch.stack for float16 outputs under CPU autocast to bfloat16)."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2, torch.float32))
    ids = ids_for(model, 2, 5)
    if norm_hooked:  # a hook on the final norm: it is applied by calling the module
        model.transformer.ln_f.register_forward_hook(lambda *_: None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with residtap.capture(model, outputs=OUTPUTS, dtype=cap_dtype, backend=backend) as cap:
            model(ids)
        ref = run_reference(model, ids, outputs=OUTPUTS, dtype=cap_dtype)
    assert_same_outputs(cap, ref, OUTPUTS)
    # normed is the final norm applied, outside autocast, to the stream the forward made under it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = run_reference(model, ids, outputs=("resid",)).stacked["resid"]
    with torch.no_grad():
        want = torch.stack([model.transformer.ln_f(r) for r in raw]).to(cap_dtype or raw.dtype)
    assert torch.equal(ref.stacked["normed"], want)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_the_op_gets_the_blocks_input_only_for_delta(extension, monkeypatch, backend):
    """Only delta reads a block's input: without it the op is not handed one (no copy of it onto the
    output's device for a dispatched model, no alignment of it choosing the kernel)."""
    import residtap.backend as B

    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    for outputs in (("resid", "normed", "stats"), OUTPUTS):
        seen = []
        real = B.choose

        def choose(*a, **k):
            choice = real(*a, **k)
            def fn(out, inp, *rest, **kw):
                seen.append(inp is not None)
                return choice.fn(out, inp, *rest, **kw)
            return choice._replace(fn=fn)

        monkeypatch.setattr(B, "choose", choose)
        with residtap.capture(model, outputs=outputs, backend=backend) as cap:
            model(ids)
        monkeypatch.undo()
        assert_same_outputs(cap, run_reference(model, ids, outputs=outputs), outputs)
        assert seen == ([False, False, False] if "delta" not in outputs else [False, True, True])


def test_bare_model_and_reference_backend(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32, lm_head=False)
    check(model, ids_for(model, 2, 5))
    cap = check(model, ids_for(model, 2, 5), backend="reference")
    assert cap.backend == "reference"


def test_last_resid_is_raw_and_normed_equals_last_hidden_state(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, outputs=("resid", "normed")) as cap:
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    for i in range(len(hs) - 1):
        assert torch.equal(cap.resid[i], hs[i])
    assert not torch.equal(cap.resid[-1], hs[-1])
    assert torch.equal(cap.normed[-1], hs[-1])


def test_delta_is_each_blocks_contribution(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    with residtap.capture(model, outputs=("resid", "delta")) as cap:
        model(ids_for(model, 2, 5))
    assert torch.equal(cap.delta[0], cap.resid[0])  # index 0: the embeddings themselves
    for i in range(1, 3):
        assert torch.equal(cap.delta[i], cap.resid[i] - cap.resid[i - 1])


def test_delta_is_the_blocks_own_contribution_when_the_stream_changes_between_blocks(extension):
    """Where something adds to the stream between two blocks (Qwen3-VL's deepstack adds image
    features; here a pre-hook on block 1), delta is still block 1's output minus its input, as in the
    reference, and not resid_2 - resid_1, which holds the addition too."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    added = torch.randn(64)
    seen = {}

    def add_between(_module, args):
        seen["input"] = args[0] + added
        return (seen["input"], *args[1:])

    handle = model.transformer.h[1].register_forward_pre_hook(add_between)
    try:
        with residtap.capture(model, outputs=OUTPUTS) as cap:
            model(ids)
        ref = run_reference(model, ids, outputs=OUTPUTS)
    finally:
        handle.remove()
    assert_same_outputs(cap, ref, OUTPUTS)
    assert torch.equal(cap.delta[2], cap.resid[2] - seen["input"])
    assert not torch.equal(cap.delta[2], cap.resid[2] - cap.resid[1])
    assert torch.equal(cap.delta[1], cap.resid[1] - cap.resid[0])


def test_capture_in_training_mode_with_grad(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    model.train()
    try:
        torch.manual_seed(0)
        ids = ids_for(model, 2, 5)
        with residtap.capture(model, outputs=OUTPUTS) as cap:
            out = model(ids, labels=ids)
        out.loss.backward()  # capturing must not break autograd
        assert cap.resid.requires_grad is False
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_the_reference_runs_in_the_callers_autograd_mode(extension):
    """A forward may depend on grad mode (Doge's mask needs grad, so torch's attention takes another
    kernel): the reference computes what a capture in the same mode sees, and detaches it."""
    class GradDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            for layer in self.layers:
                x = x + (1.0 if torch.is_grad_enabled() else 2.0) * layer(x)
            return self.norm(x)

    m, x = GradDependent(), torch.randn(2, 3, 8)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            with residtap.capture(m, blocks="layers", final_norm="norm", outputs=OUTPUTS) as cap:
                m(x)
            ref = run_reference(m, x, blocks="layers", final_norm="norm", outputs=OUTPUTS)
        assert_same_outputs(cap, ref, OUTPUTS)
        assert not any(t.requires_grad for t in ref.outputs.values() if isinstance(t, torch.Tensor))
    with torch.no_grad():
        without = run_reference(m, x, blocks="layers", final_norm="norm").outputs["resid"]
    assert not torch.equal(run_reference(m, x, blocks="layers", final_norm="norm").outputs["resid"], without)


@pytest.mark.parametrize("inside", [False, True], ids=["re-entered", "same-with"])
@pytest.mark.parametrize("how", ["parameter", "load_state_dict-assign", "in-place", "eps", "module",
                                 "rms-module", "class-forward"])
def test_a_final_norm_changed_after_set_up_is_the_one_used(extension, monkeypatch, how, inside):
    """normed (and stats' eps) follow the final norm the model runs now: a Parameter replaced after
    the capture was built (or after a forward planned the op) is read from the module, not a kept
    reference; so are the norm's eps, a module assigned at the norm's path, and a LayerNorm forward
    replaced on the class (which the op cannot stand in for). Whether the capture is entered again
    or the change comes between two forwards of one ``with``."""
    import copy

    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    cap = residtap.Capture(model, outputs=("normed", "stats"), backend="compiled")
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(cap)
        model(ids)  # plans the op with the norm as it was
        if not inside:
            stack.close()
        first = cap.normed.clone()
        ln_f = model.transformer.ln_f
        g = torch.Generator().manual_seed(7)
        new_w, new_b = torch.randn(64, generator=g), torch.randn(64, generator=g)
        stack.enter_context(torch.no_grad())  # (for the in-place changes when re-entered)
        if how == "parameter":
            ln_f.weight, ln_f.bias = torch.nn.Parameter(new_w), torch.nn.Parameter(new_b)
        elif how == "load_state_dict-assign":
            ln_f.load_state_dict({"weight": new_w, "bias": new_b}, assign=True)
        elif how == "in-place":
            ln_f.weight.copy_(new_w)
            ln_f.bias.copy_(new_b)
        elif how == "eps":
            ln_f.eps = 0.5
        elif how == "module":
            model.transformer.ln_f = nn.LayerNorm(64, eps=1e-3)
            model.transformer.ln_f.load_state_dict({"weight": new_w, "bias": new_b})
        elif how == "rms-module":
            model.transformer.ln_f = nn.RMSNorm(64, eps=1e-6)
            model.transformer.ln_f.weight.copy_(new_w)
        else:
            plain = nn.LayerNorm.forward
            monkeypatch.setattr(nn.LayerNorm, "forward", lambda self, x: plain(self, x) * 0.5 + 1)
        if not inside:
            stack.enter_context(cap)
        model(ids)
    ref = run_reference(model, ids, outputs=("normed", "stats"))
    assert_same_outputs(cap, ref, ("normed", "stats"))
    with torch.no_grad():
        assert torch.equal(cap.normed[-1], model(ids, output_hidden_states=True).hidden_states[-1])
    assert not torch.equal(cap.normed, first)  # (the change is one the outputs show)


def test_a_final_norm_given_as_a_module_stays_that_module(extension):
    """final_norm=<module> names that module, wherever the model keeps its own norm later."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    given = model.transformer.ln_f
    cap = residtap.Capture(model, outputs=("normed",), final_norm=given)
    model.transformer.ln_f = nn.LayerNorm(64, eps=0.25)
    with cap, torch.no_grad():
        model(ids)
    assert torch.equal(cap.normed, run_reference(model, ids, outputs=("normed",), final_norm=given).outputs["normed"])


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("positions", [None, [0, 3], "last", "mask"], ids=str)
def test_a_first_forward_under_inference_mode_leaves_buffers_usable_outside_it(extension, backend,
                                                                              positions):
    """Buffers are normal tensors even when allocated inside torch.inference_mode(): an inference
    tensor could not be written in place by later forwards under no_grad or with grad."""
    from helpers import padded

    model = tiny_gpt2(2, 64, 2)
    ids = ids_for(model, 3, 7)
    positions, kwargs = padded(ids, positions, left=(0, 2), right=(2, 5))
    ref = run_reference(model, ids, positions=positions, outputs=OUTPUTS, **kwargs)
    cap = residtap.Capture(model, positions=positions, outputs=OUTPUTS, backend=backend)
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        with mode(), cap:
            model(ids, **kwargs)
        assert not cap.resid.is_inference()
        assert_same_outputs(cap, ref, OUTPUTS)



def test_a_final_norm_with_non_contiguous_parameters_is_applied_by_the_module(extension):
    """The op takes contiguous norm parameters only; others make the capture call the module."""
    import copy

    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    g = torch.Generator().manual_seed(3)
    ln_f = model.transformer.ln_f
    ln_f.weight = torch.nn.Parameter(torch.randn(128, generator=g)[::2])
    assert not ln_f.weight.is_contiguous()
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, outputs=OUTPUTS, backend="compiled") as cap, torch.no_grad():
        model(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)
    assert not any(ops.fused_normed for ops in cap._ops.values())


@pytest.mark.parametrize("positions", [None, slice(2, 7), [5, 0]], ids=str)
def test_block_outputs_at_a_misaligned_address(extension, monkeypatch, positions):
    """Exact on CPU whatever the address; test_cuda runs the same check where the address decides
    which of torch's LayerNorm kernels runs. What can be seen here: the op is given the block
    output itself (contiguous, at its own address), never a span of it that torch would copy."""
    from residtap import ops

    given = []
    real = ops.capture_block

    def spy(out, *args, **kwargs):
        given.append((out.is_contiguous(), out.data_ptr() % 16))
        return real(out, *args, **kwargs)

    monkeypatch.setattr(ops, "capture_block", spy)
    check_misaligned_block_outputs("cpu", torch.float32, positions)
    assert given and all(contiguous and address != 0 for contiguous, address in given), given


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_run_reference_clones_a_block_output_at_the_same_alignment(dtype):
    from residtap.reference import _clone_as_placed

    base = torch.randn(200).to(dtype)
    for start in range(0, 40, 3):
        x = base[start:start + 60].view(3, 20)
        y = _clone_as_placed(x)
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr() and y.is_contiguous()
        assert y.data_ptr() % 64 == x.data_ptr() % 64
    t = base[:60].view(3, 20).t()  # not contiguous: torch's norm copies it anyway
    assert torch.equal(_clone_as_placed(t), t)


def test_run_reference_norms_every_residual_where_the_model_placed_it(monkeypatch):
    """run_reference norms each residual from a copy at the model's own address modulo 64 bytes:
    the embeddings (residual 0, saved by the first block's pre-hook) as well as block outputs,
    since torch's CUDA LayerNorm picks its kernel by alignment (MisalignedBlocks: all misaligned)."""
    from helpers import MisalignedBlocks
    from residtap import reference

    model = MisalignedBlocks()
    placed = []  # where the model holds residual 0, 1, 2
    model.layers[0].register_forward_pre_hook(lambda m, a: placed.append(a[0].data_ptr() % 64))
    for layer in model.layers:
        layer.register_forward_hook(lambda m, a, o: placed.append(o.data_ptr() % 64))
    normed_at = []
    real = reference.block_outputs

    def spy(out, *args, **kwargs):
        normed_at.append(out.data_ptr() % 64)
        return real(out, *args, **kwargs)

    monkeypatch.setattr(reference, "block_outputs", spy)
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    run_reference(model, ids, outputs=OUTPUTS, blocks="layers", final_norm="norm")
    assert len(placed) == 3 and all(a % 16 for a in placed), placed
    assert normed_at == placed


_HOST_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero",
               "argwhere", "unique", "masked_select"}


class _HostReadSpy(torch.overrides.TorchFunctionMode):
    """Records the tensor calls that read device values on the host (a sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in _HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overlap", [False, True], ids=["one-stream", "overlap"])
@pytest.mark.parametrize("positions", [None, [0, -1, 3], "last", slice(2, 7)], ids=str)
def test_capture_hooks_read_nothing_back_to_the_host(positions, overlap):
    """The CPU proxy of test_cuda's sync-debug tests, so that CI sees it: residtap's hooks (set-up on
    the first forward included) never turn a tensor into a Python value, which on CUDA is a host
    sync. HF's own mask handling is outside the hooks and not watched."""
    model = tiny_gpt2(2, 64, 2)
    ids = ids_for(model, 2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    cap = residtap.Capture(model, positions=positions, outputs=OUTPUTS, overlap=overlap)
    spy = _HostReadSpy()
    calls = []

    def watched(name, fn):
        def run(*args, **kwargs):
            calls.append(name)
            with spy:
                return fn(*args, **kwargs)
        return run

    hooks = ("_on_model_enter", "_on_model_call", "_on_first_block", "_begin", "_write", "_on_model_exit")
    for name in hooks:
        setattr(cap, name, watched(name, getattr(cap, name)))
    for _ in range(2):
        with cap, torch.no_grad():
            model(ids, attention_mask=mask)
    assert calls.count("_write") == 6 and calls.count("_on_model_exit") == 2
    assert spy.reads == []
    assert_same_outputs(cap, run_reference(model, ids, attention_mask=mask, positions=positions,
                                           outputs=OUTPUTS), OUTPUTS)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_hooks_on_a_layernorm_final_norm_run_as_in_the_model(extension, backend):
    """A hook on GPT-2's ln_f (a plain nn.LayerNorm, which the op normally re-applies itself)
    changes what the model computes: normed then comes from the module, hook included, so it
    equals run_reference and, at the last layer, hidden_states[-1]. Without the hook (removed
    between forwards of one capture) the op takes over again."""
    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 5)
    plain = run_reference(model, ids, outputs=OUTPUTS)
    h = model.transformer.ln_f.register_forward_hook(lambda _m, _a, out: out * 2 + 1)
    try:
        with residtap.capture(model, outputs=OUTPUTS, backend=backend) as cap:
            hs = model(ids, output_hidden_states=True).hidden_states
        assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)
        assert torch.equal(cap.normed[-1], hs[-1])
        assert not torch.equal(cap.normed, plain.outputs["normed"])
        c = residtap.Capture(model, outputs=OUTPUTS, backend=backend)
        with c:
            model(ids)
            hooked = c.normed.clone()
            h.remove()
            model(ids)
        assert torch.equal(hooked, cap.normed)
        assert_same_outputs(c, plain, OUTPUTS)
        # and the other way: a hook added between two forwards of a new capture, same shape, is seen
        d = residtap.Capture(model, outputs=OUTPUTS, backend=backend)
        with d:
            model(ids)
            h = model.transformer.ln_f.register_forward_hook(lambda _m, _a, out: out * 2 + 1)
            model(ids)
        assert torch.equal(d.normed, hooked)
    finally:
        h.remove()


def test_a_layernorm_whose_forward_is_replaced_on_the_instance_is_called_as_a_module(extension):
    """A patching library binds a new forward on the norm instance (Liger's LayerNorm does): the op
    cannot stand in for that, so normed comes from the module, as in the model."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2, torch.float32))
    plain = model.transformer.ln_f.forward
    model.transformer.ln_f.forward = lambda x: plain(x) * 2 + 1
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, outputs=OUTPUTS) as cap:
        hs = model(ids, output_hidden_states=True).hidden_states
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)
    assert torch.equal(cap.normed[-1], hs[-1])
    assert residtap.verify(model, ids).ok


def test_a_wrapper_of_a_wrapper_is_followed_to_the_hf_model(extension):
    """A PEFT model's base_model is a tuner whose .model is the HF model (each forwarding what it
    lacks, config included, to what it wraps): followed without paths."""
    class Forwarding(nn.Module):
        inner = ""

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__(self.inner), name)

        def forward(self, *args, **kwargs):
            return getattr(self, self.inner)(*args, **kwargs)

    class Tuner(Forwarding):
        inner = "model"

        def __init__(self, model):
            super().__init__()
            self.model = model

    class Peft(Forwarding):
        inner = "base_model"

        def __init__(self, model):
            super().__init__()
            self.base_model = Tuner(model)

    model = tiny_gpt2(2, 64, 2, torch.float32)
    peft, ids = Peft(model), ids_for(model, 1, 4)
    with residtap.capture(peft) as cap:
        peft(ids)
    with residtap.capture(model) as direct:
        model(ids)
    assert torch.equal(cap.resid, direct.resid)


def test_layer_takes_every_negative_index(extension):
    """cap.layer counts negatives from the end, down to -(n_layers + 1), which is residual index 0."""
    model = tiny_gpt2(2, 64, 2, torch.float32)
    with residtap.capture(model) as cap:
        model(ids_for(model, 1, 4))
    for k in range(3):
        assert torch.equal(cap.layer("resid", k - 3), cap.layer("resid", k))
    with pytest.raises(residtap.CaptureError, match="layer"):
        cap.layer("resid", -4)


@pytest.mark.parametrize("layer_id", [3, 12, -4])
def test_a_residual_index_the_model_lacks_is_named_as_such(extension, layer_id):
    """An index no layers= could capture gets the range that exists, not the advice to capture it."""
    model = tiny_gpt2(2, 64, 2, torch.float32)
    with residtap.capture(model, layers=[0, 2]) as cap:
        model(ids_for(model, 1, 4))
    with pytest.raises(residtap.CaptureError) as err:
        cap.layer("resid", layer_id)
    assert str(err.value) == (f"cap.layer('resid', {layer_id}): expected a residual index in [-3, 2] (the "
                              f"model has 2 blocks, so residual indices 0..2), got {layer_id}")
    with pytest.raises(residtap.CaptureError, match=r"index 1 was not captured .* pass layers=\[\.\.\., 1\]"):
        cap.layer("resid", 1)  # one that exists but was not selected: the advice stays


def test_hooks_added_inside_with_that_change_the_stream_are_seen_as_the_next_block_sees_them(extension):
    """A steering hook registered after the capture was entered (on a block's output, and a pre-hook
    on the first block's input) changes what the later blocks and the reference see: the capture must
    read the stream after it too, not before it, or resid and delta disagree. (hidden_states is not
    compared: transformers records it from hooks of its own, installed once, whose place among the
    user's hooks depends on which call installed them.)"""
    model = tiny_gpt2(3, 64, 2, torch.float32)
    ids = ids_for(model, 2, 5)
    blocks = model.transformer.h

    def steer_output(_module, _args, output):
        return (output[0] + 0.5, *output[1:]) if isinstance(output, tuple) else output + 0.5

    def steer_input(_module, args):
        return (args[0] * 2.0, *args[1:])

    with residtap.capture(model, outputs=OUTPUTS) as cap:
        handles = [blocks[1].register_forward_hook(steer_output), blocks[0].register_forward_pre_hook(steer_input)]
        try:
            model(ids)
            ref = run_reference(model, ids, outputs=OUTPUTS)  # its hooks come after the steering ones
        finally:
            for h in handles:
                h.remove()
    assert_same_outputs(cap, ref, OUTPUTS)
    for i in range(1, 4):
        assert torch.equal(cap.delta[i], cap.resid[i] - cap.resid[i - 1])


@pytest.mark.parametrize("registered", ["before", "inside"])
def test_a_hook_that_stops_the_forward_after_a_block_leaves_that_block_captured(extension, registered):
    """Stopping the forward after the last layer one needs (a hook that raises once block 1 has
    returned) is common: the layers up to it are complete, whether the stop hook was registered
    before the capture was entered or inside the with (where the capture's hooks are moved last)."""
    class Stop(Exception):
        pass

    def stop(_module, _args, _output):
        raise Stop

    model = tiny_gpt2(3, 64, 2, torch.float32)
    ids = ids_for(model, 2, 5)
    block = model.transformer.h[1]
    handle = block.register_forward_hook(stop) if registered == "before" else None
    try:
        with residtap.capture(model, layers=[0, 1, 2], outputs=OUTPUTS) as cap:
            if handle is None:
                handle = block.register_forward_hook(stop)
            with pytest.raises(Stop):
                model(ids)
    finally:
        handle.remove()
    assert_same_outputs(cap, run_reference(model, ids, layers=[0, 1, 2], outputs=OUTPUTS), OUTPUTS)


def test_a_deep_copy_of_the_model_made_inside_with_runs_as_a_model_without_hooks(extension):
    """copy.deepcopy copies the capture's hook entries with the model: on the copy they do nothing
    (they used to make every forward of the copy fail, inside and after the with), and the capture
    goes on capturing the original."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, outputs=OUTPUTS, positions="last") as cap, torch.no_grad():
        model(ids)
        twin = copy.deepcopy(model)
        first = cap.resid.clone()
        with torch.no_grad():
            twin.transformer.h[0].mlp.c_fc.weight.mul_(2)  # the copy computes something else
        out = twin(ids, output_hidden_states=True)
        assert torch.equal(cap.resid, first)  # the copy's forward was not captured
        model(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS, positions="last"), OUTPUTS)
    with torch.no_grad():
        again = twin(ids, output_hidden_states=True)
    assert torch.equal(again.hidden_states[1], out.hidden_states[1])
    assert not torch.equal(again.hidden_states[1], run_reference(model, ids, layers=[1]).outputs["resid"][0])


def test_a_copy_of_the_model_made_inside_with_keeps_nothing_of_the_capture_and_pickles(extension):
    """The hook entries a copy inherits refer to nothing: the copy does not keep the capture (and
    through it the original model) alive, torch.save of it works, and it runs as the original did."""
    import gc
    import io
    import weakref

    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, outputs=OUTPUTS, positions="last") as cap:
        twin = copy.deepcopy(model)
    gone = weakref.ref(cap), weakref.ref(model)
    del cap, model
    gc.collect()
    assert gone[0]() is None and gone[1]() is None
    buf = io.BytesIO()
    torch.save(twin, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        for m in (twin, loaded):
            assert torch.equal(m(ids).logits, twin(ids).logits)
    with residtap.capture(loaded, outputs=OUTPUTS) as cap:
        loaded(ids)
    assert_same_outputs(cap, run_reference(loaded, ids, outputs=OUTPUTS), OUTPUTS)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_a_loss_saved_from_a_buffer_the_next_forward_overwrote_is_refused_by_autograd(extension, backend):
    """cap.resid is a view of a buffer the next forward overwrites: a backward through a loss built
    on it before then must fail as after any in-place change, not run on the new values."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    cap = residtap.Capture(model, layers=[1], backend=backend)
    probe = torch.randn(64, 3, requires_grad=True)
    with torch.no_grad(), cap:
        model(ids_for(model, 2, 5))
    loss = (cap.resid[0] @ probe).square().sum()
    with torch.no_grad(), cap:
        model(ids_for(model, 2, 5, seed=1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _Doubled(nn.Module):
    """A block wrapped in place: runs the block, then doubles its hidden state."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        return (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2


@pytest.mark.parametrize("given", ["family", "path", "modulelist"])
@pytest.mark.parametrize("when", ["before_with", "inside_with", "inside_with_blocks_only"])
def test_a_block_replaced_at_its_path_is_the_one_captured(extension, given, when):
    """A block wrapped (or replaced) where the capture found it, after set-up or inside ``with``, is
    the block the model calls: the capture hooks it, not the one it replaced (whose output, inside
    the wrapper, is not the stream), and matches the reference of the model as it is now."""
    model = copy.deepcopy(tiny_gpt2(3, 64, 2))
    ids = ids_for(model, 2, 5)
    where = {"family": {}, "path": dict(blocks="transformer.h", final_norm="transformer.ln_f"),
             "modulelist": dict(blocks=model.transformer.h, final_norm=model.transformer.ln_f)}[given]
    positions = None if when == "inside_with_blocks_only" else "last"  # ("last" reads the model's call)
    cap = residtap.Capture(model, outputs=OUTPUTS, positions=positions, **where)
    if when == "before_with":
        model.transformer.h[1] = _Doubled(model.transformer.h[1])
        with cap:
            model(ids)
    else:
        with cap:
            model(ids)
            model.transformer.h[1] = _Doubled(model.transformer.h[1])
            if when == "inside_with":
                model(ids)
            else:  # the blocks run without a call of the model, whose hooks re-read them
                model.transformer(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS, positions=positions), OUTPUTS)
    assert cap.layout.blocks[1] is model.transformer.h[1]
    # and the hooks went with it: none is left on the block now inside the wrapper
    inner = model.transformer.h[1].block
    assert not inner._forward_hooks and not inner._forward_pre_hooks


def test_block_0_replaced_inside_with_then_run_without_the_model_is_refused(extension):
    """The old block 0's hook runs inside the new one, whose input it never saw: refused, and the next
    call of the model is captured with the new block."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, outputs=OUTPUTS) as cap:
        model(ids)
        model.transformer.h[0] = _Doubled(model.transformer.h[0])
        with pytest.raises(residtap.UnsupportedStreamError, match="block 0 of gpt2 was replaced inside this "
                                                                  "capture's with, and the blocks then ran without"):
            model.transformer(ids)
        with pytest.raises(residtap.CaptureError):
            cap.resid
        model(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)
    assert not model.transformer.h[0].block._forward_pre_hooks


def test_blocks_run_without_the_model_after_an_interrupted_call_are_captured(extension):
    """A call of the model ended by KeyboardInterrupt (caught inside ``with``) leaves no call running:
    the blocks run next without the model (``model.transformer(ids)``) are a forward of their own,
    re-read where a block was wrapped meanwhile (they failed as 'ran more than once', or kept the old
    block's hook inside the wrapper)."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)

    def interrupt(*_):
        raise KeyboardInterrupt

    with residtap.capture(model, outputs=OUTPUTS) as cap:
        for where in (model.transformer.h[0], model.transformer.h[1]):  # before block 0; after it
            handle = where.register_forward_pre_hook(interrupt)
            with pytest.raises(KeyboardInterrupt):
                model(ids)
            handle.remove()
            model.transformer(ids)
            assert_same_outputs(snapshot(cap, OUTPUTS), run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)
        handle = model.transformer.h[0].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(ids)
        handle.remove()
        model.transformer.h[1] = _Doubled(model.transformer.h[1])
        model.transformer(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)


@pytest.mark.parametrize("before", ["complete", "raised-in-embeddings"])
def test_a_fresh_block_0_then_the_blocks_without_the_model_is_refused(extension, before):
    """Block 0 replaced inside ``with`` by a module without the capture's hook, then the blocks run
    without the model: no forward begins, and the next block says so (it blamed 'ran more than once',
    or after a forward that raised in the embeddings wrote with the older forward's positions)."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)
    with residtap.capture(model, outputs=OUTPUTS, positions="last") as cap:
        model(ids)
        if before == "raised-in-embeddings":
            with pytest.raises(IndexError):
                model(torch.full((2, 3), 10**6))
        model.transformer.h[0] = copy.deepcopy(model.transformer.h[0])  # (a copy keeps no capture hook)
        with pytest.raises(residtap.UnsupportedStreamError, match=r"block 1 of gpt2 returned, run without a call of "
                                                                  r"GPT2LMHeadModel, when no forward was open"):
            model.transformer(ids)
        with pytest.raises(residtap.CaptureError):
            cap.resid
        model(ids)
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS, positions="last"), OUTPUTS)


@pytest.mark.parametrize("raises_in", [1, 2], ids=["unselected-block", "selected-block"])
def test_a_blocks_only_forward_that_raised_is_not_continued_by_the_next(extension, raises_in):
    """Blocks run without the model have no end the capture sees but their last selected layer: one that
    raised (in a block whose output is not selected, or in one that is), then block 0 replaced by a module
    without the capture's hook, then the blocks again: refused, where it read as complete, its layers
    taken from the two forwards."""
    model = copy.deepcopy(tiny_gpt2(4, 64, 2))
    ids, ids2 = ids_for(model, 2, 5), ids_for(model, 2, 5, seed=1)

    def fail(*_):
        raise ValueError("stop")

    with residtap.capture(model, layers=[0, 3]) as cap:
        handle = model.transformer.h[raises_in].register_forward_pre_hook(fail)  # as if the block raised
        with pytest.raises(ValueError, match="stop"):
            model.transformer(ids)
        handle.remove()
        model.transformer.h[0] = copy.deepcopy(model.transformer.h[0])
        with pytest.raises(residtap.UnsupportedStreamError, match="when no forward was open"):
            model.transformer(ids2)
        with pytest.raises(residtap.CaptureError):
            cap.resid


class _Retrying(nn.Module):
    """Runs a GPT-2's blocks itself, and runs again a block that raised (as after a CUDA OOM)."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.failures = lm, 0

    def forward(self, ids):
        t = self.lm.transformer
        x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
        for block in t.h:
            try:
                x = block(x)
            except RuntimeError:
                x = block(x)
        return t.ln_f(x)


def test_a_block_run_again_after_it_raised_inside_the_blocks_call_is_captured(extension):
    """Blocks run without the captured model, by a module that runs a block again after it raised: the
    forward is still open (its call runs), so the retried block is captured (f9efd03 refused it)."""
    model = copy.deepcopy(tiny_gpt2(3, 64, 2))
    runner = _Retrying(model)
    ids = ids_for(model, 2, 5)

    def fail_once(*_):
        runner.failures += 1
        if runner.failures % 2 == 1:
            raise RuntimeError("out of memory, once")

    handle = model.transformer.h[1].register_forward_pre_hook(fail_once)
    try:
        want = run_reference(runner, ids, outputs=OUTPUTS, blocks="lm.transformer.h", final_norm="lm.transformer.ln_f")
        with residtap.capture(model, outputs=OUTPUTS) as cap:
            runner(ids)
    finally:
        handle.remove()
    assert runner.failures == 4
    assert_same_outputs(cap, want, OUTPUTS)


class _Stages(nn.Module):
    """Runs a GPT-2's blocks in two stage modules, one after the other (naive model parallelism)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        h = list(lm.transformer.h)
        self.stages = nn.ModuleList([nn.Sequential(*h[:2]), nn.Sequential(*h[2:])])

    def forward(self, ids):
        t = self.lm.transformer
        x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
        for stage in self.stages:
            x = stage(x)
        return t.ln_f(x)


def test_blocks_run_by_sibling_module_calls_are_one_forward(extension):
    """Blocks run without the captured model in two stage modules: block 2 returns after the call that
    ran block 0 has ended, in the same forward (a version of d5e3fc2 that kept that call's frame refused
    it)."""
    model = copy.deepcopy(tiny_gpt2(4, 64, 2))
    runner = _Stages(model)
    ids = ids_for(model, 2, 5)
    want = run_reference(runner, ids, outputs=OUTPUTS, blocks="lm.transformer.h", final_norm="lm.transformer.ln_f")
    with residtap.capture(model, outputs=OUTPUTS) as cap:
        runner(ids)
    assert_same_outputs(cap, want, OUTPUTS)


def test_blocks_run_by_a_second_thread_while_the_model_is_in_its_embeddings(extension):
    """Thread A calls the model and waits in its embeddings; thread B runs the blocks without the model
    meanwhile. B's blocks are taken as the forward (they cannot be told from a worker of A's); A's block 0
    then says two threads ran the blocks (it blamed a loop over the blocks), and B's forward is kept."""
    import threading

    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids, ids2 = ids_for(model, 2, 5), ids_for(model, 2, 5, seed=1)
    inside, go, errors = threading.Event(), threading.Event(), []

    def wait_in_embeddings(*_):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            go.wait(30)

    def first():
        try:
            model(ids)
        except BaseException as e:  # noqa: BLE001 (checked by the main thread)
            errors.append(e)

    with residtap.capture(model, outputs=OUTPUTS) as cap:
        handle = model.transformer.wte.register_forward_pre_hook(wait_in_embeddings)
        worker = threading.Thread(target=first)
        worker.start()
        assert inside.wait(30)
        model.transformer(ids2)
        go.set()
        worker.join(30)
        handle.remove()
    assert len(errors) == 1 and isinstance(errors[0], residtap.UnsupportedStreamError)
    assert "the blocks of GPT2LMHeadModel were called from two threads at once" in str(errors[0])
    assert_same_outputs(cap, run_reference(model, ids2, outputs=OUTPUTS), OUTPUTS)


def test_blocks_run_on_a_worker_thread_by_the_models_forward_are_captured(extension):
    """One forward on two threads (a wrapper whose forward runs the language model on a worker): the
    blocks' thread is not a second forward."""
    from concurrent.futures import ThreadPoolExecutor

    class Offload(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm, self.pool = lm, ThreadPoolExecutor(1)

        def forward(self, ids):
            return self.pool.submit(self.lm, ids).result()

    model = Offload(copy.deepcopy(tiny_gpt2(2, 64, 2)))
    ids = ids_for(model.lm, 2, 5)
    where = dict(blocks="lm.transformer.h", final_norm="lm.transformer.ln_f")
    with residtap.capture(model, outputs=OUTPUTS, **where) as cap:
        model(ids)
    model.pool.shutdown()
    assert_same_outputs(cap, run_reference(model.lm, ids, outputs=OUTPUTS), OUTPUTS)


def test_a_block_list_of_another_length_at_the_path_is_refused(extension):
    model = copy.deepcopy(tiny_gpt2(3, 64, 2))
    ids = ids_for(model, 2, 5)
    cap = residtap.Capture(model, layers=[-1])
    model.transformer.h = nn.ModuleList(list(model.transformer.h)[:2])
    with pytest.raises(ValueError, match=r"blocks: 'h' of GPT2Model holds 2 blocks now, but this capture was "
                                         r"set up for 3; set up a new capture"):
        with cap:
            pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    cap = residtap.Capture(model, layers=[-1])
    with pytest.raises(ValueError, match="holds 1 blocks now, but this capture was set up for 2"):
        with cap:
            model.transformer.h = nn.ModuleList(list(model.transformer.h)[:1])
            model(ids)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(residtap.CaptureError):
        cap.resid


class _CheckpointedStack(nn.Module):
    """A custom model that checkpoints each block's __call__ (hooks included) with torch.utils.checkpoint:
    backward calls every block again, with its hooks, to recompute what the forward did not keep."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.emb = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.norm = nn.LayerNorm(16)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=self.reentrant)
        return self.norm(x)


@pytest.mark.parametrize("reentrant, whole_model", [(False, False), (True, False), (False, True)])
def test_a_backward_that_recomputes_checkpointed_blocks_is_not_a_forward(extension, reentrant, whole_model):
    """The recomputation inside backward is ignored: the capture keeps the forward's values (it used
    to fail with 'ran more than once', or start a new forward and end incomplete), and the next
    forward is captured as usual. (The model checkpointed whole: non-reentrant only, as a reentrant
    checkpoint of integer ids has no input with grad to recompute for.)"""
    torch.manual_seed(0)
    model = _CheckpointedStack(reentrant)
    where = dict(blocks="blocks", final_norm="norm")
    ids = torch.randint(0, 32, (2, 5))
    call = (lambda i: torch.utils.checkpoint.checkpoint(model, i, use_reentrant=reentrant)) if whole_model \
        else model
    with residtap.capture(model, outputs=OUTPUTS, **where) as cap:
        for seed in (1, 2):
            model.emb.weight.data.normal_(generator=torch.Generator().manual_seed(seed))
            out = call(ids)
            first = cap.resid.clone()
            out.square().sum().backward()
            assert torch.equal(cap.resid, first)
            assert_same_outputs(snapshot(cap, OUTPUTS), run_reference(model, ids, outputs=OUTPUTS, **where), OUTPUTS)
    assert model.blocks[0][0].weight.grad is not None


@pytest.mark.parametrize("signal", [KeyboardInterrupt, SystemExit])
def test_a_forward_interrupted_by_a_base_exception_caught_inside_with_does_not_spoil_the_next(extension, signal):
    """torch runs no always_call hook for a BaseException that is not an Exception: the capture must
    not take the next call of the model for one nested in the interrupted call (which made every later
    forward fail with 'ran more than once')."""
    model = copy.deepcopy(tiny_gpt2(2, 64, 2))
    ids = ids_for(model, 2, 5)

    def interrupt(*_):
        raise signal

    with residtap.capture(model, outputs=OUTPUTS) as cap:
        handle = model.transformer.h[1].register_forward_hook(interrupt)
        with pytest.raises(signal):
            model(ids)
        handle.remove()
        with pytest.raises(residtap.CaptureError):
            cap.resid  # the interrupted forward is not presented as complete
        model(ids)
        assert_same_outputs(snapshot(cap, OUTPUTS), run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)
        model(ids_for(model, 2, 5, seed=1))
    assert_same_outputs(cap, run_reference(model, ids_for(model, 2, 5, seed=1), outputs=OUTPUTS), OUTPUTS)
