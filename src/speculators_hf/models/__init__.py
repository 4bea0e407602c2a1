"""One module per draft architecture; importing this package registers every family."""

from typing import Any

from .base import SpeculatorLoadError, SpeculatorModel, is_speculator
from .eagle3 import Eagle3Speculator, Eagle3SpeculatorConfig
from .independent import IndependentSpeculator, IndependentSpeculatorConfig

# (config class, model class) of every family, in the order they are documented.
FAMILIES: list[tuple[Any, Any]] = [
    (Eagle3SpeculatorConfig, Eagle3Speculator),
    (IndependentSpeculatorConfig, IndependentSpeculator),
]

__all__ = [
    "FAMILIES",
    "Eagle3Speculator",
    "Eagle3SpeculatorConfig",
    "IndependentSpeculator",
    "IndependentSpeculatorConfig",
    "SpeculatorLoadError",
    "SpeculatorModel",
    "is_speculator",
]
