# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.models.draft_vocab. Do not edit.
"""A reduced draft vocabulary (EAGLE-3, P-EAGLE, DFlash): the draft's lm_head covers `draft_vocab_size` of the
verifier's ids; draft id d stands for verifier id d + d2t[d] (`d2t` [Vd] long), and `t2d` [V] bool marks the
verifier ids the draft has. Both buffers exist only when the draft vocabulary is smaller than the verifier's
(vLLM fails on `d2t` otherwise, and proposes wrong tokens silently without it when smaller).

`DraftVocabulary` is the mixin the families with such a head share: the buffers, choosing the vocabulary from
training data, initialising the head's rows from the verifier's, and checking a loaded map.
"""

from __future__ import annotations

from typing import Any

import torch

from .speculators_generation_sampling import expand_draft_vocab
from .speculators_models_objectives import select_draft_vocab


def vocab_map_problems(
    d2t: torch.Tensor | None, t2d: torch.Tensor | None, draft_vocab_size: int, vocab_size: int
) -> list[str]:
    """What is wrong with a draft-to-verifier vocabulary map, one line each (empty when it is sound): draft id
    d stands for verifier id d + d2t[d], which must lie in [0, vocab_size) and differ for every draft id
    (an id outside fails only at generation time with an IndexError; a repeated one loses probability mass);
    `t2d`, when given, must mark exactly those verifier ids. Shared by loading and `convert`."""
    if d2t is None:
        return []
    if d2t.dtype == torch.bool or d2t.is_floating_point() or d2t.is_complex():
        return [f"  d2t: has dtype {d2t.dtype}; it holds integer offsets (verifier id = draft id + d2t[draft id])"]
    if tuple(d2t.shape) != (draft_vocab_size,):
        return [f"  d2t: has shape {tuple(d2t.shape)}, expected ({draft_vocab_size},) (one offset per draft id)"]
    target = torch.arange(draft_vocab_size, device=d2t.device) + d2t.long()
    outside = ((target < 0) | (target >= vocab_size)).nonzero().flatten()
    if outside.numel():
        d = int(outside[0])
        return [
            f"  d2t: maps {outside.numel()} draft ids outside the verifier vocabulary [0, {vocab_size}), e.g. draft id "
            f"{d} -> {int(target[d])} (d2t[{d}] = {int(d2t[d])}); d + d2t[d] must be a verifier id"
        ]
    if target.unique().numel() != draft_vocab_size:
        return [
            f"  d2t: maps {draft_vocab_size - target.unique().numel()} draft ids to a verifier id another draft id already "
            "has; every draft id needs its own verifier id"
        ]
    if t2d is not None:
        derived = torch.zeros(vocab_size, dtype=torch.bool, device=d2t.device)
        derived[target] = True
        if (
            t2d.dtype != torch.bool
            or tuple(t2d.shape) != (vocab_size,)
            or not torch.equal(t2d.to(derived.device), derived)
        ):
            return ["  t2d: disagrees with d2t (t2d[d + d2t[d]] must be true exactly for the draft ids d)"]
    return []


class DraftVocabulary:
    """Mixin of a family whose `lm_head` [Vd, H] covers a reduced draft vocabulary. Call `init_draft_vocab` in
    `__init__`; `self.d2t` is None when the draft vocabulary is the verifier's whole vocabulary."""

    d2t: torch.Tensor | None
    t2d: torch.Tensor
    lm_head: Any
    config: Any

    def init_draft_vocab(self, draft_vocab_size: int, vocab_size: int) -> None:
        # a new draft's reduced vocabulary is a placeholder until chosen from data (`prepare_training`)
        self.draft_vocab_chosen = False
        if draft_vocab_size < vocab_size:
            self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))  # type: ignore[attr-defined]
            # until a vocabulary is selected (training: the most frequent targets), the first Vd ids
            t2d = torch.zeros(vocab_size, dtype=torch.bool)
            t2d[:draft_vocab_size] = True
            self.register_buffer("t2d", t2d)  # type: ignore[attr-defined]
        else:
            self.d2t = None

    def draft_vocab_problems(self) -> list[str]:
        """What is wrong with a loaded vocabulary map (`vocab_map_problems`)."""
        d2t, t2d = getattr(self, "d2t", None), getattr(self, "t2d", None)
        vocab = self.config.transformer_layer_config.vocab_size
        return vocab_map_problems(d2t, t2d, self.config.draft_vocab_size, vocab)

    def expand_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., Vd] -> verifier-vocabulary logits [..., V] (float32, -inf off the map)."""
        return expand_draft_vocab(logits, self.d2t, self.config.transformer_layer_config.vocab_size)

    def draft_target_ids(self) -> torch.Tensor:
        """The verifier ids of the draft vocabulary, ascending (all of them without a map)."""
        ids = torch.arange(self.config.draft_vocab_size)
        return ids if self.d2t is None else ids + self.d2t.cpu()

    def init_head_from_verifier(self, verifier: Any) -> None:
        """Copy the verifier's lm_head rows of the current draft vocabulary into the draft's lm_head."""
        head = verifier.get_output_embeddings()
        if head is not None and head.weight.shape[1] == self.lm_head.weight.shape[1]:
            with torch.no_grad():
                self.lm_head.weight.copy_(head.weight[self.draft_target_ids().to(head.weight.device)])

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Use verifier ids `target_ids` (sorted, length draft_vocab_size) as the draft vocabulary."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long).sort().values
        if self.d2t is None or target_ids.numel() != self.config.draft_vocab_size:
            raise ValueError(f"need exactly draft_vocab_size={self.config.draft_vocab_size} ids (< verifier vocab)")
        self.d2t.copy_(target_ids - torch.arange(target_ids.numel()))
        self.t2d.zero_()
        self.t2d[target_ids] = True
        self.draft_vocab_chosen = True

    def prepare_training(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, verifier: Any) -> None:
        """A new draft with a reduced vocabulary takes the most frequent targets of the data (`select_draft_vocab`)
        and the verifier's lm_head rows for them (`init_from_verifier`)."""
        if self.d2t is not None and not self.draft_vocab_chosen:
            select_draft_vocab(self, input_ids, loss_mask)
            self.init_from_verifier(verifier)  # type: ignore[attr-defined]
