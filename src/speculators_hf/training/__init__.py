"""Draft training: data (verifier hidden states), the accelerate trainer. Each family's loss is its model's
`training_loss` (shared maths in `speculators_hf.models.objectives`)."""

from ..models.objectives import select_draft_vocab
from .data import DataError, DraftDataset, cache_features, load_blocks, load_records, pack_blocks, save_blocks
from .trainer import ResumeError, TrainConfig, measure_acceptance, plan_evaluation, train

__all__ = [
    "DataError",
    "DraftDataset",
    "ResumeError",
    "TrainConfig",
    "cache_features",
    "load_blocks",
    "load_records",
    "measure_acceptance",
    "pack_blocks",
    "plan_evaluation",
    "save_blocks",
    "select_draft_vocab",
    "train",
]
