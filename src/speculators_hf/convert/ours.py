"""This package's own checkpoints (families other than EAGLE-3) -> ours: load, optionally re-bind the
verifier reference with `--verifier`, and hand the model to an exporter (`--to vllm`)."""

from __future__ import annotations

from typing import Any

from ..config import SpeculatorConfig, SpeculatorConfigError
from ..models import FAMILIES
from ..models.base import SpeculatorLoadError
from .core import ConversionError, FormatSpec, Source, bind_reference


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> Any:
    try:
        config = SpeculatorConfig.from_dict(source.config)
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{source.label}: invalid speculators-hf config: {err}") from err
    model_class = next((m for c, m in FAMILIES if isinstance(config, c)), None)
    if model_class is None:
        raise ConversionError(
            f"{source.label}: no model class for speculators_model_type {config.speculators_model_type!r}"
        )
    try:
        model = model_class.from_pretrained(source.root, dtype="auto")
    except (SpeculatorLoadError, SpeculatorConfigError, OSError, ValueError) as err:
        raise ConversionError(f"{source.label}: cannot load the checkpoint: {err}") from err
    if "speculative_tokens" in ctx.overrides:
        model.config.speculative_tokens = int(ctx.overrides["speculative_tokens"])
    unknown = sorted(set(ctx.overrides) - {"speculative_tokens"})
    if unknown:
        raise ConversionError(f"cannot set {unknown} on an existing {config.speculators_model_type} draft")
    if ctx.verifier is not None:
        verifier = model.config.verifier
        bind_reference(model.config, ctx, source.label, verifier.get("vocab_size"), verifier.get("hidden_size"))
    return model.eval()
