"""Where each model family keeps its blocks and its final norm, and how to read a block's hidden
state from its hook arguments.

Adding a family is one line in ``FAMILIES``: the HF ``config.model_type``, then the dotted paths of
the decoder blocks and of the final norm, relative to ``model.base_model`` (the bare model, which
both ``XModel`` and ``XForCausalLM`` expose).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .selection import NOT_GIVEN


@dataclasses.dataclass(frozen=True)
class Family:
    blocks: str  # path of the nn.ModuleList of decoder blocks, relative to model.base_model
    final_norm: str | None  # path of the final norm, or None when the family has none


FAMILIES: dict[str, Family] = {
    "gpt2": Family(blocks="h", final_norm="ln_f"),
}


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How the op re-applies the final norm: "layer_norm" (fused, with weight/bias/eps) or
    "module" (residtap calls the module itself, exact by construction) or "none"."""

    kind: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-5


def norm_spec(module: nn.Module | None) -> NormSpec:
    if module is None:
        return NormSpec("none")
    eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))
    if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
        return NormSpec("layer_norm", module.weight, module.bias, eps)
    return NormSpec("module", eps=eps)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The pieces of a model residtap hooks: its blocks, in order, and its final norm."""

    family: str
    blocks: tuple[nn.Module, ...]
    final_norm: nn.Module | None
    norm: NormSpec

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def eps(self) -> float:
        return self.norm.eps

    @staticmethod
    def hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden state a block was called with (positional or keyword)."""
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return kwargs["hidden_states"]
        raise RuntimeError("residtap: could not find the hidden state among the block's arguments "
                           f"(positional: {len(args)}, keywords: {sorted(kwargs)}); pass blocks= "
                           "pointing at modules called with hidden_states first or by keyword")

    @staticmethod
    def hidden_from_output(output: Any) -> torch.Tensor:
        """A block's output hidden state: the tensor itself, or element 0 of a tuple/ModelOutput."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        raise RuntimeError(f"residtap: a block returned {type(output).__name__}; expected a tensor "
                           "or a tuple whose first element is the hidden state")


def _get_path(root: nn.Module, path: str, arg: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise ValueError(f"{arg}: expected a module path inside {type(root).__name__}, got {path!r} "
                             f"({type(mod).__name__} has no attribute {part!r})")
        mod = getattr(mod, part)
    return mod


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def resolve_layout(model: nn.Module, blocks=NOT_GIVEN, final_norm=NOT_GIVEN) -> Layout:
    """Find ``model``'s blocks and final norm, from ``FAMILIES`` or from explicit arguments.

    ``blocks``: an nn.ModuleList / sequence of modules, or a dotted path relative to ``model``.
    ``final_norm``: a module, a dotted path, or None (no final norm).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    base = getattr(model, "base_model", model)
    name = model_type or type(model).__name__

    if blocks is NOT_GIVEN or final_norm is NOT_GIVEN:
        if family is None:
            raise ValueError(
                f"model: residtap does not know the model type {model_type!r} "
                f"({type(model).__name__}). Supported families: {_supported()}. For another model, "
                "pass blocks= (the decoder blocks, e.g. blocks='model.layers' or the ModuleList) and "
                "final_norm= (e.g. final_norm='model.norm', the module, or None if it has none).")

    if blocks is NOT_GIVEN:
        block_list = _get_path(base, family.blocks, "blocks")
    elif isinstance(blocks, str):
        block_list = _get_path(model, blocks, "blocks")
    else:
        block_list = blocks
    if isinstance(block_list, nn.Module) and not isinstance(block_list, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"blocks: expected an nn.ModuleList, a sequence of modules or a path to one, "
                         f"got {type(block_list).__name__}")
    block_list = tuple(block_list)
    if not block_list or not all(isinstance(b, nn.Module) for b in block_list):
        raise ValueError(f"blocks: expected a non-empty sequence of modules, got {blocks!r}")

    if final_norm is NOT_GIVEN:
        norm = _get_path(base, family.final_norm, "final_norm") if family.final_norm else None
    elif isinstance(final_norm, str):
        norm = _get_path(model, final_norm, "final_norm")
    else:
        norm = final_norm
    if norm is not None and not isinstance(norm, nn.Module):
        raise ValueError(f"final_norm: expected a module, a path or None, got {type(norm).__name__}")

    return Layout(name, block_list, norm, norm_spec(norm))
