"""The embedded benchmark zoo: a small verifier trained here and drafts trained for it, shipped in
Hub layout under `benchmarks/zoo/hub` (see benchmarks/zoo/README.md for the recipe)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

VERIFIER_ID = "speculators-hf/zoo-verifier"


def zoo_dir() -> Path | None:
    """`benchmarks/zoo` of this checkout (or $SPECULATORS_HF_ZOO), if it holds the published models."""
    candidates = [
        os.environ.get("SPECULATORS_HF_ZOO"),
        Path.cwd() / "benchmarks" / "zoo",
        Path(__file__).resolve().parents[2] / "benchmarks" / "zoo",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "hub" / f"models--{VERIFIER_ID.replace('/', '--')}").exists():
            return Path(candidate)
    return None


def zoo_families() -> list[str]:
    root = zoo_dir()
    if root is None:
        return []
    names = [
        p.name.removeprefix("models--speculators-hf--zoo-")
        for p in (root / "hub").glob("models--speculators-hf--zoo-*")
    ]
    return sorted(n for n in names if n != "verifier")


def load_zoo_draft(family: str = "eagle3", dtype: torch.dtype = torch.float32, verifier: Any = None) -> Any:
    """The zoo's `family` draft bound to the zoo verifier (loaded offline from the zoo's Hub cache)."""
    from .loading import AutoSpeculatorForCausalLM

    root = zoo_dir()
    if root is None:
        raise FileNotFoundError(
            "the benchmark zoo is not in this checkout (benchmarks/zoo/hub); build it with benchmarks/zoo/README.md"
        )
    kwargs = {"cache_dir": root / "hub", "local_files_only": True}
    return AutoSpeculatorForCausalLM.from_pretrained(
        f"speculators-hf/zoo-{family}",
        verifier=verifier,
        dtype=dtype,
        verifier_kwargs={**kwargs, "dtype": dtype},
        **kwargs,
    )


def zoo_verifier_dir() -> Path:
    """The zoo verifier's snapshot folder in the zoo's Hub cache (for engines that read a folder: vLLM)."""
    from huggingface_hub import snapshot_download

    root = zoo_dir()
    if root is None:
        raise FileNotFoundError(
            "the benchmark zoo is not in this checkout (benchmarks/zoo/hub); build it with benchmarks/zoo/README.md"
        )
    return Path(snapshot_download(VERIFIER_ID, cache_dir=root / "hub", local_files_only=True))


def zoo_tokenizer() -> Any:
    from transformers import AutoTokenizer

    root = zoo_dir()
    assert root is not None
    return AutoTokenizer.from_pretrained(VERIFIER_ID, cache_dir=root / "hub", local_files_only=True)


def zoo_prompts() -> list[torch.Tensor]:
    root = zoo_dir()
    assert root is not None
    return [torch.tensor([p]) for p in json.loads((root / "prompts.json").read_text())]


def folder_remote_code_drift(folder: Path, family: str) -> list[str]:
    """The remote-code files (`speculators_*.py`) of the draft in `folder` that differ from what this package
    writes now for `family` (missing, extra or different): empty when the folder is up to date."""
    import tempfile

    from .models import FAMILIES
    from .remote_code import write_remote_code

    with tempfile.TemporaryDirectory() as tmp:
        write_remote_code(FAMILIES[family], tmp)
        fresh = {p.name: p.read_bytes() for p in Path(tmp).glob("speculators_*.py")}
    saved = {p.name: p.read_bytes() for p in folder.glob("speculators_*.py")}
    return sorted(n for n in fresh.keys() | saved.keys() if fresh.get(n) != saved.get(n))


def smollm2_draft_dir() -> Path | None:
    """The README walkthrough's trained SmolLM2 draft (`benchmarks/smollm2/eagle3`), beside the zoo, if present."""
    root = zoo_dir()
    folder = None if root is None else root.parent / "smollm2" / "eagle3"
    return folder if folder is not None and folder.is_dir() else None


def remote_code_drift() -> dict[str, list[str]]:
    """Per zoo draft, the remote-code files (`speculators_*.py`) whose published copy differs from what this
    package writes now (missing, extra or different): empty when the zoo is up to date."""
    root = zoo_dir()
    assert root is not None
    drift = {}
    for family in zoo_families():
        snapshot = next((root / "hub" / f"models--speculators-hf--zoo-{family}" / "snapshots").iterdir())
        names = folder_remote_code_drift(snapshot, family)
        if names:
            drift[family] = names
    return drift


def refresh_remote_code() -> None:
    """Rewrite the zoo drafts' remote-code files with this package's modules (new content-addressed blobs, the
    snapshot's links pointed at them, blobs nothing links to any more removed)."""
    import hashlib
    import tempfile

    from .models import FAMILIES
    from .remote_code import write_remote_code

    root = zoo_dir()
    assert root is not None
    for family in zoo_families():
        repo = root / "hub" / f"models--speculators-hf--zoo-{family}"
        snapshot = next((repo / "snapshots").iterdir())
        for old in snapshot.glob("speculators_*.py"):
            old.unlink()
        with tempfile.TemporaryDirectory() as tmp:
            write_remote_code(FAMILIES[family], tmp)
            for path in sorted(Path(tmp).glob("speculators_*.py")):
                data = path.read_bytes()
                blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
                blob.write_bytes(data)
                (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
        linked = {p.resolve() for p in snapshot.iterdir()}
        for blob in (repo / "blobs").iterdir():
            if blob.resolve() not in linked:
                blob.unlink()


def refresh_folder_remote_code(folder: Path, family: str) -> None:
    """Rewrite the remote-code files of a draft saved as a plain folder (e.g. the SmolLM2 walkthrough's draft)."""
    from .models import FAMILIES
    from .remote_code import write_remote_code

    for old in folder.glob("speculators_*.py"):
        old.unlink()
    write_remote_code(FAMILIES[family], folder)


if __name__ == "__main__":  # python -m speculators_hf.zoo: bring the committed drafts' remote code up to date
    refresh_remote_code()
    smollm2 = smollm2_draft_dir()
    if smollm2 is not None:
        refresh_folder_remote_code(smollm2, "eagle3")
    print("zoo remote code refreshed" if not remote_code_drift() else "zoo remote code still differs")
