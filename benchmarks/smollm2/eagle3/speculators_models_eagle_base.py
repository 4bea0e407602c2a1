# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.models.eagle_base. Do not edit.
"""What EAGLE-1/2, HASS and EAGLE-3 drafts share: one decoder step per drafted token, fed the token and the
hidden state the step before produced (the verifier's own hidden states for verified positions).

Positions follow EAGLE: the draft's entry t holds token t+1 beside the hidden state of position t and
predicts token t+2. A family defines three pieces of maths; drafting (`tree_extend` / `tree_expand`, which
serve the chains of transformers' assisted loop and the trees of `speculators_hf.generate` alike) is
written once here.
"""

from __future__ import annotations

from typing import Any

import torch

from .speculators_generation_kvcache import DraftTreeState, causal_block, gather_rows, last_valid
from .speculators_models_base import SpeculatorModel


class EagleStyleSpeculator(SpeculatorModel):
    """Base of the EAGLE families; subclasses define `initial_hidden`, `advance` and `vocab_logits`."""

    def initial_hidden(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The draft's hidden input [B, T, H] at verified positions, from the verifier's hidden states."""
        raise NotImplementedError

    def advance(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft pass: tokens [B, T] beside hidden inputs [B, T, H] at `positions` -> the hidden states
        [B, T, H] fed back at the next position."""
        raise NotImplementedError

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] over the verifier vocabulary of the token predicted from `advance`'s output."""
        raise NotImplementedError

    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert state.cache is not None
        valid = valid & (positions >= 1)  # a row's first token has no hidden state before it
        mask = state.cache.mask(causal_block(valid), self.dtype)
        hidden = self.advance(tokens, self.initial_hidden(features), positions - 1, state.cache.cache, mask)
        state.cache.commit(valid)
        last = gather_rows(hidden, last_valid(valid))
        return self.vocab_logits(last), last

    def tree_expand(
        self,
        state: DraftTreeState,
        handles: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        depth: int,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert state.cache is not None
        mask = state.cache.mask(block, self.dtype)
        hidden = self.advance(tokens, handles, positions - 1, state.cache.cache, mask)
        return self.vocab_logits(hidden), hidden
