# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.sampling. Do not edit.
"""Token selection, shared by every family and both loops: one `Sampler` picks every token (the verifier's
and the draft's), in transformers' assisted loop and in the package's own.

Exactness does not depend on the draft's choices, only on reporting them honestly: speculative sampling
accepts draft token x with probability min(1, p(x)/q(x)) where q is the distribution the draft reports,
and resamples from max(0, p - q) otherwise. So a draft token must be drawn from exactly softmax(scores)
of the scores it reports (or be their argmax under greedy decoding): `choose` is that rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .speculators_generation_settings import is_position_free

if TYPE_CHECKING:
    from .speculators_generation_tree import DraftTree


def expand_draft_vocab(logits: torch.Tensor, d2t: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Scatter logits over a reduced draft vocabulary into the full verifier vocabulary.

    Draft id d means verifier id d + d2t[d]; every verifier id the draft cannot propose gets -inf.
    Without `d2t` the ids are the verifier's own.
    `logits` is [..., Vd]; the result is [..., vocab_size] in float32.
    """
    logits = logits.float()
    if d2t is None:  # same token ids; trim padding rows or pad a smaller vocabulary with -inf
        if logits.shape[-1] >= vocab_size:
            return logits[..., :vocab_size]
        return torch.nn.functional.pad(logits, (0, vocab_size - logits.shape[-1]), value=float("-inf"))
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    target_ids = torch.arange(logits.shape[-1], device=logits.device) + d2t.to(logits.device)
    full[..., target_ids] = logits
    return full


def choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The token a decoding rule picks from processed scores [..., V]: a draw from softmax(scores) when
    sampling (exactly the q the acceptance test is given), else the argmax."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])


class Sampler:
    """The verifier's decoding rule, applied alike to verifier and draft logits anywhere in a round.

    Each batch row has the logits processors transformers builds for it (`settings.row_decodings`); they
    run on the token sequence the scored position really has: the row's context (prompt and emitted
    tokens, up to the round's root) followed by the path from the root to the position inside the tree.
    Then argmax (greedy) or a draw from the softmax (sampling). When every processor depends on the
    scores alone (temperature, top-k, top-p, ...), one call covers the whole batch and no sequence is built.
    """

    def __init__(
        self,
        do_sample: bool,
        generator: torch.Generator | None = None,
        row_processors: Sequence[Sequence[Any]] | None = None,
    ):
        self.do_sample, self.generator = do_sample, generator
        self.row_processors = [list(p) for p in (row_processors or [[]])]
        self.has_processors = any(self.row_processors)
        # rows' lists differ only in processors that read the sequence, so a position-free list is everyone's
        self.position_free = all(is_position_free(p) for row in self.row_processors for p in row)
        self.rows: list[int] = list(range(len(self.row_processors)))
        self.contexts: list[torch.Tensor] | None = None

    def begin_round(self, rows: list[int], contexts: list[torch.Tensor] | None) -> None:
        """The batch of this round: original row index of each row and, unless `position_free`, each row's
        context (1D ids up to and including the root)."""
        if not self.position_free and contexts is None:
            raise ValueError("these logits processors read the token sequence: give each row's context")
        self.rows, self.contexts = rows, contexts

    @staticmethod
    def _process(processors: list[Any], ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        for processor in processors:
            scores = processor(ids, scores)
        return scores

    def _row_scores(self, i: int, paths: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Row i's processed scores [K, V] for K positions whose paths after the root are `paths` [K, d]."""
        assert self.contexts is not None
        ids = self.contexts[i].to(logits.device)[None].expand(logits.shape[0], -1)
        if paths is not None and paths.shape[-1]:
            ids = torch.cat([ids, paths.to(ids.device)], dim=1)
        return self._process(self.row_processors[self.rows[i]], ids, logits.float())

    def scores(self, logits: torch.Tensor, paths: torch.Tensor | None = None) -> torch.Tensor:
        """float32 scores after the processors: `logits` [B, V] or [B, K, V], `paths` [B, d] or [B, K, d] the
        tokens from the root (exclusive) to each scored position (None: the root itself)."""
        if self.position_free:
            scores = logits.float()
            if not self.has_processors:
                return scores
            flat = self._process(self.row_processors[0], None, scores.reshape(-1, scores.shape[-1]))
            return flat.reshape(scores.shape)
        if logits.dim() == 2:
            return self.scores(logits[:, None], None if paths is None else paths[:, None])[:, 0]
        return torch.stack(
            [self._row_scores(i, None if paths is None else paths[i], logits[i]) for i in range(logits.shape[0])]
        )

    def block_scores(self, logits: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """Processed scores of a verified block [B, N+1, V] (the root, then the tree's nodes, each scored on the
        path from the root to it; nodes of different depths have paths of different lengths)."""
        if self.position_free:
            return self.scores(logits)
        anc = tree.block_ancestors[:, :, 1:]  # ancestors-or-self below the root, in root-to-node order
        depth = anc.sum(dim=2)
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for i in range(logits.shape[0]):
            for d in range(tree.max_depth + 1):
                index = (depth[i] == d).nonzero().squeeze(1)
                if index.numel():
                    paths = tree.tokens[i][None].expand(index.numel(), -1)[anc[i, index]].view(index.numel(), d)
                    out[i, index] = self._row_scores(i, paths, logits[i, index])
        return out

    # the rule as the tree and the acceptance test use it
    def warp(self, logits: torch.Tensor, paths: torch.Tensor | None = None) -> torch.Tensor:
        return self.scores(logits, paths)

    def pick(self, logits: torch.Tensor, path: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, V] (and the path [B, d] to the position) -> (token [B], the processed scores [B, V] it was picked
        from: their argmax, or a draw from their softmax when sampling)."""
        scores = self.scores(logits, path)
        return choose(scores, self.do_sample, self.generator), scores

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator).item())


def point_mass(token: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Scores whose softmax is all mass on `token` ([B] -> [B, V]): used for a placeholder proposal, which
    keeps greedy and sampled outputs exact (it is accepted with probability p(token))."""
    scores = torch.full((token.shape[0], vocab_size), float("-inf"), device=token.device)
    scores.scatter_(1, token[:, None], 0.0)
    return scores
