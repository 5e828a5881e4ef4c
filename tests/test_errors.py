"""Bad input: a clear error naming the argument; nothing left registered; nothing half-done."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import residtap
from helpers import hook_counts, ids_for, tiny_gpt2
from residtap import backend
from residtap._build import BuildInfo


@pytest.fixture
def model():
    m = tiny_gpt2(2, 64, 2, torch.float32)
    before = hook_counts(m)
    yield m
    assert hook_counts(m) == before, "a hook was left registered"


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[3]), r"layers: expected residual indices in \[-3, 2\].*got 3"),
    (dict(layers=[-4]), r"layers: .*got -4"),
    (dict(layers=[1, 1]), r"layers: expected distinct"),
    (dict(layers=[]), r"layers: expected at least one"),
    (dict(layers="all"), r"layers: expected None, an int or a sequence of ints, got 'all'"),
    (dict(layers=torch.tensor([1.0])), r"layers: expected .*integer tensor or array will do\), got a 1-d torch.float32 Tensor"),
    (dict(layers=torch.tensor([[1]])), r"layers: expected .*got a 2-d torch.int64 Tensor"),
    (dict(layers=np.array([True])), r"layers: expected .*got a 1-d bool ndarray"),
    (dict(layers=torch.tensor(3)), r"layers: expected residual indices in \[-3, 2\].*got 3"),
    (dict(positions=[0.5]), r"positions: expected None, an int, a slice"),
    (dict(positions=[]), r"positions: expected at least one position"),
    (dict(positions=slice(0, 5, 0)), r"positions: expected a slice of ints with a non-zero step"),
    (dict(positions=slice(0.5, 3)), r"positions: expected a slice of ints"),
    (dict(positions=torch.zeros(2, 2, dtype=torch.long)), r"positions: expected a 1-D integer tensor"),
    (dict(outputs=("resid", "logits")), r"outputs: expected a non-empty subset of .*'logits'"),
    (dict(outputs=()), r"outputs: expected a non-empty subset"),
    (dict(outputs=None), r"outputs: expected a name or a non-empty collection of names from .*, got None"),
    (dict(dtype=torch.float64), r"dtype: expected None, torch.float32, torch.bfloat16 or torch.float16, got torch.float64"),
    (dict(dtype="int8"), r"dtype: expected None or one of"),
    (dict(backend="triton"), r"backend: expected one of"),
    (dict(blocks="transformer.nope"), r"blocks: expected a module path .* has no attribute 'nope'"),
    (dict(final_norm=3), r"final_norm: expected a module, a path or None, got int"),
    (dict(final_norm=None, outputs=("normed",)), r"outputs: 'normed' needs a final norm"),
])
def test_bad_arguments_raise_at_construction(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        residtap.capture(model, **kwargs)


@pytest.mark.parametrize("layers", [torch.tensor(2), torch.tensor([0, -1]), np.array([2, 0]), np.int64(2),
                                    range(0, 3, 2)], ids=repr)
def test_layers_as_integer_tensors_and_arrays(model, layers):
    expect = sorted({int(x) % 3 for x in np.atleast_1d(np.asarray(layers))})
    assert residtap.capture(model, layers=layers).layer_ids == expect


def test_unknown_model_lists_families_and_says_what_to_pass():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return self.norm(x)

    m = Tiny()
    with pytest.raises(ValueError, match=r"does not know .*Supported families: .*gpt2.*blocks=.*final_norm="):
        residtap.capture(m)
    # ...and given both, it works and matches the reference
    x = torch.randn(2, 3, 4)
    with residtap.capture(m, blocks="layers", final_norm="norm", outputs=("resid", "normed")) as cap:
        m(x)
    ref = residtap.reference.run_reference(m, x, blocks="layers", final_norm="norm", outputs=("resid", "normed"))
    assert torch.equal(cap.resid, ref.outputs["resid"]) and torch.equal(cap.normed, ref.outputs["normed"])
    assert hook_counts(m) == 0


class _Looped(nn.Module):
    """Runs its blocks ``[0, 1]`` ``loops`` times, or (``repeat``) blocks ``[0, 1, 1]``: no single residual
    per block (Dory's, HRM's or any looped stack)."""

    def __init__(self, loops=1, repeat=False):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.norm = nn.LayerNorm(4)
        self.order = [0, 1] * loops + ([1] if repeat else [])

    def forward(self, x):
        for i in self.order:
            x = x + self.layers[i](x)
        return self.norm(x)


@pytest.mark.parametrize("loops, repeat, block", [(2, False, 0), (1, True, 1)])
def test_a_block_that_runs_twice_in_one_forward_is_refused(loops, repeat, block):
    m, x = _Looped(loops, repeat), torch.randn(2, 3, 4)
    cap = residtap.capture(m, blocks="layers", final_norm="norm", outputs=("resid", "delta"))
    with pytest.raises(residtap.UnsupportedStreamError,
                       match=rf"block {block} of _Looped ran more than once in one forward of _Looped\. A model "
                             "that loops over its blocks"):
        with cap:
            m(x)
    with pytest.raises(residtap.CaptureError, match="raised"):
        cap.resid
    assert hook_counts(m) == 0
    with pytest.raises(residtap.UnsupportedStreamError,
                       match=rf"run_reference: block {block} of _Looped ran more than once"):
        residtap.reference.run_reference(m, x, blocks="layers", final_norm="norm")
    assert hook_counts(m) == 0
    # Two forwards of a model that runs each block once are two forwards, not a loop; and blocks
    # called one by one without the model are each a forward of their own
    once = _Looped()
    with residtap.capture(once, blocks="layers", final_norm="norm") as cap:
        once(x)
        once(x + 1)
        assert torch.equal(cap.resid, residtap.reference.run_reference(once, x + 1, blocks="layers",
                                                                        final_norm="norm").outputs["resid"])
        once.layers[0](x)
        once.layers[0](x)


def test_a_forward_that_skips_the_first_block_is_refused_not_read_with_the_last_ones_state():
    """residtap starts a forward at the first block: one whose first block did not run (a model
    that skips blocks) must not be written with the previous forward's positions and shapes, nor
    crash inside the model with a TypeError on the first call."""
    m, x = _Looped(), torch.randn(2, 3, 4)
    for first_call in (True, False):
        cap = residtap.capture(m, blocks="layers", final_norm="norm", layers=[2], positions="last")
        with pytest.raises(residtap.UnsupportedStreamError,
                           match=r"block 1 of _Looped returned in a forward of _Looped in which block 0 did "
                                 r"not run\..*nothing was kept from this forward"):
            with cap:
                m.order = [0, 1]
                if not first_call:
                    m(x)
                m.order = [1]
                m(x[:, :2])
        with pytest.raises(residtap.CaptureError, match="raised"):
            cap.resid
        assert hook_counts(m) == 0
        with pytest.raises(residtap.UnsupportedStreamError, match=r"run_reference: the forward of _Looped "
                                                                  r"produced no residual indices \[0\]"):
            residtap.reference.run_reference(m, x, blocks="layers", final_norm="norm", layers=[2])
        assert hook_counts(m) == 0


def test_a_forward_that_stops_before_a_selected_block_says_which_residuals_are_missing():
    m, x = _Looped(), torch.randn(2, 3, 4)
    m.order = [0]  # runs fewer blocks than it holds (like config.num_hidden_layers set below them)
    with residtap.capture(m, blocks="layers", final_norm="norm") as cap:
        m(x)
    with pytest.raises(residtap.CaptureError, match=r"reached 2 of 3 selected layers, and the call of _Looped "
                                                    r"has ended \(residual indices \[2\] were not written\)"
                                                    r"(.|\n)*runs fewer blocks than the model holds"):
        cap.resid
    with pytest.raises(residtap.UnsupportedStreamError, match=r"run_reference: the forward of _Looped produced "
                                                              r"no residual indices \[2\]: the blocks"):
        residtap.reference.run_reference(m, x, blocks="layers", final_norm="norm")
    ref = residtap.reference.run_reference(m, x, blocks="layers", final_norm="norm", layers=[0, 1])
    assert ref.outputs["resid"].shape == (2, 2, 3, 4)  # the residuals it did produce


def test_a_model_that_drops_blocks_while_training_is_refused_before_its_forward():
    """OPT, XGLM and BioGPT skip blocks at random in training when layerdrop > 0: refused on every
    forward (not only on those that happen to skip), with what to do; eval mode, or layerdrop 0,
    captures as usual."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=2,
                      vocab_size=97, word_embed_proj_dim=64, layerdrop=0.5)
    m = T.OPTForCausalLM(cfg).train()
    ids = ids_for(m, 2, 5)
    for _ in range(3):
        with pytest.raises(residtap.UnsupportedStreamError,
                           match=r"residtap: OPTForCausalLM\.model\.decoder\.layerdrop is 0\.5 and the model "
                                 r"is in training mode.*call model\.eval\(\), or set "
                                 r"OPTForCausalLM\.model\.decoder\.layerdrop = 0"):
            with residtap.capture(m) as cap:
                m(ids)
        with pytest.raises(residtap.CaptureError, match="raised"):
            cap.resid
        assert hook_counts(m) == 0
    with torch.no_grad():
        for mode in ("eval", "no layerdrop"):
            if mode == "eval":
                m.eval()
            else:
                m.train()
                m.model.decoder.layerdrop = 0.0
            with residtap.capture(m) as cap:
                torch.manual_seed(1)
                m(ids)
            torch.manual_seed(1)  # the same dropout masks in training
            assert torch.equal(cap.resid, residtap.reference.run_reference(m, ids).outputs["resid"]), mode


@pytest.mark.parametrize("final_norm,match", [
    ("lm_head", r"final_norm: expected a norm, whose weight is 1-D \[d_model\]; got a Linear with a weight of "
                r"shape \(97, 64\)"),
    (nn.RMSNorm(32), r"final_norm: the RMSNorm normalizes a width of 32, but the residual stream is 64 wide"),
    (nn.LayerNorm(48), r"final_norm: the LayerNorm normalizes a width of 48"),
    ("transformer.h.1", r"final_norm: expected the model's final norm, applied after the last block; got a "
                        r"GPT2Block that is block 1"),
    ("transformer", r"final_norm: .*got a GPT2Model that holds block 0"),
    ("transformer.h.0.ln_1", r"final_norm: .*got a LayerNorm that is inside block 0"),
])
def test_a_final_norm_that_cannot_be_one_is_refused_by_name(model, final_norm, match):
    """Not a raw shape error (or a recursion) from inside the forward: the argument, what it is."""
    ids = ids_for(model, 2, 5)
    for run in ("capture", "reference"):
        with pytest.raises(ValueError, match=match):
            if run == "capture":
                with residtap.capture(model, outputs=("resid", "normed"), final_norm=final_norm):
                    model(ids)
            else:
                residtap.reference.run_reference(model, ids, outputs=("normed",), final_norm=final_norm)
    # the width is the stream's: without normed, a norm of another width is not applied at all
    if isinstance(final_norm, nn.Module):
        with residtap.capture(model, outputs=("resid", "stats"), final_norm=final_norm) as cap:
            model(ids)
        assert torch.equal(cap.resid, residtap.reference.run_reference(model, ids).outputs["resid"])


def test_positions_out_of_range_for_the_actual_length(model):
    cap = residtap.capture(model, positions=[0, 9])
    with pytest.raises(ValueError, match=r"positions: expected positions in \[-5, 5\) .* length 5, got \[9\]$"):
        with cap:
            model(ids_for(model, 2, 5))
    with pytest.raises(residtap.CaptureError, match="raised"):
        cap.resid
    with cap:  # the same capture still works for a long enough input
        model(ids_for(model, 2, 10))
    assert cap.resid.shape == (3, 2, 2, 64)


def test_empty_slice_for_the_actual_length(model):
    with pytest.raises(ValueError, match=r"positions: the slice 8: selects no position of a sequence of "
                                         r"length 5$"):
        with residtap.capture(model, positions=slice(8, None)):
            model(ids_for(model, 1, 5))


def test_reading_before_any_forward(model):
    cap = residtap.capture(model)
    with pytest.raises(residtap.CaptureError, match=r"cap.resid: no forward has run"):
        cap.resid
    with cap:
        with pytest.raises(residtap.CaptureError, match=r"no forward has run"):
            cap.resid


def test_reading_an_output_that_was_not_requested(model):
    with residtap.capture(model, outputs=("resid",)) as cap:
        model(ids_for(model, 1, 3))
    with pytest.raises(residtap.CaptureError, match=r"cap.normed: 'normed' was not requested"):
        cap.normed
    with pytest.raises(residtap.CaptureError, match=r"cap.stats: 'stats' was not requested"):
        cap.stats


class Boom(Exception):
    pass


def test_forward_raising_inside_the_context_removes_hooks_and_propagates_unchanged(model):
    err = Boom("from block 1")

    def explode(*_):
        raise err

    h = model.transformer.h[1].register_forward_pre_hook(explode)
    try:
        cap = residtap.capture(model, outputs=("resid", "stats"))
        with pytest.raises(Boom) as info:
            with cap:
                model(ids_for(model, 1, 4))
        assert info.value is err
    finally:
        h.remove()
    with pytest.raises(residtap.CaptureError, match="the last forward raised"):
        cap.resid


def test_entering_twice_is_an_error(model):
    cap = residtap.capture(model)
    with cap:
        with pytest.raises(RuntimeError, match="already active"):
            cap.__enter__()


def test_non_module_model():
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module, got str"):
        residtap.capture("gpt2")


def test_backend_fallback_warns_once_and_explicit_compiled_raises(monkeypatch, model):
    from residtap import _build

    failed = BuildInfo(False, False, (), None, "RuntimeError: no compiler", None)
    monkeypatch.setattr(_build, "_info", failed)
    monkeypatch.setattr(backend, "_warned", set())
    ids = ids_for(model, 1, 3)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference because the extension could not be built"):
        with residtap.capture(model) as cap:
            model(ids)
    assert cap.backend == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no second warning
        with residtap.capture(model) as cap2:
            model(ids)
    assert torch.equal(cap.resid, cap2.resid)
    with pytest.raises(RuntimeError, match="backend='compiled' was requested but the extension could not"):
        with residtap.capture(model, backend="compiled"):
            model(ids)


def assert_stream_change_refused(model, block: int, change, match: str, ids, reference=False,
                                 **capture_kwargs) -> None:
    """A forward hook on ``block`` (registered first, so the capture's hook sees its result) applies
    ``change`` to the hidden state: the capture raises UnsupportedStreamError matching ``match``,
    and keeps nothing of that forward; with ``reference``, run_reference raises it too."""
    def hook(_mod, _args, out):
        return change(out) if isinstance(out, torch.Tensor) else (change(out[0]), *out[1:])

    h = model.transformer.h[block].register_forward_hook(hook)
    try:
        cap = residtap.capture(model, **capture_kwargs)
        with pytest.raises(residtap.UnsupportedStreamError, match=match):
            with cap:
                model(ids)
        if reference:
            with pytest.raises(residtap.UnsupportedStreamError, match=match):
                residtap.reference.run_reference(model, ids, **capture_kwargs)
    finally:
        h.remove()
    with pytest.raises(residtap.CaptureError, match="the last forward raised"):
        cap.resid


def test_a_block_that_narrows_the_stream_is_refused_by_name(model):
    assert_stream_change_refused(model, 1, lambda h: h.bfloat16(),
                                 "block 1 returned a bfloat16 hidden state from a float32 input; "
                                 "a residual stream that narrows", ids_for(model, 1, 4),
                                 outputs=("resid", "delta"))


class _ToyBlock(nn.Module):
    """A block called as ``block(state=x)`` (``by_keyword``) or returning ``(None, x)``."""

    def __init__(self, by_keyword: bool):
        super().__init__()
        self.proj, self.by_keyword = nn.Linear(8, 8), by_keyword

    def forward(self, x=None, *, state=None):
        if self.by_keyword:
            return state + self.proj(state)
        return None, x + self.proj(x)


class _Toy(nn.Module):
    def __init__(self, by_keyword: bool):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_ToyBlock(by_keyword) for _ in range(2)])

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.layers:
            x = block(state=x) if block.by_keyword else block(x)[1]
        return x


@pytest.mark.parametrize("by_keyword,match", [
    (True, r"could not find the hidden state among the block's arguments \(positional: 0, keywords: "
           r"\['state'\]\)"),
    (False, r"a block returned tuple; expected a tensor, or a tuple / ModelOutput whose first element is"),
])
def test_a_block_whose_hidden_state_cannot_be_found_is_refused(by_keyword, match):
    """blocks= pointing at modules called another way: UnsupportedStreamError (which `residtap
    verify` reports in one line, exit 2), and the hooks are gone."""
    model = _Toy(by_keyword)
    with pytest.raises(residtap.UnsupportedStreamError, match=match):
        with residtap.capture(model, blocks="layers", final_norm=None):
            model(torch.zeros(1, 3, dtype=torch.long))
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.layers)


def test_backend_from_the_environment_is_checked_at_construction_by_its_name(model, monkeypatch):
    monkeypatch.setenv("RESIDTAP_BACKEND", "compild")
    with pytest.raises(ValueError, match=r"RESIDTAP_BACKEND: expected one of \('auto', 'compiled', "
                                         r"'reference'\) or unset, got 'compild'"):
        residtap.capture(model)


@pytest.mark.parametrize("change,positions,shape", [
    (lambda h: h[:, :3], 0, (2, 3, 64)),  # drops tokens: the op alone would not notice at position 0
    (lambda h: h.reshape(-1, 64), None, (10, 64)),
    (lambda h: torch.cat([h, h], -1), None, (2, 5, 128)),
], ids=["fewer-tokens", "flattened", "wider"])
def test_a_block_that_changes_the_stream_shape_is_refused_by_name(model, change, positions, shape):
    """README: a stream of another shape is refused with UnsupportedStreamError, naming it; nothing
    of that forward is kept, whichever positions are asked for."""
    assert_stream_change_refused(model, 0, change,
                                 rf"block 0 of gpt2 returned a hidden state of shape "
                                 rf"{re.escape(str(shape))}, but the stream entered the first block as "
                                 r"\(2, 5, 64\)",
                                 ids_for(model, 2, 5), reference=True, positions=positions)


def test_a_forward_that_raises_before_the_first_block_leaves_no_stale_buffers(model):
    """The previous forward's buffers are not this one's: reading them after a forward that raised
    in the embeddings is an error, inside the with (caught there) and after it."""
    cap = residtap.capture(model, outputs=("resid",))
    bad = torch.full((1, 4), model.config.vocab_size + 5)  # out of the vocabulary: the embedding raises
    with cap:
        model(ids_for(model, 1, 4))
        cap.resid  # complete
        with pytest.raises(IndexError):
            model(bad)
        with pytest.raises(residtap.CaptureError, match="the last forward reached 0 of 3 selected layers"):
            cap.resid
    with pytest.raises(IndexError):
        with cap:
            model(bad)
    with pytest.raises(residtap.CaptureError, match="the last forward raised"):
        cap.resid


def test_a_family_path_with_no_blocks_names_the_path():
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=0, n_embd=64, n_head=2, vocab_size=97, n_positions=64))
    # (residtap's own random models refuse to be built without blocks)
    with pytest.raises(ValueError, match=r"overrides: expected n_layer, n_head to be an int >= 1, got n_layer=0, "
                                         r"n_head=2\.5"):
        residtap.models.random_gpt2(n_layer=0, n_embd=64, n_head=2.5, vocab_size=97, n_positions=64)
    with pytest.raises(ValueError, match=r"blocks: expected a non-empty sequence of modules, got no modules "
                                         r"at the path 'h' \(residtap's FAMILIES entry for 'gpt2'"):
        residtap.capture(model)


def test_a_model_compiled_before_the_capture_names_torch_compile_and_the_remedy():
    """torch.compile does not guard on hooks added after it compiled (torch._dynamo's
    skip_nnmodule_hook_guards), so a model compiled before the capture was entered runs its blocks
    without the capture's hooks: the error must say so and how to recover, which then works."""
    import torch._dynamo

    # A model of its own (not the shared cached one, which other tests may have hooked or compiled).
    model = residtap.models.random_gpt2(n_layer=2, n_embd=64, n_head=2, vocab_size=97, n_positions=64)
    compiled = torch.compile(model, backend="eager")
    ids = ids_for(model, 2, 4)
    torch._dynamo.reset()
    try:
        compiled(ids)  # compiled without hooks
        with residtap.capture(compiled) as cap:
            compiled(ids)
            with pytest.raises(residtap.CaptureError, match=r"reached 0 of 3 selected layers, and the call of "
                               r"OptimizedModule has ended(.|\n)*torch._dynamo.reset\(\) inside the with"):
                cap.resid
            torch._dynamo.reset()
            compiled(ids)
        assert torch.equal(cap.resid, residtap.reference.run_reference(model, ids).outputs["resid"])
    finally:
        torch._dynamo.reset()


def test_a_model_in_a_dtype_the_compiled_op_lacks_runs_on_the_reference_under_auto(extension, monkeypatch):
    """The compiled op takes float32, bfloat16 and float16 hidden states. A float64 model under "auto"
    got the op's own argument error from inside the forward (naming an 'out' the caller never passed);
    the reference computes it exactly, so "auto" falls back to it with the reason, and "compiled" is
    unavailable for that dtype, saying which."""
    import copy

    from helpers import assert_same_outputs
    from residtap.reference import OUTPUTS, run_reference

    monkeypatch.setattr(backend, "_warned", set())
    model = copy.deepcopy(tiny_gpt2(2, 64, 2, torch.float32)).double()  # (the helper's model is shared)
    ids = ids_for(model, 2, 5)
    with pytest.warns(RuntimeWarning, match=r"reference because the compiled op takes float32, bfloat16 or "
                                            r"float16 hidden states, not torch\.float64"):
        with residtap.capture(model, outputs=OUTPUTS) as cap, torch.no_grad():
            model(ids)
    assert cap.backend == "reference"
    assert_same_outputs(cap, run_reference(model, ids, outputs=OUTPUTS), OUTPUTS)
    assert backend.decide("auto", torch.device("cpu"), torch.float32) == ("compiled", "available")
    with pytest.raises(backend.BackendUnavailableError, match=r"requested but the compiled op takes .*float64"):
        with residtap.capture(model, backend="compiled"), torch.no_grad():
            model(ids)
