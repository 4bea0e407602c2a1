"""User-only chat prompts cut from Python's standard library source (the zoo verifier's corpus), for the
benchmarks that build training data with `speculators-hf data`'s pipeline.

Files are split by name: every 10th file (sorted) is held out, so held-out prompts come from source the
training prompts never saw. A prompt is a line-aligned window of about `chars` characters."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path


def stdlib_files(split: str) -> list[Path]:
    """The top-level *.py files of the running Python's standard library, `train` or `heldout` part."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in {sysconfig.get_paths()['stdlib']}")
    held = [f for i, f in enumerate(files) if i % 10 == 0]
    return held if split == "heldout" else [f for f in files if f not in held]


def prompt_records(n: int, split: str = "train", chars: int = 600, seed: int = 0) -> list[dict]:
    """`n` records {"messages": [{"role": "user", "content": <window of source>}]}."""
    rng = random.Random(f"{split}-{seed}")
    files = stdlib_files(split)
    records = []
    while len(records) < n:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        if len(lines) < 40:
            continue
        start = rng.randrange(0, len(lines) - 30)
        window = ""
        for line in lines[start:]:
            if len(window) + len(line) > chars:
                break
            window += line
        if len(window) > chars // 2:
            records.append({"messages": [{"role": "user", "content": window}]})
    return records
