"""What every converter shares: the format specs, reading a source safely, the verifier, atomic output.

- `FormatSpec` / `load_spec`: the declarative description of one foreign format (`specs/<name>.yaml`):
  how to recognise it, its tensor renames and shapes, its config field map and the defaults its
  original code assumes. Converter modules read these specs; they do not restate them.
- `evaluate`: the tiny expression language of the specs (`=hidden_size // num_attention_heads`).
- `Source`: a local folder or a Hub snapshot, read-only. Weights are read from safetensors, or from
  `.bin`/`.pt` pickles with `torch.load(weights_only=True)` only, so a pickle that would run code is
  refused (the error names the file). Only files inside the folder are read: an index naming an absolute
  path or `..`, or a link out of the folder, is refused (`models.checkpoint.folder_weight_files`).
- `VerifierRef`: the verifier named by `--verifier`: its config (never its weights), and on request its
  input embedding alone (one tensor read from its checkpoint files).
- `atomic_output`: DST is built in a temporary sibling folder that replaces it in one atomic step, so a
  failure (or a kill) leaves no DST (and an existing DST untouched); shared with `save_pretrained`.
- Sizes: index ranges of repeated tensors are bounded (`config.MAX_DRAFT_HEADS`, `MAX_LAYERS_PER_HEAD`) and
  `build_model` compares the tensors with the ones the config implies (built on the meta device) before it
  allocates anything, so a small file claiming a huge model fails at once.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import operator
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import MAX_DRAFT_HEADS, MAX_LAYERS_PER_HEAD, SpeculatorConfigError
from ..models.checkpoint import (
    TensorInfo,
    UnsafeCheckpointError,
    check_inside,
    dtype_kind,
    folder_weight_files,
    meta_model,
    non_finite_tensors,
    replacing_folder,
    save_target,
    shard_names,
    tensor_infos,
    weight_problems,
)

logger = logging.getLogger("speculators_hf.convert")

MISSING: Any = object()
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, tensor or field and the fix."""


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
    fields: dict[str, Any] = Field(default_factory=dict)  # -> our flat family fields
    required: dict[str, str] = Field(default_factory=dict)  # key -> why it must be present in the source


class AuxLayerSpec(BaseModel):
    """Where the verifier hidden states a draft reads come from: `source` (an expression; null when the
    format never records them), `offset` added to each id to get OUR numbering (HF `hidden_states[i]`,
    the input of decoder layer i), and the default when absent."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = None
    offset: int = 0
    default: Literal["verifier"] = "verifier"
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
    config_must_have: list[str] = Field(default_factory=list)
    model_type_allowed: list[str | None] = Field(default_factory=list)
    legacy_rope_keys: bool = False
    drop_config_keys: list[str] = Field(default_factory=list)
    drop_files: list[str] = Field(default_factory=list)
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


@cache
def all_specs() -> dict[str, FormatSpec]:
    """Every spec in `specs/*.yaml`, by name."""
    specs = {}
    for entry in sorted(_spec_dir().iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        try:
            spec = FormatSpec.model_validate(yaml.safe_load(entry.read_text()))
        except ValidationError as err:
            raise ConversionError(f"invalid format spec {entry.name}:\n{err}") from err
        if spec.name + ".yaml" != entry.name:
            raise ConversionError(f"format spec {entry.name} is named {spec.name!r}; the file must be {spec.name}.yaml")
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


# --------------------------------------------------------------------------------------------------
# the spec expression language
# --------------------------------------------------------------------------------------------------
_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


def get_path(mapping: Mapping[str, Any], dotted: str) -> Any:
    """`mapping["a"]["b"]` for `"a.b"`, or MISSING."""
    value: Any = mapping
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def set_path(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        nested = mapping.get(part)
        if not isinstance(nested, dict):
            nested = mapping[part] = {}
        mapping = nested
    mapping[parts[-1]] = value


def evaluate(expression: str, env: Mapping[str, Any], where: str, missing: Any = MISSING) -> Any:
    """Evaluate a spec expression: names (dotted allowed) looked up in `env`, integers, + - * //.
    A name absent from `env` is an error, or gives `missing` when that is passed."""

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            dotted = ast.unparse(node)
            value = get_path(env, dotted)
            if value is MISSING and missing is not MISSING:
                return missing
            if value is MISSING:
                raise ConversionError(f"{where}: the config has no {dotted!r} (needed by {expression!r})")
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                raise ConversionError(f"{where}: {expression!r} reads a null value")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ConversionError(f"{where}: unsupported expression {expression!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ConversionError(f"{where}: cannot parse expression {expression!r}") from err
    return walk(tree)


def resolve_value(value: Any, env: Mapping[str, Any], where: str) -> Any:
    """A spec value: `=expr` is evaluated over `env`, anything else is a literal."""
    if isinstance(value, str) and value.startswith("="):
        return evaluate(value[1:], env, where)
    return value


def source_environment(
    spec: ConfigSpec, config: Mapping[str, Any], label: str, provided: Collection[str] = ()
) -> dict[str, Any]:
    """The source config with `spec.defaults` filled in for absent keys, checked against `required`
    (unless `provided` by the caller, e.g. `--set`) and `accept`."""
    for key, why in spec.required.items():
        if get_path(config, key) is MISSING and key not in provided:
            raise ConversionError(f"{label}: config.json has no {key!r}. {why}")
    env: dict[str, Any] = json.loads(json.dumps(dict(config)))  # a deep, plain copy
    for key, default in spec.defaults.items():
        # absent, or null where the original code then falls back to its default (as HF configs do)
        current = get_path(env, key)
        if current is MISSING or (current is None and default is not None):
            set_path(env, key, resolve_value(default, env, f"{label}: default of {key}"))
    for key, rule in spec.accept.items():
        value = get_path(env, key)
        value = None if value is MISSING else value
        if value not in rule.values:
            raise ConversionError(
                f"{label}: config field {key!r} is {value!r}; this converter handles only {rule.values}. {rule.why}"
            )
    return env


def map_fields(mapping: Mapping[str, Any], env: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {key: resolve_value(value, env, f"{where}.{key}") for key, value in mapping.items()}


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------
def matches(spec: FormatSpec, config: Mapping[str, Any], tensor_names: set[str]) -> bool:
    rules = spec.detect
    architectures = config.get("architectures") or []
    checks = [
        all(get_path(config, k) is not MISSING for k in rules.config_has),
        all(get_path(config, k) is MISSING for k in rules.config_lacks),
        all(
            (None if get_path(config, k) is MISSING else get_path(config, k)) in allowed
            for k, allowed in rules.config_values.items()
        ),
        not rules.architectures_any or any(a in architectures for a in rules.architectures_any),
        not any(a in architectures for a in rules.architectures_none),
        all(t in tensor_names for t in rules.tensors_all),
        not rules.tensors_any or any(t in tensor_names for t in rules.tensors_any),
        not any(t in tensor_names for t in rules.tensors_none),
    ]
    return all(checks)


def detect_format(source: Source) -> FormatSpec:
    """The one format whose `detect` rules hold for `source`; errors when none or several do."""
    names = source.tensor_names()
    found = [spec for spec in all_specs().values() if matches(spec, source.config, names)]
    if len(found) == 1:
        return found[0]
    if not found:
        sample = sorted(names)[:8]
        raise ConversionError(
            f"{source.label}: unknown checkpoint layout. config.json keys: {sorted(source.config)[:20]}; "
            f"architectures: {source.config.get('architectures')}; tensors ({len(names)}): {sample}"
            f"{' ...' if len(names) > 8 else ''}.\nKnown formats: {sorted(all_specs())}. If this is one of them, "
            "pass --from FORMAT (the error then names what differs)."
        )
    raise ConversionError(
        f"{source.label}: ambiguous checkpoint layout: it matches {[s.name for s in found]}. "
        "Pass --from FORMAT to choose."
    )


# --------------------------------------------------------------------------------------------------
# reading a source
# --------------------------------------------------------------------------------------------------
def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin`/`.pt` state dict, read with `torch.load(weights_only=True)`: code in the pickle never runs."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, ... : all mean "not a plain tensor file"
        raise ConversionError(
            f"refusing to read {path}: it is not a plain tensor pickle (torch.load(weights_only=True) "
            f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}). Pickles that need "
            "arbitrary code are never executed; re-save the weights as safetensors from a trusted environment."
        ) from err
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise ConversionError(f"{path} does not hold a flat state dict (name -> tensor)")
    return dict(data)


def read_safetensors(path: Path, keep_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not keep_prefixes:
            return load_file(str(path), device="cpu")
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            return {name: f.get_tensor(name) for name in names if name.startswith(keep_prefixes)}
    except Exception as err:
        raise ConversionError(f"cannot read {path} as safetensors: {err}") from err


def safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as err:
        raise ConversionError(f"cannot read {path} as safetensors: {err}") from err


DEFAULT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(root: Path, preferred: list[str] | None = None) -> list[Path]:
    """The weight files of a checkpoint folder: a sharded index, else the preferred names (default
    model.safetensors, pytorch_model.bin), else any safetensors, else pickles. Each must lie inside `root`
    (symlinks resolved; a Hub cache snapshot's links into its repo's blobs are fine): an index entry that is
    absolute, contains `..` or leads out of the folder is an error."""
    try:
        found = folder_weight_files(root, [SAFETENSORS_INDEX, PICKLE_INDEX], list(preferred or DEFAULT_WEIGHT_FILES))
        if not found:
            found = sorted(root.glob("*.safetensors"))
            if not found:
                found = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
            found = [check_inside(path, root, "weight file") for path in found]
    except UnsafeCheckpointError as err:
        raise ConversionError(str(err)) from err
    return found


@dataclass
class Source:
    """A checkpoint folder to convert (never written to)."""

    root: Path
    label: str
    config: dict[str, Any]
    preferred_files: list[str] = field(default_factory=list)
    _tensors: dict[str, torch.Tensor] | None = None

    def files(self) -> list[Path]:
        files = weight_files(self.root, self.preferred_files)
        if not files:
            raise ConversionError(f"{self.label}: no weight files (*.safetensors, *.bin, *.pt) in {self.root}")
        return files

    def tensor_names(self) -> set[str]:
        if self._tensors is not None:
            return set(self._tensors)
        names: set[str] = set()
        for path in self.files():
            if path.suffix == ".safetensors":
                names.update(safetensors_names(path))
            else:
                return set(self.tensors())
        return names

    def tensors(self, keep_prefixes: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """All tensors, read (copied into memory) from the weight files; with `keep_prefixes`, only the
        tensors whose names start with one of them (safetensors read just those)."""
        if self._tensors is None:
            tensors: dict[str, torch.Tensor] = {}
            keep = tuple(keep_prefixes)
            for path in self.files():
                if path.suffix == ".safetensors":
                    part = read_safetensors(path, keep) if keep else read_safetensors(path)
                else:
                    part = read_pickle(path)
                    if keep:
                        part = {name: t for name, t in part.items() if name.startswith(keep)}
                for name in part:
                    if name in tensors:
                        raise ConversionError(f"{self.label}: tensor {name!r} appears in more than one file")
                tensors.update(part)
            self._tensors = tensors
        return self._tensors


def resolve_folder(name_or_path: str | os.PathLike, what: str, **hub_kwargs: Any) -> tuple[Path, str]:
    """A local folder, or a Hub id downloaded with `snapshot_download` (so HF_HUB_OFFLINE=1 reads the
    cache). Returns (folder, label)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve(), str(path)
    if path.exists():
        raise ConversionError(f"{what} {name_or_path} is a file; pass the checkpoint folder")
    name = str(name_or_path)
    if not HUB_ID.match(name):
        raise ConversionError(f"{what} {name!r} is neither an existing folder nor a Hub id (org/name)")
    from huggingface_hub import snapshot_download

    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token") and v is not None}
    try:
        folder = snapshot_download(name, **kwargs)
    except Exception as err:
        raise ConversionError(
            f"{what} {name!r}: not a local folder and the Hub snapshot could not be read ({type(err).__name__}: {err})"
        ) from err
    return Path(folder), name


def open_source(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> Source:
    root, label = resolve_folder(name_or_path, "source", **hub_kwargs)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{label}: no config.json in {root}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{label}: config.json is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{label}: config.json does not hold a JSON object")
    return Source(root=root, label=label, config=config)


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------
def our_name(name: str, spec: TensorSpec) -> str:
    """A source tensor name in our layout: the first matching prefix rename, else the first matching
    pattern, else unchanged."""
    for old, new in spec.renames:
        if name.startswith(old):
            return new + name[len(old) :]
    for pattern, replacement in spec.patterns:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(replacement)
    return name


def index_ranges(spec: TensorSpec, env: Mapping[str, Any], label: str) -> dict[str, range]:
    """The range of each index variable (heads, stages, layers per head), bounded: a small file whose config
    claims 10^8 layers must not make a layout of 10^8 names."""
    limit = max(MAX_DRAFT_HEADS, MAX_LAYERS_PER_HEAD)
    ranges = {}
    for var, (start, stop) in spec.indexed.items():
        lo = evaluate(str(start), env, f"{label}: range of {{{var}}}")
        hi = evaluate(str(stop), env, f"{label}: range of {{{var}}}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)) or not 0 <= lo <= hi <= lo + limit:
            raise ConversionError(
                f"{label}: the config implies {{{var}}} in range({lo!r}, {hi!r}) ({spec.indexed[var][1]}); at most "
                f"{limit} heads, stages or layers per head are supported (speculators_hf.config.MAX_DRAFT_HEADS, "
                "MAX_LAYERS_PER_HEAD). The config.json is corrupt or crafted: fix the count."
            )
        ranges[var] = range(lo, hi)
    return ranges


def expand_layout(spec: TensorSpec, env: Mapping[str, Any], label: str) -> TensorSpec:
    """The spec with every `{i}` name of `layout`/`optional` expanded over its `indexed` range."""
    if not spec.indexed:
        return spec
    ranges = index_ranges(spec, env, label)

    def expand(name: str) -> list[str]:
        names = [name]
        for var, values in ranges.items():
            token = "{" + var + "}"
            names = (
                [n.replace(token, str(v)) for n in names for v in values] if any(token in n for n in names) else names
            )
        return names

    layout = {concrete: shape for name, shape in spec.layout.items() for concrete in expand(name)}
    optional = [concrete for name in spec.optional for concrete in expand(name)]
    return spec.model_copy(update={"layout": layout, "optional": optional, "indexed": {}})


def rename_tensors(
    tensors: Mapping[str, torch.Tensor], spec: TensorSpec, label: str, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply the spec's renames, patterns and drops. Returns (our name -> tensor, our name -> source
    name). A tensor outside the layout (expanded first, see `expand_layout`) is an error naming it."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in tensors.items():
        ours = our_name(name, spec)
        if ours in spec.drop or name in spec.drop:
            log(f"dropping {name} {tuple(tensor.shape)} (not part of the draft: {label} keeps it for training only)")
            continue
        if ours not in spec.layout:
            raise ConversionError(
                f"{label}: unexpected tensor {name!r} {tuple(tensor.shape)} (read as {ours!r}); this format's "
                f"tensors are {sorted(spec.layout)}. A quantized or otherwise modified checkpoint cannot be "
                "converted exactly."
            )
        if ours in out:
            raise ConversionError(f"{label}: tensors {origin[ours]!r} and {name!r} both map to {ours!r}")
        out[ours], origin[ours] = tensor, name
    return out, origin


def source_name(ours: str, spec: TensorSpec) -> str:
    """The name a tensor of ours has in the source format (the first rename that produces it; names made
    by `patterns` are reported as ours)."""
    for old, new in spec.renames:
        if ours.startswith(new):
            return old + ours[len(new) :]
    return ours


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    spec: TensorSpec,
    env: Mapping[str, Any],
    label: str,
) -> torch.dtype:
    """Shapes (from the spec's expressions over `env`) and dtypes; returns the floating dtype shared by
    every float tensor. Errors name the tensor and both shapes / dtypes."""
    absent = [name for name in spec.layout if name not in tensors and name not in spec.optional]
    if absent:
        raise ConversionError(
            f"{label}: the checkpoint lacks {[source_name(name, spec) for name in absent]}, which this format always has"
        )
    float_dtype: torch.dtype | None = None
    float_first = ""
    for name, tensor in tensors.items():
        src_name = origin.get(name, name)
        shape_exprs = spec.layout.get(name)
        if shape_exprs is not None:
            want = tuple(int(evaluate(e, env, f"{label}: shape of {name}")) for e in shape_exprs)
            if tuple(tensor.shape) != want:
                raise ConversionError(
                    f"{label}: tensor {src_name!r} has shape {tuple(tensor.shape)}, the config implies {want} "
                    f"({' x '.join(shape_exprs)})"
                )
        kind = spec.dtypes.get(name, "float")
        if dtype_kind(tensor.dtype) != kind:
            wanted = {"float": "a float dtype", "integer": "an integer dtype", "bool": "torch.bool"}[kind]
            raise ConversionError(f"{label}: tensor {src_name!r} has dtype {tensor.dtype}, expected {wanted}")
        if kind == "float":
            if float_dtype is None:
                float_dtype, float_first = tensor.dtype, src_name
            elif tensor.dtype != float_dtype:
                raise ConversionError(
                    f"{label}: tensor {src_name!r} has dtype {tensor.dtype} but {float_first!r} has {float_dtype}; "
                    "a checkpoint with mixed float dtypes cannot be converted without loss (cast it first)"
                )
    return float_dtype or torch.float32


# --------------------------------------------------------------------------------------------------
# the verifier
# --------------------------------------------------------------------------------------------------
@dataclass
class VerifierRef:
    """The verifier named with `--verifier` (an id, a path or a loaded model). Only its config is read;
    `input_embedding` reads its embedding tensor alone, from its checkpoint files."""

    name_or_path: str | None
    config: Any
    model: Any = None
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, verifier: Any, **hub_kwargs: Any) -> VerifierRef | None:
        if verifier is None:
            return None
        from transformers import AutoConfig, PreTrainedModel

        if isinstance(verifier, PreTrainedModel):
            name = getattr(verifier, "name_or_path", None) or verifier.config.name_or_path or None
            return cls(name_or_path=name, config=verifier.config, model=verifier, hub_kwargs=hub_kwargs)
        name = str(verifier)
        path = Path(name).expanduser()
        if path.exists():
            name = str(path.resolve())  # vLLM uses name_or_path verbatim, relative to ITS working directory
        elif not HUB_ID.match(name):
            raise ConversionError(f"verifier {verifier!r} is neither an existing folder nor a Hub id (org/name)")
        kwargs = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token") and v is not None}
        try:
            config = AutoConfig.from_pretrained(name, **kwargs)
        except Exception as err:
            raise ConversionError(f"cannot read the config of verifier {name!r}: {err}") from err
        return cls(name_or_path=name, config=config, hub_kwargs=kwargs)

    def reference(self) -> dict[str, Any]:
        """name_or_path, architectures and the fingerprint, for `speculators_config.verifier`."""
        from ..config import verifier_fingerprint

        return {
            "name_or_path": self.name_or_path,
            "architectures": list(self.config.architectures or []),
            **verifier_fingerprint(self.config),
        }

    def input_embedding(self, keys: list[str]) -> torch.Tensor:
        """The verifier's input embedding [V, H]: from the loaded model, or ONE tensor read from its files."""
        if self.model is not None:
            return self.model.get_input_embeddings().weight.detach().cpu().clone()
        for path in self._embedding_files(keys):
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    names = set(f.keys())
                    for key in keys:
                        if key in names:
                            return f.get_tensor(key)
            else:
                state = read_pickle(path)
                for key in keys:
                    if key in state:
                        return state[key]
        raise ConversionError(
            f"verifier {self.name_or_path}: no input embedding found under any of {keys} in its checkpoint files"
        )

    def _embedding_files(self, keys: list[str]) -> list[Path]:
        name = self.name_or_path
        if name is None:
            raise ConversionError("the verifier has no name or path to read its embedding from")
        local = Path(name)
        if local.is_dir():
            return self._files_in(local, keys)
        from huggingface_hub import hf_hub_download

        for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
            try:
                index_path = Path(hf_hub_download(name, index, **self.hub_kwargs))
            except Exception:
                continue
            try:
                shard_names(index_path)  # refuses names leading out of the repo
            except UnsafeCheckpointError as err:
                raise ConversionError(f"verifier {name}: {err}") from err
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shard = next((weight_map[k] for k in keys if k in weight_map), None)
            if shard is None:
                raise ConversionError(f"verifier {name}: {index} maps none of {keys}")
            return [Path(hf_hub_download(name, shard, **self.hub_kwargs))]
        for single in ("model.safetensors", "pytorch_model.bin"):
            try:
                return [Path(hf_hub_download(name, single, **self.hub_kwargs))]
            except Exception:
                continue
        raise ConversionError(f"verifier {name}: found no weight files to read its embedding from")

    @staticmethod
    def _files_in(root: Path, keys: list[str]) -> list[Path]:
        for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
            if (root / index).is_file():
                try:
                    shard_names(root / index)  # refuses names leading out of the folder
                    weight_map = json.loads((root / index).read_text())["weight_map"]
                    shards = [root / weight_map[k] for k in keys if k in weight_map][:1]
                    return [check_inside(shard, root, "verifier shard") for shard in shards]
                except UnsafeCheckpointError as err:
                    raise ConversionError(f"verifier {root}: {err}") from err
        return weight_files(root)


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def check_destination(source_root: Path | None, dst: Path, overwrite: bool) -> None:
    dst = dst.expanduser().resolve()
    if source_root is not None:
        src = source_root.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise ConversionError(f"destination {dst} overlaps the source {src}; the source is never written to")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"destination {dst} exists and is not empty; pass overwrite=True (--overwrite)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a directory")


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """Yield an empty folder beside `dst`; on success it replaces `dst` in one atomic step, on failure (or a
    kill) it is removed and `dst` is left as it was (`models.checkpoint.replacing_folder`, which
    `save_pretrained` uses too)."""
    with replacing_folder(save_target(dst)) as tmp:
        yield tmp
        if not any(tmp.iterdir()):
            raise ConversionError("the converter wrote nothing")


# --------------------------------------------------------------------------------------------------
# shared by the converters of the non-EAGLE-3 families
# --------------------------------------------------------------------------------------------------
def apply_overrides(config: Any, overrides: dict[str, Any], label: str, settable: Collection[str] = ()) -> None:
    """`--set KEY=VALUE` on a converted config: `speculative_tokens` always, and the flat fields `settable`
    (those that do not change tensor shapes); each value is validated by the config's own field annotations,
    and an error names the key, the value and what is expected."""
    allowed = {"speculative_tokens", *settable}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConversionError(f"{label}: cannot set {unknown}; settable here: {sorted(allowed)}")
    try:
        for key, value in overrides.items():
            if key == "speculative_tokens":
                config.speculative_tokens = value
            else:
                setattr(config, key, value)
        config.validate_speculator()
    except SpeculatorConfigError as err:
        raise ConversionError(f"{label}: invalid value after --set: {err}") from err


def bind_reference(
    config: Any, ctx: Any, label: str, vocab_size: int | None, hidden_size: int | None, what: str = "draft"
) -> None:
    """Record what the draft requires of its verifier (`vocab_size`, `hidden_size`), then, with
    `--verifier`, check the verifier against it (and against the fingerprint the source names) and
    fill the reference. Errors list every field that differs."""
    known = config.verifier
    if ctx.verifier is not None:
        ref = ctx.verifier.reference()
        problems = []
        if vocab_size is not None and ref["vocab_size"] is not None and ref["vocab_size"] != vocab_size:
            problems.append(
                f"vocab_size: the {what} was made for a vocabulary of {vocab_size} tokens, the verifier has "
                f"{ref['vocab_size']}"
            )
        if hidden_size is not None and ref["hidden_size"] is not None and ref["hidden_size"] != hidden_size:
            problems.append(
                f"hidden_size: the {what} reads verifier hidden states of width {hidden_size}, the verifier's are "
                f"{ref['hidden_size']}"
            )
        for name in ("num_hidden_layers", "bos_token_id", "eos_token_id", "pad_token_id"):
            if known.get(name) is not None and ref.get(name) is not None and known[name] != ref[name]:
                problems.append(f"{name}: the source names {known[name]!r}, the verifier has {ref[name]!r}")
        if problems:
            raise ConversionError(
                f"{label}: verifier {ctx.verifier.name_or_path or '(loaded model)'} does not match the {what}:\n  "
                + "\n  ".join(problems)
            )
        previous = known.get("name_or_path")
        if previous and ref["name_or_path"] and previous != ref["name_or_path"]:
            ctx.log(f"verifier: {previous} (from the source) replaced by {ref['name_or_path']}")
        known.update({k: v for k, v in ref.items() if v is not None})
    if known.get("vocab_size") is None:
        known["vocab_size"] = vocab_size
    if known.get("hidden_size") is None:
        known["hidden_size"] = hidden_size


def build_model(
    model_class: Any,
    config: Any,
    tensors: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    dtype: torch.dtype,
    label: str,
) -> Any:
    """`model_class(config)` in `dtype` holding exactly `tensors` (every missing, unexpected or misshapen
    tensor is listed in the error, by its source name)."""
    from transformers.initialization import no_init_weights

    try:
        config.validate_speculator()
        # the tensors the config implies, from a model on the meta device: compared before anything is allocated
        expected = tensor_infos(meta_model(model_class, config))
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{label}: the converted config is invalid: {err}") from err
    found = {
        name: TensorInfo(tuple(t.shape), dtype_kind(t.dtype), str(t.dtype).removeprefix("torch."))
        for name, t in tensors.items()
    }
    lines = weight_problems(expected, found, owner="converted config", names=origin)
    if lines:
        raise ConversionError(f"{label}: the tensors do not match the converted config:\n" + "\n".join(lines))
    with no_init_weights():
        model = model_class(config)
    model.to(dtype)
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=True)
    problems = model.weight_value_problems()
    if problems:
        raise ConversionError(f"{label}: invalid tensor values:\n" + "\n".join(problems))
    return model.eval()


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], origin: Mapping[str, str], label: str) -> None:
    """NaN or inf in a weight is an error naming the source tensors (a draft loaded from such a file is
    refused too: `SpeculatorModel.from_pretrained`)."""
    broken = sorted(origin.get(n, n) for n in non_finite_tensors(tensors.items()))
    if broken:
        raise ConversionError(
            f"{label}: tensors {broken} hold NaN or inf values; the checkpoint is corrupt (a diverged training run or a "
            "damaged download): re-download it or take an earlier checkpoint"
        )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        b.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
    )


def write_native(folder: Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace everything in `folder` by `config.json` and `model.safetensors` (a foreign layout)."""
    from safetensors.torch import save_file

    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )


def check_reimport(folder: Path, model: Any, spec: FormatSpec, module: Any, target: str) -> None:
    """Import the written export again with `module` and compare it with `model`, tensor by tensor and
    config field by config field (the export must be lossless)."""
    from types import SimpleNamespace

    config = json.loads((folder / "config.json").read_text())
    source = Source(root=folder, label=f"export to {target}", config=config)
    ctx = SimpleNamespace(verifier=None, overrides={}, log=lambda message: None, hub_kwargs={})
    back = module.import_checkpoint(source, spec, ctx)
    ours, theirs = model.state_dict(), back.state_dict()
    if set(ours) != set(theirs):
        raise ConversionError(
            f"export to {target}: reading the export back gives other tensors: extra {sorted(set(theirs) - set(ours))}, "
            f"missing {sorted(set(ours) - set(theirs))}"
        )
    for name, tensor in ours.items():
        if not same_bits(tensor, theirs[name]):
            raise ConversionError(f"export to {target}: the written tensor for {name} differs from the draft's")
    schema = type(model.config).fields_schema()
    for key in schema.model_fields if schema is not None else ():
        want, got = getattr(model.config, key), getattr(back.config, key)
        if key == "transformer_layer_config":
            want, got = _layer_view(want), _layer_view(got)
        if want != got:
            raise ConversionError(f"export to {target}: config field {key} reads back as {got!r}, not {want!r}")


def _layer_view(layer: Any) -> dict[str, Any]:
    ignore = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "_attn_implementation"}
    data = layer.to_dict() if hasattr(layer, "to_dict") else dict(layer)
    return {k: v for k, v in data.items() if k not in ignore}
