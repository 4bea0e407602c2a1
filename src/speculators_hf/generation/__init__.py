"""Shared generation machinery: verifier hidden-state capture, the per-generation draft session,
token selection and acceptance statistics."""

from .capture import VerifierBindingError, VerifierTap
from .sampling import TokenPicker, expand_draft_vocab
from .session import DraftSession
from .stats import GenerationStats

__all__ = [
    "DraftSession",
    "GenerationStats",
    "TokenPicker",
    "VerifierBindingError",
    "VerifierTap",
    "expand_draft_vocab",
]
