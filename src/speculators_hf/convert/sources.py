"""A source checkpoint, read-only: a local folder or a Hub snapshot. Weights are read from safetensors, or from
`.bin`/`.pt` pickles with `torch.load(weights_only=True)` only, so a pickle that would run code is refused (the
error names the file). Only files inside the folder are read: an index naming an absolute path or `..`, or a
link out of the folder, is refused (`models.checkpoint.folder_weight_files`). `detect_format` recognises the
format from config fields and tensor names."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..loading import looks_like_local_path
from ..models.checkpoint import (
    UnsafeCheckpointError,
    check_inside,
    folder_weight_files,
)
from .errors import ConversionError
from .expressions import MISSING, get_path
from .formats import FormatSpec, all_specs

logger = logging.getLogger("speculators_hf.convert")

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


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
    if looks_like_local_path(name):
        raise ConversionError(f"{what} {name!r} is neither an existing folder nor a Hub id (org/name)")
    from huggingface_hub import snapshot_download

    keys = ("revision", "cache_dir", "token", "local_files_only")
    kwargs = {k: v for k, v in hub_kwargs.items() if k in keys and v is not None}
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
