"""Convert published draft checkpoints into this package's format, and export to `speculators`/vLLM.

```python
from speculators_hf.convert import convert

convert("yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", "llama-eagle3", verifier="meta-llama/Llama-3.1-8B-Instruct")
convert("llama-eagle3", "llama-eagle3-vllm", to="speculators")
convert("FasterDecoding/medusa-vicuna-7b-v1.3", "medusa", verifier="lmsys/vicuna-7b-v1.3")
convert("medusa", "medusa-vllm", to="vllm")   # vLLM's native Medusa layout
convert("z-lab/Qwen3-8B-DFlash-b16", "qwen3-dflash", verifier="Qwen/Qwen3-8B")   # then --to vllm as EAGLE-3
```

Each foreign format is one declarative spec (`specs/<format>.yaml`: how to recognise it, tensor
renames and shapes, config field map, the defaults its original code assumes) plus one small module
that applies it (`eagle3.py`, `specforge.py`, `speculators.py`, `dflash.py`, `eagle.py`, `medusa.py`,
`mlp_speculator.py`, `ours.py`, `sglang.py`). A new format plugs in as a spec with
`status: supported` and `module: <name>`, and a module defining `import_checkpoint(source, spec, ctx)`
(and `export_checkpoint(folder, model, spec, ctx)` when it can be written too). Formats recognised
but not converted yet have `status: planned` specs, so `--from auto` names them.

What the modules share, one concern each: `formats.py` (the specs), `expressions.py` (the specs' tiny
expression language), `sources.py` (reading a source safely, detection), `tensors.py` (renaming, layouts,
shape/dtype/value checks), `verifier.py` (`--verifier`), `output.py` (overrides, the verifier reference,
building the model, atomic output, native exports read back), `errors.py`.

Safety: sources are only read (safetensors, or pickles through `torch.load(weights_only=True)`); only
safetensors are written; the output folder is built beside DST and renamed into place, so a failure
leaves no DST; every mismatch (shape, dtype, vocabulary, verifier) is an error naming the tensor or
field and both values.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..loading import is_hub_id
from .errors import ConversionError
from .formats import (
    FormatSpec,
    all_export_targets,
    all_specs,
    exporter_for,
    known_checkpoints,
    load_spec,
    supported_formats,
)
from .output import atomic_output, check_destination, same_bits
from .sources import Source, detect_format, open_source
from .verifier import VerifierRef

__all__ = [
    "ConversionError",
    "ConvertContext",
    "FormatSpec",
    "all_specs",
    "convert",
    "detect",
    "known_checkpoints",
    "load_spec",
    "supported_formats",
]

logger = logging.getLogger("speculators_hf.convert")


@dataclass
class ConvertContext:
    """What a converter module gets besides the source: the verifier, `--set` overrides, a logger."""

    verifier: VerifierRef | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = logger.info
    hub_kwargs: dict[str, Any] = field(default_factory=dict)


def detect(src: str | os.PathLike, **hub_kwargs: Any) -> FormatSpec:
    """The format of a checkpoint folder or Hub id (see `specs/*.yaml`); raises when unknown or ambiguous."""
    return detect_format(open_source(src, **hub_kwargs))


def _module(spec: FormatSpec) -> Any:
    if spec.status != "supported" or spec.module is None:
        raise ConversionError(
            f"format {spec.name!r} ({spec.title}) is recognised but has no converter yet; supported: {supported_formats()}"
        )
    return importlib.import_module(f"{__name__}.{spec.module}")


def _exporter(target: FormatSpec) -> Any:
    """The module that writes `target` (its export block's `module`, else the spec's own)."""
    assert target.export is not None
    return importlib.import_module(f"{__name__}.{target.export.module or target.module}")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    from_format: str = "auto",
    verifier: Any = None,
    to: str = "ours",
    *,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    verifier_id: str | None = None,
    dtype: str | torch.dtype | None = None,
    repo_id: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert the draft checkpoint `src` (a folder or a Hub id) and write it to the folder `dst`.

    - `from_format`: "auto" (detected from config fields and tensor names, and reported) or a format
      name (`supported_formats()`).
    - `verifier`: the verifier's Hub id, path or loaded model. Its config fills the verifier reference
      and fingerprint and is checked against the draft; its input embedding is copied when the source
      has none (research EAGLE-3). Its weights are never loaded otherwise.
    - `to`: "ours" (this package's format: loads with AutoModelForCausalLM, remote code included),
      "speculators" (EAGLE-3, P-EAGLE, DFlash: what the `speculators` library and vLLM read; additionally
      checked for that), "vllm" (what vLLM reads for the draft's family: the speculators format for
      EAGLE-3, P-EAGLE and DFlash, vLLM's native layouts for EAGLE-1, Medusa and the MLP speculator; each
      native export is imported again and compared) or "sglang" (what SGLang 0.5.23 reads: EAGLE-3 as
      `LlamaForCausalLMEagle3`, DFlash as `DFlashDraftModel`; imported again and compared).
    - `overrides`: our flat config fields to set (e.g. {"norm_before_residual": True}), and
      `speculative_tokens`.
    - `revision`: the Hub revision of `src`; `cache_dir`, `token`: for Hub ids of `src` and the verifier
      (HF_HUB_OFFLINE=1 reads the local cache).
    - `verifier_id`: the verifier's Hub id (org/name) to write as the verifier reference, when `verifier`
      is a local folder (or the source names one): vLLM loads the verifier from that reference verbatim,
      and `push` requires a Hub id. Without it, an export naming a local path warns.
    - `dtype`: "float16", "bfloat16" or "float32" (or a torch dtype): cast the floating-point weights;
      default: keep the source's dtype.
    - `repo_id`: the Hub id the result will be published under, filled into the model card's snippets.
    Returns `dst` as a Path.
    """
    say = log or logger.info
    hub_kwargs = {"revision": revision, "cache_dir": str(cache_dir) if cache_dir else None, "token": token}
    if to != "ours" and to not in all_export_targets():
        raise ConversionError(f"cannot export to {to!r}; export targets: ours, {', '.join(all_export_targets())}")
    for what, value in (("verifier_id", verifier_id), ("repo_id", repo_id)):
        if value is not None and not is_hub_id(value, namespaced=True):
            raise ConversionError(f"{what} {value!r} is not a Hub id: pass it as ORG/NAME")
    cast = _dtype(dtype)
    source: Source = open_source(src, **hub_kwargs)
    destination = Path(dst).expanduser().resolve()
    check_destination(source.root, destination, overwrite)
    if from_format == "auto":
        spec = detect_format(source)
        say(f"detected format: {spec.name} ({spec.title})")
    else:
        spec = load_spec(from_format)
        say(f"format: {spec.name} ({spec.title})")
    module = _module(spec)
    if to != "ours" and spec.family != "*":
        exporter_for(to, spec.family)  # fail before reading any weights
    ctx = ConvertContext(
        # the verifier is resolved at its own default revision: SRC's revision means nothing in its repo
        verifier=VerifierRef.resolve(verifier, cache_dir=hub_kwargs["cache_dir"], token=token),
        overrides=dict(overrides or {}),
        log=say,
        hub_kwargs=hub_kwargs,
    )
    model = module.import_checkpoint(source, spec, ctx)
    _finish(model, verifier_id, cast, repo_id, say)
    target = exporter_for(to, model.config.speculators_model_type) if to != "ours" else None
    with atomic_output(destination) as tmp:
        model.save_pretrained(tmp)
        _check_written(tmp, model)
        if target is not None:
            _exporter(target).export_checkpoint(tmp, model, target, ctx)
    say(f"wrote {destination} ({f'{target.title}, for --to {to}' if target is not None else 'speculators_hf format'})")
    return destination


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")


def _finish(
    model: Any, verifier_id: str | None, dtype: torch.dtype | None, repo_id: str | None, say: Callable[[str], None]
) -> None:
    """What the caller asked of the output, whatever the source: the verifier's Hub id, the dtype of the
    floating-point weights (integer/bool tensors such as d2t/t2d keep theirs), the card's repo id."""
    if verifier_id is not None:
        previous = model.config.verifier.get("name_or_path")
        model.config.verifier["name_or_path"] = verifier_id
        if previous != verifier_id:
            say(f"verifier reference: {verifier_id}" + (f" (instead of {previous})" if previous else ""))
    if dtype is not None and dtype != model.dtype:
        say(f"weights cast from {model.dtype} to {dtype}")
        model.to(dtype)
    if repo_id is not None:
        model.card_info = {**(getattr(model, "card_info", None) or {}), "repo_id": repo_id}


def _check_written(folder: Path, model: Any) -> None:
    """Load the written checkpoint back: same tensors, same dtypes, bit for bit."""
    reloaded = type(model).from_pretrained(folder, dtype="auto")
    written, original = reloaded.state_dict(), model.state_dict()
    for name, tensor in original.items():
        if not same_bits(written[name], tensor):
            raise ConversionError(f"the written checkpoint differs from the converted tensors at {name}")
