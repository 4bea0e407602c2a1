"""One module per draft architecture; importing this package registers every family."""

from typing import Any

from .base import SpeculatorLoadError, SpeculatorModel, is_speculator
from .eagle import EagleSpeculator, EagleSpeculatorConfig
from .eagle3 import Eagle3Speculator, Eagle3SpeculatorConfig
from .independent import IndependentSpeculator, IndependentSpeculatorConfig
from .medusa import MedusaSpeculator, MedusaSpeculatorConfig
from .mlp_speculator import MLPSpeculator, MLPSpeculatorConfig

# (config class, model class) of every family, in the order they are documented.
FAMILIES: list[tuple[Any, Any]] = [
    (Eagle3SpeculatorConfig, Eagle3Speculator),
    (EagleSpeculatorConfig, EagleSpeculator),
    (MedusaSpeculatorConfig, MedusaSpeculator),
    (MLPSpeculatorConfig, MLPSpeculator),
    (IndependentSpeculatorConfig, IndependentSpeculator),
]

__all__ = [
    "FAMILIES",
    "Eagle3Speculator",
    "Eagle3SpeculatorConfig",
    "EagleSpeculator",
    "EagleSpeculatorConfig",
    "IndependentSpeculator",
    "IndependentSpeculatorConfig",
    "MLPSpeculator",
    "MLPSpeculatorConfig",
    "MedusaSpeculator",
    "MedusaSpeculatorConfig",
    "SpeculatorLoadError",
    "SpeculatorModel",
    "is_speculator",
]
