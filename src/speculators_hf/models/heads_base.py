"""What Medusa and the MLP speculator share: they read only the verifier's post-norm last hidden state at
the position before the newest token, keep no cache, and draft at most one token per head."""

from __future__ import annotations

from typing import Any

import torch

from ..generation.capture import VerifierBindingError
from ..generation.kvcache import DraftTreeState
from .base import SpeculatorModel


class HeadsSpeculator(SpeculatorModel):
    """Base of the head-based families (`config.max_speculative_tokens` = the number of heads)."""

    def verifier_layer_ids(self) -> list[int]:
        """The post-norm last hidden state: id num_hidden_layers in `output_hidden_states` numbering."""
        return self.last_hidden_layer_ids()

    def new_draft_state(self) -> dict[str, torch.Tensor]:
        """No cache: only the newest verifier hidden state, kept under "hidden"."""
        return {}

    def newest_hidden(self, state: dict[str, torch.Tensor], features: list[torch.Tensor]) -> torch.Tensor:
        """The verifier state [B, 1, H] before the newest token: the last of `features` (the states verified
        since the last round), or the one kept from an earlier round when there is none."""
        if features and features[0].shape[1]:
            state["hidden"] = features[0][:, -1:]
        if "hidden" not in state:
            raise VerifierBindingError(
                f"{type(self).__name__} has no verifier hidden state to start from; the verifier must run before "
                "the draft, as transformers' assisted generation does"
            )
        return state["hidden"]

    def new_tree_state(self, batch_size: int, device: Any = None) -> DraftTreeState:
        return DraftTreeState()

    def max_tree_depth(self) -> int | None:
        return self.config.max_speculative_tokens
