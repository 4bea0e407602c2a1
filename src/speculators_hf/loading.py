"""Load a draft, or a draft and its verifier already bound, in one call (like PEFT's AutoPeft* classes)."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

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


def load_draft(name_or_path: str | os.PathLike, **kwargs: Any) -> SpeculatorModel:
    """Load a draft checkpoint (ours, or a `speculators` 0.9 one whose config has no `model_type`).

    `kwargs` go to `from_pretrained` (`revision`, `dtype`, `device_map`, `cache_dir`, ...). A local folder
    that a killed save left missing (only where folders cannot be swapped atomically) is restored first
    (`models.checkpoint.recover_interrupted_save`).
    """
    if not Path(name_or_path).expanduser().exists():
        recover_interrupted_save(Path(name_or_path).expanduser().absolute())
    hub_kwargs = {
        k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs
    }
    config = SpeculatorConfig.from_pretrained(name_or_path, **hub_kwargs)
    model_class: Any = FAMILIES[config.speculators_model_type]
    return model_class.from_pretrained(name_or_path, config=config, **kwargs)


class AutoSpeculatorForCausalLM:
    """`AutoSpeculatorForCausalLM.from_pretrained(draft_id)` loads the draft AND the verifier named in its
    config, binds them, and returns the draft; the verifier is `draft.verifier`:

    ```python
    draft = AutoSpeculatorForCausalLM.from_pretrained("org/llama-eagle3", dtype=torch.bfloat16)
    out = draft.verifier.generate(**inputs, assistant_model=draft)
    ```
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
        draft = load_draft(draft_name_or_path, **kwargs)
        vkw: dict[str, Any] = {}
        if isinstance(verifier, PreTrainedModel):
            source = getattr(verifier, "name_or_path", None) or verifier.config.name_or_path or None
        else:
            reference = draft.config.verifier
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
