# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.models.base. Do not edit.
"""`SpeculatorModel`: what every draft family shares.

- A reference to its verifier (like a PEFT adapter's `base_model_name_or_path`) plus a fingerprint
  (vocab size, hidden size, layers, special ids) that `bind_verifier` checks.
- `bind_verifier` installs the hooks that capture the verifier hidden states the draft needs during
  the verifier's own forward passes.
- `generate` implements the contract of transformers' assisted decoding
  (`verifier.generate(..., assistant_model=draft)`): it returns `.sequences` (prompt + k draft
  tokens), `.scores` (k [1, V] tensors over the verifier vocabulary) and `.cache` (a `DraftSession`).
- `save_pretrained` writes safetensors, a complete config, the flat remote-code files and `auto_map`,
  atomically. `from_pretrained` trusts nothing in the checkpoint: files outside the folder, tensors the
  config implies but the file lacks (checked before anything is allocated), wrong dtypes and NaN/inf
  values are errors. The file handling lives in `checkpoint.py`.

A family subclass defines the drafting contract — `verifier_layer_ids`, `tree_extend`, `tree_expand` and,
where needed, `new_tree_state` / `max_tree_depth` — and `config_from_verifier`, optionally
`init_from_verifier` / `on_bind`. The one contract serves both loops: transformers' assisted loop drafts a
chain (a width-1 tree, `generation/session.py`) with the same code as the package's own loop drafts trees.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

from .speculators_config import FINGERPRINT_FIELDS, SpeculatorConfig, SpeculatorConfigError, tokenizer_hash, verifier_fingerprint
from .speculators_generation_capture import VerifierBindingError, VerifierTap
from .speculators_generation_kvcache import OUTPUT_CACHE_FIELD, DraftTreeState, MaskedCache
from .speculators_generation_lean import lean_pass_for
from .speculators_generation_policy import AdaptiveDrafting, adaptive_drafting, draft_length
from .speculators_generation_sampling import Sampler
from .speculators_generation_session import DraftSession
from .speculators_generation_settings import ASSISTANT_SETTINGS
from .speculators_generation_stats import GenerationStats
from .speculators_remote_code import write_remote_code
from .speculators_models_checkpoint import UnsafeCheckpointError, carry_over, checkpoint_weight_files, meta_model, non_finite_tensors, recover_interrupted_save, replacing_folder, safetensors_header, save_target, tensor_infos, weight_problems

# from_pretrained's arguments that say where a checkpoint's files come from
DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


class SpeculatorLoadError(ValueError):
    """A checkpoint's weights do not match its config (missing, unexpected, misshapen or mistyped tensors), hold
    invalid values (NaN/inf, an out-of-range vocabulary map), or lie outside the checkpoint folder."""


@dataclass
class DraftOutput(ModelOutput):
    """What a draft's `forward` returns, as transformers' models return a `ModelOutput`: `logits` of the token
    each position predicts (over the draft's vocabulary; [heads, B, T, V] for head-based drafts, one per head),
    `hidden_states` [B, T, H] the draft's output states (what the EAGLE families feed back)."""

    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


@dataclass(frozen=True)
class VllmServing:
    """How vLLM serves a family's drafts, as a run of vLLM checked it: the model card's "Serve with vLLM" section is
    rendered from these facts alone (`hub/cards.py`), and `tests/unit/test_cards.py` compares the two.

    `method`: vLLM's `speculative_config["method"]` (vLLM needs it: without one it runs any draft as `draft_model`
    unless the draft's path contains "eagle3"/"dflash"); None when vLLM cannot serve the family, `reason` saying why.
    `options`: more `speculative_config` keys. `folder`: the folder vLLM reads when it is not the draft's own, and
    `prepare` how to write it (Markdown; `{draft}` stands for the draft's id or folder). `serve_draft`: `vllm serve
    DRAFT` alone works too (vLLM's speculators reader takes the verifier, method and length from config.json).
    `checked`: what ran the command, with which vLLM ("" when no run did); `results`: its results file (JSON, relative
    to the repository) when there is one. `notes`: what vLLM does differently (Markdown)."""

    method: str | None
    checked: str = ""
    results: str = ""
    reason: str = ""
    options: tuple[tuple[str, Any], ...] = ()
    folder: str = ""
    prepare: str = ""
    serve_draft: bool = False
    notes: str = ""


# Every draft family, by `speculators_model_type`, in the order they were registered (`family`).
FAMILIES: dict[str, type[SpeculatorModel]] = {}


def family(model_class: type[SpeculatorModel]) -> type[SpeculatorModel]:
    """Class decorator: make `model_class` (with its `config_class`) a draft family. Everything else reads the
    registry: AutoConfig's dispatch on `speculators_model_type`, the Auto classes (`speculators_hf.register_family`),
    loading, the CLI's `--family`, training (`training_loss`), model cards (`title`, `card_details`) and the
    vLLM tensor names (`vllm_tensor_name`). Nothing outside the family's module and its converter names it."""
    config_class = model_class.config_class
    name = config_class.family
    if not name:
        raise ValueError(f"{config_class.__name__} has no `family` (its speculators_model_type)")
    config_class.model_class_name = model_class.__name__
    SpeculatorConfig.families[name] = config_class
    FAMILIES[name] = model_class
    return model_class


def is_speculator(model: Any) -> bool:
    """True for any speculators_hf draft, including copies loaded as remote code."""
    return bool(getattr(model, "_is_speculator", False))


class SpeculatorModel(PreTrainedModel, GenerationMixin):
    config_class: Any = SpeculatorConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _is_speculator: ClassVar[bool] = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # -- what a family declares about itself (registration, `family`, builds every table from these) ------
    title: ClassVar[str] = ""  # its name in model cards and messages, e.g. "EAGLE-3"
    # the model card's "What this draft is" (Markdown): what it reads from the verifier, how it drafts, its parameters
    description: ClassVar[str] = ""
    # (label, config key) of the flat config fields worth a line in the model card
    card_details: ClassVar[tuple[tuple[str, str], ...]] = ()
    # how vLLM serves the family, as checked (the card's "Serve with vLLM"); None: not stated yet
    vllm_serving: ClassVar[VllmServing | None] = None
    # training: the unrolled draft steps its loss takes by default (training-time test, HASS); None when the
    # family's loss has no such steps (then `--ttt-steps` is refused)
    default_train_steps: ClassVar[int | None] = None
    # drafting: whether the draft grows token trees (several nodes per depth, each step from its parent's handle);
    # False where a chain's later tokens come from one pass that cannot branch (P-EAGLE, DFlash): chains only
    drafts_trees: ClassVar[bool] = True
    # what `auto` stops a chain on (generation/policy.py): "probability", the draft's probability of the chain so
    # far; "confidence", the product of the acceptance rates the draft's own head predicts for each slot
    # (`predicted_acceptance`; DSpark's confidence head). An instance attribute may override it per draft.
    acceptance_signal: str = "probability"
    # the signals this draft can stop on (a family with an acceptance head adds "confidence")
    acceptance_signals: tuple[str, ...] = ("probability",)
    # transformers' loop: run the verifier's decoder layers without transformers' per-call plumbing where that is
    # bitwise the stock forward (generation/lean.py); False: always the stock layers. (The own loop's switch is
    # `generate(..., lean_verifier=...)`.)
    lean_verifier: bool = True
    # Writes README.md (the model card) into a checkpoint folder. Set by `speculators_hf.hub` when the
    # package is imported; a copy loaded as remote code has none and keeps the card already saved.
    card_writer: ClassVar[Callable[[Any, Path], None] | None] = None

    def __init__(self, config: SpeculatorConfig):
        super().__init__(config)
        # Plain attributes (not submodules): the verifier is never part of the draft's state dict.
        self._binding: dict[str, Any] | None = None
        self._verifier_layers: int | None = None  # num_hidden_layers of the bound verifier
        self._last_stats = GenerationStats()
        self._policy: AdaptiveDrafting | None = None  # of the current verifier.generate(num_assistant_tokens="auto")

    # ---------------------------------------------------------------------------------------------
    # what a family defines
    # ---------------------------------------------------------------------------------------------
    def verifier_layer_ids(self) -> list[int]:
        """Verifier hidden states the draft reads, in `output_hidden_states` numbering (0 = embeddings,
        num_layers = post-norm last hidden state). Empty for drafts that only read tokens."""
        raise NotImplementedError

    @classmethod
    def config_from_verifier(cls, verifier_config: Any, **overrides: Any) -> SpeculatorConfig:
        """A config for a new draft sized for `verifier_config`."""
        raise NotImplementedError

    def init_from_verifier(self, verifier: PreTrainedModel) -> None:
        """Initialise weights that a new draft copies from its verifier (e.g. embeddings)."""

    def on_bind(self, verifier: PreTrainedModel) -> None:
        """Check family-specific compatibility and keep references to verifier parts the draft uses."""

    # -- drafting: one contract for both loops (a chain is a width-1 tree) ----------------------------
    def new_tree_state(self, batch_size: int, device: torch.device | str | None = None) -> DraftTreeState:
        """Fresh per-generation state of the tree loop: by default a `MaskedCache` for the draft's attention."""
        return DraftTreeState(cache=MaskedCache(batch_size, device))

    def max_tree_depth(self) -> int | None:
        """Most tokens the draft can predict ahead of the newest one (None: unbounded)."""
        return None

    def tree_extend(
        self,
        state: DraftTreeState,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the tokens that became final since the last call, for a ragged batch.

        `tokens` [B, A] sit at absolute `positions` [B, A]; only entries where `valid` [B, A] count; every
        row has at least one valid entry and its valid entries are its newest tokens, in order.
        `features` holds one [B, A, H] tensor per id of `verifier_layer_ids` (ascending): the verifier's
        hidden states at the position just BEFORE each token (meaningless where that is < 0). Anything
        the draft appended to `state` beyond its context since the last call was dropped already.
        Returns (logits [B, V] over the verifier vocabulary of the token after each row's newest token,
        a handle [B, ...]: what `tree_expand` needs from that prediction, e.g. the draft's hidden state)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement the tree loop (tree_extend)")

    def tree_expand(
        self,
        state: DraftTreeState,
        handles: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        depth: int,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed K tree nodes per row: `tokens` [B, K] at `positions` [B, K], `depth` tokens after the
        row's newest token, each with its parent's handle (`handles` [B, K, ...]). `block` [B, K, T + K]
        says which of the T nodes fed earlier this round, and of these K, each node may attend to (its
        ancestors and itself); all of them also see the row's context. Returns (logits [B, K, V] over the
        verifier vocabulary of each node's next token, the nodes' handles [B, K, ...])."""
        raise NotImplementedError(f"{type(self).__name__} does not implement the tree loop (tree_expand)")

    def predicted_acceptance(self, state: DraftTreeState) -> torch.Tensor | None:
        """The acceptance rate [B, K] the draft predicts for the tokens of the logits `tree_extend` / `tree_expand`
        returned last (K = 1 after `tree_extend`), when it predicts one and `acceptance_signal` is "confidence";
        otherwise None, and `auto` reads the draft's probabilities."""
        return None

    # -- training (speculators_hf.training) and export ------------------------------------------------
    def training_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], steps: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of a batch of blocks (`input_ids` [B, T], `loss_mask` [B, T], the verifier hidden states
        `features`, one [B, T, H] tensor per id of `verifier_layer_ids`). `steps`: unrolled draft steps (None:
        `default_train_steps`). The shared maths is in `objectives.py`; metrics hold `loss` and `acc_<j>`."""
        raise NotImplementedError(f"{type(self).__name__} has no training loss")

    def prepare_training(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, verifier: Any) -> None:
        """Called once before training a NEW draft on this data (e.g. EAGLE-3 picks its draft vocabulary)."""

    @classmethod
    def vllm_tensor_name(cls, name: str) -> str:
        """The name tensor `name` has in the checkpoint vLLM (or `speculators`) loads for this family."""
        return name

    def load_error_hint(self, unexpected: list[str]) -> str:
        """A family-specific line (ending in a newline) explaining unexpected tensors, or ""."""
        return ""

    def last_hidden_layer_ids(self) -> list[int]:
        """`verifier_layer_ids` of drafts that read the verifier's post-norm last hidden state (id
        `num_hidden_layers` in `output_hidden_states` numbering), from the fingerprint or the bound verifier."""
        layers = self.config.verifier.get("num_hidden_layers") or self._verifier_layers
        if layers is None:
            raise SpeculatorConfigError(
                f"{type(self).__name__} reads the verifier's last hidden state, but speculators_config.verifier."
                "num_hidden_layers is unset: bind the draft to its verifier first, or record the fingerprint"
            )
        return [int(layers)]

    # ---------------------------------------------------------------------------------------------
    # construction and binding
    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_verifier(cls, verifier: PreTrainedModel, tokenizer: Any = None, **overrides: Any) -> SpeculatorModel:
        """A new, untrained draft sized for `verifier`, recording its reference, already bound."""
        draft = cls(cls.config_for(verifier, tokenizer, **overrides))
        draft.to(device=verifier.device, dtype=verifier.dtype)  # type: ignore[call-arg]
        draft.init_from_verifier(verifier)
        return draft.bind_verifier(verifier, tokenizer=tokenizer)

    @classmethod
    def config_for(cls, verifier: PreTrainedModel, tokenizer: Any = None, **overrides: Any) -> SpeculatorConfig:
        """`config_from_verifier` plus the verifier reference: name, architectures and fingerprint."""
        config = cls.config_from_verifier(verifier.config, **overrides)
        config.verifier.update(
            name_or_path=getattr(verifier, "name_or_path", None) or verifier.config.name_or_path or None,
            architectures=list(verifier.config.architectures or [type(verifier).__name__]),
            **verifier_fingerprint(verifier.config),
        )
        if tokenizer is not None:
            config.verifier["tokenizer_hash"] = tokenizer_hash(tokenizer)
        config.validate_speculator()
        return config

    def check_verifier(self, verifier: PreTrainedModel, tokenizer: Any = None) -> None:
        """Raise `VerifierBindingError` naming every fingerprint field where `verifier` differs."""
        expected = self.config.verifier
        actual = verifier_fingerprint(verifier.config)
        problems = [
            f"  {name}: draft expects {expected[name]!r}, verifier has {actual[name]!r}"
            for name in FINGERPRINT_FIELDS
            if expected.get(name) is not None and actual[name] != expected[name]
        ]
        if (
            tokenizer is not None
            and expected.get("tokenizer_hash")
            and tokenizer_hash(tokenizer) != expected["tokenizer_hash"]
        ):
            problems.append(
                f"  tokenizer_hash: draft expects {expected['tokenizer_hash']}, tokenizer has {tokenizer_hash(tokenizer)}"
            )
        if problems:
            raise VerifierBindingError(
                f"{type(verifier).__name__} ({getattr(verifier, 'name_or_path', '') or 'unnamed'}) is not the verifier this "
                f"draft was made for ({expected.get('name_or_path')}):\n" + "\n".join(problems) + "\n"
                "Bind the draft to the verifier named in draft.config.verifier, or train/convert a draft for this one."
            )

    def bind_verifier(self, verifier: Any, tokenizer: Any = None) -> SpeculatorModel:
        """Attach the draft to `verifier`: check the fingerprint, install the hidden-state hooks and the
        generation settings. Returns the draft, so `draft = X.from_pretrained(...).bind_verifier(v)` works."""
        self.check_verifier(verifier, tokenizer)
        self._verifier_layers = verifier.config.get_text_config().num_hidden_layers
        self.on_bind(verifier)
        self.unbind_verifier()
        tap = VerifierTap(verifier, self.verifier_layer_ids())
        original_generate = verifier.generate

        @functools.wraps(original_generate)
        def generate(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("assistant_model") is not self:
                return original_generate(*args, **kwargs)
            # transformers reads the draft length from the draft's generation config only; `draft_length` also
            # reads the call's and the verifier's settings (in transformers' order), and they are put where
            # transformers reads them for this call. "auto[:max]": the chain length is chosen round by round
            # (`generation.policy`) up to its maximum, which transformers is given as the length.
            length = draft_length(self, verifier, kwargs.get("generation_config"), kwargs)
            for name in ASSISTANT_SETTINGS:
                kwargs.pop(name, None)
            self._policy = None
            tokens = length.tokens
            if length.max_depth is not None:  # calibrated (first call only) before the tap is armed
                self._policy = adaptive_drafting(verifier, self, length.max_depth, trees=False)
                tokens = self._policy.max_depth
            config = self.generation_config
            saved = (config.num_assistant_tokens, config.num_assistant_tokens_schedule)
            saved_threshold = config.assistant_confidence_threshold
            # transformers runs the schedule; threshold 0: no confidence stop (refused above when set), which also
            # spares transformers fitting one
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = tokens, length.schedule
            config.assistant_confidence_threshold = 0.0
            self._last_stats = GenerationStats()
            # the verifier's layers without transformers' per-call plumbing, where that is bitwise the same
            # (generation/lean.py; checked once per binding): the stock forward otherwise, and when attention
            # weights are asked for (the lean layer calls the attention function, not the hooked attention module)
            settings = kwargs.get("generation_config") or verifier.generation_config
            attentions = kwargs.get("output_attentions", getattr(settings, "output_attentions", False))
            lean = lean_pass_for(self, verifier, tap) if self.lean_verifier and not attentions else None
            tap.arm()
            finished = False
            try:
                with lean.in_layers() if lean is not None and lean.swappable else contextlib.nullcontext():
                    output = original_generate(*args, **kwargs)
                finished = True
                prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
                sequences = output if isinstance(output, torch.Tensor) else output.sequences
                self._last_stats.verifier_forwards = tap.forwards  # exact counts from the final length
                if isinstance(prompt, torch.Tensor):
                    self._last_stats.emitted_tokens = sequences.shape[-1] - prompt.shape[-1]
                return output
            finally:
                tap.disarm()  # stop capturing once the generation is over
                self._policy = None
                adapted = config.num_assistant_tokens
                config.num_assistant_tokens, config.num_assistant_tokens_schedule = saved
                config.assistant_confidence_threshold = saved_threshold
                if finished and length.schedule == "heuristic":  # transformers keeps the adapted length, as documented
                    config.num_assistant_tokens = adapted

        verifier.generate = generate
        self._binding = {"verifier": verifier, "tap": tap}
        if self.generation_config is None:
            self.generation_config = GenerationConfig()
        # The draft's generation config is the user's (transformers' place for the draft length). Earlier versions
        # wrote `speculative_tokens` into it here, and saved it: a value equal to it says nothing more, and would
        # hide a later change of `speculative_tokens`.
        if self.generation_config.num_assistant_tokens == self.config.speculative_tokens:
            self.generation_config.num_assistant_tokens = None
        return self

    def unbind_verifier(self) -> None:
        """Remove the hooks from the verifier (the draft can be bound again later)."""
        if self._binding is not None:
            self._binding["tap"].remove()
            self._binding["verifier"].__dict__.pop("generate", None)
            self._binding = None

    @property
    def verifier(self) -> PreTrainedModel | None:
        return None if self._binding is None else self._binding["verifier"]

    @property
    def generation_stats(self) -> GenerationStats:
        """Counts of the last generate() call that used this draft (tau, drafted, accepted, ...)."""
        return self._last_stats

    # ---------------------------------------------------------------------------------------------
    # transformers' assisted-generation contract
    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: Any = None,
        max_new_tokens: int | None = None,
        cache: DraftSession | None = None,
        past_key_values: DraftSession | None = None,
        **kwargs: Any,
    ) -> GenerateDecoderOnlyOutput:
        """Called by transformers' assisted decoding once per round; not a text generator on its own."""
        if generation_config is None or not getattr(generation_config, "is_assistant", False):
            raise TypeError(
                f"{type(self).__name__} is a draft model: it proposes tokens for its verifier and does not "
                "generate text on its own. Use verifier.generate(**inputs, assistant_model=draft) or "
                "speculators_hf.generate(verifier, draft, ...)."
            )
        if self._binding is None:
            raise VerifierBindingError(
                f"this {type(self).__name__} is not bound to a verifier. Call draft.bind_verifier(verifier) before "
                "verifier.generate(..., assistant_model=draft), or load both with "
                "speculators_hf.AutoSpeculatorForCausalLM.from_pretrained(draft_id)."
            )
        if input_ids is None or input_ids.shape[0] != 1:
            raise ValueError("transformers' assisted generation drafts for one sequence at a time (batch size 1)")
        session = cache if cache is not None else past_key_values
        if session is None:
            session = DraftSession(self, self._binding["tap"], self._policy)
            self._last_stats = session.stats
        # transformers passes min(num_assistant_tokens, room left) as max_new_tokens
        k = max(int(max_new_tokens or self.config.speculative_tokens), 1)
        sampler = Sampler(bool(generation_config.do_sample), row_processors=[list(logits_processor or [])])
        tokens, scores = session.step(input_ids, k, sampler)
        sequences = torch.cat([input_ids, tokens.to(input_ids.device)], dim=1)
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(scores), **{OUTPUT_CACHE_FIELD: session})  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Save weights (safetensors), config, remote code and `auto_map` into `save_directory`, atomically.

        The path is resolved first (`sub/..` is a folder's parent, a symlink its target). The checkpoint is
        written into a new folder beside it, which then takes its place in one step (`checkpoint.replacing_folder`):
        a save killed at any moment leaves the previous checkpoint or the new one, never a mix, and the next
        save removes what it left behind. Files of the existing folder that a save does not write (a tokenizer,
        a person's README.md) are carried over; weights, weight indexes, config and remote code never are (the
        new save defines them), nor symlinks or special files (a warning names them)."""
        target = save_target(save_directory)
        kwargs["safe_serialization"] = True
        with replacing_folder(target) as work:
            if target.is_dir():
                carry_over(target, work)
            self.config.auto_map = write_remote_code(type(self), work)
            super().save_pretrained(work, *args, **kwargs)
            if SpeculatorModel.card_writer is not None:
                SpeculatorModel.card_writer(self, work)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Load a draft from safetensors, trusting nothing in the checkpoint.

        Before anything is allocated: the weight files must lie inside the checkpoint folder (an index naming
        `../x` is refused), and their headers must hold exactly the tensors the config implies, in shape and
        dtype class (a config claiming far more than the file holds fails here, in milliseconds). After loading:
        no weight may hold NaN or inf, and family values are checked (`weight_value_problems`, e.g. EAGLE-3's
        d2t). Every failure is a `SpeculatorLoadError` (or `SpeculatorConfigError` for config.json) naming the
        tensor or field, the bad value and the fix."""
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)  # never unpickle a draft's weights
        # Mismatched shapes are collected (not re-initialised silently: we raise below) so that the
        # error can name every tensor with both shapes.
        kwargs["ignore_mismatched_sizes"] = True
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            cls.check_checkpoint_files(pretrained_model_name_or_path, kwargs)
        loaded: Any = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model, info = loaded
        missing = sorted(info.get("missing_keys", []))
        mismatched = sorted(info.get("mismatched_keys", []))
        # An unexpected tensor is an error too: dropping it would change the maths silently (an fc bias
        # under `fc_bias: false`, a norm or head of another format).
        unexpected = sorted(info.get("unexpected_keys", []))
        if missing or mismatched or unexpected:
            expected = model.state_dict()
            lines = [f"  missing {k}: expected shape {tuple(expected[k].shape)}" for k in missing if k in expected]
            lines += [
                f"  {key}: checkpoint has shape {tuple(got)}, config expects {tuple(want)}"
                for key, got, want in mismatched
            ]
            lines += [f"  unexpected {k}: this {cls.__name__} config has no such tensor" for k in unexpected]
            raise cls.weights_error(pretrained_model_name_or_path, lines, model.load_error_hint(unexpected))
        problems = model.weight_value_problems()
        if problems:
            cast = " (loaded as float16: values beyond +-65504 overflow; load with dtype=torch.float32 or bfloat16)"
            raise SpeculatorLoadError(
                f"{pretrained_model_name_or_path} holds invalid weight values"
                f"{cast if model.dtype == torch.float16 else ''}:\n" + "\n".join(problems) + "\nThe checkpoint is "
                "corrupt (a diverged training run, a bad conversion or a damaged download): re-download it, or train or "
                "convert it again."
            )
        return (model, info) if want_info else model

    @classmethod
    def weights_error(cls, source: Any, lines: list[str], hint: str = "") -> SpeculatorLoadError:
        return SpeculatorLoadError(
            f"{source} does not hold the weights its config describes:\n"
            + "\n".join(lines)
            + "\n"
            + hint
            + "The checkpoint is incomplete or was written for another config; re-download it, fix its config or "
            "convert it with `speculators-hf convert`."
        )

    @classmethod
    def check_checkpoint_files(cls, name_or_path: Any, kwargs: dict[str, Any]) -> None:
        """The checks `from_pretrained` makes before transformers allocates anything (see there): the files it
        will read, and their safetensors headers against the tensors of `cls(config)` built on the meta device."""
        if kwargs.get("gguf_file"):
            raise SpeculatorLoadError("drafts load from safetensors only: gguf_file is not supported")
        local = Path(str(name_or_path)).expanduser()
        if not local.exists():
            recover_interrupted_save(local.absolute())  # a save killed between its two renames (see checkpoint.py)
        download = {k: kwargs[k] for k in DOWNLOAD_KWARGS if kwargs.get(k) is not None}
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config = cls.config_class.from_pretrained(config or name_or_path, **download)
        if getattr(config, "transformers_weights", None) is not None:
            raise SpeculatorLoadError(
                f"{name_or_path}: config.json sets transformers_weights={config.transformers_weights!r}; a draft's "
                "weights are model.safetensors (or its shards and index). Remove the key from config.json."
            )
        if kwargs.get("use_safetensors") is False:
            return  # pickles asked for explicitly: transformers reads them with weights_only
        try:
            files = checkpoint_weight_files(name_or_path, kwargs.get("variant"), **download)
            found = safetensors_header(files)
        except UnsafeCheckpointError as err:
            raise SpeculatorLoadError(f"{name_or_path}: {err}") from err
        if not files:
            return  # transformers reports the missing weights file
        model = meta_model(cls, config)
        expected = tensor_infos(model)
        lines = weight_problems(expected, found, f"{cls.__name__} config")
        if lines:
            unexpected = [name for name in found if name not in expected]
            raise cls.weights_error(name_or_path, lines, model.load_error_hint(unexpected))

    def weight_value_problems(self) -> list[str]:
        """What is wrong with the loaded values, one line each naming the tensor: NaN or inf in a weight.
        Families add their own checks (EAGLE-3: the draft-to-verifier vocabulary map)."""
        return [f"  {name}: holds NaN or inf values" for name in non_finite_tensors(self.state_dict().items())]
