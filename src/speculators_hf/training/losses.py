"""Training losses, one per draft family, and draft-vocabulary selection.

Every loss takes a batch of blocks (`input_ids` [B, T], `loss_mask` [B, T]) and the verifier hidden
states the family reads (one [B, T, H] tensor per id of `draft.verifier_layer_ids()`), and returns
(loss, metrics). Targets are the data's own next tokens; build the data with the verifier's own
responses (`speculators-hf data --regenerate`) so that these are the verifier's choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean CE over masked positions and top-1 accuracy; zero (with grad) when nothing is masked in."""
    if not mask.any():
        return logits.sum() * 0.0, 0.0
    chosen, labels = logits[mask].float(), target[mask]
    return F.cross_entropy(chosen, labels), (chosen.argmax(-1) == labels).float().mean().item()


def chained_cross_entropy(
    step_logits: Any,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    decay: float = 0.8,
    t2d: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss every chained draft shares: step (or head) j at row t predicts x_{t+j+2}; step j is
    weighted decay**j. `step_logits` is a sequence of [B, T, V'] tensors. With a reduced draft vocabulary
    (`t2d`: verifier ids it contains), targets outside it are left out and the others are mapped to draft
    ids (the selected verifier ids, ascending)."""
    length = input_ids.shape[1]
    draft_id = None if t2d is None else torch.cumsum(t2d.long(), 0) - 1
    total = input_ids.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    for j, logits in enumerate(step_logits):
        if length - j - 2 <= 0:
            break
        target = input_ids[:, j + 2 :]
        mask = loss_mask[:, j + 2 :].bool()
        if t2d is not None and draft_id is not None:
            mask = mask & t2d[target]
            target = draft_id[target].clamp(min=0)
        ce, acc = masked_cross_entropy(logits[:, : length - j - 2], target, mask)
        total = total + decay**j * ce
        metrics[f"acc_{j}"] = acc
    metrics["loss"] = total.item()
    return total, metrics


def eagle3_loss(
    draft: Any,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    features: list[torch.Tensor],
    steps: int = 7,
    decay: float = 0.8,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training-time test: `steps` unrolled draft steps, step j weighted decay**j (EAGLE-3: 7, 0.8)."""
    steps = min(steps, input_ids.shape[1] - 2)
    t2d = draft.t2d if draft.d2t is not None else None
    return chained_cross_entropy(draft.unrolled_logits(input_ids, features, steps), input_ids, loss_mask, decay, t2d)


def eagle_loss(
    draft: Any,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    features: list[torch.Tensor],
    steps: int = 1,
    decay: float = 0.8,
    feature_weight: float = 1.0,
    ce_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE-1/2 (steps=1) and HASS (steps>1): SmoothL1 between the predicted and the verifier's next
    feature plus 0.1 x cross-entropy of the verifier's head on the prediction (EAGLE's weights)."""
    target = features[0]
    total = input_ids.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    for j, out in enumerate(draft.unrolled_features(input_ids, target, steps)):
        n = input_ids.shape[1] - j - 2
        if n <= 0:
            break
        mask = loss_mask[:, j + 2 :].bool()
        pred, want = out[:, :n], target[:, j + 1 : j + 1 + n]
        regression = F.smooth_l1_loss(pred[mask], want[mask]) if mask.any() else pred.sum() * 0.0
        ce, acc = masked_cross_entropy(draft.logits(pred), input_ids[:, j + 2 :], mask)
        total = total + decay**j * (feature_weight * regression + ce_weight * ce)
        metrics[f"acc_{j}"] = acc
    metrics["loss"] = total.item()
    return total, metrics


def medusa_loss(
    draft: Any, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], decay: float = 0.8
) -> tuple[torch.Tensor, dict[str, float]]:
    """Medusa: head i reads the verifier's last hidden state at t and predicts x_{t+i+2} (weights 0.8^i)."""
    return chained_cross_entropy(draft(features[0]), input_ids, loss_mask, decay)


def mlp_speculator_loss(
    draft: Any, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor], decay: float = 0.8
) -> tuple[torch.Tensor, dict[str, float]]:
    """MLP speculator, teacher-forced: head i starts from the state at t, reads x_{t+1}..x_{t+i+1}, predicts x_{t+i+2}."""
    return chained_cross_entropy(draft(features[0], input_ids), input_ids, loss_mask, decay)


def independent_loss(
    draft: Any, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain next-token cross entropy of the small LM (on verifier-generated data: distillation)."""
    logits = draft.model(input_ids=input_ids).logits[:, :-1]
    ce, acc = masked_cross_entropy(logits, input_ids[:, 1:], loss_mask[:, 1:].bool())
    return ce, {"loss": ce.item(), "acc_0": acc}


LOSSES: dict[str, LossFn] = {
    "eagle3": eagle3_loss,
    "eagle": eagle_loss,
    "independent": independent_loss,
    "medusa": medusa_loss,
    "mlp_speculator": mlp_speculator_loss,
}


def loss_for(family: str) -> LossFn:
    try:
        return LOSSES[family]
    except KeyError:
        raise ValueError(
            f"no training loss for draft family {family!r}; trainable families: {sorted(LOSSES)}"
        ) from None


def select_draft_vocab(draft: Any, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """EAGLE-3 draft vocabulary: the `draft_vocab_size` verifier ids that are most frequent as training
    targets (ties: lower id first). Sets d2t/t2d and returns the ids."""
    vocab = draft.config.vocab_size
    counts = torch.bincount(input_ids[loss_mask.bool()].flatten(), minlength=vocab)[:vocab].double()
    counts -= torch.arange(vocab, dtype=torch.double) / (vocab * 10.0)  # deterministic tie-break
    ids = counts.topk(draft.config.draft_vocab_size).indices
    draft.set_draft_vocab(ids)
    return ids.sort().values
