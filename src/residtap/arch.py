"""Where each model family keeps its blocks and its final norm, and how to read a block's hidden
state from its hook arguments.

Adding a family is one line in ``FAMILIES``: the HF ``config.model_type``, then the dotted paths of
the decoder blocks and of the final norm, relative to ``model.base_model`` (the bare model, which
both ``XModel`` and ``XForCausalLM`` expose). A final norm whose attribute exists but is None (OPT
with ``do_layer_norm_before=False``) means "no final norm".

An image-text model (LLaVA, Gemma 3, Qwen2.5-VL, Mistral 3...) needs no line of its own: its base
model keeps the text decoder as ``language_model``, and that decoder's own model_type says where its
blocks and final norm are.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from .selection import NOT_GIVEN


class UnsupportedStreamError(RuntimeError):
    """The model's residual stream is not what residtap captures: one ``[batch, seq, d_model]``
    tensor handed from block to block, each block running once per forward, never narrowing."""


def not_a_stream(hidden: torch.Tensor) -> str | None:
    """Why the first block's hidden state is not a ``[batch, seq, d_model]`` stream, or None. Capture
    and run_reference refuse in these words, each with its own prefix."""
    if hidden.dim() != 3:
        return (f"expected the first block's hidden state to be [batch, seq, d_model], got shape "
                f"{tuple(hidden.shape)}")
    return None


def stream_changed(block: int, family: str, out: torch.Tensor, inp: torch.Tensor | None,
                   stream: tuple) -> str | None:
    """Why block ``block`` left the stream's shape ``stream`` (what it returned, or was called with),
    or None. Capture and run_reference refuse in these words, each with its own prefix."""
    for what, x in (("returned", out), ("was called with", inp)):
        if x is not None and x.shape != stream:  # (torch.Size is a tuple)
            return (f"block {block} of {family} {what} a hidden state of shape {tuple(x.shape)}, but the "
                    f"stream entered the first block as {tuple(stream)} [batch, seq, d_model]")
    return None


@dataclasses.dataclass(frozen=True)
class Family:
    blocks: str  # path of the nn.ModuleList of decoder blocks, relative to model.base_model
    final_norm: str | None  # path of the final norm, or None when the family has none
    # A module HF applies after the final norm to make last_hidden_state (OPT's project_out, which
    # may change the width); verify re-applies it to explain hidden_states[-1]. None where absent.
    project_out: str | None = None


# Read from transformers' models/<type>/modeling_<type>.py; every entry is tested with a tiny random
# model (tests/test_families.py) on transformers 5.17 and 5.24 (on 5.24 alone where 5.17 lacks the
# type). Every hidden state here is the first positional argument of its block; blocks return a
# tensor or a tuple.
FAMILIES: dict[str, Family] = {
    "gpt2": Family("h", "ln_f"),
    "gptj": Family("h", "ln_f"),
    "gpt_neox": Family("layers", "final_layer_norm"),  # Pythia
    "opt": Family("decoder.layers", "decoder.final_layer_norm", project_out="decoder.project_out"),
    "llama": Family("layers", "norm"),  # RMSNorm
    "mistral": Family("layers", "norm"),  # RMSNorm
    "qwen2": Family("layers", "norm"),  # RMSNorm
    "gemma": Family("layers", "norm"),  # RMSNorm with (1 + w); embeddings scaled by sqrt(d)
    "phi": Family("layers", "final_layernorm"),
    "bloom": Family("h", "ln_f"),  # hidden_states[0] is after word_embeddings_layernorm
    "falcon": Family("h", "ln_f"),
    "gpt_bigcode": Family("h", "ln_f"),  # StarCoder, SantaCoder
    "codegen": Family("h", "ln_f"),
    "mpt": Family("blocks", "norm_f"),  # LayerNorm without a bias
    "persimmon": Family("layers", "final_layernorm"),
    "stablelm": Family("layers", "norm"),
    "starcoder2": Family("layers", "norm"),
    "phi3": Family("layers", "norm"),  # RMSNorm
    "phimoe": Family("layers", "norm"),
    "qwen3": Family("layers", "norm"),  # RMSNorm
    "qwen2_moe": Family("layers", "norm"),
    "qwen3_moe": Family("layers", "norm"),
    "mixtral": Family("layers", "norm"),
    "gemma2": Family("layers", "norm"),  # (1 + w) RMSNorm, like Gemma
    "gemma3_text": Family("layers", "norm"),  # Gemma3ForCausalLM; the decoder of Gemma 3 4B+
    "olmo": Family("layers", "norm"),  # LayerNorm without parameters, computed in float32
    "olmo2": Family("layers", "norm"),
    "olmo3": Family("layers", "norm"),
    "olmoe": Family("layers", "norm"),
    "cohere": Family("layers", "norm"),  # Command-R: LayerNorm without a bias, in float32
    "cohere2": Family("layers", "norm"),
    "granite": Family("layers", "norm"),  # scales embeddings and residuals by config multipliers
    "granitemoe": Family("layers", "norm"),
    "smollm3": Family("layers", "norm"),
    "gpt_oss": Family("layers", "norm"),
    "glm4": Family("layers", "norm"),
    "nemotron": Family("layers", "norm"),  # LayerNorm with (1 + w)
    "deepseek_v2": Family("layers", "norm"),
    "deepseek_v3": Family("layers", "norm"),  # also Kimi K2, Moonlight
    "glm4_moe": Family("layers", "norm"),  # GLM-4.5
    "glm": Family("layers", "norm"),  # GLM-4 (the first, "glm-4-9b")
    "dots1": Family("layers", "norm"),
    "ernie4_5": Family("layers", "norm"),
    "ernie4_5_moe": Family("layers", "norm"),
    "hunyuan_v1_dense": Family("layers", "norm"),
    "hunyuan_v1_moe": Family("layers", "norm"),
    "exaone4": Family("layers", "norm"),
    "exaone_moe": Family("layers", "norm"),
    "seed_oss": Family("layers", "norm"),
    "helium": Family("layers", "norm"),
    "arcee": Family("layers", "norm"),  # AFM
    "apertus": Family("layers", "norm"),
    "ministral": Family("layers", "norm"),
    "bitnet": Family("layers", "norm"),
    "jetmoe": Family("layers", "norm"),
    "exaone": Family("layers", "norm"),  # EXAONE 3 / 3.5
    "internlm3": Family("layers", "norm"),
    "minicpm3": Family("layers", "norm"),  # multi-head latent attention
    "ministral3": Family("layers", "norm"),
    "vaultgemma": Family("layers", "norm"),
    "diffllama": Family("layers", "norm"),  # differential attention
    "doge": Family("layers", "norm"),
    "cwm": Family("layers", "norm"),
    "nanochat": Family("layers", "norm"),
    "hyperclovax": Family("layers", "norm"),
    "iquestcoder": Family("layers", "norm"),
    "apertus1p5_text": Family("layers", "norm"),
    "granite_swa": Family("layers", "norm"),
    "youtu": Family("layers", "norm"),
    "cohere_compass_text": Family("layers", "norm"),
    "phi4_multimodal": Family("layers", "norm"),  # Phi-4-multimodal's decoder; text-only inputs
    # mixtures of experts
    "dbrx": Family("blocks", "norm_f"),  # LayerNorm without a bias
    "granitemoeshared": Family("layers", "norm"),
    "granitemoe_swa": Family("layers", "norm"),
    "cohere2_moe": Family("layers", "norm"),
    "flex_olmo": Family("layers", "norm"),
    "afmoe": Family("layers", "norm"),
    "flint": Family("layers", "norm"),
    "hy_v3": Family("layers", "norm"),
    "inkling_text": Family("layers", "norm"),
    "kolibri1": Family("layers", "norm"),
    "laguna": Family("layers", "norm"),
    "mellum": Family("layers", "norm"),
    "mimo_v2_flash": Family("layers", "norm"),
    "minimax_m2": Family("layers", "norm"),
    "sarvam_moe": Family("layers", "norm"),
    "solar_open": Family("layers", "norm"),
    "beam": Family("layers", "norm"),
    "longcat_flash": Family("layers", "norm"),  # one block holds two attention sublayers
    # multi-head latent attention with routed experts (DeepSeek's), some with sparse attention
    "deepseek_v32": Family("layers", "norm"),
    "glm_moe_dsa": Family("layers", "norm"),  # GLM-5
    "glm4_moe_lite": Family("layers", "norm"),
    "axk1": Family("layers", "norm"),
    "axk2": Family("layers", "norm"),
    "sarvam_mla": Family("layers", "norm"),
    "dots3_note_text": Family("layers", "norm"),
    # older GPT-style decoders (LayerNorm)
    "gpt_neo": Family("h", "ln_f"),
    "ctrl": Family("h", "layernorm"),
    "xglm": Family("layers", "layer_norm"),
    "biogpt": Family("layers", "layer_norm"),
    "gpt_neox_japanese": Family("layers", "final_layer_norm"),
    "jais2": Family("layers", "norm"),
    "modernbert-decoder": Family("layers", "final_norm"),
    "openai-gpt": Family("h", None),  # GPT-1: post-norm blocks, no final norm
    # hybrids: linear-attention, SSM or convolution blocks beside attention ones
    "qwen3_next": Family("layers", "norm"),
    "falcon_h1": Family("layers", "final_layernorm"),
    "lfm2": Family("layers", "embedding_norm"),  # LFM2's final norm, despite its name
    "minimax": Family("layers", "norm"),
    "olmo_hybrid": Family("layers", "norm"),
    "jamba": Family("layers", "final_layernorm"),
    "bamba": Family("layers", "final_layernorm"),
    "granitemoehybrid": Family("layers", "norm"),  # Granite 4.0
    "zamba2": Family("layers", "final_layernorm"),
    "nemotron_h": Family("layers", "norm_f"),
    "qwen3_5_text": Family("layers", "norm"),  # Qwen3.5's decoder
    "qwen3_5_moe_text": Family("layers", "norm"),
    "kimi_linear": Family("layers", "norm"),
    "bailing_hybrid": Family("layers", "norm"),
    "lara_mini": Family("layers", "norm"),
    "lfm2_moe": Family("layers", "embedding_norm"),
    "lfm3": Family("layers", "embedding_norm"),
    "recurrent_gemma": Family("layers", "final_norm"),  # RecurrentGemma (Griffin)
    "zamba": Family("layers", "final_layernorm"),
    "xlstm": Family("blocks", "out_norm"),
    # state-space models: hidden_states has no embeddings entry (verify finds the shift); in bfloat16
    # their blocks keep the residual in float32 (residual_in_fp32)
    "mamba": Family("layers", "norm_f"),
    "mamba2": Family("layers", "norm_f"),
    "falcon_mamba": Family("layers", "norm_f"),
    "llama4_text": Family("layers", "norm"),  # Llama 4 (Scout, Maverick): their text decoder
    "gemma4_text": Family("layers", "norm"),  # Gemma 4's decoder; per-layer inputs enter inside blocks
    # text decoders that exist only inside an image-text model
    "qwen2_5_vl_text": Family("layers", "norm"),
    "qwen3_vl_text": Family("layers", "norm"),
    "aria_text": Family("layers", "norm"),
    "gemma4_unified_text": Family("layers", "norm"),
    "minimax_m3_vl_text": Family("layers", "norm"),
}


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How the op re-applies the final norm: "layer_norm" (fused, with the module's weight and
    bias, read from it at each use so that a replaced Parameter is seen) or "module" (residtap
    calls the module itself, exact by construction) or "none"."""

    kind: str
    eps: float = 1e-5


# Where norms keep their epsilon: nn.LayerNorm / nn.RMSNorm / GemmaRMSNorm use `eps`, the
# Llama-style RMSNorms `variance_epsilon`; configs name it per family.
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "variance_eps")
_CONFIG_EPS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
DEFAULT_EPS = 1e-5  # nn.LayerNorm's default, for stats when neither norm nor config names one


def _first_float(obj, names) -> float | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


_LAYER_NORM_FORWARD = nn.LayerNorm.forward  # a forward replaced on the class is not torch's norm


def norm_spec(module: nn.Module | None, config=None) -> NormSpec:
    """How to re-apply ``module``; its eps (also the eps of stats mean/rstd) comes from the module,
    else from ``config`` (``rms_norm_eps``, ``layer_norm_eps``...), else ``DEFAULT_EPS``."""
    eps = _first_float(module, _EPS_ATTRS) if module is not None else None
    if eps is None and config is not None:
        eps = _first_float(config, _CONFIG_EPS)
    eps = DEFAULT_EPS if eps is None else eps
    if module is None:
        return NormSpec("none", eps=eps)
    if type(module) is nn.LayerNorm and nn.LayerNorm.forward is _LAYER_NORM_FORWARD \
            and len(module.normalized_shape) == 1:
        return NormSpec("layer_norm", eps)
    return NormSpec("module", eps=eps)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The pieces of a model residtap hooks: its blocks, in order, and its final norm."""

    family: str
    blocks: tuple[nn.Module, ...]
    final_norm: nn.Module | None
    norm: NormSpec
    project_out: nn.Module | None = None  # applied by HF after the final norm (OPT), else None
    # (root, dotted path) the final norm was found at, where it was named by a path: see refreshed
    norm_at: tuple[nn.Module, str] | None = dataclasses.field(default=None, compare=False)
    # where eps is read when the norm names none (the model's text_config)
    config: Any = dataclasses.field(default=None, compare=False)
    # where the blocks were found: (root, dotted path), or the nn.ModuleList / nn.Sequential passed
    # as blocks=; None for a list of modules, which stays those modules. See with_current_blocks
    blocks_at: Any = dataclasses.field(default=None, compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def refreshed(self) -> "Layout":
        """This layout with the final norm the model holds now: the module at the path it was found
        at (a module assigned there since is the one the model calls) and its eps as set now; self
        when nothing changed. Host-side attribute reads only."""
        norm = self.final_norm
        if self.norm_at is not None:
            norm = _get_path(*self.norm_at, "final_norm")
            if norm is not None and not isinstance(norm, nn.Module):
                raise ValueError(f"final_norm: expected a module at {self.norm_at[1]!r} of "
                                 f"{type(self.norm_at[0]).__name__}, found {type(norm).__name__}")
        spec = norm_spec(norm, self.config)
        if norm is self.final_norm and spec == self.norm:
            return self
        return dataclasses.replace(self, final_norm=norm, norm=spec)

    def with_current_blocks(self) -> "Layout":
        """This layout with the blocks the model holds now where they were found: a block replaced
        or wrapped at its path (``model.transformer.h[3] = Wrapper(...)``), or a container assigned
        at the path, after the layout was read is the one the model calls. Self when nothing
        changed; a ValueError where the number of blocks changed (layer indices were resolved
        against it). Host-side attribute reads only."""
        at = self.blocks_at
        if at is None:
            return self
        container = _get_path(*at, "blocks") if isinstance(at, tuple) else at
        if isinstance(container, (nn.ModuleList, nn.Sequential, list, tuple)) and len(container) == len(self.blocks) \
                and all(a is b for a, b in zip(container, self.blocks)):
            return self
        where = f"{at[1]!r} of {type(at[0]).__name__}" if isinstance(at, tuple) else "the blocks= given"
        blocks = _block_tuple(container, f"the modules at {where}")
        if len(blocks) != len(self.blocks):
            raise ValueError(f"blocks: {where} holds {len(blocks)} blocks now, but this capture was set up "
                             f"for {len(self.blocks)}; set up a new capture for the model as it is now")
        if self.final_norm is not None:
            _check_norm_apart(self.final_norm, blocks)
        return dataclasses.replace(self, blocks=blocks)

    @property
    def eps(self) -> float:
        return self.norm.eps

    @staticmethod
    def hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden state a block was called with: its first positional argument, else the
        keyword ``hidden_states`` (or ``hidden_state`` / ``x``)."""
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        for name in _HIDDEN_KWARGS:
            if isinstance(kwargs.get(name), torch.Tensor):
                return kwargs[name]
        raise UnsupportedStreamError("residtap: could not find the hidden state among the block's arguments "
                           f"(positional: {len(args)}, keywords: {sorted(kwargs)}); expected it first "
                           f"or as one of the keywords {_HIDDEN_KWARGS}. Pass blocks= pointing at "
                           "modules called that way")

    @staticmethod
    def hidden_from_output(output: Any) -> torch.Tensor:
        """A block's output hidden state: the tensor itself, or the first element of a tuple, a
        list or a dict / ModelOutput."""
        first = output
        if isinstance(output, (tuple, list)) and output:
            first = output[0]
        elif isinstance(output, dict) and output:
            first = next(iter(output.values()))
        if isinstance(first, torch.Tensor):
            return first
        raise UnsupportedStreamError(f"residtap: a block returned {type(output).__name__}; expected a "
                                     "tensor, or a tuple / ModelOutput whose first element is the hidden "
                                     "state")


_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x")


def _get_path(root: nn.Module, path: str, arg: str, source: str = "") -> nn.Module | None:
    """The attribute at dotted ``path`` below ``root``; None where the last attribute is None."""
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise ValueError(f"{arg}: expected a module path inside {type(root).__name__}{source}, got "
                             f"{path!r} ({type(mod).__name__} has no attribute {part!r})")
        mod = getattr(mod, part)
    return mod


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def _how_to_pass() -> str:
    return ("pass blocks= (the decoder blocks: a dotted path relative to the model such as "
            "'model.layers', the nn.ModuleList, or a list of modules) and final_norm= (a path such as "
            "'model.norm', the module, or None if the model has none) (on the command line: --blocks "
            "model.layers --final-norm model.norm, or --final-norm none); or register the family once "
            "with residtap.FAMILIES['<model_type>'] = residtap.Family(blocks='layers', "
            "final_norm='norm'), paths relative to model.base_model")


def resolve_layout(model: nn.Module, blocks=NOT_GIVEN, final_norm=NOT_GIVEN) -> Layout:
    """Find ``model``'s blocks and final norm, from ``FAMILIES`` or from explicit arguments.

    ``blocks``: an nn.ModuleList / sequence of modules, or a dotted path relative to ``model``.
    ``final_norm``: a module, a dotted path relative to ``model``, or None (no final norm).
    Either one given explicitly overrides the table; a model not in the table needs both.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    inner = unwrapped(model)  # (torch.nn.DataParallel's and DDP's module: its config and family)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    base = bare_model(inner)
    name = model_type or type(model).__name__
    if family is None:  # an image-text model: its text decoder, a family residtap knows
        decoder = getattr(base, "language_model", None)
        decoder_type = getattr(getattr(decoder, "config", None), "model_type", None)
        if isinstance(decoder, nn.Module) and isinstance(decoder_type, str) and decoder_type in FAMILIES:
            family, base = FAMILIES[decoder_type], bare_model(decoder)
            name, model_type = f"{name} ({decoder_type} decoder)", decoder_type

    if family is None and (blocks is NOT_GIVEN or final_norm is NOT_GIVEN):
        what = (f"the model type {model_type!r}" if model_type
                else "this model (it has no config.model_type)")
        missing = " and ".join(a for a, v in (("blocks=", blocks), ("final_norm=", final_norm))
                               if v is NOT_GIVEN)
        raise ValueError(f"model: residtap does not know {what} ({type(model).__name__}), so it needs "
                         f"{missing}. Supported families: {_supported()} (by config.model_type, or "
                         "that of an image-text model's language_model). "
                         f"For another model, {_how_to_pass()}.")
    source = f" (residtap's FAMILIES entry for {model_type!r}; {_how_to_pass()})"

    if blocks is NOT_GIVEN:
        blocks_at = (base, family.blocks)
        block_list = _get_path(base, family.blocks, "blocks", source)
    elif isinstance(blocks, str):
        blocks_at = (model, blocks)
        block_list = _get_path(model, blocks, "blocks")
    else:
        blocks_at = blocks if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else None
        block_list = blocks
    given = f"{blocks!r}" if blocks is not NOT_GIVEN else f"no modules at the path {family.blocks!r}{source}"
    block_list = _block_tuple(block_list, given)

    norm_at = None
    if final_norm is NOT_GIVEN:
        norm_at = (base, family.final_norm) if family.final_norm else None
        norm = _get_path(base, family.final_norm, "final_norm", source) if family.final_norm else None
    elif isinstance(final_norm, str):
        norm_at = (model, final_norm)
        norm = _get_path(model, final_norm, "final_norm")
    else:
        norm = final_norm
    if norm is not None and not isinstance(norm, nn.Module):
        raise ValueError(f"final_norm: expected a module, a path or None, got {type(norm).__name__}")
    if norm is not None:
        _check_norm_apart(norm, block_list)

    project_out = None
    if family is not None and family.project_out:
        try:  # only verify uses it, to explain hidden_states[-1]; absent means nothing to re-apply
            project_out = _get_path(base, family.project_out, "project_out", source)
        except ValueError:
            project_out = None
    config = text_config(inner)
    return Layout(name, block_list, norm, norm_spec(norm, config), project_out, norm_at, config, blocks_at)


def _block_tuple(block_list, given: str) -> tuple[nn.Module, ...]:
    """``block_list`` (an nn.ModuleList / nn.Sequential or a sequence of modules) as a non-empty
    tuple of modules, else a ValueError naming ``given``."""
    if isinstance(block_list, nn.Module) and not isinstance(block_list, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"blocks: expected an nn.ModuleList, a sequence of modules or a path to one, "
                         f"got {type(block_list).__name__}")
    try:
        block_list = tuple(block_list)
    except TypeError:
        raise ValueError(f"blocks: expected an nn.ModuleList, a sequence of modules or a path to one, "
                         f"got {type(block_list).__name__} ({given})") from None
    if not block_list or not all(isinstance(b, nn.Module) for b in block_list):
        raise ValueError(f"blocks: expected a non-empty sequence of modules, got {given}")
    return block_list


def _check_norm_apart(norm: nn.Module, blocks: tuple) -> None:
    """The final norm is applied to every captured layer from the blocks' hooks: a norm that is a
    block, holds one or sits inside one would run blocks again from their own hooks."""
    inside = {id(m) for m in norm.modules()}
    for i, blk in enumerate(blocks):
        if id(blk) in inside or any(m is norm for m in blk.modules()):
            how = "is" if blk is norm else ("holds" if id(blk) in inside else "is inside")
            raise ValueError(f"final_norm: expected the model's final norm, applied after the last block; "
                             f"got a {type(norm).__name__} that {how} block {i}")


def norm_width_mismatch(norm: nn.Module | None, d_model: int) -> str | None:
    """Why ``norm`` cannot normalize a stream ``d_model`` wide, read from its 1-D weight (or its
    ``normalized_shape``), or None. Host-side attribute reads only."""
    weight = getattr(norm, "weight", None) if norm is not None else None
    if isinstance(weight, torch.Tensor) and weight.dim() != 1:
        return (f"final_norm: expected a norm, whose weight is 1-D [d_model]; got a {type(norm).__name__} "
                f"with a weight of shape {tuple(weight.shape)}")
    width = weight.shape[0] if isinstance(weight, torch.Tensor) else None
    shape = getattr(norm, "normalized_shape", None)
    if width is None and isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int):
        width = shape[0]
    if width is not None and width != d_model:
        return (f"final_norm: the {type(norm).__name__} normalizes a width of {width}, but the residual "
                f"stream is {d_model} wide")
    return None


def bare_model(model: nn.Module) -> nn.Module:
    """``model`` without its LM head: where a family's paths start (resolve_layout), and what extract
    runs to capture. HF's ``base_model``, followed through wrappers (a PEFT model's is a tuner
    holding the HF model); or, where that is the model itself because its ``base_model_prefix``
    names no attribute, the model it keeps as ``model`` (Llama 4's causal LM names
    "language_model" but holds its Llama4TextModel in ``model``; a PEFT tuner holds the HF model)."""
    for _ in range(8):  # wrappers of wrappers, boundedly
        base = getattr(model, "base_model", model)
        if isinstance(base, nn.Module) and base is not model:
            model = base
            continue
        inner = getattr(model, "model", None)
        if isinstance(inner, nn.Module) and inner is not model and getattr(inner, "config", None) is not None:
            model = inner
            continue
        break
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a call of ``model`` runs: through wrappers whose own forward takes ``*args,
    **kwargs`` (torch.compile's OptimizedModule, DataParallel, DistributedDataParallel) to the
    module they wrap."""
    m = model
    for _ in range(8):  # wrappers of wrappers, boundedly
        inner = getattr(m, "_orig_mod", None)
        if inner is None and isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = m.module
        if not isinstance(inner, nn.Module):
            break
        m = inner
    return m


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature a call of ``model`` binds to: that of the module it wraps (``unwrapped``).
    None where it cannot be read."""
    try:
        return inspect.signature(unwrapped(model).forward)
    except (TypeError, ValueError):
        return None


def mask_argument(model: nn.Module, blocks) -> str:
    """The argument of ``model``'s forward that says which tokens of the stream ``blocks`` carry are
    real: ``attention_mask``, except for the blocks of an encoder-decoder model (T5, BART, Whisper)
    that are not in its encoder, whose tokens are the decoder's: ``decoder_attention_mask`` (the
    model's ``attention_mask`` is the encoder's there, of another length). Host-side reads only."""
    inner = unwrapped(model)
    if not getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        return "attention_mask"
    get = getattr(inner, "get_encoder", None)
    try:
        encoder = get() if callable(get) else None
    except Exception:  # a model whose get_encoder cannot answer: its blocks are not known to be the encoder's
        encoder = None
    if isinstance(encoder, nn.Module) and any(m is blocks[0] for m in encoder.modules()):
        return "attention_mask"
    return "decoder_attention_mask"


def attention_mask_of(signature: inspect.Signature | None, args: tuple, kwargs: dict,
                      name: str = "attention_mask"):
    """The mask argument ``name`` (see mask_argument) a call with ``args``/``kwargs`` passes (None if
    it passes none), by keyword or by its position in ``signature``. A ValueError where positional
    arguments beyond the first reach a ``*args`` the mask could be among: which one it is cannot be
    told."""
    mask = kwargs.get(name)
    if mask is not None or signature is None or len(args) < 2:
        return mask
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = {}
    if name in bound:
        return bound[name]
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        raise ValueError(f"positions='last': the model was called with {len(args)} positional arguments "
                         f"and its forward takes *args, so which one is the {name} cannot be told; "
                         f"pass it as {name}=...")
    return None


def text_config(model: nn.Module):
    """The config of the text decoder residtap taps: ``model.config`` itself, or for an image-text
    model (Gemma 3) its text part, where the decoder's width, eps and length live; None without one."""
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config admits (max_position_embeddings, n_positions), or None."""
    config = text_config(model)
    value = getattr(config, "max_position_embeddings", getattr(config, "n_positions", None))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def module_device(module: nn.Module) -> torch.device | None:
    """The device ``module`` computes on: accelerate's execution device when it is dispatched (its
    weights may be offloaded to the CPU or the meta device), else its first parameter's, else None.

    Cheap, as a capture asks it of every block each time it is entered: accelerate's hook read from the
    instance's own attributes (where accelerate sets it; nn.Module's __getattr__ would search further
    and raise inside for every module without one), and the first parameter found by walking the modules
    in ``module.parameters()``'s order (its own, then each submodule's, depth first) without that
    generator's bookkeeping: 2-3x less time per block."""
    device = getattr(vars(module).get("_hf_hook"), "execution_device", None)
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    stack = [module]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None and p.device.type != "meta":
                return p.device
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return None
