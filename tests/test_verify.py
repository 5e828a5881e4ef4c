"""residtap.verify and `residtap verify`: the seed's finding as a report and an exit code."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from torch import nn

import residtap
from helpers import DTYPES, hook_counts, ids_for, tiny_gpt2
from residtap import backend, cli


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_layer,d", [(1, 64), (3, 66)])
def test_report_every_layer_raw_except_the_last_which_is_final_norm(extension, dtype, n_layer, d):
    model = tiny_gpt2(n_layer, d, 2 if d == 64 else 3, dtype)
    rep = residtap.verify(model, ids_for(model, 2, 6))
    assert rep.ok and rep.n_layers == n_layer and rep.n_hidden_states == n_layer + 1
    for row in rep.rows[:-1]:
        assert row.raw_exact and row.raw_maxabs == 0.0
    last = rep.rows[-1]
    assert not last.raw_exact and last.raw_maxabs > 0
    assert last.normed_exact and last.normed_maxabs == 0.0 and last.matches == "normed"
    assert rep.convention.startswith("last entry is final_norm")
    d = rep.to_dict()
    assert json.loads(json.dumps(d))["ok"] is True and len(d["rows"]) == n_layer + 1
    text = str(rep)
    assert "final_norm(raw)" in text and text.rstrip().endswith("OK")


def test_report_with_attention_mask(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    ids = ids_for(model, 2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    assert residtap.verify(model, ids, attention_mask=mask).ok


def test_report_fails_when_the_last_state_is_not_explained(extension):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    wrong = nn.LayerNorm(64, eps=1e-3)  # not the model's ln_f: cannot reproduce hidden_states[-1]
    rep = residtap.verify(model, ids_for(model, 2, 6), final_norm=wrong)
    assert not rep.ok and rep.rows[-1].matches == "neither"
    assert "FAILED" in str(rep)


def test_cli_verify_table_and_json(extension, capsys):
    assert cli.main(["verify", "--batch", "1", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-small (random init), 12 blocks" in out and out.rstrip().endswith("OK")
    rows = [line.split(None, 5) for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    # hidden_states[0] is block 0's input, not any block's output
    assert [r[-1] for r in rows] == ["embeddings (block 0's input)"] + ["raw block output"] * 11 \
        + ["final_norm(raw)"]
    assert ("convention: last entry is final_norm(raw output); entry 0 is the embeddings (block 0's input), "
            "the others raw block outputs") in out
    assert out.count("exact") >= 13
    assert cli.main(["verify", "--batch", "1", "--seq", "4", "--dtype", "bfloat16", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["n_layers"] == 12 and rep["dtype"] == "bfloat16"
    assert [r["matches"] for r in rep["rows"]] == ["raw"] * 12 + ["normed"]


def test_cli_verify_exit_code_1_when_not_ok(extension, monkeypatch, capsys):
    verify_mod = sys.modules["residtap.verify"]
    real = verify_mod.verify
    monkeypatch.setattr(verify_mod, "verify",
                        lambda m, ids, **kw: real(m, ids, final_norm=nn.LayerNorm(768, eps=0.1), **kw))
    assert cli.main(["verify", "--batch", "1", "--seq", "4"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_cli_verify_model_that_cannot_be_loaded_offline(tmp_path, capsys):
    assert cli.main(["verify", "--model", str(tmp_path / "nothing-here")]) == 2  # not 1: "not exact"
    # a mistyped path is said as such, not as an invalid hub name
    assert capsys.readouterr().err == (f"residtap verify: error: --model '{tmp_path / 'nothing-here'}': no "
                                       "such directory (a local model is a directory holding config.json and "
                                       "the weights)\n")
    assert cli.main(["verify", "--model", "no-such-org/no-such-model"]) == 2  # a hub name: not in the cache
    assert "--model 'no-such-org/no-such-model' could not be loaded offline" in capsys.readouterr().err
    assert cli.main(["verify", "--model", "random:gpt2-small"]) == 2  # extract's spec: said as such
    assert capsys.readouterr().err == ("residtap verify: error: --model 'random:gpt2-small': verify does not take "
                                       "extract's random: specs; omit --model for the built-in random "
                                       "GPT-2-small (--seed sets its weights), or save a model with "
                                       "save_pretrained and pass its directory\n")
    weights = tmp_path / "model.safetensors"  # a file: said as one, not as "no such directory"
    weights.write_bytes(b"\0" * 16)
    assert cli.main(["verify", "--model", str(weights)]) == 2
    assert capsys.readouterr().err == (f"residtap verify: error: --model {str(weights)!r} is a file, not a "
                                       "model directory or hub name (a local model is a directory holding "
                                       "config.json and the weights)\n")


@pytest.mark.parametrize("args,match", [
    (["--batch", "0"], r"--batch: .*expected an int >= 1, got '0'"),
    (["--seq", "-1"], r"--seq: .*expected an int >= 1, got '-1'"),
    (["--seq", "2000"], r"--seq: expected at most 1024 \(the model's positions\), got 2000"),
    (["--device", "bogus"], r"--device: expected a device that computes, .*got 'bogus'"),
    (["--device", "meta"], r"--device: expected a device that computes, .*got 'meta'"),
    pytest.param(["--device", "mps"], r"--device: 'mps' is not available here",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    (["--seed", str(2**64)], r"--seed: expected an int in \[-2\*\*63, 2\*\*64\) .*got 18446744073709551616"),
    (["--device", "cuda:7"], r"--device: 'cuda:7' is not available here"),
    (["--final-norm", "lm_head"], r"final_norm: expected a norm, whose weight is 1-D \[d_model\]; got a Linear "
                                  r"with a weight of shape \(50257, 768\)"),
    (["--final-norm", "transformer.h.11"], r"final_norm: expected the model's final norm, applied after the "
                                           r"last block; got a GPT2Block that is block 11"),
])
def test_cli_verify_bad_arguments_exit_2_naming_them(extension, capsys, args, match):
    try:
        rc = cli.main(["verify", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_verify_compiled_backend_unavailable_exits_2_in_one_line(monkeypatch, capsys):
    """Asking for a backend this machine lacks is a bad argument (2), not a failed check (1)."""
    monkeypatch.setattr(backend, "compiled_unavailable_reason", lambda device, dtype=None: "no compiler here")
    assert cli.main(["verify", "--batch", "1", "--seq", "4", "--backend", "compiled"]) == 2
    err = capsys.readouterr().err
    assert err == "residtap verify: error: backend='compiled' was requested but no compiler here\n"


def test_report_json_is_strict_where_a_nan_faces_a_number(extension, capsys):
    """max |diff| is inf where a NaN faces a number: to_json and --json write it as the string
    "inf", since a bare Infinity is not JSON."""
    import copy

    model = copy.deepcopy(tiny_gpt2(3, 64, 2, torch.float32))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[3] = float("nan")
    rep = residtap.verify(model, ids_for(model, 1, 6))
    assert rep.rows[2].normed_maxabs == float("inf")

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    d = json.loads(rep.to_json(), parse_constant=refuse)
    assert d["rows"][2]["normed_maxabs"] == "inf" and d["rows"][2]["raw_maxabs"] == 0.0
    assert d["ok"] is True and d["rows"][-1]["normed_maxabs"] == 0.0


def test_report_when_the_projection_does_not_explain_the_last_state(extension):
    """A family with a projection (OPT's project_out) whose re-application misses: the convention
    says the projection was tried, not that residtap knows none."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=97, hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=2,
                    num_attention_heads=2, ffn_dim=128, max_position_embeddings=64)
    model = OPTForCausalLM(cfg).eval()
    ids = ids_for(model, 1, 5)
    assert residtap.verify(model, ids).ok
    rep = residtap.verify(model, ids, final_norm=nn.LayerNorm(64, eps=0.1))
    assert not rep.ok
    assert rep.convention == ("unexplained: hidden_states[-1] (width 32, d_model 64) is not "
                              "project_out(final_norm(raw output))")


def test_report_for_a_model_whose_layers_are_stored_per_device(extension, monkeypatch):
    """A model dispatched over several devices has no stacked cap.resid: verify reads per layer
    (emulated on one device by storing per layer, as test_device_map does)."""
    monkeypatch.setattr(residtap.Capture, "_stacked_on", lambda self, devices: False)
    model = tiny_gpt2(2, 64, 2, torch.float32)
    rep = residtap.verify(model, ids_for(model, 2, 6))
    assert rep.ok and [r.matches for r in rep.rows] == ["raw", "raw", "normed"]


def test_report_when_the_config_asks_for_tuples(extension):
    """verify asks for a ModelOutput whatever config.return_dict says (on the bare model: HF's
    LM-head wrappers themselves break with return_dict=False in their config)."""
    import copy

    model = copy.deepcopy(tiny_gpt2(2, 64, 2, torch.float32)).transformer
    model.config.return_dict = False
    assert isinstance(model(ids_for(model, 2, 6), output_hidden_states=True), tuple)
    assert residtap.verify(model, ids_for(model, 2, 6)).ok


def test_cli_bad_dtype(capsys):
    """The names --dtype takes, without the Python API's None (not something to type here)."""
    with pytest.raises(SystemExit) as e:  # argparse's own error
        cli.main(["verify", "--dtype", "float64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(r"--dtype: invalid choice: 'float64' \(choose from 'bf16', "
                                           r".*'float32'", err), err
    assert "None" not in err


def test_cli_verify_local_model_directory(extension, tmp_path, capsys):
    model = tiny_gpt2(2, 64, 2, torch.float32)
    model.save_pretrained(tmp_path / "tiny")
    assert cli.main(["verify", "--model", str(tmp_path / "tiny"), "--batch", "1", "--seq", "5"]) == 0
    assert "2 blocks" in capsys.readouterr().out


def test_cli_env_reports_extension_and_backend(extension, capsys):
    assert cli.main(["env", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["extension_loaded"] is True and "cpu" in rep["extension_devices"]
    assert rep["backend_by_device"]["cpu"] == "compiled"
    assert rep["torch"] == torch.__version__


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nans_that_came_through_unchanged_are_exact_and_a_nan_against_a_number_is_not(extension, dtype):
    """A NaN in the stream (one channel of the middle block's MLP bias) reaches hidden_states as
    the very same bits: verify calls that exact, as a bit-for-bit comparison must (``==`` would
    not). The next block spreads it over every row, and the last entry is final_norm of that.
    A NaN facing a number is a difference, reported as inf, not as 'nothing to compare'."""
    import copy

    model = copy.deepcopy(tiny_gpt2(3, 64, 2, dtype))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[3] = float("nan")
    ids = ids_for(model, 2, 6)
    rep = residtap.verify(model, ids)
    assert rep.ok, str(rep)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert not hs[1].isnan().any() and hs[2].isnan().any() and not hs[2].isnan().all()
    assert [r.matches for r in rep.rows[:3]] == ["raw", "raw", "raw"]
    assert all(r.raw_exact and r.raw_maxabs == 0.0 for r in rep.rows[:3])
    assert rep.rows[2].normed_maxabs == float("inf")  # final_norm makes whole rows NaN
    assert rep.rows[-1].normed_exact and rep.rows[-1].normed_maxabs == 0.0

    from residtap.verify import _compare
    nan = torch.tensor(float("nan"))
    h = torch.ones(4, dtype=dtype)
    c = h.clone()
    c[1] = float("nan")
    maxabs, eq = _compare(c, h, nan)
    assert maxabs.item() == float("inf") and eq.item() == 0.0
    h[1] = float("nan")
    assert [t.item() for t in _compare(c, h, nan)] == [0.0, 1.0]
    c[1] = -0.0
    h[1] = 0.0
    assert [t.item() for t in _compare(c, h, nan)] == [0.0, 1.0]  # as torch.equal counts it


def test_cli_verify_checks_the_seed_for_a_loaded_model_too(extension, tmp_path, capsys):
    tiny_gpt2(2, 64, 2, torch.float32).save_pretrained(tmp_path / "tiny")
    assert cli.main(["verify", "--model", str(tmp_path / "tiny"), "--seed", str(2**64)]) == 2
    assert "residtap verify: error: --seed: expected an int in" in capsys.readouterr().err


def test_cli_verify_a_checkpoint_of_no_kind_it_loads(tmp_path, capsys):
    """A complete local encoder-decoder checkpoint: not "could not be loaded offline", which would send the
    user looking for files they have."""
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                        num_heads=2)).save_pretrained(tmp_path / "t5")
    assert cli.main(["verify", "--model", str(tmp_path / "t5")]) == 2
    err = capsys.readouterr().err
    assert "is a 't5' model, which transformers has as neither a causal LM nor an image-text" in err
    assert "offline" not in err


def test_verify_refuses_a_model_that_needs_more_than_token_ids(extension, capsys):
    """BLIP-2's forward requires pixel_values: verify can make up token ids but not images. Before, the
    ids went in positionally as pixel_values and a TypeError blamed input_ids (exit 1, "not exact")."""
    from transformers import GPT2LMHeadModel

    class NeedsPixels(GPT2LMHeadModel):
        def forward(self, pixel_values, input_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    model = NeedsPixels(tiny_gpt2(1, 64, 2, torch.float32).config).eval()
    with pytest.raises(ValueError, match=r"^model: NeedsPixels.forward requires pixel_values besides "
                                         r"input_ids; verify runs on token ids alone"):
        residtap.verify(model, ids_for(model, 1, 4))


def test_verify_a_forward_that_runs_fewer_blocks_than_it_has(extension):
    """Llama runs layers[:config.num_hidden_layers]: lowering it is HF's early exit. verify says so, and
    verifies the blocks that ran when given them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=96,
                                         max_position_embeddings=64)).eval()
    model.config.num_hidden_layers = 2
    ids = ids_for(model, 2, 6)
    with pytest.raises(ValueError, match=r"^model: its forward ran 2 of its 3 blocks \(config.num_hidden_layers"):
        residtap.verify(model, ids)
    rep = residtap.verify(model, ids, blocks=model.model.layers[:2])
    assert rep.ok and rep.n_layers == 2 and [r.matches for r in rep.rows] == ["raw", "raw", "normed"]


def test_cli_exit_status_3_for_the_unexpected(extension, monkeypatch, capsys):
    """1 means "not exact" and 2 a bad argument or model; a bug is neither."""
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sys.modules["residtap.verify"], "verify", boom)
    assert cli.main(["verify", "--batch", "1", "--seq", "4"]) == cli.EXIT_UNEXPECTED == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.rstrip().endswith("residtap verify: unexpected error (above); exit status 3")


def test_cli_a_ctrl_c_a_library_wrapped_is_a_ctrl_c_not_status_3(extension, monkeypatch, capsys):
    """A Ctrl-C during one of transformers' lazy imports comes out as its ModuleNotFoundError, raised from
    the KeyboardInterrupt: the command line raises that KeyboardInterrupt (Python's way out, the death by
    SIGINT) rather than calling it an unexpected error with status 3."""
    ctrl_c = KeyboardInterrupt()

    def wrapped(*args, **kwargs):
        try:
            raise ctrl_c
        except KeyboardInterrupt as e:
            try:
                raise RuntimeError("import of GenerationMixin halted") from e
            except RuntimeError as inner:
                raise ModuleNotFoundError("Could not import module 'GPT2LMHeadModel'") from inner

    monkeypatch.setattr(sys.modules["residtap.verify"], "verify", wrapped)
    with pytest.raises(KeyboardInterrupt) as raised:
        cli.main(["verify", "--batch", "1", "--seq", "4"])
    assert raised.value is ctrl_c and "unexpected error" not in capsys.readouterr().err


def test_cli_verify_a_model_type_residtap_lacks_with_blocks_and_final_norm(extension, tmp_path, capsys):
    """The error for a model outside residtap's table said to pass blocks= / final_norm=, which the
    command line had no way to."""
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, is_decoder=True)).save_pretrained(tmp_path / "bert")
    args = ["verify", "--model", str(tmp_path / "bert"), "--batch", "1", "--seq", "6"]
    assert cli.main(args) == 2
    assert "--blocks model.layers --final-norm model.norm, or --final-norm none" in capsys.readouterr().err
    assert cli.main(args + ["--blocks", "bert.encoder.layer", "--final-norm", "none"]) == 0
    out = capsys.readouterr().out
    assert "2 blocks" in out and "no entry is normalized (the model has no final norm)" in out


def test_report_where_the_final_norm_changes_nothing(extension):
    """An identity final norm: every entry is the raw residual and its norm at once ("both"), which
    the report says as such rather than as raw alone."""
    import copy

    model = copy.deepcopy(tiny_gpt2(2, 64, 2, torch.float32))
    model.transformer.ln_f = nn.Identity()
    rep = residtap.verify(model, ids_for(model, 2, 6))
    assert rep.ok and [r.matches for r in rep.rows] == ["both"] * 3
    assert str(rep).count("raw (= normed)") == 3


def test_verify_a_forward_taking_input_ids_positional_only(extension):
    """forward(self, input_ids, /, ...): the ids go by position, as a keyword would be refused."""
    from transformers import GPT2LMHeadModel

    class PositionalOnly(GPT2LMHeadModel):
        def forward(self, input_ids, /, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    model = PositionalOnly(tiny_gpt2(1, 64, 2, torch.float32).config).eval()
    assert residtap.verify(model, ids_for(model, 1, 4)).ok


def test_cli_final_norm_none_in_any_case():
    import argparse

    for text in ("none", "None", "NONE"):
        assert cli.layout_kwargs(argparse.Namespace(blocks=None, final_norm=text)) == {"final_norm": None}
    assert cli.layout_kwargs(argparse.Namespace(blocks="h", final_norm="ln_f")) == {"blocks": "h",
                                                                                   "final_norm": "ln_f"}
    assert cli.layout_kwargs(argparse.Namespace(blocks=None, final_norm=None)) == {}


def test_cli_a_capture_error_is_a_one_line_exit_2(extension, monkeypatch, capsys):
    def refuses(*args, **kwargs):
        raise residtap.CaptureError("cap.resid: the last forward reached 3 of 4 selected layers")

    monkeypatch.setattr(sys.modules["residtap.verify"], "verify", refuses)
    assert cli.main(["verify", "--batch", "1", "--seq", "4"]) == 2
    assert capsys.readouterr().err == ("residtap verify: error: cap.resid: the last forward reached 3 of 4 "
                                       "selected layers\n")


def test_cli_verify_takes_seq_up_to_the_models_positions(extension, tmp_path, capsys):
    from residtap.models import random_gpt2

    random_gpt2(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=8).save_pretrained(tmp_path / "m")
    args = ["verify", "--model", str(tmp_path / "m"), "--batch", "1"]
    assert cli.main(args + ["--seq", "8"]) == 0
    assert cli.main(args + ["--seq", "9"]) == 2
    assert "--seq: expected at most 8 (the model's positions), got 9" in capsys.readouterr().err


def _embeds_only(base, record=None):
    """A copy of ``base`` (a GPT-2, with or without its LM head) whose forward takes ``inputs_embeds`` and no
    ``input_ids``, as a user's wrapper may; what it is given goes into ``record``."""
    class EmbedsOnly(type(base)):
        def forward(self, inputs_embeds, attention_mask=None, **kwargs):
            if record is not None:
                record.append(inputs_embeds)
            return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    model = EmbedsOnly(base.config).to(base.dtype).eval()
    model.load_state_dict(base.state_dict())
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verify_a_forward_taking_inputs_embeds_alone(extension, dtype):
    """A forward without input_ids gets the model's own input embeddings of the ids. Before, the ids went in
    positionally as inputs_embeds: integers where vectors belong, a RuntimeError from deep in the model. The
    report is the input_ids path's, row for row, because HF's forward computes exactly these embeddings."""
    base = tiny_gpt2(2, 64, 2, dtype)
    seen = []
    model = _embeds_only(base, seen)
    ids = ids_for(model, 2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    rep = residtap.verify(model, ids, attention_mask=mask)
    assert len(seen) == 1 and torch.equal(seen[0], base.transformer.wte(ids))
    assert rep.ok and [r.matches for r in rep.rows] == ["raw", "raw", "normed"]
    ref = residtap.verify(base, ids, attention_mask=mask)
    assert rep.rows == ref.rows and rep.convention == ref.convention
    with torch.no_grad():
        by_ids = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        by_embeds = base(inputs_embeds=seen[0], attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(by_ids) == len(by_embeds) == 3 and all(map(torch.equal, by_ids, by_embeds))


def test_cli_verify_a_forward_taking_inputs_embeds_alone(extension, monkeypatch, capsys):
    """Before, on a bare model at --seq equal to its width (where the ids broadcast against the position
    embeddings), the forward ran on the ids as vectors and `residtap verify` said FAILED, exit 1: a finding
    about residtap's own wrong input, not the model."""
    model = _embeds_only(tiny_gpt2(2, 64, 2, torch.float32, lm_head=False))
    monkeypatch.setattr(cli, "_load_model", lambda *args: (model, "embeds-only"))
    assert cli.main(["verify", "--batch", "1", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "embeds-only, 2 blocks" in out and out.rstrip().endswith("OK")


class _Wrapped(nn.Module):
    """A wrapper that is no PreTrainedModel: its forward takes inputs_embeds, and it has no
    get_input_embeddings to make them with."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, inputs_embeds, attention_mask=None, **kwargs):
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def _no_vectors(base):
    """A forward taking inputs_embeds alone, whose get_input_embeddings maps ids to themselves."""
    model = _embeds_only(base)
    model.get_input_embeddings = lambda: nn.Identity()
    return model


class _PatchEmbedding(nn.Module):
    def forward(self, pixels):  # (a Conv2d given ints raises too, in words that vary with torch)
        raise RuntimeError("expected pixel values [batch, channels, height, width]\n(a second line)")


def _raises_on_ids(base):
    """A forward taking inputs_embeds alone, whose input embeddings are a patch embedding, which
    raises on token ids."""
    model = _embeds_only(base)
    model.get_input_embeddings = lambda: _PatchEmbedding()
    return model


def _needs_more(base):
    from transformers import GPT2LMHeadModel

    class NeedsPixels(GPT2LMHeadModel):
        def forward(self, inputs_embeds, pixel_values, **kwargs):
            return super().forward(inputs_embeds=inputs_embeds, **kwargs)

    return NeedsPixels(base.config).eval()


@pytest.mark.parametrize("make,layout,error", [
    (_Wrapped, ["--blocks", "lm.transformer.h", "--final-norm", "lm.transformer.ln_f"],
     "model: _Wrapped.forward takes inputs_embeds and no input_ids, and _Wrapped has no input embeddings "
     "(get_input_embeddings()) to make them from token ids; verify runs on token ids alone (capture it with "
     "residtap.Capture and your own inputs)"),
    (_no_vectors, [],
     "model: EmbedsOnly.forward takes inputs_embeds and no input_ids, and its input embeddings (Identity) made "
     "torch.int64 of shape [1, 4] of token ids of shape [1, 4], not a floating-point vector per token; verify "
     "runs on token ids alone (capture it with residtap.Capture and your own inputs)"),
    (_raises_on_ids, [],
     "model: EmbedsOnly.forward takes inputs_embeds and no input_ids, and its input embeddings (_PatchEmbedding) "
     "raised on token ids of shape [1, 4]: RuntimeError: expected pixel values [batch, channels, height, width]; "
     "verify runs on token ids alone (capture it with residtap.Capture and your own inputs)"),
    (_needs_more, [],
     "model: NeedsPixels.forward requires pixel_values besides inputs_embeds; verify runs on token ids alone "
     "(capture it with residtap.Capture and your own inputs)"),
], ids=["no-embeddings", "no-vectors", "raises", "needs-more"])
def test_verify_refuses_inputs_embeds_it_cannot_make_in_one_line(extension, monkeypatch, capsys, make, layout,
                                                                  error):
    """Where verify cannot make the inputs_embeds a forward takes in place of input_ids, it says what it
    expected and what it found (exit 2), before any forward and with no hook left. Before, the ids went in as
    the embeddings: a RuntimeError from inside the model, exit 3."""
    from residtap.models import random_gpt2

    # A fresh model, not tiny_gpt2's shared one, which other tests' forwards left HF's own hooks on.
    model = make(random_gpt2(n_layer=1, n_embd=64, n_head=2, vocab_size=97, n_positions=64))
    kw = {"blocks": layout[1], "final_norm": layout[3]} if layout else {}
    with pytest.raises(ValueError) as info:
        residtap.verify(model, ids_for(model, 1, 4), **kw)
    assert str(info.value) == error
    # No forward ran (HF adds output-capturing hooks of its own on the first) and no hook of residtap's is left.
    assert hook_counts(model) == 0
    monkeypatch.setattr(cli, "_load_model", lambda *args: (model, "wrapped"))
    assert cli.main(["verify", "--batch", "1", "--seq", "4", *layout]) == 2
    err = capsys.readouterr().err
    assert err == f"residtap verify: error: {info.value}\n" and err.count("\n") == 1
    assert hook_counts(model) == 0


def test_compare_reports_infinite_and_float64_differences_as_they_are():
    """An inf facing a number (or -inf) is a difference of inf, not float32's largest value; a
    float64 model's differences are taken in float64 (1e-12 is not 0, 1e300 is not 3.4e38)."""
    from residtap.verify import _compare

    nan = torch.tensor(float("nan"))
    inf = float("inf")
    for c, h in (([inf], [1.0]), ([inf], [-inf]), ([2.0], [-inf])):
        maxabs, eq = _compare(torch.tensor(c), torch.tensor(h), nan)
        assert maxabs.item() == inf and eq.item() == 0.0, (c, h)
    assert [t.item() for t in _compare(torch.tensor([inf]), torch.tensor([inf]), nan)] == [0.0, 1.0]
    one = torch.ones(3, dtype=torch.float64)
    maxabs, eq = _compare(one + 1e-12, one, nan)
    assert maxabs.item() > 0.0 and eq.item() == 0.0
    maxabs, _ = _compare(one * 1e300, -one * 1e300, nan)
    assert maxabs.item() == inf  # (2e300 does not fit in the float32 table: inf, not a finite value)


@pytest.mark.parametrize("ids,mask,match", [
    (torch.zeros(1, 2, 7, dtype=torch.long), None, r"input_ids: expected an integer tensor \[batch, seq\] with "
                                                   r"batch, seq >= 1, got a torch.int64 tensor of shape \(1, 2, 7\)"),
    (torch.zeros(7, dtype=torch.long), None, r"got a torch.int64 tensor of shape \(7,\)"),
    (torch.zeros(2, 0, dtype=torch.long), None, r"got a torch.int64 tensor of shape \(2, 0\)"),
    (torch.zeros(2, 7), None, r"got a torch.float32 tensor"),
    ([[1, 2]], None, r"got list"),
    (torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 6), r"attention_mask: expected None or a tensor of "
                                                            r"input_ids' shape \(2, 7\), got shape \(2, 6\)"),
])
def test_verify_refuses_input_ids_that_are_not_a_batch_of_sequences(extension, ids, mask, match):
    model = tiny_gpt2(2, 64, 2)
    with pytest.raises(ValueError, match=match):
        residtap.verify(model, ids, mask)


def test_cli_output_into_a_closed_pipe_ends_quietly():
    """`residtap env --json | head`: once the reader has gone, no traceback and no status 3."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "residtap", "env", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    proc.stdout.close()  # before it writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err, err
