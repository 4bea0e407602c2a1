"""The declarative description of the foreign formats (`specs/<name>.yaml`): how to recognise each, its tensor
renames and shapes, its config field map and the defaults its original code assumes (`FormatSpec`), and the
list of known published checkpoints. Converter modules read these specs; they do not restate them."""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConversionError

logger = logging.getLogger("speculators_hf.convert")


# --------------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------------
class DetectSpec(BaseModel):
    """How a format is recognised from config.json and the tensor names (all listed rules must hold).

    Config keys may be dotted (`eagle_config.eagle_aux_hidden_state_layer_ids`). In `config_values`,
    null in the allowed list means "absent"."""

    model_config = ConfigDict(extra="forbid")

    config_has: list[str] = Field(default_factory=list)
    config_lacks: list[str] = Field(default_factory=list)
    config_values: dict[str, list[Any]] = Field(default_factory=dict)
    architectures_any: list[str] = Field(default_factory=list)
    architectures_none: list[str] = Field(default_factory=list)
    tensors_all: list[str] = Field(default_factory=list)
    tensors_any: list[str] = Field(default_factory=list)
    tensors_none: list[str] = Field(default_factory=list)


class TensorSpec(BaseModel):
    """The tensors of a format, named as OUR layout after `renames` (source prefix -> our prefix) and
    `patterns` (a regular expression matching a whole source name -> its replacement, tried when no
    prefix rename applies; `\\1` refers to a group).

    `indexed` declares index variables for repeated tensors (heads, stages): `{i: [start, stop]}` with
    expressions as bounds; a layout name containing `{i}` stands for one tensor per i in that range.
    `keep_prefixes`: when set, only source tensors starting with one of them are read (the rest of the
    file, e.g. the fine-tuned verifier of a Medusa-2 checkpoint, is ignored)."""

    model_config = ConfigDict(extra="forbid")

    renames: list[tuple[str, str]] = Field(default_factory=list)
    patterns: list[tuple[str, str]] = Field(default_factory=list)
    keep_prefixes: list[str] = Field(default_factory=list)
    indexed: dict[str, tuple[str | int, str | int]] = Field(default_factory=dict)
    layout: dict[str, list[str]] = Field(default_factory=dict)  # our name -> shape (expressions)
    optional: list[str] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)  # read, reported and discarded
    dtypes: dict[str, Literal["float", "integer", "bool"]] = Field(default_factory=dict)  # default: float


class AcceptRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: list[Any]
    why: str = ""


class ConfigSpec(BaseModel):
    """How the foreign config.json becomes ours.

    Values that are strings starting with `=` are expressions over the source config (after
    `defaults`); anything else is a literal. `defaults` fill keys the source lacks with what the
    ORIGINAL code assumes; `accept` lists the values the conversion can represent exactly."""

    model_config = ConfigDict(extra="forbid")

    defaults: dict[str, Any] = Field(default_factory=dict)
    accept: dict[str, AcceptRule] = Field(default_factory=dict)
    layer: dict[str, Any] = Field(default_factory=dict)  # -> transformer_layer_config
    # when set, transformer_layer_config starts as the whole source config (itself a transformers config of the
    # draft layers, e.g. z-lab DFlash's flat Qwen3 config) minus these keys; `layer` entries then override
    layer_from_source_except: list[str] | None = None
    fields: dict[str, Any] = Field(default_factory=dict)  # -> our flat family fields
    required: dict[str, str] = Field(default_factory=dict)  # key -> why it must be present in the source
    # section -> keys the original code reads from that section first, else from the top level (z-lab's
    # `dflash_config`): they are read as `section.key`; any key set in both places with different values is an error
    section_first: dict[str, list[str]] = Field(default_factory=dict)


class AuxLayerSpec(BaseModel):
    """Where the verifier hidden states a draft reads come from: `source` (an expression; null when the
    format never records them), `offset` added to each id to get OUR numbering (HF `hidden_states[i]`,
    the input of decoder layer i), and the default when absent."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = None
    offset: int = 0
    default: Literal["verifier"] = "verifier"
    # how the source concatenates the states fc reads: in layer order (ours, vLLM's: the default) or in the order
    # `source` lists them (z-lab), whose fc.weight column blocks are then reordered with the ids
    order: Literal["layers", "listed"] = "layers"
    why: str = ""


class EmbeddingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when_missing: Literal["verifier", "error"] = "error"
    verifier_keys: list[str] = Field(default_factory=list)
    why: str = ""


class ExportSpec(BaseModel):
    """What an export to this format must satisfy (checked after writing). `targets`: the names
    `--to` accepts for it (default: the spec's name); several families may share a target (`vllm`)."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(default_factory=list)
    module: str | None = None  # the module that writes it (`export_checkpoint`), when not the spec's own
    config_must_have: list[str] = Field(default_factory=list)
    model_type_allowed: list[str | None] = Field(default_factory=list)
    legacy_rope_keys: bool = False
    drop_config_keys: list[str] = Field(default_factory=list)
    drop_files: list[str] = Field(default_factory=list)
    # config values the export writes although a reader of this format does not serve them: a warning says why
    warn: dict[str, AcceptRule] = Field(default_factory=dict)
    notes: str = ""


class FormatSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    title: str
    status: Literal["supported", "planned"]
    family: str
    module: str | None = None
    upstream: list[str] = Field(default_factory=list)
    detect: DetectSpec = Field(default_factory=DetectSpec)
    weight_files: list[str] = Field(default_factory=list)
    tensors: TensorSpec = Field(default_factory=TensorSpec)
    config: ConfigSpec = Field(default_factory=ConfigSpec)
    aux_layers: AuxLayerSpec | None = None
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    vocab: dict[str, str] = Field(default_factory=dict)
    export: ExportSpec | None = None
    notes: str = ""


def _spec_dir() -> Any:
    return resources.files("speculators_hf.convert").joinpath("specs")


def _merged(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@cache
def all_specs() -> dict[str, FormatSpec]:
    """Every spec in `specs/*.yaml`, by name. A spec with `extends: NAME` is that spec with its own keys laid over
    it (`_merged`: mappings merge, lists and values are replaced), so a variant states only what differs."""
    raw = {
        entry.name.removesuffix(".yaml"): yaml.safe_load(entry.read_text())
        for entry in sorted(_spec_dir().iterdir(), key=lambda p: p.name)
        if entry.name.endswith(".yaml")
    }

    def resolved(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        data = dict(raw[name])
        base = data.pop("extends", None)
        if base is None:
            return data
        if base not in raw or base in seen:
            raise ConversionError(f"format spec {name}.yaml extends {base!r}: no such spec, or a cycle")
        return _merged(resolved(base, (*seen, name)), data)

    specs = {}
    for file_name in raw:
        try:
            spec = FormatSpec.model_validate(resolved(file_name))
        except ValidationError as err:
            raise ConversionError(f"invalid format spec {file_name}.yaml:\n{err}") from err
        if spec.name != file_name:
            raise ConversionError(
                f"format spec {file_name}.yaml is named {spec.name!r}; the file must be {spec.name}.yaml"
            )
        specs[spec.name] = spec
    return specs


def load_spec(name: str) -> FormatSpec:
    specs = all_specs()
    if name not in specs:
        raise ConversionError(f"unknown format {name!r}; known formats: {sorted(specs)}")
    return specs[name]


def supported_formats() -> list[str]:
    return [name for name, spec in all_specs().items() if spec.status == "supported"]


def export_targets(spec: FormatSpec) -> list[str]:
    """The `--to` names under which `spec` is written (none when it has no `export` block)."""
    if spec.export is None:
        return []
    return spec.export.targets or [spec.name]


def all_export_targets() -> list[str]:
    return sorted({target for spec in all_specs().values() for target in export_targets(spec)})


def exporter_for(target: str, family: str) -> FormatSpec:
    """The spec that writes a `family` draft for `--to target`."""
    candidates = [spec for spec in all_specs().values() if target in export_targets(spec)]
    if not candidates:
        raise ConversionError(f"cannot export to {target!r}; export targets: ours, {', '.join(all_export_targets())}")
    for spec in candidates:
        if spec.family == family:
            return spec
    raise ConversionError(
        f"cannot export a {family} draft to {target!r}: {target!r} is written for the "
        f"{sorted({s.family for s in candidates})} families only"
    )


def known_checkpoints() -> list[dict[str, Any]]:
    """The published checkpoints listed in `known_checkpoints.yaml` (repo, format, how it was verified)."""
    text = resources.files("speculators_hf.convert").joinpath("known_checkpoints.yaml").read_text()
    return list(yaml.safe_load(text)["checkpoints"])
