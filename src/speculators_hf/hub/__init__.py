"""The Hub side of a draft: model cards (`cards.py`) and one-commit uploads with the verifier-reference check
(`upload.py`). Importing it makes every `save_pretrained` write the card and `draft.push_to_hub` use `push_to_hub`."""

from ..models.base import SpeculatorModel
from .cards import (
    CARD_INPUT_KEYS,
    GENERATED_MARK,
    ModelCardInputError,
    card_for_folder,
    card_inputs_of,
    create_model_card,
    family_title,
    is_generated_card,
    tensor_table,
    vllm_tensor_name,
    write_model_card,
)
from .upload import VerifierReferenceError, check_verifier_reference, checkpoint_files, draft_push_to_hub, push_to_hub


def _install() -> None:
    SpeculatorModel.card_writer = write_model_card
    SpeculatorModel.push_to_hub = draft_push_to_hub  # type: ignore[method-assign,assignment]


_install()


__all__ = [
    "CARD_INPUT_KEYS",
    "GENERATED_MARK",
    "ModelCardInputError",
    "VerifierReferenceError",
    "card_for_folder",
    "card_inputs_of",
    "check_verifier_reference",
    "checkpoint_files",
    "create_model_card",
    "family_title",
    "is_generated_card",
    "push_to_hub",
    "tensor_table",
    "vllm_tensor_name",
    "write_model_card",
]
