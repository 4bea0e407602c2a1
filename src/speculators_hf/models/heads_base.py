"""What Medusa and the MLP speculator share: they read only the verifier's post-norm last hidden state at
the position before the newest token, keep no cache, and draft at most one token per head."""

from __future__ import annotations

from typing import Any

from ..generation.kvcache import DraftTreeState
from .base import SpeculatorModel


class HeadsSpeculator(SpeculatorModel):
    """Base of the head-based families (`config.max_speculative_tokens` = the number of heads)."""

    def verifier_layer_ids(self) -> list[int]:
        """The post-norm last hidden state: id num_hidden_layers in `output_hidden_states` numbering."""
        return self.last_hidden_layer_ids()

    def new_tree_state(self, batch_size: int, device: Any = None) -> DraftTreeState:
        return DraftTreeState()

    def max_tree_depth(self) -> int | None:
        return self.config.max_speculative_tokens
