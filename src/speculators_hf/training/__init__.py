"""Draft training: data (verifier hidden states), per-family losses, the accelerate trainer."""

from .data import DataError, DraftDataset, cache_features, load_blocks, load_records, pack_blocks, save_blocks
from .losses import LOSSES, loss_for, select_draft_vocab
from .trainer import TrainConfig, measure_acceptance, train

__all__ = [
    "LOSSES",
    "DataError",
    "DraftDataset",
    "TrainConfig",
    "cache_features",
    "load_blocks",
    "load_records",
    "loss_for",
    "measure_acceptance",
    "pack_blocks",
    "save_blocks",
    "select_draft_vocab",
    "train",
]
