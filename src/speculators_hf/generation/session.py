"""One generation with a draft: the object transformers threads through its assisted loop as the
draft's `cache`.

transformers calls `draft.generate(input_ids, cache=<what we returned last time>, ...)` once per
round. The session works out which positions the verifier has checked since the last round (the
prefix of `input_ids` minus the newest token), hands the draft the verifier's hidden states for
exactly those positions, and lets the draft family drop whatever it had drafted beyond them. A round
therefore costs O(k) draft work, whatever the sequence length.

The assisted loop also calls `get_seq_length()` and `crop()` on it, with a target suited to
independent LMs; the session ignores those crops and resynchronises from `input_ids` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .sampling import TokenPicker, point_mass
from .stats import GenerationStats

if TYPE_CHECKING:
    from .capture import VerifierTap


class DraftSession:
    """Per-generation draft state, returned to transformers as the draft's cache."""

    def __init__(self, draft: Any, tap: VerifierTap):
        self.draft = draft
        self.tap = tap
        self.state = draft.new_draft_state()
        self.verified = 0  # positions whose verifier features the draft has consumed
        self.prompt_length: int | None = None
        self.tokens: torch.Tensor | None = None  # the sequence we last returned, to check continuity
        self.stats = GenerationStats()
        if not tap.armed:  # armed already when called through the bound verifier's generate()
            tap.arm()

    # -- the part of transformers' Cache protocol that the assisted loop uses ------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.verified

    def crop(self, max_length: int) -> None:
        """Ignored: the session drops rejected draft positions itself at the next round."""

    # -- one round ---------------------------------------------------------------------------------
    def step(
        self, input_ids: torch.LongTensor, num_tokens: int, pick: TokenPicker
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Draft `num_tokens` tokens after `input_ids` ([1, n]); returns (tokens [1, k], k scores [1, V])."""
        n = input_ids.shape[1]
        if self.prompt_length is None:
            self.prompt_length = n
        elif self.tokens is not None and not torch.equal(
            input_ids[:, : self.verified], self.tokens[:, : self.verified]
        ):
            raise RuntimeError(
                "the draft session was handed a sequence that does not continue the previous round; "
                "start a new generate() call instead of reusing the draft's cache"
            )
        self.stats.draft_rounds += 1
        self.stats.verifier_forwards = self.tap.forwards
        self.stats.emitted_tokens = n - self.prompt_length

        features = self.tap.features(self.verified, n - 1) if self.draft.verifier_layer_ids() else []
        if features is None:
            # Called before the verifier's prefill (transformers drafts first): no hidden states exist
            # yet. One placeholder token with a point-mass score keeps greedy and sampling exact.
            token = input_ids[:, -1]
            tokens, scores = token[:, None], [point_mass(token, self.draft.config.vocab_size)]
        else:
            tokens, scores = self.draft.propose(self.state, input_ids, features, self.verified, num_tokens, pick)
            self.verified = n - 1
        self.stats.drafted_tokens += tokens.shape[1]
        self.tokens = torch.cat([input_ids, tokens], dim=1)
        return tokens, scores
