# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.kvcache. Do not edit.
"""KV caches of the package's own speculative loop: append-only, ragged across the batch, with a mask.

`MaskedCache` wraps a transformers `DynamicCache` (all layers full attention) whose rows hold different
sequences. Entries are only ever appended; an entry that does not belong to a row's sequence (left
padding, a rejected tree node, the holes left when rows accept different numbers of tokens) is marked
dead in `alive` [B, L] and masked out of every later attention with an explicit 4D mask. Positions are
explicit (RoPE is applied before caching), so an entry's index in the cache means nothing and
`compact` can squeeze dead entries out whenever they make up too much of the cache.

The models see the mask through their 4D-mask support: transformers 5.x hands a 4D `attention_mask`
to the attention functions as is (`masking_utils._preprocess_mask_arguments`), for sdpa and eager alike.
The mask is additive (0 where allowed, the dtype's minimum elsewhere) so that a query never sees a
non-finite value, and every query sees at least itself.

A round of tree drafting or verification appends a block past the live context (`length`): `mask`
builds the mask for it, then `keep` turns chosen block entries into context (the verifier's accepted
path) or `truncate` drops the block (the draft's tree nodes, computed from the draft's own guesses).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.models.llama.modeling_llama import LlamaAttention

# transformers 5.24 renamed the cache keyword of model and attention forwards (and the field of generate()'s
# output) from `past_key_values` to `cache`; the old keyword is deprecated, not gone. Pass the installed name.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
OUTPUT_CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the cache keyword of the installed transformers (see `CACHE_KWARG`)."""
    return {CACHE_KWARG: cache}


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool [B, q, kv] -> additive [B, 1, q, kv] (0 where allowed, dtype min elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def causal_block(valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, q, q] mask of a block of new context entries: entry i sees the valid entries j <= i, and itself."""
    q = valid.shape[1]
    idx = torch.arange(q, device=valid.device)
    lower = idx[None, :] <= idx[:, None]
    return (lower[None] & valid[:, None, :]) | torch.eye(q, dtype=torch.bool, device=valid.device)[None]


class MaskedCache:
    """A `DynamicCache` for a ragged batch: context entries [0, length) with a per-row `alive` mask, plus
    a block of pending entries beyond `length` while a tree is drafted or verified."""

    def __init__(self, batch_size: int, device: torch.device | str | None = None):
        self.cache = DynamicCache()
        self.alive = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    @property
    def length(self) -> int:
        """Context entries (alive or dead); pending block entries are not counted."""
        return self.alive.shape[1]

    def _layers(self) -> list[Any]:
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    def mask(self, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive [B, 1, q, length + T] mask for q new entries appended after T pending block entries:
        every query sees the alive context, and the pending/new entries that `block` [B, q, T] allows."""
        context = self.alive[:, None, :].expand(-1, block.shape[1], -1)
        return additive_mask(torch.cat([context, block.to(self.alive.device)], dim=2), dtype)

    def commit(self, valid: torch.Tensor) -> None:
        """The entries just appended past the context (all of them) become context, alive where `valid` [B, q]."""
        self.alive = torch.cat([self.alive, valid.to(self.alive.device)], dim=1)
        self._check()

    def keep(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Turn pending block entries `index` [B, A] (block-relative) into context, alive where `valid`,
        and drop the rest of the block. The kept entries are moved to the front of the block in place and
        the block cut after them, so the context is never copied; a chain's accepted path (the block's
        first A entries) moves nothing."""
        start, kept = self.length, index.shape[1]
        if not torch.equal(index, torch.arange(kept, device=index.device).expand_as(index)):
            for layer in self._layers():
                gather = (start + index.to(layer.keys.device))[:, None, :, None]
                gather = gather.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
                # gather copies before the write, so overlapping source and destination entries are safe
                layer.keys[:, :, start : start + kept] = layer.keys.gather(2, gather)
                layer.values[:, :, start : start + kept] = layer.values.gather(2, gather)
        self._cut(start + kept)
        self.commit(valid)

    def truncate(self) -> None:
        """Drop every pending entry beyond the context."""
        self._cut(self.length)

    def _cut(self, length: int) -> None:
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows`."""
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        self.alive = self.alive[rows.to(self.alive.device)]

    def dead_fraction(self) -> float:
        return 1.0 - self.alive.float().mean().item() if self.alive.numel() else 0.0

    def compact(self) -> None:
        """Squeeze dead context entries out: each row keeps its alive entries, in order, left-padded with
        dead ones to the longest row. Pending entries must have been kept or truncated first."""
        self.truncate()
        keep = int(self.alive.sum(1).max().item()) if self.alive.numel() else 0
        # stable sort on alive puts a row's dead entries first and its alive ones after, in order
        order = torch.sort(self.alive.to(torch.int8), dim=1, stable=True).indices[:, self.length - keep :]
        for layer in self._layers():
            gather = order.to(layer.keys.device)[:, None, :, None]
            gather = gather.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        self.alive = self.alive.gather(1, order)

    def maybe_compact(self, threshold: float = 0.5, min_length: int = 64) -> None:
        if self.length >= min_length and self.dead_fraction() > threshold:
            self.compact()

    def _check(self) -> None:
        layers = self._layers()
        if layers and layers[0].keys.shape[2] != self.length:
            raise RuntimeError(
                f"cache holds {layers[0].keys.shape[2]} entries but the mask covers {self.length}: a forward pass "
                "appended a different number of entries than it was given"
            )


@dataclass
class DraftTreeState:
    """Per-generation state of a draft in the tree loop: its own `MaskedCache` (drafts with attention) and
    per-row tensors (first dimension = batch row) a family keeps between rounds."""

    cache: MaskedCache | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.select(rows)
        self.tensors = {k: v[rows.to(v.device)] for k, v in self.tensors.items()}


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    """Index of the last True column of each row of `valid` [B, A] (every row has one)."""
    columns = torch.arange(valid.shape[1], device=valid.device)
    return torch.where(valid, columns, -1).max(dim=1).values


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, A, ...] at column index[b] of each row -> [B, ...]."""
    return x[torch.arange(x.shape[0], device=x.device), index.to(x.device)]
