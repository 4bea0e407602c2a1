# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.models.layers. Do not edit.
"""Decoder-layer parts shared by the EAGLE families, taken from transformers' own model code.

The draft's attention, MLP, RMSNorm and rotary embedding are transformers' classes for the
`transformer_layer_config.model_type` (llama, qwen2, qwen3, mistral), so the maths matches the
verifier family exactly and every attention backend (sdpa, eager, flash) works. Only the input width
of q/k/v changes (EAGLE-3 attends over [embedding, hidden] = 2H).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralMLP,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .speculators_generation_kvcache import cache_kwargs

PARTS: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "llama": (LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding),
    "mistral": (MistralAttention, MistralMLP, MistralRMSNorm, MistralRotaryEmbedding),
    "qwen2": (Qwen2Attention, Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding),
    "qwen3": (Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding),
}


def parts_for(
    layer_config: PretrainedConfig,
) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    try:
        return PARTS[layer_config.model_type]
    except KeyError:
        raise ValueError(
            f"transformer_layer_config.model_type {layer_config.model_type!r} is not supported for draft layers; "
            f"use one of {sorted(PARTS)}"
        ) from None


def rms_norm(layer_config: PretrainedConfig, size: int | None = None) -> nn.Module:
    norm_cls = parts_for(layer_config)[2]
    return norm_cls(size or layer_config.hidden_size, eps=layer_config.rms_norm_eps)


def attention(layer_config: PretrainedConfig, layer_idx: int, in_features: int | None = None) -> nn.Module:
    """Self-attention of `layer_config`'s family; q/k/v read `in_features` (default hidden_size)."""
    attn = parts_for(layer_config)[0](layer_config, layer_idx)
    if in_features is not None and in_features != layer_config.hidden_size:
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(in_features, old.out_features, bias=old.bias is not None))
    return attn


def mlp(layer_config: PretrainedConfig) -> nn.Module:
    return parts_for(layer_config)[1](layer_config)


def rotary(layer_config: PretrainedConfig) -> nn.Module:
    return parts_for(layer_config)[3](config=layer_config)


def causal_mask(query_positions: torch.Tensor, key_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: a query at absolute position p sees keys 0..p (works for sdpa and eager). Positions [q]
    give [1, 1, q, kv]; positions [B, q] (transformers' `position_ids`) give [B, 1, q, kv]."""
    positions = query_positions if query_positions.dim() == 2 else query_positions[None]
    keys = torch.arange(key_length, device=positions.device)
    allowed = keys[None, None, :] <= positions[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def ttt_mask(length: int, step: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """Additive [1, 1, T, T*(step+1)] mask of unrolled training (training-time test): row t sees the
    step-0 rows 0..t (causal) and its own row in each of the `step` later blocks (diagonal)."""
    rows = torch.arange(length, device=device)
    blocks = [rows[None, :] <= rows[:, None]] + [torch.eye(length, dtype=torch.bool, device=device)] * step
    allowed = torch.cat(blocks, 1)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[
        None, None
    ]


def attend(
    attn: nn.Module,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    rope: nn.Module,
    cache: Any = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `attn` on `hidden` [B, q, *] at absolute `positions` [q] or [B, q] (one row per sequence, as
    transformers' `position_ids`), appending to `cache` when given. `mask` (additive, [B or 1, 1, q, kv])
    defaults to causal over the cache: key index = absolute position (the tree loop passes its own)."""
    position_ids = positions if positions.dim() == 2 else positions[None].expand(hidden.shape[0], -1)
    cos_sin = rope(hidden, position_ids)
    if mask is None:
        past = cache.get_seq_length() if cache is not None else 0
        mask = causal_mask(positions, past + hidden.shape[1], hidden.dtype)
    out, _ = attn(hidden_states=hidden, position_embeddings=cos_sin, attention_mask=mask, **cache_kwargs(cache))
    return out
