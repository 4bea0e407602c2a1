"""Shared generation machinery: verifier hidden-state capture, the per-generation draft session,
token selection and acceptance statistics, and the package's own speculative loop (`generate`: token trees,
batch > 1)."""

from .capture import VerifierBindingError, VerifierTap
from .loop import SpeculativeOutput, generate
from .sampling import Sampler, expand_draft_vocab
from .session import DraftSession
from .stats import GenerationStats
from .tree import DraftTree, TreeSpec

__all__ = [
    "DraftSession",
    "DraftTree",
    "GenerationStats",
    "Sampler",
    "SpeculativeOutput",
    "TreeSpec",
    "VerifierBindingError",
    "VerifierTap",
    "expand_draft_vocab",
    "generate",
]
