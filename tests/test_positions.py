"""Positions that respect padding: "last" (each row's last real token) and bool masks (packed
rows), bit-identical to gathering the reference; and clear errors for bad position specs."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers as T
from torch import nn

import residtap
from helpers import assert_same_outputs, ids_for, tiny_gpt2
from residtap.reference import OUTPUTS, run_reference
from residtap.selection import last_token_index

B, S = 3, 8
MASKS = {  # attention masks [B, S]: 1 = real token
    "left": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8, [0, 1, 1, 1, 1, 1, 1, 1]]),
    "right": torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8, [1, 1, 1, 1, 1, 1, 1, 0]]),
    "both": torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]]),
}
LAST = {"left": [7, 7, 7], "right": [4, 7, 6], "both": [5, 7, 3]}


@pytest.fixture(scope="module")
def models():
    """A LayerNorm family (fused norm) and an RMSNorm family (the module re-applied), fp32 and bf16."""
    gpt2 = tiny_gpt2(2, 64, 2, torch.float32)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=97, bos_token_id=1, eos_token_id=2)
    llama = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        llama.model.norm.weight.normal_()
    out = {}
    for name, m in (("gpt2", gpt2), ("llama", llama)):
        out[name, torch.float32] = m
        out[name, torch.bfloat16] = copy.deepcopy(m).to(torch.bfloat16)
    return out


def check(model, ids, positions, outputs=OUTPUTS, **kw):
    with residtap.capture(model, positions=positions, outputs=outputs, backend="compiled") as cap:
        model(ids, **kw)
    ref = run_reference(model, ids, positions=positions, outputs=outputs, **kw)
    assert_same_outputs(cap, ref, outputs)
    return cap


# ---------------------------------------------------------------- "last"
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", MASKS)
def test_last_real_token_with_padding(extension, models, family, dtype, padding):
    model = models[family, dtype]
    cap = check(model, ids_for(model, B, S), "last", attention_mask=MASKS[padding])
    assert cap.resid.shape == (3, B, 1, 64)
    assert cap.positions.tolist() == [[p] for p in LAST[padding]]


def test_last_gathers_the_same_rows_as_all_positions(extension, models):
    model, mask = models["llama", torch.float32], MASKS["both"]
    ids = ids_for(model, B, S)
    with residtap.capture(model, outputs=OUTPUTS) as full:
        model(ids, attention_mask=mask)
    with residtap.capture(model, positions="last", outputs=OUTPUTS) as last:
        model(ids, attention_mask=mask)
    rows = torch.arange(B)
    for name in ("resid", "delta", "normed"):
        assert torch.equal(getattr(last, name)[:, :, 0], getattr(full, name)[:, rows, LAST["both"]])
    assert torch.equal(last.stats.rstd[:, :, 0], full.stats.rstd[:, rows, LAST["both"]])


def test_last_without_a_mask_is_the_final_position(extension, models):
    model = models["gpt2", torch.float32]
    cap = check(model, ids_for(model, B, S), "last")
    assert cap.positions.tolist() == [[S - 1]] * B


def test_last_reads_a_positional_attention_mask(extension, models):
    model = models["gpt2", torch.float32]  # forward(input_ids, <cache args>, attention_mask, ...)
    ids, mask = ids_for(model, B, S), MASKS["right"]
    k = list(inspect.signature(model.forward).parameters).index("attention_mask")
    args = (ids, *[None] * (k - 1), mask)
    with residtap.capture(model, positions="last") as cap:
        model(*args)
    assert cap.positions.tolist() == [[p] for p in LAST["right"]]
    ref = run_reference(model, *args, positions="last")
    assert torch.equal(cap.resid, ref.outputs["resid"])


def test_last_follows_each_forward_mask(extension, models):
    model = models["gpt2", torch.float32]
    ids = ids_for(model, B, S)
    with residtap.capture(model, positions="last") as cap:
        for padding in ("left", "right", "both"):
            model(ids, attention_mask=MASKS[padding])
            assert cap.positions.tolist() == [[p] for p in LAST[padding]]
            ref = run_reference(model, ids, attention_mask=MASKS[padding], positions="last")
            assert torch.equal(cap.resid, ref.outputs["resid"])


def test_last_with_a_cache_uses_the_current_columns(extension, models):
    model = models["llama", torch.float32]
    ids, mask = ids_for(model, 2, S), MASKS["left"][:2]
    # transformers renamed past_key_values to cache (5.2x); use whichever this version has
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True)[name]
    nxt = torch.tensor([[5, 6], [7, 8]])  # two new tokens; the mask covers the cache too
    step_mask = torch.cat([mask, torch.tensor([[1, 0], [1, 1]])], dim=1)  # [2, S + 2]
    with residtap.capture(model, positions="last", outputs=OUTPUTS) as cap:
        model(nxt, attention_mask=step_mask, **{name: copy.deepcopy(cache)})
    ref = run_reference(model, nxt, attention_mask=step_mask, **{name: copy.deepcopy(cache)},
                        positions="last", outputs=OUTPUTS)
    assert_same_outputs(cap, ref, OUTPUTS)
    assert cap.positions.tolist() == [[0], [1]]


@pytest.mark.parametrize("part", ["encoder", "decoder"])
@pytest.mark.parametrize("decoder_mask", [False, True])
def test_last_in_an_encoder_decoder_model_reads_the_mask_of_the_blocks_tokens(extension, part, decoder_mask):
    """T5's attention_mask is the encoder's (7 tokens here), its decoder_attention_mask the decoder's
    (5): the decoder blocks' last token is read from the latter (none: every decoder token is real)."""
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                    num_heads=2)).eval()
    enc_mask = torch.ones(2, 7, dtype=torch.long)
    enc_mask[0, 3:] = 0
    dec_mask = torch.ones(2, 5, dtype=torch.long)
    dec_mask[1, 2:] = 0
    kw = dict(input_ids=torch.randint(0, 64, (2, 7)), decoder_input_ids=torch.randint(0, 64, (2, 5)),
              attention_mask=enc_mask)
    if decoder_mask:
        kw["decoder_attention_mask"] = dec_mask
    where = dict(blocks=f"{part}.block", final_norm=f"{part}.final_layer_norm")
    with residtap.capture(model, positions="last", outputs=OUTPUTS, **where) as cap:
        model(**kw)
    ref = run_reference(model, positions="last", outputs=OUTPUTS, **where, **kw)
    assert_same_outputs(cap, ref, OUTPUTS)
    want = {"encoder": [2, 6], "decoder": [4, 1] if decoder_mask else [4, 4]}[part]
    assert cap.positions.flatten().tolist() == want


def test_last_in_the_encoder_under_generate_says_to_capture_the_encoder(extension):
    """generate runs an encoder-decoder model's encoder by itself, never through the model's forward,
    whose attention_mask "last" reads: the error says so, and capturing the encoder works."""
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                    num_heads=2, decoder_start_token_id=0)).eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 3:] = 0
    with pytest.raises(RuntimeError, match=r"T5ForConditionalGeneration.forward was not called.*where the encoder runs "
                                           r"by itself \(generate calls an encoder-decoder model's encoder directly\), "
                                           r"capture model.get_encoder\(\)"):
        with residtap.capture(model, positions="last", blocks="encoder.block", final_norm="encoder.final_layer_norm"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    encoder = model.get_encoder()
    with residtap.capture(encoder, positions="last", outputs=OUTPUTS, blocks="block",
                          final_norm="final_layer_norm") as cap:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert cap.positions.flatten().tolist() == [2, 6]
    with torch.no_grad():  # as generate runs it (torch's SDPA takes another kernel with grad)
        ref = run_reference(encoder, input_ids=ids, attention_mask=mask, positions="last", outputs=OUTPUTS,
                            blocks="block", final_norm="final_layer_norm")
    assert_same_outputs(cap, ref, OUTPUTS)


def test_last_of_a_row_with_no_real_token_is_position_0(extension):
    """An all-padding row has no last real token: position 0, in the capture and the reference alike."""
    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0
    with residtap.capture(model, positions="last", outputs=OUTPUTS) as cap:
        model(ids, attention_mask=mask)
    assert cap.positions.tolist() == [[5], [0]]
    ref = run_reference(model, ids, attention_mask=mask, positions="last", outputs=OUTPUTS)
    assert_same_outputs(cap, ref, OUTPUTS)


def test_positions_must_lie_inside_the_sequence():
    """-seq_len .. seq_len - 1, as Python indexes: seq_len itself is one past the end."""
    from residtap.selection import resolve_positions

    for ok in ([6], [-7], [0, 6, -1]):
        resolve_positions(ok, 7)
    for bad in ([7], [-8], 7):
        with pytest.raises(ValueError, match="positions"):
            resolve_positions(bad, 7)


def test_last_token_index_any_layout():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [True, True, True, True], [0, 0, 1, 1]])
    assert last_token_index(mask, 4).tolist() == [[2], [0], [3], [3]]  # a row with no real token: 0
    assert last_token_index(mask.float(), 2).tolist() == [[0], [0], [1], [1]]  # the last 2 columns


# ---------------------------------------------------------------- bool masks: packed rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bool_mask_packs_kept_tokens(extension, models, family, dtype):
    model = models[family, dtype]
    attn = MASKS["both"]
    keep = attn.bool()
    cap = check(model, ids_for(model, B, S), keep, attention_mask=attn)
    n_kept = int(keep.sum())
    assert cap.resid.shape == (3, n_kept, 64) and cap.stats.l2.shape == (3, n_kept)
    assert torch.equal(cap.kept, keep.nonzero())
    assert cap.kept[:3].tolist() == [[0, 2], [0, 3], [0, 4]]  # row-major: row 0's real tokens first


def test_bool_mask_with_layers_and_capture_dtype(extension, models):
    model = models["llama", torch.bfloat16]
    keep = torch.rand(B, S, generator=torch.Generator().manual_seed(3)) < 0.4
    keep[1, 5] = True
    ids = ids_for(model, B, S)
    with residtap.capture(model, layers=[-1, 0], positions=keep, dtype="float32", outputs=OUTPUTS) as cap:
        model(ids)
    ref = run_reference(model, ids, layers=[-1, 0], positions=keep, dtype="float32", outputs=OUTPUTS)
    assert cap.layer_ids == [0, 2] and cap.resid.dtype == torch.float32
    assert_same_outputs(cap, ref, OUTPUTS)
    with residtap.capture(model, positions=None) as full:
        model(ids)
    assert torch.equal(cap.resid[1], full.resid[2][keep].float())


@pytest.mark.parametrize("positions", ["last", "mask"])
def test_gathered_nans_keep_their_bits(extension, models, positions):
    """A NaN in a bfloat16 stream keeps its sign and payload however its tokens are gathered, in
    the op's outputs and in the RMSNorm the capture applies itself (torch's CPU gather makes every
    bfloat16 NaN 0xffff; x[:, index] and boolean indexing keep the bits)."""
    model = models["llama", torch.bfloat16]
    ids, attn = ids_for(model, B, S), MASKS["both"]
    positions = attn.bool() if positions == "mask" else positions
    kw = dict(layers=[1, 2], positions=positions, outputs=("resid", "normed"))

    def nan_features(_module, _args, output):  # every token's first two features: NaNs with payloads
        hs = output[0] if isinstance(output, tuple) else output
        hs.view(torch.int16)[..., :2] = torch.tensor([0x7FC1, -0x7F], dtype=torch.int16)

    handle = model.model.layers[0].register_forward_hook(nan_features)
    try:
        with torch.no_grad(), residtap.capture(model, **kw) as cap:
            model(ids, attention_mask=attn)
        ref = run_reference(model, ids, attention_mask=attn, **kw)
    finally:
        handle.remove()
    for name in ("resid", "normed"):
        got, want = getattr(cap, name), ref.outputs[name]
        assert got.isnan().any(), name
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name


def test_bool_mask_shape_must_match_the_forward(models):
    model = models["gpt2", torch.float32]
    cap = residtap.capture(model, positions=torch.ones(B, S, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positions: the bool mask is \[batch, seq\] = \[3, 8\] but the "
                                         r"forward's hidden states are \[3, 7, \.\.\.\]"):
        with cap:
            model(ids_for(model, B, S - 1))
    with pytest.raises(residtap.CaptureError, match="raised"):
        cap.resid


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("positions,match", [
    ("first", r"positions: expected None, an int, a slice, .*'last'.*got 'first'"),
    ("LAST", r"got 'LAST'"),
    (torch.zeros(S, dtype=torch.bool),
     r"positions: a bool mask must be \[batch, seq\] \(2-D\), got shape \(8,\)"),
    (torch.zeros(1, B, S, dtype=torch.bool), r"a bool mask must be \[batch, seq\].*\(1, 3, 8\)"),
    (torch.zeros(B, S, dtype=torch.bool), r"positions: the bool mask of shape \(3, 8\) keeps no token"),
    (torch.ones(B, S), r"positions: expected a 1-D integer tensor or a 2-D bool mask \[batch, seq\], got a "
                       r"torch.float32 tensor of shape \(3, 8\)"),
    ([True, False], r"positions: expected None, an int, a slice"),
    ({"last"}, r"positions: expected None, an int, a slice"),
])
def test_bad_position_specs_raise_at_construction(models, positions, match):
    with pytest.raises(ValueError, match=match):
        residtap.capture(models["gpt2", torch.float32], positions=positions)


def test_last_needs_the_forward_of_the_model_it_was_given(models):
    lm = models["gpt2", torch.float32]
    cap = residtap.capture(lm, positions="last")
    with pytest.raises(RuntimeError, match=r"positions='last': the blocks ran but GPT2LMHeadModel.forward "
                                           r"was not called"):
        with cap:
            lm.transformer(ids_for(lm, B, S))  # the inner model: the outer forward never saw a mask
    assert not lm._forward_pre_hooks and not lm.transformer.h[0]._forward_pre_hooks


class Toy(nn.Module):
    """Takes any attention_mask and ignores it, so that residtap's own check is what fails."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.norm = nn.LayerNorm(4)  # never applied; named so the reference gets a final_norm

    def forward(self, x, attention_mask=None):
        for blk in self.blocks:
            x = x + blk(x)
        return x


@pytest.mark.parametrize("mask,got", [(torch.ones(2, 4), r"shape \(2, 4\)$"),
                                      (torch.ones(3, 5), r"shape \(3, 5\)$"),
                                      (torch.ones(2, 1, 5, 5), r"shape \(2, 1, 5, 5\); a 4-D mask \(generate with "
                                                               r"cache_implementation='static' passes one\).*use the "
                                                               r"dynamic cache, or an int position"),
                                      ("yes", "str$")])
def test_last_with_a_mask_of_the_wrong_shape(mask, got):
    m = Toy()
    with pytest.raises(ValueError, match=r"positions='last': expected the model's attention_mask to be "
                                         r"\[batch, >= seq\] = \[2, >= 5\] \(1 = real token\), got " + got):
        with residtap.capture(m, positions="last", blocks="blocks", final_norm="norm"):
            m(torch.randn(2, 5, 4), attention_mask=mask)


def test_last_of_an_empty_sequence_is_refused():
    m = Toy()
    with pytest.raises(ValueError, match=r"positions='last': the input has no tokens \(sequence length 0\)"):
        with residtap.capture(m, positions="last", blocks="blocks", final_norm="norm"):
            m(torch.randn(2, 0, 4))
    with pytest.raises(ValueError, match=r"positions='last': the input has no tokens \(sequence length 0\)"):
        run_reference(m, torch.randn(2, 0, 4), positions="last", blocks="blocks", final_norm="norm")


def test_a_huge_position_is_refused_against_the_real_length(models):
    """Positions are range-checked per forward, against its length (not a stand-in length)."""
    model = models["gpt2", torch.float32]
    cap = residtap.capture(model, positions=[0, 2**70])
    with pytest.raises(ValueError, match=r"positions: expected positions in \[-8, 8\) for the input's sequence "
                                         rf"length 8, got \[{2**70}\]"):
        with cap:
            model(ids_for(model, B, S))


def test_positions_and_kept_read_are_copies(models):
    """Changing what cap.positions / cap.kept return changes nothing the capture gathers next."""
    model = models["gpt2", torch.float32]
    ids = ids_for(model, B, S)
    for spec in ([0, 3], [5, 1], "last"):
        cap = residtap.capture(model, positions=spec)
        with cap:
            model(ids)
        first = cap.resid.clone()
        cap.positions[0, 0] = 2
        with cap:
            model(ids)
        assert torch.equal(cap.resid, first), spec
    mask = MASKS["both"].bool()
    cap = residtap.capture(model, positions=mask)
    with cap:
        model(ids)
    cap.kept[0] = 7
    assert torch.equal(cap.kept, mask.nonzero())


def test_reading_kept_or_positions_of_the_other_kind(models):
    model = models["gpt2", torch.float32]
    ids = ids_for(model, B, S)
    with residtap.capture(model, positions=[0, -1]) as cap:
        model(ids)
    assert cap.positions.tolist() == [[0, S - 1]] * B
    with pytest.raises(residtap.CaptureError, match=r"cap.kept: only a bool mask"):
        cap.kept
    with residtap.capture(model, positions=MASKS["left"].bool()) as packed:
        model(ids)
    with pytest.raises(residtap.CaptureError, match=r"cap.positions: a bool mask packs tokens.*cap.kept"):
        packed.positions
    with pytest.raises(residtap.CaptureError, match=r"cap.positions: no forward has run"):
        residtap.capture(model, positions="last").positions


def test_no_host_sync_in_the_hooks(extension, monkeypatch):
    """The hooks of "last" and of a bool mask read no tensor value on the host: every way of doing
    so raises while the (sync-free) toy model runs. On a GPU each would be a host sync."""
    m = Toy()
    x, attn = torch.randn(2, 5, 4), torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    caps = [residtap.capture(m, positions=p, blocks="blocks", final_norm="norm", outputs=OUTPUTS,
                             backend="compiled") for p in ("last", attn.bool())]

    def no_sync(*_a, **_k):
        raise AssertionError("a host read of a tensor inside the forward")

    for cap in caps:
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__bool__", "__int__", "__index__", "cpu", "numpy", "nonzero"):
                mp.setattr(torch.Tensor, name, no_sync)
            with cap:
                m(x, attention_mask=attn)
    for cap, kw in zip(caps, (dict(attention_mask=attn, positions="last"), dict(positions=attn.bool()))):
        ref = run_reference(m, x, blocks="blocks", final_norm="norm", outputs=OUTPUTS, **kw)
        assert_same_outputs(cap, ref, OUTPUTS)
    assert caps[0].positions.tolist() == [[4], [2]]


def test_numpy_arrays_and_0d_tensors_select_as_their_values():
    """positions= and cap.layer take numpy arrays / integers and 0-d integer tensors as layers= does."""
    import numpy as np

    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 6)
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    for spec, same in ((np.array([0, 4, 2]), [0, 4, 2]), (torch.tensor(3), 3), (np.array(3), 3),
                       (np.int64(-1), -1), (mask.numpy(), mask),
                       # narrow numpy integers, alone or in a list: no fixed-width arithmetic overflows
                       (np.int32(3), 3), (np.uint8(1), 1), ([np.int16(1), 2], [1, 2]),
                       ([np.int32(0), np.int32(-1)], [0, -1]), (slice(np.int32(1), np.int64(4)), slice(1, 4))):
        with residtap.capture(model, positions=spec) as a:
            model(ids)
        with residtap.capture(model, positions=same) as b:
            model(ids)
        assert torch.equal(a.resid, b.resid), spec
        # the reference reads positions by the same rules (it refused numpy and 0-d tensors)
        assert torch.equal(run_reference(model, ids, positions=spec).outputs["resid"], a.resid), spec
    for layer_id in (np.int64(1), torch.tensor(1), np.int32(-2)):
        assert torch.equal(b.layer("resid", layer_id), b.resid[1])
    # layers= as a list of numpy integers: plain ints in layer_ids (a manifest writes them as JSON)
    ids_np = residtap.capture(model, layers=[np.int8(-1), np.int64(0)]).layer_ids
    assert ids_np == [0, 2] and all(type(i) is int for i in ids_np)
    for bad in (torch.tensor(1.0), torch.tensor(True)):
        with pytest.raises(ValueError, match="layer_id: expected an int residual index, got"):
            b.layer("resid", bad)


def test_last_reads_a_positional_mask_through_wrappers_or_says_it_cannot(extension, models):
    """A wrapper whose forward takes *args (DataParallel here; torch.compile's OptimizedModule is
    unwrapped the same way, by _orig_mod): the mask is found by the wrapped model's signature. A
    custom wrapper that hides it: an error, not the last position taken as real."""
    model, mask = models["llama", torch.float32], MASKS["right"]
    ids = ids_for(model, B, S)
    wrapped = nn.DataParallel(model)  # without a GPU it calls the model itself
    sel = dict(blocks="module.model.layers", final_norm="module.model.norm")
    with residtap.capture(wrapped, positions="last", **sel) as cap:
        wrapped(ids, mask)  # Llama: forward(input_ids, attention_mask, ...)
    ref = run_reference(wrapped, ids, mask, positions="last", **sel)
    assert cap.positions.tolist() == [[p] for p in LAST["right"]]
    assert torch.equal(cap.resid, ref.outputs["resid"])

    class Opaque(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

    opaque = Opaque(model)
    cap = residtap.capture(opaque, positions="last", blocks="inner.model.layers",
                           final_norm="inner.model.norm")
    with cap:
        opaque(ids)  # no mask: fine
        cap.resid
        with pytest.raises(ValueError, match=r"positions='last': the model was called with 2 positional "
                                             r"arguments and its forward takes \*args"):
            opaque(ids, mask)
        with pytest.raises(residtap.CaptureError, match="the last forward raised"):
            cap.resid  # not the previous forward's, taken for this one's
