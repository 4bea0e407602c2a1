"""speculators-hf: speculative-decoding drafts as native Hugging Face models.

Importing the package registers every draft family with AutoConfig (`model_type="speculators"`),
AutoModel and AutoModelForCausalLM.
"""

from importlib.metadata import PackageNotFoundError, version

from transformers import AutoConfig

from .config import SpeculatorConfig, SpeculatorConfigError
from .generation import GenerationStats, SpeculativeOutput, TreeSpec, VerifierBindingError, generate
from .hub import ModelCardInputError, VerifierReferenceError, create_model_card, push_to_hub
from .loading import AutoSpeculatorForCausalLM, load_draft, register_family
from .models import (
    FAMILIES,
    DFlash2Speculator,
    DFlash2SpeculatorConfig,
    DFlashSpeculator,
    DFlashSpeculatorConfig,
    DSparkSpeculator,
    DSparkSpeculatorConfig,
    Eagle3Speculator,
    Eagle3SpeculatorConfig,
    EagleSpeculator,
    EagleSpeculatorConfig,
    IndependentSpeculator,
    IndependentSpeculatorConfig,
    MedusaSpeculator,
    MedusaSpeculatorConfig,
    MLPSpeculator,
    MLPSpeculatorConfig,
    PEagleSpeculator,
    PEagleSpeculatorConfig,
    SpeculatorLoadError,
    SpeculatorModel,
    is_speculator,
)

try:
    __version__ = version("speculators-hf")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

AutoConfig.register(SpeculatorConfig.model_type, SpeculatorConfig, exist_ok=True)
for _model_class in list(FAMILIES.values()):
    register_family(_model_class)

__all__ = [
    "AutoSpeculatorForCausalLM",
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
    "GenerationStats",
    "IndependentSpeculator",
    "IndependentSpeculatorConfig",
    "MLPSpeculator",
    "MLPSpeculatorConfig",
    "MedusaSpeculator",
    "MedusaSpeculatorConfig",
    "ModelCardInputError",
    "PEagleSpeculator",
    "PEagleSpeculatorConfig",
    "SpeculativeOutput",
    "SpeculatorConfig",
    "SpeculatorConfigError",
    "SpeculatorLoadError",
    "SpeculatorModel",
    "TreeSpec",
    "VerifierBindingError",
    "VerifierReferenceError",
    "__version__",
    "create_model_card",
    "generate",
    "is_speculator",
    "load_draft",
    "push_to_hub",
    "register_family",
]
