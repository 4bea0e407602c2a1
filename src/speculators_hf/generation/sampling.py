"""Token selection for drafts, shared by every family.

Exactness does not depend on the draft's choices, only on reporting them honestly: transformers'
speculative sampling accepts draft token x with probability min(1, p(x)/q(x)) where q is the
distribution the draft returned as its score, and resamples from max(0, p - q) otherwise. So a draft
token must be drawn from exactly softmax(score) (or be its argmax under greedy decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

LogitsProcessor = Callable[[torch.LongTensor, torch.FloatTensor], torch.FloatTensor]


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


class TokenPicker:
    """Applies the verifier's logits processors to a draft's logits and picks the draft token.

    Greedy: argmax of the processed scores. Sampling: a draw from softmax(processed scores), which is
    the q that the verifier's acceptance test uses.
    """

    def __init__(
        self,
        logits_processor: Iterable[LogitsProcessor] | None,
        do_sample: bool,
        generator: torch.Generator | None = None,
    ):
        # transformers hands the assistant a plain list of processors (a LogitsProcessorList is one too)
        self.processors = list(logits_processor or [])
        self.do_sample = do_sample
        self.generator = generator

    def process(self, input_ids: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """float32 scores [B, V] after the logits processors."""
        scores = logits.float()
        for processor in self.processors:
            scores = processor(input_ids, scores)  # type: ignore[arg-type]
        return scores

    def __call__(self, input_ids: torch.Tensor | None, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`logits` [B, V] over the verifier vocab for the token after `input_ids` -> (token [B], scores [B, V])."""
        scores = self.process(input_ids, logits)
        return choose(scores, self.do_sample, self.generator), scores


def choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The token a decoding rule picks from processed scores [..., V]: a draw from softmax(scores) when
    sampling (exactly the q the acceptance test is given), else the argmax."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])


def point_mass(token: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Scores whose softmax is all mass on `token` ([B] -> [B, V]): used for a placeholder proposal, which
    keeps greedy and sampled outputs exact (it is accepted with probability p(token))."""
    scores = torch.full((token.shape[0], vocab_size), float("-inf"), device=token.device)
    scores.scatter_(1, token[:, None], 0.0)
    return scores


def draft_chain(
    input_ids: torch.Tensor,
    num_tokens: int,
    pick: TokenPicker,
    next_logits: Callable[[torch.Tensor | None], torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Draft `num_tokens` tokens one after another after `input_ids` [1, n].

    `next_logits(previous_token)` returns the [1, V] verifier-vocabulary logits of the next draft token,
    given the token drafted just before (None for the first). Returns (tokens [1, k], k scores)."""
    sequence, scores, token = input_ids, [], None
    for _ in range(num_tokens):
        token, score = pick(sequence, next_logits(token))
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        scores.append(score)
    return sequence[:, input_ids.shape[1] :], scores


def truncate_cache(cache: Any, length: int) -> None:
    """Drop everything a transformers `Cache` holds beyond `length` positions (what the draft computed
    from its own guesses in the previous round)."""
    stale = cache.get_seq_length() - length
    if stale > 0:
        cache.crop(-stale)
