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


def zoo_tokenizer() -> Any:
    from transformers import AutoTokenizer

    root = zoo_dir()
    assert root is not None
    return AutoTokenizer.from_pretrained(VERIFIER_ID, cache_dir=root / "hub", local_files_only=True)


def zoo_prompts() -> list[torch.Tensor]:
    root = zoo_dir()
    assert root is not None
    return [torch.tensor([p]) for p in json.loads((root / "prompts.json").read_text())]
