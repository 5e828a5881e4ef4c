"""Small seeded random models built from HF configs: no download, reproducible.

Used by ``residtap verify`` without ``--model``, by the tests and by the benchmarks. The mechanics
residtap checks (where the final norm sits, what hidden_states holds) do not depend on trained
weights.
"""

from __future__ import annotations

import os

import torch

from .arch import text_config
from .selection import is_int

# GPT-2 sizes by name; n_layer / n_embd / n_head as in the released checkpoints.
GPT2_SIZES = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


def check_seed(seed, name: str) -> None:
    """A ValueError naming ``name`` unless ``seed`` is what torch.manual_seed takes."""
    if not is_int(seed) or not -2**63 <= seed < 2**64:
        raise ValueError(f"{name}: expected an int in [-2**63, 2**64) (what torch.manual_seed takes), "
                         f"got {seed!r}")


def random_gpt2(size: str = "gpt2-small", *, seed: int = 0, dtype=torch.float32, device="cpu",
                lm_head: bool = True, **overrides):
    """A GPT-2-architecture model with seeded random weights, in eval mode.

    ``overrides`` go to ``GPT2Config`` (e.g. ``n_layer=2, n_embd=66, n_head=2, vocab_size=100``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    if size not in GPT2_SIZES:
        raise ValueError(f"size: expected one of {sorted(GPT2_SIZES)}, got {size!r}")
    check_seed(seed, "seed")
    known = set(GPT2Config().to_dict()) | set(GPT2Config.attribute_map)
    unknown = sorted(set(overrides) - known)
    if unknown:  # GPT2Config keeps any key, so a typo would silently build the default size
        raise ValueError(f"overrides: expected GPT2Config fields (n_layer, n_embd, n_head, vocab_size, "
                         f"n_positions, ...), got unknown {unknown}")
    kw = {**GPT2_SIZES[size], **overrides}
    small = [k for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")
             if k in overrides and not (is_int(kw[k]) and kw[k] >= 1)]
    if small:  # (GPT2Config takes them, and a model of 0 blocks fails later, as something else)
        raise ValueError(f"overrides: expected {', '.join(small)} to be an int >= 1, got "
                         f"{', '.join(f'{k}={kw[k]!r}' for k in small)}")
    if "vocab_size" in kw:  # keep the special tokens inside a small vocabulary
        kw.setdefault("bos_token_id", kw["vocab_size"] - 1)
        kw.setdefault("eos_token_id", kw["vocab_size"] - 1)
    cfg = GPT2Config(**kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = (GPT2LMHeadModel if lm_head else GPT2Model)(cfg)
    return model.to(dtype).eval()


class ModelLoadError(ValueError):
    """load_pretrained's own finding about ``spec``, said as it is (not as "could not be loaded")."""


class UnsupportedModelTypeError(ModelLoadError):
    """A checkpoint that loads, but as no kind of model residtap's loader knows."""


def _looks_like_a_path(spec: str) -> bool:
    """A local path, not a hub name ("gpt2", "org/name"): starts like one, or has more than one '/'."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def load_pretrained(spec: str, **kwargs):
    """A local model directory or cached name, offline: ``AutoModelForCausalLM``, or for an image-text
    model (LLaVA, Qwen2.5-VL...) which has none, ``AutoModelForImageTextToText``."""
    import transformers
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if os.path.isfile(os.path.expanduser(spec)):  # transformers would take it for a config.json
        raise ModelLoadError(f"{spec!r} is a file, not a model directory or hub name (a local model is a "
                             "directory holding config.json and the weights)")
    if _looks_like_a_path(spec) and not os.path.isdir(os.path.expanduser(spec)):
        raise ModelLoadError(f"{spec!r}: no such directory (a local model is a directory holding config.json "
                             "and the weights)")
    config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = transformers.AutoModelForCausalLM
    elif config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto = transformers.AutoModelForImageTextToText
    else:
        raise UnsupportedModelTypeError(
            f"{spec!r} is a {config.model_type!r} model, which transformers has as neither a causal LM "
            "nor an image-text-to-text model; residtap loads decoder-only language models (for others, "
            "load the model yourself and pass blocks= / final_norm=)")
    return auto.from_pretrained(spec, config=config, local_files_only=True, **kwargs)


_TEXT_SPECIALS = {"bos_token_id", "eos_token_id", "pad_token_id"}


def load_pretrained_as(spec: str, arg: str, alternative: str, **kwargs):
    """:func:`load_pretrained` for the argument ``arg`` ("--model", "model:"): any failure is a
    ValueError naming it. A ModelLoadError is said as it is; anything else (an offline machine, an
    unknown name, corrupt files) as what it was, with the way out, then ``alternative``."""
    try:
        return load_pretrained(spec, **kwargs)
    except ModelLoadError as e:
        raise ValueError(f"{arg} {e}") from e
    except Exception as e:
        raise ValueError(f"{arg} {spec!r} could not be loaded offline ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Pass a local directory with "
                         f"config.json and weights, or a name already in the HF cache{alternative}") from e


def random_input_ids(model, batch: int, seq: int, *, seed: int = 0, device=None) -> torch.Tensor:
    """``[batch, seq]`` token ids, uniform over the vocabulary; for an image-text model, over the ids
    that are not its image / video tokens (which would ask for pixels)."""
    config = getattr(model, "config", None)
    text = text_config(model)
    skip = []
    if text is not config:
        skip = sorted({v for k, v in vars(config).items() if k.endswith(("_token_id", "_token_index"))
                       and k not in _TEXT_SPECIALS and isinstance(v, int) and 0 <= v < text.vocab_size})
    check_seed(seed, "seed")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text.vocab_size - len(skip), (batch, seq), generator=g)
    for token in skip:  # ascending: each id at or past a skipped token moves one further up
        ids += (ids >= token).long()
    return ids.to(device or next(model.parameters()).device)
