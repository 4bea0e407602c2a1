# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.config. Do not edit.
"""Speculator configuration: a transformers config that is also a valid `speculators`/vLLM config.

Every draft family shares the top-level `model_type = "speculators"` (the only value besides "absent"
that vLLM accepts for this format) and says which family it is in `speculators_model_type`. The
`speculators_config` block (algorithm, proposal methods, verifier reference + fingerprint) and each
family's flat fields are validated by pydantic on load and on save, so a bad file fails with the
field's name and the expected value instead of producing a silently wrong draft.

This module is part of the remote-code bundle (see `remote_code.py`): it imports only third-party
packages, never `speculators_hf` itself.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    StrictInt,
    ValidationError,
    create_model,
    model_validator,
)
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

# Version of the `speculators` checkpoint format these configs follow (what `speculators` 0.9 writes).
SPECULATORS_FORMAT_VERSION = "0.9.0"
MODEL_TYPE = "speculators"


class SpeculatorConfigError(ValueError):
    """A speculator config (or config.json) is malformed; the message names the field and the fix."""


# --------------------------------------------------------------------------------------------------
# bounds on config values
# --------------------------------------------------------------------------------------------------
# A config.json is read from files nobody vetted, and its numbers decide how much memory and time a draft
# built from it takes before any weight is read (a 12 KB file claiming 10^8 layers per head would build for
# hours). Each bound is far above any published model, so it only ever refuses a broken or crafted file;
# the tensors a config implies are also compared with the weight files before anything is allocated
# (`models/checkpoint.py`), which bounds memory by the checkpoint's real size.
MAX_SPECULATIVE_TOKENS = 64  # draft tokens per round (published drafts use 3..10; acceptance decays geometrically)
MAX_DRAFT_HEADS = 64  # Medusa heads, MLP speculator stages (published: 3..5)
MAX_LAYERS_PER_HEAD = 64  # residual layers per Medusa head (published: 1)
MAX_LAYERS = 1024  # decoder layers of a verifier or an independent draft LM (largest public models: ~130)
MAX_ATTENTION_HEADS = 1024  # attention / key-value heads of a layer (largest public models: 128)
MAX_WIDTH = 1 << 18  # 262,144: hidden, intermediate, embedding and head widths (largest public: ~53k)
MAX_VOCAB_SIZE = 1 << 22  # 4,194,304 tokens (largest public vocabularies: ~262k)


# Integer fields in 1..limit; strict, so 1e8, 32.0, true or "5" in a config.json are refused too.
SpeculativeTokens = Annotated[StrictInt, Field(gt=0, le=MAX_SPECULATIVE_TOKENS)]
DraftHeads = Annotated[StrictInt, Field(gt=0, le=MAX_DRAFT_HEADS)]
LayersPerHead = Annotated[StrictInt, Field(gt=0, le=MAX_LAYERS_PER_HEAD)]
Layers = Annotated[StrictInt, Field(gt=0, le=MAX_LAYERS)]
Width = Annotated[StrictInt, Field(gt=0, le=MAX_WIDTH)]
VocabSize = Annotated[StrictInt, Field(gt=0, le=MAX_VOCAB_SIZE)]
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_VOCAB_SIZE)]


def mask_token_problems(mask_token_id: int | None, vocab_size: int | None) -> list[str]:
    """`check_fields` lines of a parallel drafter's `mask_token_id` (P-EAGLE, DFlash): it must be a vocabulary id."""
    if mask_token_id is None or vocab_size is None or mask_token_id < vocab_size:
        return []
    return [f"  mask_token_id: {mask_token_id} is outside the vocabulary (size {vocab_size})"]


def required_mask_token(config: Any, title: str) -> int:
    """The `mask_token_id` a parallel drafter fills the positions not known yet with; an error naming the fix."""
    if config.mask_token_id is None:
        raise ValueError(
            f"this {title} draft has no mask_token_id: set draft.config.mask_token_id (the token it was trained "
            "with for the positions not known yet) before drafting"
        )
    return int(config.mask_token_id)


# Fields of a nested transformers config (`transformer_layer_config`, `draft_model_config`) that size the
# model built from it, by their standard names (a config class's `attribute_map` gives its own names).
LAYER_LIMITS = {
    "hidden_size": MAX_WIDTH,
    "intermediate_size": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "num_attention_heads": MAX_ATTENTION_HEADS,
    "num_key_value_heads": MAX_ATTENTION_HEADS,
    "num_hidden_layers": MAX_LAYERS,
    "vocab_size": MAX_VOCAB_SIZE,
}


def layer_config_problems(
    values: Mapping[str, Any], field: str, attribute_map: Mapping[str, str] | None = None
) -> list[str]:
    """What is wrong with a nested transformers config (as a dict), one line per problem naming
    `field.key`, the value and what is expected: sizes are integers within `LAYER_LIMITS`, the attention
    heads split evenly (query heads over key-value heads; the hidden size over the heads when `head_dim`
    is unset, as transformers then derives it), `hidden_act` is an activation transformers knows
    (`ACT2FN`) and `rms_norm_eps` a positive number. Checked before the config class is built, whose own
    errors (ZeroDivisionError, KeyError, negative tensor sizes) would not name the field."""
    names = dict(attribute_map or {})

    def get(name: str) -> tuple[str, Any]:
        key = names.get(name, name)
        return f"{field}.{key}", values.get(key)

    problems, sizes = [], {}
    for name, limit in LAYER_LIMITS.items():
        where, value = get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            problems.append(f"  {where}: must be an integer in 1..{limit} (got {value!r})")
        else:
            sizes[name] = value
    heads, kv_heads = sizes.get("num_attention_heads"), sizes.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        problems.append(
            f"  {get('num_attention_heads')[0]}: {heads} query heads cannot be shared evenly by {kv_heads} key-value "
            f"heads ({get('num_key_value_heads')[0]}); make num_attention_heads a multiple of num_key_value_heads"
        )
    hidden = sizes.get("hidden_size")
    if heads and hidden and get("head_dim")[1] is None and hidden % heads:
        problems.append(
            f"  {get('hidden_size')[0]}: {hidden} is not a multiple of num_attention_heads ({heads}), and head_dim is "
            "unset (transformers derives it as hidden_size // num_attention_heads); fix the sizes or set head_dim"
        )
    where, act = get("hidden_act")
    if act is not None and (not isinstance(act, str) or act not in ACT2FN):
        problems.append(f"  {where}: unknown activation {act!r}; transformers knows {sorted(ACT2FN)}")
    where, eps = get("rms_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf):
        problems.append(f"  {where}: must be a positive number (got {eps!r})")
    return problems


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per pydantic error: `field.path: problem (got value)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        got = e.get("input")
        got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc or '<root>'}: {e['msg']}{got_txt}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# pydantic schemas of the `speculators_config` block
# --------------------------------------------------------------------------------------------------
class ProposalMethod(BaseModel):
    """One way of proposing tokens; `speculative_tokens` is the default draft length."""

    model_config = ConfigDict(extra="allow")

    proposal_type: Literal["greedy", "sample", "tree"] = "greedy"
    speculative_tokens: SpeculativeTokens = 5
    verifier_accept_k: PositiveInt = 1
    accept_tolerance: NonNegativeFloat = 0.0

    @model_validator(mode="after")
    def _adaptive_is_a_bool(self) -> ProposalMethod:
        # `adaptive` (this package only: choose the draft length round by round) is written only when set
        adaptive = (self.model_extra or {}).get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {adaptive!r}")
        return self


class VerifierReference(BaseModel):
    """The verifier a draft was made for, and its fingerprint.

    The fingerprint (vocab size, hidden size, layer count, special token ids, optional tokenizer hash)
    lives here and never in the weights: vLLM refuses any tensor it does not expect.
    """

    model_config = ConfigDict(extra="allow")

    name_or_path: str | None = None
    architectures: list[str] = Field(default_factory=list)
    revision: str | None = None
    vocab_size: VocabSize | None = None
    hidden_size: Width | None = None
    num_hidden_layers: Layers | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tokenizer_hash: str | None = None


class SpeculatorsBlock(BaseModel):
    """The `speculators_config` block, as `speculators` and vLLM read it."""

    model_config = ConfigDict(extra="allow")

    algorithm: str
    proposal_methods: list[ProposalMethod] = Field(min_length=1)
    default_proposal_method: str = "greedy"
    verifier: VerifierReference

    @model_validator(mode="after")
    def _default_method_exists(self) -> SpeculatorsBlock:
        types = [m.proposal_type for m in self.proposal_methods]
        if self.default_proposal_method not in types:
            raise ValueError(
                f"default_proposal_method {self.default_proposal_method!r} is not one of the proposal_methods {types}"
            )
        return self


FINGERPRINT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "bos_token_id", "eos_token_id", "pad_token_id")


def verifier_fingerprint(verifier_config: PretrainedConfig) -> dict[str, Any]:
    """The fingerprint fields of a verifier's (text) config."""
    text = verifier_config.get_text_config()
    return {name: getattr(text, name, None) for name in FINGERPRINT_FIELDS}


def tokenizer_hash(tokenizer: Any) -> str:
    """A stable hash of a tokenizer's vocabulary and special tokens (order-independent)."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(map(str, tokenizer.all_special_tokens)),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# the config class
# --------------------------------------------------------------------------------------------------
class SpeculatorConfig(PretrainedConfig):
    """Base config of every draft family.

    `AutoConfig` is registered once for `model_type="speculators"`; `from_dict` dispatches on
    `speculators_model_type` to the family's subclass (registered with `register_family`).
    The verifier's vocab size and special ids are exposed as `vocab_size`, `bos_token_id`, ... so that
    transformers' assisted generation and `pipeline` see the same token space as the verifier.
    """

    model_type = MODEL_TYPE
    # Family name in `speculators_model_type`; set by subclasses.
    family: ClassVar[str] = ""
    # The family's model class name, the default `architectures` (set by `models.base.family`).
    model_class_name: ClassVar[str] = ""
    families: ClassVar[dict[str, type[SpeculatorConfig]]] = {}

    speculators_model_type: str = ""
    speculators_version: str = SPECULATORS_FORMAT_VERSION
    speculators_config: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Accept the fingerprint as top-level kwargs (as `vocab_size=` etc.), like any HF config.
        fingerprint = {k: kwargs.pop(k) for k in FINGERPRINT_FIELDS if k in kwargs}
        super().__post_init__(**kwargs)
        if not self.speculators_model_type:
            self.speculators_model_type = self.family
        if self.speculators_config is None:
            # a family that proposes fewer than 5 tokens a round drafts them all; the limit is computed from the
            # family's fields, so only once they are valid (otherwise validate_speculator below names them)
            limit = None if self._field_problems() else self.max_speculative_tokens
            self.speculators_config = default_speculators_config(
                self.family or self.speculators_model_type, min(5, limit) if limit else 5
            )
        self.speculators_config.setdefault("verifier", {}).update(fingerprint)
        if not self.architectures and self.model_class_name:
            self.architectures = [self.model_class_name]
        self.validate_speculator()

    # -- the family's own fields: declared once, as annotated dataclass fields ------------------------
    @classmethod
    def fields_schema(cls) -> type[BaseModel] | None:
        """The pydantic model of the fields this family's config class declares, derived from their
        annotations and defaults (`draft_vocab_size: VocabSize = 32000`): each field is declared once, and
        its type and bounds validate config.json. None for a class that declares no fields."""
        if "_fields_schema" not in cls.__dict__:
            fields: dict[str, Any] = {}
            # the annotations of the family's classes (a family may extend another), not of SpeculatorConfig
            classes = [
                c for c in reversed(cls.__mro__) if issubclass(c, SpeculatorConfig) and c is not SpeculatorConfig
            ]
            for klass in classes:
                for name, hint in inspect.get_annotations(klass, eval_str=True).items():
                    if name.startswith("_") or get_origin(hint) is ClassVar:
                        continue
                    fields[name] = (hint, getattr(cls, name, None))
            # strict: validation checks the values without converting them, so "6" or "false" (which the config
            # would keep as text, "false" being truthy) are refused rather than accepted
            config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=True)
            schema = create_model(f"{cls.__name__}Fields", __config__=config, **fields) if fields else None
            cls._fields_schema = schema  # type: ignore[attr-defined]
        return cls.__dict__["_fields_schema"]

    def check_fields(self) -> list[str]:
        """Rules that relate several fields (each field's own type and bounds are in its annotation): one
        line per problem, `  field: what is wrong and what is expected`. Families override it."""
        return []

    # -- validation --------------------------------------------------------------------------------
    def _field_problems(self) -> list[str]:
        """The family fields checked against their annotations (type and bounds): one entry, or none."""
        schema = self.fields_schema()
        if schema is None:
            return []
        values = {name: getattr(self, name) for name in schema.model_fields}
        values = {k: (v.to_dict() if isinstance(v, PretrainedConfig) else v) for k, v in values.items()}
        try:
            schema.model_validate(values)
        except ValidationError as err:
            return [format_validation_error(err)]
        return []

    def validate_speculator(self) -> None:
        """Validate the speculators block and the family fields; raise `SpeculatorConfigError`."""
        if self.family and self.speculators_model_type != self.family:
            raise SpeculatorConfigError(
                f"speculators_model_type is {self.speculators_model_type!r} but {type(self).__name__} expects {self.family!r}"
            )
        problems = []
        try:
            block = SpeculatorsBlock.model_validate(self.speculators_config)
            self.speculators_config = block.model_dump(mode="json", exclude_none=False)
        except ValidationError as err:
            problems.append(format_validation_error(err, "speculators_config"))
        problems += self._field_problems()
        if not problems:
            problems += self.check_fields()
        # derived properties (the limit, check_fields) compute with the fields: only once their types are right
        limit = None if problems else self.max_speculative_tokens
        if limit is not None and self.speculative_tokens > limit:
            problems.append(
                f"  speculators_config.proposal_methods.speculative_tokens: {self.speculative_tokens} exceeds {limit}, "
                f"the most a {self.family} draft proposes in a round ({self.speculative_tokens_limit}; vLLM refuses more)"
            )
        if problems:
            raise SpeculatorConfigError(
                f"Invalid {type(self).__name__} ({self.speculators_model_type or 'unknown family'}):\n"
                + "\n".join(problems)
                + "\nFix these fields in config.json (or the arguments) and load again."
            )

    # what bounds `max_speculative_tokens`, for the error message
    speculative_tokens_limit: ClassVar[str] = "one token per head"

    @property
    def max_speculative_tokens(self) -> int | None:
        """The longest chain the family can draft (one token per head for head-based drafts), or None."""
        return None

    # -- verifier reference ------------------------------------------------------------------------
    @property
    def verifier(self) -> dict[str, Any]:
        """The `speculators_config.verifier` block (name_or_path, architectures, fingerprint)."""
        assert self.speculators_config is not None
        return self.speculators_config["verifier"]

    def _default_methods(self) -> list[dict[str, Any]]:
        assert self.speculators_config is not None
        default = self.speculators_config["default_proposal_method"]
        methods = [m for m in self.speculators_config["proposal_methods"] if m["proposal_type"] == default]
        if not methods:
            raise SpeculatorConfigError(f"no proposal method {default!r}")
        return methods

    def _set_default_methods(self, name: str, value: Any) -> None:
        """Set `name` in the default proposal method(s); a value the schema refuses is refused, naming the
        field, and leaves the config as it was."""
        methods = self._default_methods()
        previous = [dict(m) for m in methods]
        for method in methods:
            method[name] = value
        try:
            self.validate_speculator()
        except SpeculatorConfigError:
            for method, old in zip(methods, previous):
                method.clear()
                method.update(old)
            raise

    @property
    def speculative_tokens(self) -> int:
        """Default draft length: `speculative_tokens` of the default proposal method."""
        return int(self._default_methods()[0]["speculative_tokens"])

    @speculative_tokens.setter
    def speculative_tokens(self, value: int) -> None:
        self._set_default_methods("speculative_tokens", value)

    @property
    def adaptive_drafting(self) -> bool:
        """Whether the draft chooses its length round by round by default (`adaptive` in the default proposal
        method; `speculative_tokens` stays the fixed length other readers such as vLLM use). A per-call
        `num_assistant_tokens` or `tree` overrides it."""
        return bool(self._default_methods()[0].get("adaptive", False))

    @adaptive_drafting.setter
    def adaptive_drafting(self, value: bool) -> None:
        self._set_default_methods("adaptive", value)

    # The verifier's token space, as transformers' assisted generation and `pipeline` compare it.
    vocab_size = property(
        lambda self: self.verifier.get("vocab_size"), lambda self, v: self.verifier.update(vocab_size=v)
    )
    bos_token_id = property(
        lambda self: self.verifier.get("bos_token_id"), lambda self, v: self.verifier.update(bos_token_id=v)
    )
    eos_token_id = property(
        lambda self: self.verifier.get("eos_token_id"), lambda self, v: self.verifier.update(eos_token_id=v)
    )
    pad_token_id = property(
        lambda self: self.verifier.get("pad_token_id"), lambda self, v: self.verifier.update(pad_token_id=v)
    )

    # -- (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:  # type: ignore[override]
        """Build the family's config class from a config.json dict (ours or `speculators` 0.9's)."""
        config_dict = dict(config_dict)
        family = config_dict.get("speculators_model_type")
        target: type[SpeculatorConfig] = cls
        if cls.family == "":
            if family is None:
                raise SpeculatorConfigError(
                    "config.json has no 'speculators_model_type': this is not a speculator checkpoint "
                    f"(known families: {sorted(cls.families)})."
                )
            if family not in cls.families:
                raise SpeculatorConfigError(
                    f"unknown speculators_model_type {family!r}; this version of speculators_hf knows "
                    f"{sorted(cls.families)}. Upgrade speculators_hf, or convert the checkpoint with "
                    "`speculators-hf convert`."
                )
            target = cls.families[family]
        config_dict.pop("model_type", None)  # absent in `speculators` 0.9 files; always ours on save
        try:
            return super(SpeculatorConfig, target).from_dict.__func__(target, config_dict, **kwargs)  # type: ignore[attr-defined]
        except SpeculatorConfigError:
            raise
        except (TypeError, ValueError) as err:  # strict dataclass field errors from transformers
            raise SpeculatorConfigError(f"Invalid {target.__name__}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        self.validate_speculator()
        out = super().to_dict()
        out["model_type"] = MODEL_TYPE
        out["speculators_model_type"] = self.speculators_model_type
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # vLLM and `speculators` read fields whose defaults differ from ours (e.g. vLLM assumes
        # norm_before_residual=True when absent), so a saved config is always complete.
        return self.to_dict()


def default_speculators_config(algorithm: str, speculative_tokens: int = 5) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "proposal_methods": [
            {
                "proposal_type": "greedy",
                "speculative_tokens": speculative_tokens,
                "verifier_accept_k": 1,
                "accept_tolerance": 0.0,
            }
        ],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": None, "architectures": []},
    }


def build_layer_config(
    value: PretrainedConfig | dict[str, Any] | None,
    default_type: str = "llama",
    field: str = "transformer_layer_config",
) -> PretrainedConfig:
    """A nested transformers config (`transformer_layer_config`, `draft_model_config`: the `field` named in
    errors) from a dict or a config, checked with `layer_config_problems` before it is built."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(value, PretrainedConfig):
        values, model_type = value.to_dict(), value.model_type
    else:
        values = dict(value or {})
        model_type = values.pop("model_type", default_type)
        values.pop("transformers_version", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise SpeculatorConfigError(
            f"{field}.model_type {model_type!r} is not a model type this transformers version knows "
            "(e.g. 'llama', 'qwen3'); fix it in config.json, or upgrade transformers"
        )
    problems = layer_config_problems(values, field, getattr(CONFIG_MAPPING[model_type], "attribute_map", None))
    if problems:
        raise SpeculatorConfigError(
            f"Invalid {field} ({model_type}):\n" + "\n".join(problems) + "\nFix these fields in config.json (or the "
            "arguments) and load again."
        )
    if isinstance(value, PretrainedConfig):
        return value
    try:
        return AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError, StrictDataclassError) as err:  # the config class's own checks
        raise SpeculatorConfigError(f"Invalid {field} ({model_type}): {err}") from err
