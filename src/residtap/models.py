"""Small seeded random models built from HF configs: no download, reproducible.

Used by ``residtap verify`` without ``--model``, by the tests and by the benchmarks. The mechanics
residtap checks (where the final norm sits, what hidden_states holds) do not depend on trained
weights.
"""

from __future__ import annotations

import torch

# GPT-2 sizes by name; n_layer / n_embd / n_head as in the released checkpoints.
GPT2_SIZES = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


def random_gpt2(size: str = "gpt2-small", *, seed: int = 0, dtype=torch.float32, device="cpu",
                lm_head: bool = True, **overrides):
    """A GPT-2-architecture model with seeded random weights, in eval mode.

    ``overrides`` go to ``GPT2Config`` (e.g. ``n_layer=2, n_embd=66, n_head=2, vocab_size=100``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    if size not in GPT2_SIZES:
        raise ValueError(f"size: expected one of {sorted(GPT2_SIZES)}, got {size!r}")
    kw = {**GPT2_SIZES[size], **overrides}
    if "vocab_size" in kw:  # keep the special tokens inside a small vocabulary
        kw.setdefault("bos_token_id", kw["vocab_size"] - 1)
        kw.setdefault("eos_token_id", kw["vocab_size"] - 1)
    cfg = GPT2Config(**kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = (GPT2LMHeadModel if lm_head else GPT2Model)(cfg)
    return model.to(dtype).eval()


def random_input_ids(model, batch: int, seq: int, *, seed: int = 0, device=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return ids.to(device or next(model.parameters()).device)
