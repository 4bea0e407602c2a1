"""MLP speculator (IBM; Wertheimer et al., 2024, "Accelerating Production LLMs with Combined
Token/Embedding Speculators"), field for field as fms-extras, fms-fsdp and vLLM's `mlp_speculator` read it.

A recurrent chain of `n_predict` small MLP stages, no attention and no cache. The state s starts as the
verifier's post-norm last hidden state at the position that produced the newest token (optionally
rescaled by a parameter-free norm and 1/sqrt(2) with `scale_input`). Stage i reads the newest token
and the state:

    s = gelu(ln_i(proj_i(s) + (emb_weight / state_weight) * emb_i(token)))    logits_i = head_i(s)

with state_weight = 0.5 ** (0.5 / n_predict) and emb_weight = sqrt((1 - state_weight**2) * inner_dim / 2),
so that the verifier's state keeps half of the magnitude by the last stage. (The paper writes
state_weight * proj + emb_weight * emb; the references add with alpha = emb_weight / state_weight and
let the norm absorb the common factor, as done here.) `ln_i` is an RMS norm WITH a bias and WITHOUT
mean subtraction (eps 1e-6): x * rsqrt(mean(x^2) + eps) * weight + bias. gelu is the exact (erf) one.
Stage i's token is drafted by stage i-1 (stage 0 reads the verifier's newest token), so a chain is at
most `n_predict` tokens long.

Saved tensors are the published layout WITHOUT the `speculator.` prefix that the Hub copies carry
(fms-extras' HF wrapper keeps the module under `self.speculator`; vLLM strips the prefix on load; the
converter strips or adds it): `emb.{i}.weight` [V, inner], `proj.{i}.weight` ([inner, emb_dim] for
i = 0, else [inner, inner]), `head.{i}.weight` [V, inner], `ln.{i}.weight` and `ln.{i}.bias` [inner],
for i < n_predict. `scale_input`'s ln0 has no parameters, hence no tensor. The verifier's tensors are
never stored.

`tie_weights` (fms-extras): every stage shares one `emb`, one `head` and one `ln`, and stages 1.. share
one `proj` (proj.0 reads emb_dim and stays separate). In memory the stages share the MODULES (vLLM
lists one module per stage; fms-extras shares the parameters), so training updates one set of weights;
on disk every stage's copy is written as an equal tensor, the layout of the published HF checkpoints
(vLLM loads the copies its deduplicated parameters name and ignores the rest). Loading a tied checkpoint
fills each shared module from any one of its copies (transformers 5.2x loads module-shared keys once),
so a file with only the first copies loads too; copies that differ are not detected (one of them wins),
so a converter should compare them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, cast

import torch
from pydantic import Field, PositiveInt, StrictInt
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init

from ..config import (
    MAX_DRAFT_HEADS,
    MAX_WIDTH,
    DraftHeads,
    SpeculatorConfig,
    SpeculatorConfigError,
    VocabSize,
    Width,
    default_speculators_config,
)
from ..generation.capture import VerifierBindingError
from ..generation.kvcache import DraftTreeState, gather_rows, last_valid
from ..generation.sampling import expand_draft_vocab
from .base import DraftOutput, VllmServing, family
from .heads_base import HeadsSpeculator
from .objectives import chained_cross_entropy

NORM_EPS = 1e-6  # fms LayerNormParameterized and vLLM MLPSpeculatorLayerNorm default
# fms-extras' MLPSpeculatorConfig default (n_predict = 3); heads beyond the third default to 1 (no branching).
DEFAULT_TOP_K = (5, 4, 3)


def default_top_k(n_predict: int) -> list[int]:
    """`top_k_tokens_per_head` when unset: fms-extras' [5, 4, 3], cut or padded with 1 to `n_predict` heads
    (the field only shapes fms-extras' candidate trees; chains and vLLM ignore it)."""
    return [*DEFAULT_TOP_K, *[1] * n_predict][:n_predict]


class MLPSpeculatorConfig(SpeculatorConfig):
    """Config of an MLP speculator; `speculators_model_type = "mlp_speculator"`. The vocabulary is the
    verifier's (`vocab_size`, from the fingerprint); `inner_dim = 0` means `emb_dim`, as published."""

    family = "mlp_speculator"

    emb_dim: Width = 4096
    inner_dim: Annotated[StrictInt, Field(ge=0, le=MAX_WIDTH)] = 0
    n_predict: DraftHeads = 3
    top_k_tokens_per_head: list[VocabSize] | None = None
    n_candidates: PositiveInt = 5
    tie_weights: bool = False
    scale_input: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        valid_n = self.max_speculative_tokens is not None  # a default list of 10^8 entries is never built
        if self.top_k_tokens_per_head is None and valid_n:
            self.top_k_tokens_per_head = default_top_k(self.n_predict)
        if self.speculators_config is None:  # draft length defaults to the number of heads (vLLM's default too)
            self.speculators_config = default_speculators_config(self.family, self.n_predict if valid_n else 1)
        super().__post_init__(**kwargs)

    def check_fields(self) -> list[str]:
        problems = []
        top_k = self.top_k_tokens_per_head
        if top_k is None or len(top_k) != self.n_predict:
            problems.append(
                f"  top_k_tokens_per_head: needs one entry per head (n_predict={self.n_predict}), got {top_k}"
            )
        if self.tie_weights and self.n_predict < 2:
            problems.append("  tie_weights: needs n_predict >= 2 (there is nothing to tie with one stage)")
        return problems

    @property
    def max_speculative_tokens(self) -> int | None:
        n = self.n_predict
        valid = isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_DRAFT_HEADS
        return n if valid else None  # an invalid count is reported by the field's own annotation

    @property
    def inner_size(self) -> int:
        """Width of the speculator's state (`inner_dim`, or `emb_dim` when 0)."""
        return self.inner_dim or self.emb_dim


class MLPSpeculatorNorm(nn.Module):
    """RMS-style norm of the MLP speculator: x * rsqrt(mean(x^2) + eps), then weight * x + bias when
    `affine` (no mean subtraction, unlike LayerNorm). Without `affine` (scale_input's ln0) it has no
    parameters."""

    def __init__(self, size: int, affine: bool = True, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight: nn.Parameter | None = nn.Parameter(torch.ones(size)) if affine else None
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(size)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if self.weight is not None and self.bias is not None:
            x = self.weight * x + self.bias
        return x


@family
class MLPSpeculator(HeadsSpeculator):
    """MLP speculator draft. Create one with `MLPSpeculator.from_verifier(verifier)` or load one."""

    config_class = MLPSpeculatorConfig
    title = "MLP speculator"
    description = (
        "The [MLP speculator](https://arxiv.org/abs/2404.19124) (IBM; Wertheimer et al., 2024) is a chain of "
        "`n_predict` small MLP stages without attention or cache. Its state starts as the verifier's last hidden "
        "state (after its final norm); stage i mixes it with the embedding of the token stage i-1 drafted and "
        "predicts the next token, so a round drafts at most `n_predict` tokens. Chains and token trees."
    )
    vllm_serving = VllmServing(
        method=None,
        reason=(
            "vLLM 0.32 cannot serve it: it refuses the architecture before reading any weight (`Model architectures "
            "['MLPSpeculatorPreTrainedModel'] are not supported for now`), as its V1 engine has no MLP-speculator "
            "proposer and the registry entry is commented out (`conversion/check_vllm_native.py`, conversion/README.md, "
            '"Native exports in vLLM 0.32 (checked)").'
        ),
        notes=(
            "`speculators-hf convert {draft} mlp-speculator-vllm --to vllm` still writes the fms-extras / vLLM "
            "`mlp_speculator` layout (`speculator.`-prefixed tensors), which vLLM versions with the V0 engine served "
            'with `"method": "mlp_speculator"`; no such version was run here.'
        ),
    )
    card_details = (
        ("stages (`n_predict`)", "n_predict"),
        ("input width (`emb_dim`)", "emb_dim"),
        ("inner width (`inner_dim`, 0 = `emb_dim`)", "inner_dim"),
        ("`tie_weights`", "tie_weights"),
        ("`scale_input`", "scale_input"),
    )

    def __init__(self, config: MLPSpeculatorConfig):
        super().__init__(config)
        vocab, emb_dim, inner, n = config.vocab_size, config.emb_dim, config.inner_size, config.n_predict
        if vocab is None:
            raise SpeculatorConfigError(
                "MLPSpeculatorConfig has no vocabulary size: set speculators_config.verifier.vocab_size (the "
                "verifier's), or build the config with MLPSpeculator.config_for(verifier)"
            )
        # fms-extras speculator.py: the verifier state keeps 50% of the magnitude by the last head
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * (inner / 2))
        proj_first = nn.Linear(emb_dim, inner, bias=False)
        if config.tie_weights:  # one module per stack, listed once per stage (proj.0 stays separate)
            emb, head, ln = nn.Embedding(vocab, inner), nn.Linear(inner, vocab, bias=False), MLPSpeculatorNorm(inner)
            proj_rest = nn.Linear(inner, inner, bias=False)
            self.emb = nn.ModuleList([emb] * n)
            self.proj = nn.ModuleList([proj_first] + [proj_rest] * (n - 1))
            self.head = nn.ModuleList([head] * n)
            self.ln = nn.ModuleList([ln] * n)
        else:
            self.emb = nn.ModuleList(nn.Embedding(vocab, inner) for _ in range(n))
            self.proj = nn.ModuleList([proj_first] + [nn.Linear(inner, inner, bias=False) for _ in range(n - 1)])
            self.head = nn.ModuleList(nn.Linear(inner, vocab, bias=False) for _ in range(n))
            self.ln = nn.ModuleList(MLPSpeculatorNorm(inner) for _ in range(n))
        self.ln0 = MLPSpeculatorNorm(emb_dim, affine=False) if config.scale_input else None
        self.activation = nn.GELU()  # exact (erf) gelu, as nn.GELU() in the references
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """fms-extras' `reset_parameters`: N(0, 1/sqrt(inner_dim)) for embeddings and linears, norms at 1 and 0."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=1 / math.sqrt(self.config.inner_size))
        elif isinstance(module, MLPSpeculatorNorm) and module.weight is not None and module.bias is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)

    # -- maths -------------------------------------------------------------------------------------
    def input_state(self, hidden: torch.Tensor) -> torch.Tensor:
        """The initial state from verifier hidden states [..., emb_dim]: as is, or ln0(h) / sqrt(2) with
        `scale_input`."""
        hidden = hidden.to(cast(nn.Linear, self.proj[0]).weight.dtype)
        if self.ln0 is not None:
            hidden = self.ln0(hidden) / math.sqrt(2)
        return hidden

    def stage(self, index: int, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage `index`: state [B, T, emb_dim or inner] and the newest tokens [B, T] -> (next state
        [B, T, inner], logits [B, T, V] of the token after `tokens`)."""
        state = self.proj[index](state)
        state = torch.add(state, self.emb[index](tokens), alpha=self.emb_weight / self.state_weight)
        state = self.activation(self.ln[index](state))
        return state, self.head[index](state)

    def forward(
        self,
        verifier_hidden_states: torch.Tensor | list[torch.Tensor],
        input_ids: torch.LongTensor,
        **kwargs: Any,
    ) -> DraftOutput:
        """Teacher-forced `logits` of every head, for training and tests: [n_predict, B, T, V].

        `verifier_hidden_states` [B, T, emb_dim] (or a one-element list) are the verifier's post-norm last
        hidden states at positions 0..T-1 and `input_ids` [B, T'] (T' >= T) the sequence x_0.. itself.
        Head i at row t starts from the state at position t, reads the true tokens x_{t+1}..x_{t+i+1} and
        predicts x_{t+i+2}: exactly what drafting computes after the prefix x_0..x_{t+1} when its drafts
        are right. Tokens past the end of `input_ids` are 0: mask rows t + i + 2 >= T' out of the loss.
        (fms-extras' `speculator(embeds, inds)` is `forward(embeds, input_ids)` with inds = input_ids[:, 1:].)"""
        hidden = verifier_hidden_states[0] if isinstance(verifier_hidden_states, list) else verifier_hidden_states
        length = hidden.shape[1]
        state, logits = self.input_state(hidden), []
        for i in range(self.config.n_predict):
            tokens = input_ids[:, i + 1 : i + 1 + length]
            tokens = nn.functional.pad(tokens, (0, length - tokens.shape[1]))
            state, head_logits = self.stage(i, state, tokens)
            logits.append(head_logits)
        return DraftOutput(logits=torch.stack(logits))

    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher-forced: stage i starts from the state at t, reads x_{t+1}..x_{t+i+1}, predicts x_{t+i+2}
        (weights 0.8^i)."""
        return chained_cross_entropy(self(features[0], input_ids).logits, input_ids, loss_mask)

    # -- the family contract -----------------------------------------------------------------------
    # -- the tree loop: no cache; a node's handle is its state, stage = its depth ---------------------
    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 0 reads each row's newest token and the verifier state at the position before it."""
        last = last_valid(valid)
        hidden = self.input_state(gather_rows(features[0], last)[:, None])
        hidden, logits = self.stage(0, hidden, gather_rows(tokens, last)[:, None].to(hidden.device))
        return expand_draft_vocab(logits[:, 0], None, self.config.vocab_size), hidden[:, 0]

    def tree_expand(
        self,
        state: DraftTreeState,
        handles: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        depth: int,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A node `depth` tokens ahead goes through stage `depth`, from its parent's state."""
        hidden, logits = self.stage(depth, handles, tokens.to(handles.device))
        return expand_draft_vocab(logits, None, self.config.vocab_size), hidden

    # -- creation from a verifier --------------------------------------------------------------------
    @classmethod
    def config_from_verifier(
        cls,
        verifier_config: PretrainedConfig,
        inner_dim: int | None = None,
        n_predict: int | None = None,
        tie_weights: bool = False,
        scale_input: bool = False,
        speculative_tokens: int | None = None,
        **fields: Any,
    ) -> MLPSpeculatorConfig:
        """emb_dim = the verifier's hidden size, inner_dim = emb_dim unless given. One head per draft token:
        n_predict defaults to `speculative_tokens` when that is given, else 3 (fms-extras' default), and the
        draft length to n_predict."""
        text = verifier_config.get_text_config()
        n_predict = n_predict or speculative_tokens or 3
        config = MLPSpeculatorConfig(
            emb_dim=text.hidden_size,
            inner_dim=inner_dim or text.hidden_size,
            n_predict=n_predict,
            tie_weights=tie_weights,
            scale_input=scale_input,
            **{"vocab_size": text.vocab_size, **fields},  # the verifier's vocabulary (fingerprint)
        )
        if speculative_tokens is not None:
            config.speculative_tokens = speculative_tokens
        return config

    def on_bind(self, verifier: Any) -> None:
        text = verifier.config.get_text_config()
        if text.hidden_size != self.config.emb_dim:
            raise VerifierBindingError(
                f"emb_dim: the MLP speculator reads verifier hidden states of size {self.config.emb_dim}, "
                f"verifier has hidden size {text.hidden_size}"
            )

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as saved: with `tie_weights` every stage's tensor is its own (equal) copy, the
        published layout (safetensors refuses aliased tensors, and transformers would drop the aliases)."""
        seen: set[tuple[torch.device, int]] = set()
        out = {}
        for key, tensor in self.state_dict().items():
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            out[key] = tensor.detach().clone() if storage in seen else tensor
            seen.add(storage)
        return out

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = self.checkpoint_state_dict()
        super().save_pretrained(save_directory, *args, **kwargs)
