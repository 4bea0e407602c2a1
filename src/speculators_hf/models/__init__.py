"""One module per draft architecture; importing this package registers every family (`base.family`).
`FAMILIES` maps `speculators_model_type` to the family's model class."""

from .base import FAMILIES, SpeculatorLoadError, SpeculatorModel, family, is_speculator
from .dflash import DFlashSpeculator, DFlashSpeculatorConfig
from .dflash2 import DFlash2Speculator, DFlash2SpeculatorConfig
from .dspark import DSparkSpeculator, DSparkSpeculatorConfig
from .eagle import EagleSpeculator, EagleSpeculatorConfig
from .eagle3 import Eagle3Speculator, Eagle3SpeculatorConfig
from .independent import IndependentSpeculator, IndependentSpeculatorConfig
from .medusa import MedusaSpeculator, MedusaSpeculatorConfig
from .mlp_speculator import MLPSpeculator, MLPSpeculatorConfig
from .peagle import PEagleSpeculator, PEagleSpeculatorConfig

__all__ = [
    "FAMILIES",
    "DFlash2Speculator",
    "DFlash2SpeculatorConfig",
    "DFlashSpeculator",
    "DFlashSpeculatorConfig",
    "DSparkSpeculator",
    "DSparkSpeculatorConfig",
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
    "PEagleSpeculator",
    "PEagleSpeculatorConfig",
    "SpeculatorLoadError",
    "SpeculatorModel",
    "family",
    "is_speculator",
]
