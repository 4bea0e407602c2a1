# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.lean. Do not edit.
"""The verifier's pass in the package's own loop, without transformers' per-call plumbing.

A transformers forward wraps every decoder layer and attention call in argument decorators, output capturing,
mask preprocessing and gradient-checkpointing wrappers; a 30-layer verifier pays them some 60 times a pass. On
SmolLM2-135M (this project's 2-core AMD EPYC, one thread, packed linears, 4 tokens after 200 cached) a pass took
57.55 ms through `verifier(...)` and 52.85 ms through this module, and the own loop ran 1.10x faster with it
(`benchmarks/lean_pass.py`, results in `benchmarks/results/lean-pass`).

`LeanPass` is a plain loop over the decoder layers of Llama, Mistral, Qwen2 and Qwen3. It calls the verifier's
own modules (embedding, rotary embedding, norms, projections, Qwen3's q/k norms, MLP, final norm, lm_head), the
rotary and attention functions of the model's own modeling file (`ALL_ATTENTION_FUNCTIONS`, for its
`_attn_implementation`) and the cache's `update`, in the order of transformers' forward, with the same arguments.
One step differs where it may: under sdpa with grouped-query attention and more than one query, sdpa reads each
key/value head for its group of query heads (`enable_gqa`) where transformers first copies the heads for every
query head (`repeat_kv`: a copy of the whole cache in every layer of every pass).

The result must be the stock forward's bit for bit, and that is checked, not assumed: `LeanPass.of` runs both on
the verifier itself (a padded prefill, a tree-masked block over the cache, a single token) and returns None
unless every logit and captured hidden state is equal (the grouped-query step is tried first, then transformers'
attention function); the loop then runs `verifier(...)`. It declines as well for anything it would bypass:
another module layout, a module accelerate has hooked (offloading, device maps), forward hooks other than the
draft's own and transformers' output capturing.

The lean pass returns the hidden states the draft reads (`VerifierTap`'s numbering: `hidden_states[i]` for
i < num_layers, the post-norm state for i == num_layers), so the tap's hooks are not needed on this path.

Transformers' loop (`verifier.generate(..., assistant_model=draft)`) calls the verifier's forward itself; there
the bound generate() runs the verifier's decoder layers as `LeanPass.layer` for the call (`in_layers`: each
layer's `forward` an instance attribute, put back afterwards), inside transformers' own model forward, its mask
and the tap's hooks. `of` checks that path too (`matches_stock_in_layers`: 2D masks as generate passes them,
padded and not, a prefill, a block and a single token over the cache) and `swappable` says whether it holds.
`draft.lean_verifier = False` keeps the stock layers there.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .speculators_generation_capture import decoder_of
from .speculators_generation_kvcache import additive_mask, cache_kwargs, causal_block

# the decoder layers whose forward `LeanPass` replays (transformers' modeling files of these families)
LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_DECODER_PARTS = {"embed_tokens", "layers", "norm", "rotary_emb"}


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


# transformers' own hooks that record outputs only while `output_hidden_states` (or attentions) is asked for;
# installed on the model's first such call and inert otherwise
_OBSERVING_HOOKS = "transformers.utils.output_capturing"


def _hooked(module: nn.Module, allowed: Collection[int]) -> bool:
    """Whether `module` or a submodule runs code around its forward that the lean loop would not call: an
    accelerate hook, or forward (pre-)hooks other than transformers' output capturing and the ones whose handle
    ids are `allowed`."""
    for sub in module.modules():
        if hasattr(sub, "_hf_hook"):
            return True
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
            if any(
                key not in allowed and getattr(hook, "__module__", None) != _OBSERVING_HOOKS
                for key, hook in hooks.items()
            ):
                return True
    return False


def lean_pass_for(draft: Any, verifier: nn.Module, tap: Any) -> LeanPass | None:
    """The lean pass of `draft`'s binding to `verifier` (made and checked once per binding, kept in it), or None
    where it does not apply; hooks installed since the check are looked for on every call."""
    binding = draft._binding
    if "lean" not in binding:
        binding["lean"] = LeanPass.of(verifier, tap.layer_ids, tap.hook_ids)
    lean: LeanPass | None = binding["lean"]
    return lean if lean is not None and LeanPass.supports(verifier, tap.hook_ids) else None


class LeanPass:
    """A verifier forward pass as plain calls of the verifier's modules; see the module docstring."""

    def __init__(self, verifier: nn.Module):
        # typed Any: transformers' modules, reached through attributes nn.Module does not declare
        decoder: Any = decoder_of(verifier)
        self.verifier: Any = verifier
        self.decoder = decoder
        self.layers: list[Any] = list(decoder.layers)
        modeling = sys.modules[type(self.layers[0]).__module__]
        self.rotary = modeling.apply_rotary_pos_emb
        self.eager = modeling.eager_attention_forward
        # grouped-query attention straight through sdpa (`enable_gqa`) instead of transformers' `repeat_kv`, which
        # copies every cached key and value head once per query head sharing it, in every layer of every pass
        self.grouped = False
        # whether transformers' loop may run the verifier's layers as `layer` (`in_layers`; checked by `of`)
        self.swappable = False

    @staticmethod
    def supports(verifier: nn.Module, allowed_hooks: Collection[int] = ()) -> bool:
        """Whether `verifier` has the module layout the lean loop replays (and nothing hooked around it)."""
        try:
            decoder = decoder_of(verifier)
        except ValueError:
            return False
        layers = list(decoder.layers)  # type: ignore[arg-type]
        config = getattr(verifier, "config", None)
        return (
            bool(layers)
            and _children(verifier) == {"model", "lm_head"}
            and getattr(verifier, "model", None) is decoder
            and _children(decoder) == _DECODER_PARTS
            and len(layers) == getattr(config, "num_hidden_layers", None)
            and all(
                type(layer).__name__ in LAYERS
                and _children(layer) == _LAYER_PARTS
                and _children(layer.self_attn) <= _ATTENTION_PARTS
                and {"q_proj", "k_proj", "v_proj", "o_proj"} <= _children(layer.self_attn)
                for layer in layers
            )
            and not _hooked(verifier, allowed_hooks)
        )

    @classmethod
    def of(cls, verifier: nn.Module, layer_ids: list[int], allowed_hooks: Collection[int] = ()) -> LeanPass | None:
        """A lean pass for `verifier` if it supports one and it is bitwise equal to the stock forward there
        (logits and the hidden states `layer_ids`), else None. `allowed_hooks`: handle ids of hooks that only
        observe (the draft's `VerifierTap`)."""
        if not cls.supports(verifier, allowed_hooks):
            return None
        lean = cls(verifier)
        layer_ids = sorted(set(layer_ids) | {0, len(lean.layers)})
        for grouped in (True, False) if lean._groups > 1 else (False,):
            lean.grouped = grouped
            if lean.matches_stock(layer_ids):
                lean.swappable = lean.matches_stock_in_layers()
                return lean
        return None

    @property
    def _groups(self) -> int:
        """Query heads per key/value head under sdpa (1: no grouped-query shortcut applies)."""
        if self.verifier.config._attn_implementation != "sdpa":
            return 1
        return int(getattr(self.layers[0].self_attn, "num_key_value_groups", 1))

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        layer_ids: list[int],
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, q or logits_to_keep, V] and the hidden states `layer_ids` (ascending, each [B, q, H]) of
        one pass over `input_ids` [B, q] at `position_ids` with the additive 4D `attention_mask`, appending the
        block's keys and values to `cache` (a transformers `DynamicCache`), as `verifier(...)` does."""
        keep = set(layer_ids)
        states: dict[int, torch.Tensor] = {}
        hidden = self.decoder.embed_tokens(input_ids)
        position = self.decoder.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self.layers):
            if index in keep:
                states[index] = hidden
            hidden = self.layer(layer, hidden, position, attention_mask, cache)
        hidden = self.decoder.norm(hidden)
        states[len(self.layers)] = hidden
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.verifier.lm_head(hidden), [states[i] for i in layer_ids]

    def layer(
        self, layer: Any, hidden: torch.Tensor, position: Any, mask: torch.Tensor | None, cache: Any, **kwargs: Any
    ) -> torch.Tensor:
        """One decoder layer over `hidden` [B, q, H]: `position` is the rotary embedding's (cos, sin), `mask` what
        the model forward gives its layers (an additive or boolean 4D mask, or None for sdpa's causal path),
        `kwargs` what it passes on to the attention function."""
        attn = layer.self_attn
        implementation = self.verifier.config._attn_implementation
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        heads = (*hidden.shape[:-1], -1, attn.head_dim)
        query = attn.q_proj(hidden).view(heads)
        key = attn.k_proj(hidden).view(heads)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before the rotary embedding
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = attn.v_proj(hidden).view(heads).transpose(1, 2)
        query, key = self.rotary(query, key, *position)
        if cache is not None:
            key, value = cache.update(key, value, attn.layer_idx)
        # the grouped-query step needs a mask (None: sdpa's causal path) and more than one query (for one,
        # transformers folds the query heads, `pack_gqa`)
        if self.grouped and implementation == "sdpa" and mask is not None and query.shape[2] > 1:
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=attn.scaling, enable_gqa=True
            ).transpose(1, 2)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, self.eager)
            window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
            output, _ = attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling,
                                  sliding_window=window, **kwargs)  # fmt: skip
        hidden = residual + attn.o_proj(output.reshape(*hidden.shape[:-1], -1).contiguous())
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @contextmanager
    def in_layers(self) -> Iterator[None]:
        """While inside, the verifier's decoder layers run `layer` (their `forward`, an instance attribute; the model
        forward around them stays transformers': transformers' loop calls it)."""
        for layer in self.layers:
            layer.forward = self._layer_forward(layer)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)

    def _layer_forward(self, layer: Any) -> Any:
        def forward(
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_embeddings: Any = None,
            cache: Any = None,
            past_key_values: Any = None,  # the name before transformers 5.24
            **kwargs: Any,
        ) -> torch.Tensor:
            cache = cache if cache is not None else past_key_values
            return self.layer(layer, hidden_states, position_embeddings, attention_mask, cache, **kwargs)

        return forward

    def matches_stock_in_layers(self) -> bool:
        """Whether `verifier(...)` gives bitwise equal logits with its layers running `layer` (`in_layers`), as
        transformers' generate calls it: 2D masks (a padded batch; one sequence, where sdpa takes its causal path
        without a mask), then a block and a single token over the cache."""
        from transformers import DynamicCache

        verifier = self.verifier
        device = next(verifier.parameters()).device
        vocab = verifier.get_input_embeddings().weight.shape[0]
        ids = (torch.arange(20, device=device) * 7919 % vocab).view(2, 10)
        padded = torch.ones(2, 10, dtype=torch.long, device=device)
        padded[1, :3] = 0
        with torch.inference_mode():
            for mask, rows in ((padded, 2), (torch.ones_like(padded[:1]), 1)):
                logits = []
                for swapped in (False, True):
                    cache, out = DynamicCache(), []
                    with self.in_layers() if swapped else contextlib.nullcontext():
                        for start, end in ((0, 6), (6, 9), (9, 10)):
                            positions = (mask[:, :end].cumsum(1) - 1).clamp(min=0)[:, start:]
                            out.append(verifier(input_ids=ids[:rows, start:end], attention_mask=mask[:, :end],
                                                position_ids=positions, use_cache=True,
                                                **cache_kwargs(cache)).logits)  # fmt: skip
                    logits.append(out)
                if not all(map(torch.equal, *logits)):
                    return False
        return True

    def matches_stock(self, layer_ids: list[int]) -> bool:
        """Whether this pass and `verifier(...)` give bitwise equal logits and hidden states `layer_ids` on a
        short padded prefill, a tree-masked block and a single token after it (each with its own fresh cache)."""
        from transformers import DynamicCache

        verifier = self.verifier
        param = next(verifier.parameters())
        vocab = verifier.get_input_embeddings().weight.shape[0]
        dtype = param.dtype
        ids = (torch.arange(14, device=param.device) * 7919 % vocab).view(2, 7)
        valid = torch.ones(2, 7, dtype=torch.bool, device=param.device)
        valid[1, :2] = False  # a left-padded row
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        block = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=param.device)  # a tree
        context = valid[:, None, :].expand(-1, 3, -1)
        steps = [
            (ids[:, :7], positions, additive_mask(causal_block(valid), dtype)),
            (
                (ids[:, 4:7] + 1) % vocab,  # ids of the vocabulary, however small
                positions[:, -1:] + torch.tensor([[1, 2, 2]], device=param.device),
                additive_mask(torch.cat([context, block[None].expand(2, -1, -1)], dim=2), dtype),
            ),
            (  # one token (a one-token prompt's prefill; transformers attends to it through another path)
                ids[:, 2:3],
                positions[:, -1:] + 3,
                additive_mask(torch.ones(2, 1, 11, dtype=torch.bool, device=param.device), dtype),
            ),
        ]
        with torch.inference_mode():
            stock_cache, lean_cache = DynamicCache(), DynamicCache()
            for tokens, pos, mask in steps:
                hidden = verifier.model(  # type: ignore[operator]
                    input_ids=tokens,
                    position_ids=pos,
                    attention_mask=mask,
                    output_hidden_states=True,
                    use_cache=True,
                    **cache_kwargs(stock_cache),
                )
                stock = [
                    hidden.last_hidden_state if i == len(self.layers) else hidden.hidden_states[i] for i in layer_ids
                ]
                stock_logits = verifier.lm_head(hidden.last_hidden_state)  # type: ignore[operator]
                logits, states = self(tokens, pos, mask, lean_cache, layer_ids)
                if not torch.equal(logits, stock_logits) or not all(map(torch.equal, states, stock)):
                    return False
        return True
