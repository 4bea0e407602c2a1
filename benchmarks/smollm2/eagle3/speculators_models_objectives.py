# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.models.objectives. Do not edit.
"""The maths the families' training losses share (each family's loss is its model's `training_loss`).

Every loss takes a batch of blocks (`input_ids` [B, T], `loss_mask` [B, T]) and the verifier hidden states the
family reads, and returns (loss, metrics). Targets are the data's own next tokens; build the data with the
verifier's own replies (`speculators-hf data --regenerate`) so that these are the verifier's choices.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean CE over masked positions and top-1 accuracy; zero (with grad) when nothing is masked in."""
    if not mask.any():
        return logits.sum() * 0.0, 0.0
    chosen, labels = logits[mask].float(), target[mask]
    return F.cross_entropy(chosen, labels), (chosen.argmax(-1) == labels).float().mean().item()


def draft_targets(target: torch.Tensor, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifier ids `target` as ids of a reduced draft vocabulary (`t2d`: the verifier ids it contains; draft ids
    are those ids in ascending order; 0 for an id outside it), and whether each is in it."""
    return (torch.cumsum(t2d.long(), 0) - 1)[target].clamp(min=0), t2d[target]


def stepwise_cross_entropy(
    steps: Any, decay: float = 0.8, t2d: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over draft steps j of decay**j x the masked CE of step j; `steps` yields (logits [..., V'], target
    [...], mask [...]) per step, targets as verifier ids. With a reduced draft vocabulary (`t2d`: the verifier
    ids it contains), targets outside it are left out and the others mapped to draft ids (the selected verifier
    ids, ascending). Metrics: `acc_<j>` per step and `loss`."""
    total = torch.zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    for j, (logits, target, mask) in enumerate(steps):
        mask = mask.bool()
        if t2d is not None:
            target, in_vocab = draft_targets(target, t2d)
            mask = mask & in_vocab
        ce, acc = masked_cross_entropy(logits, target, mask)
        total = total.to(ce.device) + decay**j * ce
        metrics[f"acc_{j}"] = acc
    metrics["loss"] = total.item()
    return total, metrics


def chained_cross_entropy(
    step_logits: Any,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    decay: float = 0.8,
    t2d: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss every chained draft shares: step (or head) j at row t predicts x_{t+j+2}; step j is
    weighted decay**j (`stepwise_cross_entropy`). `step_logits` is a sequence of [B, T, V'] tensors."""
    length = input_ids.shape[1]
    steps = (
        (logits[:, : length - j - 2], input_ids[:, j + 2 :], loss_mask[:, j + 2 :])
        for j, logits in enumerate(step_logits)
        if length - j - 2 > 0
    )
    return stepwise_cross_entropy(steps, decay, t2d)


def select_draft_vocab(draft: Any, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """EAGLE-3 draft vocabulary: the `draft_vocab_size` verifier ids that are most frequent as training
    targets (ties: lower id first). Sets d2t/t2d and returns the ids."""
    vocab = draft.config.vocab_size
    counts = torch.bincount(input_ids[loss_mask.bool()].flatten(), minlength=vocab)[:vocab].double()
    counts -= torch.arange(vocab, dtype=torch.double) / (vocab * 10.0)  # deterministic tie-break
    ids = counts.topk(draft.config.draft_vocab_size).indices
    draft.set_draft_vocab(ids)
    return ids.sort().values
