"""Where `custom_generate/generate.py` files written by earlier versions of this package import the hook from
(`from speculators_hf.generation.custom_generate import custom_generate`): drafts already pushed with such a
file keep working. The hook lives in `speculators_hf.custom_generate`; it is imported when called, so that
nothing in `generation/` imports the package above it at import time."""

from __future__ import annotations

from typing import Any


def custom_generate(*args: Any, **kwargs: Any) -> Any:
    from ..custom_generate import custom_generate as hook

    return hook(*args, **kwargs)
