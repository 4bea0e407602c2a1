"""transformers' `custom_generate` hook: `verifier.generate(**inputs, custom_generate=DRAFT, trust_remote_code=True)`
runs `speculators_hf.generate` with the draft at DRAFT (a Hub id or a folder).

transformers 5.x loads `custom_generate/generate.py` from the repo or folder named by `custom_generate`,
checks `custom_generate/requirements.txt`, and calls its `generate(model=verifier, **every generate()
argument)`. `write_custom_generate(folder)` writes those two files into a draft checkpoint (push the folder
and the Hub repo serves the hook too); the file only delegates to `custom_generate` below.

transformers does not pass the repo name on to the function, so the draft is found, in order: a `draft=`
argument (a loaded draft, an id or a path), or the `custom_generate` argument of the transformers
`generate()` call that invoked the hook (read from its frame). Drafts are loaded once per (draft, verifier).
"""

from __future__ import annotations

import inspect
import weakref
from pathlib import Path
from typing import Any

GENERATE_PY = '''"""Speculative decoding with this draft through transformers' custom_generate hook (speculators-hf).

    verifier.generate(**inputs, custom_generate="<this repo or folder>", trust_remote_code=True,
                      tree="dynamic:6:8:48", max_new_tokens=128)

runs speculators_hf.generate(verifier, <this draft>, ...): token trees and batches, output equal to the
verifier alone (greedy) or following its distribution (sampling).
"""

from speculators_hf.custom_generate import custom_generate


def generate(model, **kwargs):
    return custom_generate(model, **kwargs)
'''

REQUIREMENTS = "speculators-hf\n"

# transformers generate() arguments that the loop cannot honour when they are set
_UNSUPPORTED = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
                "negative_prompt_ids", "negative_prompt_attention_mask")  # fmt: skip
_IGNORED = ("synced_gpus", "use_model_defaults", "tokenizer", "assistant_tokenizer")

_loaded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def write_custom_generate(directory: str | Path) -> Path:
    """Write `custom_generate/generate.py` and `requirements.txt` into a draft folder; returns the subfolder."""
    folder = Path(directory) / "custom_generate"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generate.py").write_text(GENERATE_PY)
    (folder / "requirements.txt").write_text(REQUIREMENTS)
    return folder


def _hook_source() -> str | None:
    """The `custom_generate` argument of the transformers generate() call up the stack."""
    frame = inspect.currentframe()
    while frame is not None:
        value = frame.f_locals.get("custom_generate")
        if frame.f_code.co_name == "generate" and isinstance(value, (str, Path)):
            return str(value)
        frame = frame.f_back
    return None


def _draft_for(verifier: Any, draft: Any) -> Any:
    if draft is None:
        draft = _hook_source()
        if draft is None:
            raise ValueError(
                "cannot tell which draft to use: call verifier.generate(..., custom_generate=<draft repo or folder>, "
                "trust_remote_code=True), or pass draft=<a draft, its id or its path>"
            )
    if not isinstance(draft, (str, Path)):
        return draft
    per_verifier = _loaded.setdefault(verifier, {})
    if str(draft) not in per_verifier:
        from .loading import load_draft

        per_verifier[str(draft)] = load_draft(str(draft), dtype=verifier.dtype).to(verifier.device)
    return per_verifier[str(draft)]


def custom_generate(model: Any, draft: Any = None, inputs: Any = None, **kwargs: Any) -> Any:
    """The hook's body: `speculators_hf.generate(model, draft, ...)` from transformers generate() arguments."""
    from .generation.loop import generate

    for name in _UNSUPPORTED:
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"speculators_hf's custom_generate does not support {name}; leave it unset")
    for name in _IGNORED:
        kwargs.pop(name, None)
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if input_ids is None:
        raise ValueError("custom_generate needs input_ids (or inputs)")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return generate(model, _draft_for(model, draft), input_ids, **kwargs)
