"""Every supported family, bare model and causal-LM wrapper, with a tiny random config built here:
verify's report (found from the data), and capture against the reference bit for bit."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import transformers as T
from torch import nn
from transformers import CONFIG_MAPPING

import residtap
from helpers import assert_same_outputs, hook_counts
from residtap import cli
from residtap.arch import bare_model
from residtap.models import random_input_ids
from residtap.reference import OUTPUTS, run_reference

D, EPS = 64, 3e-5  # an eps no family uses by default, so reading the wrong one shows
_COMMON = dict(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(num_hidden_layers=2, hidden_size=D, num_attention_heads=4, max_position_embeddings=32)
_GQA = dict(_DECODER, intermediate_size=128, num_key_value_heads=2, rms_norm_eps=EPS)
_OPT = dict(_DECODER, ffn_dim=128, word_embed_proj_dim=D)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_GQA16 = dict(_GQA, head_dim=16)
_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)  # as most MoE configs name them
# DeepSeek's multi-head latent attention (no grouped KV heads; head_dim is the rope part's, so not set)
_LATENT = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
               v_head_dim=16)
_ROUTED_LATENT = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1)
_MLA = dict(_LATENT, **_ROUTED_LATENT, first_k_dense_replace=1)  # routed experts after one dense block
_SPARSE = dict(index_n_heads=2, index_head_dim=16, index_topk=4)  # DeepSeek-V3.2's indexer: 4 of 8 tokens
_MAMBA2_HEADS = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1)
_LLAMA4 = dict(_GQA, head_dim=16, intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1,
               interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=16)
_LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                         linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
_SSM = dict(hidden_size=D, num_hidden_layers=2, state_size=8, layer_norm_epsilon=EPS)
# the same routed experts with ordinary attention (GLM-4.5, dots1)
_ROUTED = dict(head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               first_k_dense_replace=1, n_group=1, topk_group=1)


def _newer(name):
    """The config class ``transformers.<name>``, which transformers 5.17 lacks: there the family's
    tests skip (CI's newest transformers runs them)."""
    cls = getattr(T, name, None)
    if cls is not None:
        return cls

    def absent(**_):
        pytest.skip(f"transformers {T.__version__} has no {name}")
    absent.missing = name
    return absent


def _image_text(cls, tokens, vision, **text_extra):
    """An image-text model's config: a tiny vision tower, and a text decoder residtap taps inside it.
    The image tokens (named by ``tokens``, as each config calls them) lie past the ids the tests draw."""
    def make(vocab_size, **text):
        text = dict(text, **text_extra, vocab_size=vocab_size + len(tokens))
        ids = {name: vocab_size + i for i, name in enumerate(tokens)}
        return cls(text_config=text, vision_config=vision, **ids)
    return make


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
_QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=D)
_QWEN_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


# name -> (config class or factory, kwargs, what hidden_states[-1] is, how the final norm is re-applied)
FAMILIES = {
    "gpt2": (T.GPT2Config, dict(n_layer=2, n_embd=D, n_head=4, n_positions=32, layer_norm_epsilon=EPS),
             "normed", "layer_norm"),
    "gptj": (T.GPTJConfig, dict(n_layer=2, n_embd=D, n_head=4, rotary_dim=8, n_positions=32,
                                layer_norm_epsilon=EPS), "normed", "layer_norm"),
    "gpt_neox": (T.GPTNeoXConfig, dict(_DECODER, intermediate_size=128, layer_norm_eps=EPS),
                 "normed", "layer_norm"),
    "opt": (T.OPTConfig, _OPT, "normed", "layer_norm"),
    "opt-no-final-norm": (T.OPTConfig, dict(_OPT, do_layer_norm_before=False), "raw", "none"),
    "opt-project-out": (T.OPTConfig, dict(_OPT, word_embed_proj_dim=48), "projected", "layer_norm"),
    "opt-no-norm-project-out": (T.OPTConfig, dict(_OPT, word_embed_proj_dim=48, do_layer_norm_before=False),
                                "projected", "none"),  # the shape of facebook/opt-350m
    "llama": (T.LlamaConfig, _GQA, "normed", "module"),
    "mistral": (T.MistralConfig, _GQA, "normed", "module"),
    "qwen2": (T.Qwen2Config, _GQA, "normed", "module"),
    "gemma": (T.GemmaConfig, dict(_GQA, head_dim=16), "normed", "module"),
    "phi": (T.PhiConfig, dict(_DECODER, intermediate_size=128, layer_norm_eps=EPS), "normed", "layer_norm"),
    "bloom": (T.BloomConfig, dict(n_layer=2, hidden_size=D, n_head=4, layer_norm_epsilon=EPS),
              "normed", "layer_norm"),
    "falcon": (T.FalconConfig, dict(_DECODER, layer_norm_epsilon=EPS), "normed", "layer_norm"),
    "falcon-new-arch": (T.FalconConfig, dict(_DECODER, layer_norm_epsilon=EPS, new_decoder_architecture=True,
                                             num_kv_heads=2), "normed", "layer_norm"),
    "gpt_bigcode": (T.GPTBigCodeConfig, dict(n_layer=2, n_embd=D, n_head=4, n_positions=32,
                                             layer_norm_epsilon=EPS), "normed", "layer_norm"),
    "codegen": (T.CodeGenConfig, dict(n_layer=2, n_embd=D, n_head=4, rotary_dim=8, n_positions=32, n_ctx=32,
                                      layer_norm_epsilon=EPS), "normed", "layer_norm"),
    "mpt": (T.MptConfig, dict(n_layers=2, d_model=D, n_heads=4, max_seq_len=32, expansion_ratio=2,
                              layer_norm_epsilon=EPS), "normed", "layer_norm"),
    "persimmon": (T.PersimmonConfig, dict(_DECODER, intermediate_size=128, layer_norm_eps=EPS),
                  "normed", "layer_norm"),
    "stablelm": (T.StableLmConfig, dict(_GQA, layer_norm_eps=EPS), "normed", "layer_norm"),
    "starcoder2": (T.Starcoder2Config, dict(_GQA, norm_epsilon=EPS), "normed", "layer_norm"),
    "phi3": (T.Phi3Config, _GQA, "normed", "module"),
    "phimoe": (T.PhimoeConfig, dict(_GQA, **_MOE), "normed", "layer_norm"),
    "qwen3": (T.Qwen3Config, dict(_GQA, head_dim=16), "normed", "module"),
    "qwen2_moe": (T.Qwen2MoeConfig, dict(_GQA, num_experts=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32, num_experts_per_tok=2),
                  "normed", "module"),
    "qwen3_moe": (T.Qwen3MoeConfig, dict(_GQA, head_dim=16, num_experts=4, moe_intermediate_size=32,
                                         num_experts_per_tok=2), "normed", "module"),
    "mixtral": (T.MixtralConfig, dict(_GQA, **_MOE), "normed", "module"),
    "gemma2": (T.Gemma2Config, dict(_GQA, head_dim=16), "normed", "module"),
    "gemma3_text": (T.Gemma3TextConfig, dict(_GQA, head_dim=16), "normed", "module"),
    # OLMo's final norm has no parameters and no eps setting: nn.LayerNorm's 1e-5, hard-coded
    "olmo": (T.OlmoConfig, dict(_DECODER, intermediate_size=128, num_key_value_heads=2), "normed", "module"),
    "olmo2": (T.Olmo2Config, _GQA, "normed", "module"),
    "olmo3": (T.Olmo3Config, _GQA, "normed", "module"),
    "olmoe": (T.OlmoeConfig, dict(_GQA, num_experts=4, num_experts_per_tok=2), "normed", "module"),
    "cohere": (T.CohereConfig, dict(_GQA, layer_norm_eps=EPS), "normed", "module"),
    "cohere2": (T.Cohere2Config, dict(_GQA, layer_norm_eps=EPS), "normed", "module"),
    "granite": (T.GraniteConfig, dict(_GQA, embedding_multiplier=2.0, residual_multiplier=0.5),
                "normed", "module"),
    "granitemoe": (T.GraniteMoeConfig, dict(_GQA, **_MOE, embedding_multiplier=2.0, residual_multiplier=0.5),
                   "normed", "module"),
    "smollm3": (T.SmolLM3Config, _GQA, "normed", "module"),
    "gpt_oss": (T.GptOssConfig, dict(_GQA, **_MOE, head_dim=16), "normed", "module"),
    "glm4": (T.Glm4Config, dict(_GQA, head_dim=16), "normed", "module"),
    "nemotron": (T.NemotronConfig, dict(_GQA, norm_eps=EPS), "normed", "module"),
    "deepseek_v2": (T.DeepseekV2Config, dict(_GQA, **_MLA), "normed", "module"),
    "deepseek_v3": (T.DeepseekV3Config, dict(_GQA, **_MLA), "normed", "module"),
    "glm4_moe": (T.Glm4MoeConfig, dict(_GQA, **_ROUTED), "normed", "module"),
    "glm": (T.GlmConfig, dict(_GQA, head_dim=16), "normed", "module"),
    "dots1": (T.Dots1Config, dict(_GQA, **_ROUTED, n_shared_experts=1), "normed", "module"),
    "ernie4_5": (T.Ernie4_5Config, dict(_GQA, head_dim=16), "normed", "module"),
    "ernie4_5_moe": (T.Ernie4_5_MoeConfig, dict(_GQA, head_dim=16, moe_num_experts=4, moe_k=2,
                                                moe_intermediate_size=32), "normed", "module"),
    "hunyuan_v1_dense": (T.HunYuanDenseV1Config, dict(_GQA, head_dim=16), "normed", "module"),
    "hunyuan_v1_moe": (T.HunYuanMoEV1Config, dict(_GQA, head_dim=16, num_experts=4, moe_topk=2),
                       "normed", "module"),
    "exaone4": (T.Exaone4Config, dict(_GQA, head_dim=16), "normed", "module"),
    "exaone_moe": (T.ExaoneMoeConfig, dict(_GQA, head_dim=16), "normed", "module"),
    "seed_oss": (T.SeedOssConfig, dict(_GQA, head_dim=16), "normed", "module"),
    "helium": (T.HeliumConfig, dict(_GQA, head_dim=16), "normed", "module"),
    "arcee": (T.ArceeConfig, _GQA, "normed", "module"),
    "apertus": (T.ApertusConfig, _GQA, "normed", "module"),
    "ministral": (T.MinistralConfig, dict(_GQA, head_dim=16), "normed", "module"),
    "bitnet": (T.BitNetConfig, _GQA, "normed", "module"),
    "jetmoe": (T.JetMoeConfig, dict(_GQA, **_MOE, kv_channels=16), "normed", "module"),
    "exaone": (_newer("ExaoneConfig"), _GQA16, "normed", "module"),
    "internlm3": (_newer("InternLM3Config"), _GQA16, "normed", "module"),
    "minicpm3": (T.MiniCPM3Config, dict(_GQA16, **_LATENT), "normed", "module"),
    "ministral3": (T.Ministral3Config, _GQA16, "normed", "module"),
    "vaultgemma": (T.VaultGemmaConfig, _GQA16, "normed", "module"),
    "diffllama": (T.DiffLlamaConfig, _GQA16, "normed", "module"),
    # Doge's attention mask needs grad in grad mode, so torch's attention takes another kernel there:
    # the reference runs the model in the caller's autograd mode for this
    "doge": (T.DogeConfig, _GQA16, "normed", "module"),
    "cwm": (T.CwmConfig, _GQA16, "normed", "module"),
    "nanochat": (T.NanoChatConfig, _GQA16, "normed", "module"),
    "hyperclovax": (T.HyperCLOVAXConfig, _GQA16, "normed", "module"),
    "iquestcoder": (_newer("IQuestCoderConfig"), _GQA16, "normed", "module"),
    "apertus1p5_text": (_newer("Apertus1p5TextConfig"), _GQA16, "normed", "module"),
    "granite_swa": (T.GraniteSWAConfig, _GQA16, "normed", "module"),
    "youtu": (T.YoutuConfig, dict(_GQA, **_LATENT), "normed", "module"),
    # every layer type needs its own rope settings (none: no rope), and mrope_section fits head_dim 16
    "cohere_compass_text": (T.CohereCompassTextConfig, dict(
        _GQA16, layer_norm_eps=EPS, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2]),
                         "full_attention": None}), "normed", "module"),
    "phi4_multimodal": (T.Phi4MultimodalConfig, dict(
        _GQA16, vision_config=_VISION, audio_config=dict(hidden_size=32, intermediate_size=64,
                                                                     num_blocks=1, num_attention_heads=2)),
        "normed", "module"),
    # DBRX's attention reads rope_theta, and clamps with clip_qkv, from attn_config: real checkpoints set both
    "dbrx": (T.DbrxConfig, dict(d_model=D, n_heads=4, n_layers=2, max_seq_len=32,
                                attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=1e4),
                                ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
             "normed", "layer_norm"),
    "granitemoeshared": (T.GraniteMoeSharedConfig, dict(_GQA16, **_MOE), "normed", "module"),
    "granitemoe_swa": (T.GraniteMoeSWAConfig, dict(_GQA16, **_MOE), "normed", "module"),
    "cohere2_moe": (T.Cohere2MoeConfig, dict(_GQA16, **_EXPERTS), "normed", "module"),
    "flex_olmo": (T.FlexOlmoConfig, dict(_GQA16, num_experts=4, num_experts_per_tok=2), "normed", "module"),
    "afmoe": (T.AfmoeConfig, dict(_GQA16, **_EXPERTS, num_shared_experts=1), "normed", "module"),
    "flint": (_newer("FlintConfig"), dict(_GQA16, **_EXPERTS, shared_expert_intermediate_size=32),
              "normed", "module"),
    "hy_v3": (T.HYV3Config, dict(_GQA16, **_EXPERTS), "normed", "module"),
    "inkling_text": (T.InklingTextConfig, dict(_GQA16, n_routed_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32), "normed", "module"),
    "kolibri1": (_newer("Kolibri1Config"), dict(_GQA16, **_EXPERTS, num_local_experts=4,
                                                shared_expert_intermediate_size=32), "normed", "module"),
    "laguna": (T.LagunaConfig, dict(_GQA16, **_EXPERTS, shared_expert_intermediate_size=32), "normed", "module"),
    "mellum": (T.MellumConfig, dict(_GQA16, **_EXPERTS, num_local_experts=4), "normed", "module"),
    "mimo_v2_flash": (T.MiMoV2FlashConfig, dict(_GQA16, n_routed_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=32), "normed", "module"),
    "minimax_m2": (T.MiniMaxM2Config, dict(_GQA16, **_MOE), "normed", "module"),
    "sarvam_moe": (_newer("SarvamMoEConfig"), dict(_GQA16, n_routed_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=32), "normed", "module"),
    "solar_open": (T.SolarOpenConfig, dict(_GQA16, n_routed_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32), "normed", "module"),
    "beam": (_newer("BeamConfig"), dict(_GQA16, **_EXPERTS), "normed", "module"),
    # one block of LongCat-Flash holds two attention sublayers: num_hidden_layers is twice num_layers
    "longcat_flash": (T.LongcatFlashConfig, dict(
        {k: v for k, v in _GQA.items() if k != "num_hidden_layers"}, num_layers=2, **_LATENT, head_dim=8,
        n_routed_experts=4, zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=32), "normed", "module"),
    "deepseek_v32": (T.DeepseekV32Config, dict(_GQA16, **_MLA, **_SPARSE), "normed", "module"),
    "glm_moe_dsa": (T.GlmMoeDsaConfig, dict(_GQA16, **_MLA, **_SPARSE), "normed", "module"),
    "glm4_moe_lite": (T.Glm4MoeLiteConfig, dict(_GQA, **_LATENT, **_ROUTED_LATENT), "normed", "module"),
    "axk1": (T.AXK1Config, dict(_GQA, **_LATENT, **_ROUTED_LATENT), "normed", "module"),
    "axk2": (T.AXK2Config, dict(_GQA, **_LATENT, **_ROUTED_LATENT, **_SPARSE), "normed", "module"),
    "sarvam_mla": (_newer("SarvamMLAConfig"), dict(_GQA, **_MLA), "normed", "module"),
    # an indexed (sparse) layer, then a sliding one with latent sizes of its own
    "dots3_note_text": (_newer("Dots3NoteTextConfig"), dict(
        _GQA16, **_LATENT, **_ROUTED_LATENT, **_SPARSE, shared_experts_intermediate_size=32,
        layer_types=["indexed_attention", "sliding_attention"], sliding_window=4, swa_num_attention_heads=4,
        swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=16, swa_head_dim=16,
        swa_qk_nope_head_dim=8, swa_v_head_dim=16), "normed", "module"),
    "gpt_neo": (T.GPTNeoConfig, dict(_GQA, attention_types=[[["global", "local"], 1]], window_size=4,
                                     layer_norm_epsilon=EPS), "normed", "layer_norm"),
    "ctrl": (T.CTRLConfig, dict(n_layer=2, n_embd=D, n_head=4, dff=128, n_positions=32, layer_norm_epsilon=EPS),
             "normed", "layer_norm"),
    "xglm": (T.XGLMConfig, dict(_DECODER, ffn_dim=128), "normed", "layer_norm"),
    "biogpt": (T.BioGptConfig, dict(_DECODER, intermediate_size=128), "normed", "layer_norm"),
    "gpt_neox_japanese": (T.GPTNeoXJapaneseConfig, dict(_GQA, layer_norm_eps=EPS), "normed", "layer_norm"),
    "jais2": (T.Jais2Config, dict(_GQA16, layer_norm_eps=EPS), "normed", "layer_norm"),
    "modernbert-decoder": (T.ModernBertDecoderConfig, dict(_GQA16, norm_eps=EPS), "normed", "layer_norm"),
    "openai-gpt": (T.OpenAIGPTConfig, dict(n_layer=2, n_embd=D, n_head=4, n_positions=32, layer_norm_epsilon=EPS),
                   "raw", "none"),  # GPT-1: post-norm blocks and no final norm
    "qwen3_next": (T.Qwen3NextConfig, dict(_GQA, head_dim=16, layer_types=["linear_attention", "full_attention"],
                                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, linear_num_value_heads=4,
                                           linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
                   "normed", "module"),
    "falcon_h1": (T.FalconH1Config, dict(_GQA, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                         mamba_n_groups=1, mamba_d_state=16), "normed", "module"),
    "minimax": (T.MiniMaxConfig, dict(_GQA, **_MOE, head_dim=16, layer_types=["linear_attention", "full_attention"]),
                "normed", "module"),
    "olmo_hybrid": (T.OlmoHybridConfig, _GQA, "normed", "module"),
    # Mamba blocks beside attention ones; the second of the two layers attends (with none, transformers
    # itself fails: its cache asks the attention layers for the sequence length)
    "jamba": (T.JambaConfig, dict(_GQA, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8,
                                  use_mamba_kernels=False), "normed", "module"),
    "bamba": (T.BambaConfig, dict(_GQA, **_MAMBA2_HEADS, attn_layer_indices=[1]), "normed", "module"),
    "granitemoehybrid": (T.GraniteMoeHybridConfig, dict(_GQA, **_MAMBA2_HEADS, **_MOE,
                                                        layer_types=["mamba", "attention"]), "normed", "module"),
    "zamba2": (T.Zamba2Config, dict(_GQA, layers_block_type=["mamba", "hybrid"], mamba_headdim=16,
                                    mamba_d_state=16, n_mamba_heads=8), "normed", "module"),
    "nemotron_h": (T.NemotronHConfig, dict(_GQA, hybrid_override_pattern="M*", mamba_num_heads=8, mamba_head_dim=16,
                                           ssm_state_size=16, n_groups=1, layer_norm_epsilon=EPS),
                   "normed", "module"),
    "qwen3_5_text": (T.Qwen3_5TextConfig, dict(_GQA16, **_LINEAR_ATTENTION), "normed", "module"),
    "qwen3_5_moe_text": (T.Qwen3_5MoeTextConfig, dict(_GQA16, **_LINEAR_ATTENTION, **_EXPERTS,
                                                      shared_expert_intermediate_size=32), "normed", "module"),
    # latent attention in the attending layer (so no grouped KV heads), a dense block then routed experts
    "kimi_linear": (T.KimiLinearConfig, dict(_GQA16, **_LATENT, layer_types=["linear_attention", "full_attention"],
                                             num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             linear_head_dim=16, linear_num_heads=4), "normed", "module"),
    "bailing_hybrid": (_newer("BailingHybridConfig"), dict(
        _GQA16, **_LATENT, layer_types=["linear_attention", "full_attention"], first_k_dense_replace=1,
        num_local_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32),
        "normed", "module"),
    "lara_mini": (_newer("LaraMiniConfig"), dict(_GQA16, **_EXPERTS, shared_expert_intermediate_size=32),
                  "normed", "module"),
    "lfm2_moe": (T.Lfm2MoeConfig, dict(_GQA16, **_EXPERTS, norm_eps=EPS, layer_types=["conv", "full_attention"],
                                       num_dense_layers=1), "normed", "module"),
    "lfm3": (_newer("Lfm3Config"), dict(_GQA16, layer_types=["conv", "full_attention"]), "normed", "module"),
    "recurrent_gemma": (T.RecurrentGemmaConfig, dict(_GQA16, block_types=["recurrent", "attention"],
                                                     attention_window_size=16), "normed", "module"),
    # two hybrid layers: with one, transformers cannot tie the shared attention block's weights
    "zamba": (T.ZambaConfig, dict(_GQA16, layers_block_type=["hybrid", "hybrid"], use_mamba_kernels=False,
                                  mamba_d_state=8), "normed", "module"),
    # qk_dim_factor 1: transformers sizes the cache and the layer alike only where d x factor is a multiple of 64
    "xlstm": (T.xLSTMConfig, dict(_GQA16, num_heads=4, qk_dim_factor=1.0, norm_eps=EPS), "normed", "module"),
    # state-space models; hidden_states has no embeddings entry (SHIFTED)
    "mamba": (T.MambaConfig, _SSM, "normed", "module"),
    "mamba2": (T.Mamba2Config, dict(_SSM, state_size=16, num_heads=8, head_dim=16, expand=2, n_groups=1,
                                    chunk_size=4), "normed", "module"),
    "falcon_mamba": (T.FalconMambaConfig, _SSM, "normed", "module"),
    "lfm2": (T.Lfm2Config, dict(_GQA, layer_types=["conv", "full_attention"], norm_eps=EPS), "normed", "module"),
    # Llama 4's causal LM keeps its decoder in `model`, though its base_model_prefix says "language_model"
    "llama4_text": (T.Llama4TextConfig, _LLAMA4, "normed", "module"),
    # Gemma 4's decoder, with per-layer inputs (kept small: 96 x 16) and a narrow global head
    "gemma4_text": (T.Gemma4TextConfig, dict(_GQA16, layer_types=["sliding_attention", "full_attention"],
                                             sliding_window=4, global_head_dim=16, vocab_size_per_layer_input=96,
                                             hidden_size_per_layer_input=16), "normed", "module"),
    # text decoders of image-text models
    "aria_text": (T.AriaTextConfig, _GQA16, "normed", "module"),
    "gemma4_unified_text": (T.Gemma4UnifiedTextConfig, _GQA16, "normed", "module"),
    "minimax_m3_vl_text": (T.MiniMaxM3VLTextConfig, dict(_GQA16, **_MOE), "normed", "module"),
    # image-text models, tapped in their text decoder (config.text_config; base_model.language_model)
    "gemma3": (_image_text(T.Gemma3Config, ("boi_token_index", "eoi_token_index", "image_token_index"),
                           _VISION), dict(_GQA, head_dim=16), "normed", "module"),
    "llava": (_image_text(T.LlavaConfig, ("image_token_index",), dict(_VISION, model_type="clip_vision_model"),
                          model_type="llama"), _GQA, "normed", "module"),
    "mistral3": (_image_text(T.Mistral3Config, ("image_token_index",),
                             dict(_VISION, model_type="pixtral", head_dim=16), model_type="mistral"),
                 _GQA, "normed", "module"),
    "qwen2_5_vl": (_image_text(T.Qwen2_5_VLConfig, _QWEN_TOKENS, dict(_QWEN_VISION, fullatt_block_indexes=[0])),
                   dict(_GQA, rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])),
                   "normed", "module"),
    "qwen3_vl": (_image_text(T.Qwen3VLConfig, _QWEN_TOKENS, dict(_QWEN_VISION, deepstack_visual_indexes=[0])),
                 dict(_GQA, head_dim=16), "normed", "module"),
}
# hidden_states[i] is block i's output, and the last entry the final norm of the last block's output
SHIFTED = {"mamba", "mamba2", "falcon_mamba"}
# where the final norm's eps is not a setting (nn.LayerNorm's default); else EPS (OPT: below)
EPS_OF = {"olmo": 1e-5, "dbrx": 1e-5, "xglm": 1e-5, "biogpt": 1e-5}
WRAPPERS = ("causal-lm", "bare")

IDS = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
PADDED = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1],   # left padding
                       [1, 1, 1, 1, 1, 1, 0, 0]])  # right padding


def _build(name: str) -> nn.Module:
    cls, kwargs, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    config = cls(**kwargs, **_COMMON)
    auto = T.AutoModelForCausalLM if config.get_text_config(decoder=True) is config else T.AutoModelForImageTextToText
    model = auto.from_config(config).eval()
    # Norm weights start at 1 (Gemma: 0, used as 1 + w) and biases at 0: move them, so that a
    # norm re-applied with the wrong weights, bias or (1 + w) convention cannot pass.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                for p in mod.parameters(recurse=False):
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name: str, wrapper: str, dtype=torch.float32) -> nn.Module:
        if (name, dtype) not in cache:
            # built again rather than copied: RecurrentGemma keeps its last states, graph and all, on its
            # modules, which deepcopy refuses after a forward in grad mode
            cache[name, dtype] = _build(name).to(dtype)
        lm = cache[name, dtype]
        return lm if wrapper == "causal-lm" else bare_model(lm)

    return get


def test_every_family_in_the_table_is_tested():
    absent = {name for name, (make, *_) in FAMILIES.items() if hasattr(make, "missing")}
    tested = {make(**kwargs, **_COMMON).get_text_config(decoder=True).model_type
              for name, (make, kwargs, *_) in FAMILIES.items() if name not in absent}
    assert tested | absent == set(residtap.FAMILIES) and not tested & absent
    assert not absent & set(CONFIG_MAPPING)  # a type only newer transformers have (its tests skip)


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_verify_detects_the_convention(models, name, wrapper):
    model = models(name, wrapper)
    assert (model.get_output_embeddings() is not None) == (wrapper == "causal-lm")  # XForCausalLM / XModel
    rep = residtap.verify(model, IDS, PADDED)
    last_is = FAMILIES[name][2]
    assert rep.ok, str(rep)
    assert rep.n_hidden_states == rep.n_layers + 1 == 3
    assert [r.matches for r in rep.rows[:-1]] == ["raw", "raw"]
    assert all(r.raw_exact and r.raw_maxabs == 0.0 for r in rep.rows[:-1])
    last = rep.rows[-1]
    assert last.matches == last_is
    text = str(rep)
    assert rep.first_resid == (1 if name in SHIFTED else 0)
    assert [r.resid_index for r in rep.rows] == ([1, 2, 2] if name in SHIFTED else [0, 1, 2])
    if name in SHIFTED:  # found from the data: the unshifted comparison explains nothing
        assert rep.convention == ("no embeddings entry: hidden_states[i] is block i's raw output, and the "
                                  "last entry is final_norm(raw output of the last block)")
        assert "no embeddings entry, so row i is compared with the residual after block i" in text
        assert last.normed_exact and not last.raw_exact
    elif last_is == "normed":  # re-applying the model's own final norm reproduces hidden_states[-1]
        assert last.normed_exact and last.normed_maxabs == 0.0 and not last.raw_exact
        assert rep.convention.startswith("last entry is final_norm(raw output)")
    elif last_is == "raw":
        assert not rep.has_final_norm and last.normed_exact is None
        assert rep.convention == ("no entry is normalized (the model has no final norm): entry 0 is the "
                                  "embeddings (block 0's input), the others raw block outputs")
        assert "no final norm" in text
    else:  # project_out after the (optional) final norm changes the width: re-applied, exact
        assert last.projected_exact and last.projected_maxabs == 0.0 and last.raw_maxabs is None
        assert rep.last_width == 48 and rep.d_model == D
        assert "width 48 (d_model 64)" in rep.convention
        inner = "final_norm(raw output)" if rep.has_final_norm else "raw output"
        assert rep.convention.startswith(f"last entry is project_out({inner})")
    assert text.rstrip().endswith("OK")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_capture_matches_reference_with_padding_on_both_sides(extension, models, name, wrapper, dtype):
    cap = _capture_matches_reference_and_hf(models(name, wrapper, dtype), name, torch.device("cpu"))
    assert cap.layer_ids == [0, 1, 2]
    assert cap.resid.shape == (3, 2, 8, D) and cap.resid.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_capture_matches_reference(extension, models, name, dtype):
    """The same on the GPU (scripts/gpu_check.sh): the fused LayerNorm of the families that use it, the
    model's own norm modules for the others, each in its family's blocks."""
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cap = _capture_matches_reference_and_hf(_build(name).to(dtype=dtype, device=cuda), name, cuda)
    assert cap.resid.device.type == "cuda" and cap.backend == "compiled"
    # Every dtype the hidden states have was probed at set-up (Mamba: float32 under bfloat16 weights)
    assert not [w for w in seen if "was not checked against torch" in str(w.message)]


def _capture_matches_reference_and_hf(model, name, device):
    """Capture every output (batch with padding on both sides) and compare it with the reference; and
    the reference with HF: hidden_states[1] (SHIFTED: [0]) is block 0's raw output, and where
    hidden_states[-1] is normalized, it is the normed last residual. A model that keeps its stream in
    float32 under bfloat16 weights (Mamba) is captured in its own dtype: HF's entries rounded to it."""
    ids, mask = IDS.to(device), PADDED.to(device)
    has_norm = FAMILIES[name][3] != "none"
    outputs = OUTPUTS if has_norm else tuple(o for o in OUTPUTS if o != "normed")
    with residtap.capture(model, outputs=outputs, backend="compiled") as cap:  # grad mode, as users run it
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ref = run_reference(model, ids, attention_mask=mask, outputs=outputs)
    assert cap.layer_ids == ref.layer_ids
    assert_same_outputs(cap, ref, outputs)
    dtype = cap.resid.dtype
    assert torch.equal(cap.resid[1], hs[0 if name in SHIFTED else 1].to(dtype))
    if has_norm and FAMILIES[name][2] == "normed":
        assert torch.equal(cap.normed[-1], hs[-1].to(dtype))
    return cap


@pytest.mark.parametrize("name", FAMILIES)
def test_norm_kind_and_eps_read_from_each_family(models, name):
    model = models(name, "causal-lm")
    layout = residtap.capture(model).layout
    assert layout.norm.kind == FAMILIES[name][3]
    # The stats eps is the final norm's: the config's where the family sets one, else LayerNorm's
    # default (OPT builds its norms without an eps).
    assert layout.eps == (1e-5 if name.startswith("opt") else EPS_OF.get(name, EPS))
    assert (layout.project_out is not None) == name.endswith("project-out")


@pytest.mark.parametrize("name", ["llama", "gemma3"])  # Gemma 3: the flag is its text decoder's
def test_tie_last_hidden_states_false_is_reported_not_failed(models, name):
    model = copy.deepcopy(models(name, "causal-lm"))
    model.config.get_text_config(decoder=True).tie_last_hidden_states = False
    rep = residtap.verify(model, IDS, PADDED)
    # Older transformers (5.17) ignore the flag; verify must detect what this one actually does.
    with torch.no_grad():
        hs_last = model(IDS, attention_mask=PADDED, output_hidden_states=True).hidden_states[-1]
    raw_last = run_reference(model, IDS, layers=[-1], attention_mask=PADDED).outputs["resid"][0]
    honoured = torch.equal(hs_last, raw_last)
    assert rep.ok and rep.has_final_norm
    assert rep.rows[-1].matches == ("raw" if honoured else "normed")
    if honoured:
        assert rep.convention == ("no entry is normalized (config.tie_last_hidden_states=False): entry 0 is "
                                  "the embeddings (block 0's input), the others raw block outputs")


def test_a_projection_residtap_does_not_know_is_not_explained(models, monkeypatch):
    no_projection = residtap.Family("decoder.layers", "decoder.final_layer_norm")
    monkeypatch.setitem(residtap.FAMILIES, "opt", no_projection)
    rep = residtap.verify(models("opt-project-out", "causal-lm"), IDS, PADDED)
    assert not rep.ok and rep.rows[-1].matches == "neither"
    assert "hidden_states[-1] has width 48, not d_model 64" in rep.convention
    assert "FAILED" in str(rep)


def test_gemma_resid0_is_the_embedding_scaled_by_sqrt_d(models):
    model = models("gemma", "bare")
    with residtap.capture(model, layers=0) as cap:
        model(IDS)
    plain = nn.functional.embedding(IDS, model.embed_tokens.weight)
    assert torch.equal(cap.resid[0], plain * torch.tensor(D ** 0.5))
    assert not torch.equal(cap.resid[0], plain)


def test_a_model_with_parallel_streams_is_refused_by_name(monkeypatch, tmp_path, capsys):
    """Gemma 3n's AltUp hands its blocks four streams, [4, batch, seq, d]: no single residual. Added to
    the table by hand, it is refused with its shape, by the API and by `residtap verify` (exit 2)."""
    config = T.Gemma3nTextConfig(**_GQA16, **_COMMON, num_kv_shared_layers=0, vocab_size_per_layer_input=96,
                                 hidden_size_per_layer_input=16, laurel_rank=8, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    hooks = hook_counts(model)
    monkeypatch.setitem(residtap.FAMILIES, "gemma3n_text", residtap.Family("layers", "norm"))
    shape = r"expected the first block's hidden state to be \[batch, seq, d_model\], got shape \(4, 2, 8, 64\)"
    with pytest.raises(residtap.UnsupportedStreamError, match=shape):
        with residtap.capture(model, outputs=("resid", "normed")):
            model(IDS, attention_mask=PADDED)
    with pytest.raises(residtap.UnsupportedStreamError, match=shape):  # the reference too
        run_reference(model, IDS, attention_mask=PADDED, outputs=("resid", "normed"))
    assert hook_counts(model) == hooks
    model.save_pretrained(tmp_path / "gemma3n")
    capsys.readouterr()  # save_pretrained's progress bar
    assert cli.main(["verify", "--model", str(tmp_path / "gemma3n"), "--batch", "2", "--seq", "8"]) == 2
    err = capsys.readouterr().err  # after transformers' progress bars: one line, no traceback
    assert err.endswith("residtap verify: error: residtap: expected the first block's hidden state to be "
                        "[batch, seq, d_model], got shape (4, 2, 8, 64)\n") and "Traceback" not in err


def test_an_image_text_model_is_read_through_its_text_config(models, tmp_path):
    """Gemma 3 (4B+) keeps the decoder's width, eps and length in config.text_config, not at the top:
    extraction sizes its rows, and picks its default sequence length, from there."""
    model = models("gemma3", "causal-lm")
    assert getattr(model.config, "hidden_size", None) is None
    assert getattr(model.config, "max_position_embeddings", None) is None
    ids = torch.randint(3, 96, (70,), generator=torch.Generator().manual_seed(2)).int().numpy()
    np.save(tmp_path / "ids.npy", ids)
    res = residtap.extract(model, str(tmp_path / "ids.npy"), tmp_path / "out", batch_size=2,
                           outputs=("resid", "normed"), progress=False)
    acts = residtap.open(tmp_path / "out", verify=True)
    assert res.complete and acts.d_model == D
    seqs = torch.from_numpy(ids[:64]).long().reshape(2, 32)  # max_position_embeddings of the text model
    assert torch.equal(acts.sequences("input_ids"), seqs.int())
    with torch.inference_mode(), residtap.capture(model.base_model, outputs=("resid", "normed")) as cap:
        model.base_model(input_ids=seqs, use_cache=False)
    for name in ("resid", "normed"):
        for k, lid in enumerate(cap.layer_ids):
            assert torch.equal(acts.layer(lid, name).to_tensor(), getattr(cap, name)[k].reshape(-1, D))


def test_an_image_text_model_whose_decoder_residtap_does_not_know_needs_paths(models, monkeypatch):
    model = models("llava", "causal-lm")
    assert residtap.capture(model).layout.family == "llava (llama decoder)"
    monkeypatch.delitem(residtap.FAMILIES, "llama")
    with pytest.raises(ValueError, match=r"does not know the model type 'llava' .*needs blocks= and final_norm="):
        residtap.capture(model)
    inner = model.base_model.language_model
    with residtap.capture(model, blocks="model.language_model.layers", final_norm="model.language_model.norm",
                          outputs=("resid", "normed")) as cap:
        hs = model(IDS, output_hidden_states=True).hidden_states
    assert cap.layout.blocks == tuple(inner.layers) and cap.layout.final_norm is inner.norm
    assert torch.equal(cap.resid[1], hs[1]) and torch.equal(cap.normed[-1], hs[-1])


def test_an_image_text_model_directory_loads_for_verify_and_extract(models, tmp_path, capsys):
    """LLaVA has no AutoModelForCausalLM class: the CLI loads it as an image-text model."""
    model = models("llava", "causal-lm")
    model.save_pretrained(tmp_path / "llava")
    assert cli.main(["verify", "--model", str(tmp_path / "llava"), "--batch", "4", "--seq", "16"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
    ids = torch.randint(3, 96, (48,), generator=torch.Generator().manual_seed(3)).int()
    np.save(tmp_path / "ids.npy", ids.numpy())
    assert cli.main(["extract", "--model", str(tmp_path / "llava"), "--data", str(tmp_path / "ids.npy"),
                     "--out", str(tmp_path / "acts"), "--seq-len", "16", "--no-progress"]) == 0
    acts = residtap.open(tmp_path / "acts", verify=True)
    with torch.inference_mode(), residtap.capture(model.base_model, layers=2) as cap:
        model.base_model(input_ids=ids.long().reshape(3, 16), use_cache=False)
    assert acts.d_model == D and torch.equal(acts.layer(2).to_tensor(), cap.resid[0].reshape(-1, D))


def test_a_mamba_directory_verifies_on_the_command_line_with_the_shift_reported(models, tmp_path, capsys):
    """The CLI path, JSON included, for a model whose hidden_states has no embeddings entry, in bfloat16:
    its blocks widen the stream to float32, and verify says both."""
    models("mamba", "causal-lm", torch.bfloat16).save_pretrained(tmp_path / "mamba")
    args = ["verify", "--model", str(tmp_path / "mamba"), "--batch", "2", "--seq", "8", "--dtype", "bfloat16"]
    assert cli.main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["first_resid"] == 1 and report["dtype"] == "bfloat16"
    assert [r["resid_index"] for r in report["rows"]] == [1, 2, 2]
    assert [r["matches"] for r in report["rows"]] == ["raw", "raw", "normed"]
    assert all(r["raw_maxabs"] == 0.0 for r in report["rows"][:2])
    assert report["convention"].startswith("no embeddings entry: hidden_states[i] is block i's raw output")
    assert cli.main(args) == 0
    assert "no embeddings entry, so row i is compared" in capsys.readouterr().out


def test_random_ids_for_an_image_text_model_never_ask_for_pixels():
    config = _image_text(T.LlavaConfig, (), dict(_VISION, model_type="clip_vision_model"),
                         model_type="llama")(**_GQA, **_COMMON)
    config.image_token_index = 50  # mid-vocabulary, as in some checkpoints
    model = T.AutoModelForImageTextToText.from_config(config)
    ids = random_input_ids(model, 64, 64)
    assert set(ids.unique().tolist()) == set(range(96)) - {50}


# ---------------------------------------------------------------- models residtap does not know
class KwargBlock(nn.Module):
    """A block called with hidden_states= as a keyword, returning a tuple, a dict or a tensor."""

    def __init__(self, d: int, returns: str):
        super().__init__()
        self.lin, self.returns = nn.Linear(d, d), returns

    def forward(self, *, hidden_states, scale=1.0):
        out = hidden_states + scale * torch.tanh(self.lin(hidden_states))
        return {"tuple": (out, None), "dict": {"hidden_states": out, "aux": None},
                "tensor": out}[self.returns]


class Toy(nn.Module):
    def __init__(self, d: int = 8, returns: str = "tuple"):
        super().__init__()
        self.embed = nn.Embedding(16, d)
        self.trunk = nn.ModuleDict({"blocks": nn.ModuleList(KwargBlock(d, returns) for _ in range(3))})
        self.norm = nn.RMSNorm(d, eps=1e-4)

    def forward(self, ids, attention_mask=None):
        x = self.embed(ids)
        for blk in self.trunk["blocks"]:
            out = blk(hidden_states=x, scale=0.5)
            if blk.returns != "tensor":
                out = out[0] if blk.returns == "tuple" else out["hidden_states"]
            x = out
        return self.norm(x)


def test_unknown_model_error_lists_families_and_says_what_to_pass():
    m = Toy()
    with pytest.raises(ValueError) as info:
        residtap.capture(m)
    msg = str(info.value)
    assert msg.startswith("model: residtap does not know this model (it has no config.model_type) (Toy)")
    assert all(name in msg for name in residtap.FAMILIES)
    assert "blocks=" in msg and "final_norm=" in msg and "residtap.FAMILIES[" in msg
    with pytest.raises(ValueError, match=r"so it needs final_norm=\. Supported"):
        residtap.capture(m, blocks="trunk.blocks")  # one of the two is not enough
    m.config = T.PretrainedConfig()
    m.config.model_type = "my-arch"
    with pytest.raises(ValueError, match=r"does not know the model type 'my-arch' \(Toy\)"):
        residtap.capture(m)


@pytest.mark.parametrize("returns", ["tuple", "dict", "tensor"])
@pytest.mark.parametrize("given", ["paths", "modules"])
def test_explicit_blocks_and_final_norm(extension, returns, given):
    torch.manual_seed(0)
    m = Toy(returns=returns)
    with torch.no_grad():
        m.norm.weight.normal_()
    spec = (dict(blocks="trunk.blocks", final_norm="norm") if given == "paths"
            else dict(blocks=list(m.trunk["blocks"]), final_norm=m.norm))
    ids = torch.randint(0, 16, (2, 5))
    with residtap.capture(m, outputs=OUTPUTS, **spec) as cap:
        out = m(ids)
    assert cap.layout.eps == 1e-4 and cap.layout.norm.kind == "module"
    ref = run_reference(m, ids, outputs=OUTPUTS, **spec)
    assert_same_outputs(cap, ref, OUTPUTS)
    assert torch.equal(cap.normed[-1], out)  # nn.RMSNorm re-applied through the module: exact


def test_explicit_final_norm_none_overrides_the_table(extension, models):
    model = models("llama", "causal-lm")
    with pytest.raises(ValueError, match=r"outputs: 'normed' needs a final norm"):
        residtap.capture(model, final_norm=None, outputs=("normed",))
    cap = residtap.capture(model, final_norm=None, outputs=("resid", "stats"))
    assert cap.layout.final_norm is None and cap.layout.eps == EPS  # the config's rms_norm_eps
    # the reference by the same rules: None is no final norm (it used to mean "the table's")
    with pytest.raises(ValueError, match=r"outputs: 'normed' needs a final norm"):
        run_reference(model, torch.zeros(1, 2, dtype=torch.long), final_norm=None, outputs=("normed",))
    ids = random_input_ids(model, 2, 5)
    with torch.no_grad(), cap:
        model(ids)
    with torch.no_grad():
        ref = run_reference(model, ids, final_norm=None, outputs=("resid", "stats"))
    assert_same_outputs(cap, ref, ("resid", "stats"))


def test_a_renamed_table_path_says_where_it_came_from(models, monkeypatch):
    monkeypatch.setitem(residtap.FAMILIES, "llama", residtap.Family("decoder_layers", "norm"))
    with pytest.raises(ValueError, match=r"blocks: expected a module path inside LlamaModel \(residtap's "
                                         r"FAMILIES entry for 'llama'.*has no attribute 'decoder_layers'"):
        residtap.capture(models("llama", "causal-lm"))


def test_the_residual_width_is_the_configs_where_the_embeddings_are_narrower():
    """OPT-350m-like: no final norm and word_embed_proj_dim < hidden_size. The width the parity
    guard probes at set-up is the residual's, not the embeddings'."""
    torch.manual_seed(0)
    cfg = T.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                      word_embed_proj_dim=32, do_layer_norm_before=False, vocab_size=97,
                      max_position_embeddings=64)
    model = T.OPTForCausalLM(cfg).eval()
    assert model.get_input_embeddings().weight.shape[-1] == 32
    cap = residtap.Capture(model, outputs=("stats",))
    assert cap._guess_d_model() == 64


@pytest.mark.parametrize("name", sorted(SHIFTED))
def test_a_stream_kept_in_float32_under_bfloat16_weights(models, name):
    """Mamba's blocks return float32 from bfloat16 weights (residual_in_fp32): block 0 widens the stream.
    dtype=float32 captures it as HF reports it, bit for bit; verify does so by itself and says bfloat16."""
    model = models(name, "causal-lm", torch.bfloat16)
    with residtap.capture(model, dtype=torch.float32, outputs=OUTPUTS) as cap:
        hs = model(IDS, attention_mask=PADDED, output_hidden_states=True).hidden_states
    assert [h.dtype for h in hs] == [torch.float32] * 3  # nothing here is rounded to bfloat16
    assert all(torch.equal(cap.resid[i + 1], hs[i]) for i in range(2))
    assert torch.equal(cap.normed[-1], hs[-1])
    ref = run_reference(model, IDS, attention_mask=PADDED, dtype=torch.float32, outputs=OUTPUTS)
    assert_same_outputs(cap, ref, OUTPUTS)
    # block 0's contribution: its float32 output minus its bfloat16 input, as torch promotes them
    embeddings = model.get_input_embeddings()(IDS)
    assert embeddings.dtype == torch.bfloat16 and torch.equal(cap.resid[0], embeddings.float())
    assert torch.equal(cap.delta[1], hs[0] - embeddings)
    rep = residtap.verify(model, IDS, PADDED)
    assert rep.ok and rep.first_resid == 1 and rep.dtype == "bfloat16"
    assert all(r.raw_exact and r.raw_maxabs == 0.0 for r in rep.rows[:-1])
