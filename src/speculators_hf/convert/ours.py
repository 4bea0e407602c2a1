"""This package's own checkpoints (families other than EAGLE-3) -> ours: load, optionally re-bind the
verifier reference with `--verifier`, and hand the model to an exporter (`--to vllm`)."""

from __future__ import annotations

from typing import Any

from ..config import SpeculatorConfig, SpeculatorConfigError
from ..models import FAMILIES
from ..models.base import SpeculatorLoadError
from .errors import ConversionError
from .formats import FormatSpec
from .output import apply_overrides, bind_reference
from .sources import Source


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> Any:
    try:
        config = SpeculatorConfig.from_dict(source.config)
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{source.label}: invalid speculators-hf config: {err}") from err
    model_class = FAMILIES.get(config.speculators_model_type)
    if model_class is None:
        raise ConversionError(
            f"{source.label}: no model class for speculators_model_type {config.speculators_model_type!r}"
        )
    try:
        model = model_class.from_pretrained(source.root, dtype="auto")
    except (SpeculatorLoadError, SpeculatorConfigError, OSError, ValueError) as err:
        raise ConversionError(f"{source.label}: cannot load the checkpoint: {err}") from err
    apply_overrides(model.config, ctx.overrides, source.label)
    if ctx.verifier is not None:
        verifier = model.config.verifier
        bind_reference(model.config, ctx, source.label, verifier.get("vocab_size"), verifier.get("hidden_size"))
    return model.eval()
