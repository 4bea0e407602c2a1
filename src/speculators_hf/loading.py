"""Load a draft, or a draft and its verifier already bound, in one call (like PEFT's AutoPeft* classes)."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .config import SpeculatorConfig
from .models import FAMILIES, SpeculatorModel, family
from .models.checkpoint import recover_interrupted_save


def register_family(model_class: type[SpeculatorModel]) -> type[SpeculatorModel]:
    """Add a draft family (a `SpeculatorModel` subclass and its `config_class`): it joins the registry every table
    is built from (`models.base.family`: config dispatch, loading, `--family`, training, model cards) and
    transformers' AutoModel / AutoModelForCausalLM, so it loads and trains like the built-in families.
    Usable as a class decorator."""
    family(model_class)
    AutoModel.register(model_class.config_class, model_class, exist_ok=True)
    AutoModelForCausalLM.register(model_class.config_class, model_class, exist_ok=True)
    return model_class


def looks_like_local_path(name: str) -> bool:
    """An existing path, or a string shaped like a path rather than a Hub id (`org/name` or `name`)."""
    if os.path.exists(name) or name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def is_hub_id(name: str, namespaced: bool = False) -> bool:
    """Whether `name` is shaped like a Hub repo id and names no local path: `org/name`, or also a bare `name`
    unless `namespaced` (a repo to publish under always has an owner)."""
    return not looks_like_local_path(name) and (not namespaced or "/" in name)


HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


def draft_config_dict(name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """config.json of a draft folder or Hub repo, as written (`from_pretrained`'s Hub arguments in `kwargs` are
    used, the rest ignored). A local folder that a killed save left missing (only where folders cannot be swapped
    atomically) is restored first (`models.checkpoint.recover_interrupted_save`)."""
    if not Path(name_or_path).expanduser().exists():
        recover_interrupted_save(Path(name_or_path).expanduser().absolute())
    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    config, _ = PretrainedConfig.get_config_dict(name_or_path, **hub_kwargs)
    return config


def load_draft(name_or_path: str | os.PathLike, verifier: Any = None, **kwargs: Any) -> SpeculatorModel:
    """Load a draft checkpoint: ours, or one the `speculators` library wrote (no `model_type` in config.json).

    `kwargs` go to `from_pretrained` (`revision`, `dtype`, `device_map`, `cache_dir`, ...). The library's
    checkpoints are read through `convert`'s spec for their family (`convert.speculators.read_checkpoint`), so the
    draft is the one `speculators-hf convert` would write, with the same checks and errors; `verifier` (a model, id
    or path; ignored for our own checkpoints) then fills the verifier fingerprint, and the input embedding of a
    draft saved without one, as `--verifier` does. Such a checkpoint takes only `dtype`, `device_map` (one device)
    and the Hub arguments; convert it to give `from_pretrained` any other.
    """
    from .convert.speculators import is_library_config, read_checkpoint

    if not is_library_config(draft_config_dict(name_or_path, **kwargs)):
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = SpeculatorConfig.from_pretrained(name_or_path, **hub_kwargs)
        model_class: Any = FAMILIES[config.speculators_model_type]
        return model_class.from_pretrained(name_or_path, config=config, **kwargs)
    hub_keys = ("revision", "cache_dir", "token", "local_files_only")
    unusable = sorted(set(kwargs) - {"dtype", "torch_dtype", "device_map", *hub_keys})
    if unusable:
        raise TypeError(
            f"{name_or_path} is a checkpoint of the speculators library, read through its conversion spec, which "
            f"takes no {unusable}: write it in this package's format first (`speculators-hf convert {name_or_path} "
            "OUT --verifier VERIFIER`) and load OUT"
        )
    hub_kwargs = {k: kwargs[k] for k in hub_keys if k in kwargs}
    draft = read_checkpoint(name_or_path, verifier=verifier, **hub_kwargs)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype is not None and dtype != "auto":
        draft.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    device = kwargs.get("device_map")
    if isinstance(device, dict):
        raise TypeError(f"device_map {device!r}: a speculators-library checkpoint is placed on one device; pass it")
    if device is not None:
        draft.to(device)
    return draft


class AutoSpeculatorForCausalLM:
    """`AutoSpeculatorForCausalLM.from_pretrained(draft_id)` loads the draft AND the verifier named in its
    config, binds them, and returns the draft; the verifier is `draft.verifier`:

    ```python
    draft = AutoSpeculatorForCausalLM.from_pretrained("org/llama-eagle3", dtype=torch.bfloat16)
    out = draft.verifier.generate(**inputs, assistant_model=draft)
    ```

    A checkpoint the `speculators` library wrote loads too (`load_draft`): its verifier first, whose config then
    fills the draft's fingerprint.
    """

    @classmethod
    def from_pretrained(
        cls,
        draft_name_or_path: str | os.PathLike,
        verifier: str | os.PathLike | PreTrainedModel | None = None,
        verifier_kwargs: dict[str, Any] | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> SpeculatorModel:
        """`verifier`: a loaded model, or an id/path overriding the draft's reference. `kwargs` (dtype,
        device_map, revision, cache_dir, ...) go to the draft; `verifier_kwargs` (default: the dtype,
        device_map, cache_dir, token and local_files_only of `kwargs`) to the verifier's
        `AutoModelForCausalLM.from_pretrained`.

        When the draft records its verifier's `tokenizer_hash`, binding checks it against `tokenizer`, or
        when none is passed, against the tokenizer found where the verifier came from (its id or path, same
        revision; a loaded verifier's `name_or_path`); if none can be loaded there, a warning says the hash
        was not checked. A different tokenizer is a `VerifierBindingError` naming tokenizer_hash."""
        from .convert.speculators import is_library_config

        config = draft_config_dict(draft_name_or_path, **kwargs)
        library = is_library_config(config)
        draft = None if library else load_draft(draft_name_or_path, **kwargs)
        reference = (
            draft.config.verifier if draft is not None else (config.get("speculators_config") or {}).get("verifier")
        )
        vkw: dict[str, Any] = {}
        if isinstance(verifier, PreTrainedModel):
            source = getattr(verifier, "name_or_path", None) or verifier.config.name_or_path or None
        else:
            reference = dict(reference or {})
            name = verifier or reference.get("name_or_path")
            if not name:
                raise ValueError(
                    f"{draft_name_or_path} does not name its verifier (speculators_config.verifier.name_or_path is empty); "
                    "pass verifier=<model id, path or loaded model>"
                )
            shared = ("dtype", "device_map", "cache_dir", "token", "local_files_only")
            vkw = (
                dict(verifier_kwargs) if verifier_kwargs is not None else {k: kwargs[k] for k in shared if k in kwargs}
            )
            if verifier is None and reference.get("revision"):
                vkw.setdefault("revision", reference["revision"])
            source = str(name)
            verifier = AutoModelForCausalLM.from_pretrained(name, **vkw)
        if draft is None:
            draft = load_draft(draft_name_or_path, verifier=verifier, **kwargs)
        if tokenizer is None and draft.config.verifier.get("tokenizer_hash"):
            tokenizer = verifier_tokenizer(source, vkw)
        draft.to(verifier.device)  # type: ignore[arg-type]
        return draft.bind_verifier(verifier, tokenizer=tokenizer)


# files one of which a saved tokenizer has (fast, slow sentencepiece/BPE/WordPiece, or its config)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained`, never as remote code, with a clear error for a local folder that holds no
    tokenizer (transformers would suggest installing sentencepiece)."""
    from transformers import AutoTokenizer

    folder = Path(str(name_or_path)).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the verifier's tokenizer "
            "there (tokenizer.save_pretrained(folder)), or name another source with --tokenizer where the command "
            "has it"
        )
    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False, **kwargs)


def verifier_tokenizer(source: str | None, kwargs: dict[str, Any]) -> Any:
    """The tokenizer stored with the verifier at `source` (never remote code), or None with a warning that the
    draft's tokenizer_hash could not be checked."""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    reason = "the verifier has no name or path to load it from"
    if source:
        try:
            return load_tokenizer(source, **hub)
        except Exception as err:  # any failure means the same thing here: no tokenizer to compare
            reason = f"loading it from {source} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    warnings.warn(
        f"the draft records its verifier's tokenizer_hash, but the verifier's tokenizer could not be loaded: {reason}. "
        "The tokenizer was NOT checked; pass tokenizer=<the verifier's tokenizer> to check it.",
        stacklevel=3,
    )
    return None


def save_to_hub_cache(
    folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike, revision: str = "0" * 40
) -> Path:
    """Lay a checkpoint folder out as huggingface_hub's cache holds a downloaded repo (blobs,
    snapshots/<revision>, refs/main), so `from_pretrained(repo_id, cache_dir=cache_dir)` loads it
    with HF_HUB_OFFLINE=1: how the benchmark zoo ships its models and how tests stand in for the Hub."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.rmtree(snapshot, ignore_errors=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
