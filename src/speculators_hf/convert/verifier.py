"""`VerifierRef`: the verifier named by `--verifier`: its config (never its weights), and on request its input
embedding alone (one tensor read from its checkpoint files)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..loading import looks_like_local_path
from ..models.checkpoint import (
    UnsafeCheckpointError,
    check_inside,
    shard_names,
)
from .errors import ConversionError
from .sources import PICKLE_INDEX, SAFETENSORS_INDEX, read_pickle, weight_files

logger = logging.getLogger("speculators_hf.convert")


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
        elif looks_like_local_path(name):
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
