# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.session. Do not edit.
"""One generation with a draft inside transformers' assisted loop: the object transformers threads through
its rounds as the draft's `cache`.

transformers calls `draft.generate(input_ids, cache=<what we returned last time>, ...)` once per round.
The session drafts with the same contract and the same code as the package's own loop: the tokens that
became final since the last round are fed to the draft with the verifier's hidden states before each of
them (`tree_extend`, which extends the draft's `MaskedCache`), then a chain of k tokens is drawn after the
newest one (`tree.build_tree` with a chain, a width-1 tree) by the `Sampler` holding transformers' logits
processors, and the drafted entries are dropped from the draft's cache again (they were computed from the
draft's own guesses). A round therefore costs O(k) draft work, whatever the sequence length.

With an adaptive policy (`num_assistant_tokens="auto"`), k is the policy's maximum and the chain stops
where the policy says: the assisted loop verifies the shorter candidate as it is, and the next round's
`input_ids` tell how many of the drafted tokens the verifier kept (`policy.AdaptiveDrafting.observe`).

The assisted loop also calls `get_seq_length()` and `crop()` on it, with a target suited to independent
LMs; the session ignores those crops and resynchronises from `input_ids` itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .speculators_generation_policy import AdaptiveDrafting, Round, sync
from .speculators_generation_sampling import Sampler, point_mass
from .speculators_generation_stats import GenerationStats
from .speculators_generation_tree import DraftTree, TreeSpec, build_tree

if TYPE_CHECKING:
    from .speculators_generation_capture import VerifierTap


def feed_and_draft(
    draft: Any,
    state: Any,
    tokens: torch.Tensor,
    start: int,
    features: list[torch.Tensor],
    num_tokens: int,
    sampler: Sampler,
    stop_below: float | None = None,
    timed: bool = False,
    stop_scale: tuple[float, ...] = (),
) -> tuple[DraftTree, float]:
    """Feed one sequence's tokens at positions start, start+1, ... (`tokens` [1, A]; `features`: the verifier's
    hidden states at the positions before them, start - 1 first, one [1, A, H] tensor per layer id), then draft a
    chain of `num_tokens` after the last of them (stopped early once the draft's probability of the chain, times
    `stop_scale` at that depth, is below `stop_below`) and drop the drafted entries from `state` again.
    Returns the chain (its `tokens` [1, k] and the processed `scores` [1, k, V] each was picked from) and the
    seconds it took after the feed (`timed`; else 0.0, with no device synchronisation); k may be below `num_tokens` for drafts that cannot predict that far
    (`max_tree_depth`) and where the chain stopped early."""
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    valid = torch.ones_like(tokens, dtype=torch.bool)
    root_logits, root_handle = draft.tree_extend(state, tokens, positions, valid, features)
    if timed:
        sync(tokens.device)
    began = time.perf_counter()
    chain = build_tree(
        draft,
        state,
        TreeSpec.chain(num_tokens, stop_below, stop_scale),
        sampler,
        root_logits,
        root_handle,
        positions[:, -1],
    )
    if state.cache is not None:
        state.cache.truncate()
    if not timed:
        return chain, 0.0
    sync(tokens.device)
    return chain, time.perf_counter() - began


class DraftSession:
    """Per-generation draft state, returned to transformers as the draft's cache."""

    def __init__(self, draft: Any, tap: VerifierTap, policy: AdaptiveDrafting | None = None):
        self.draft = draft
        self.tap = tap
        self.policy = policy  # None: chains of the length transformers asks for
        # the previous round: (sequence length before it, its chain, the chain's seconds, when the round began)
        self.last_round: tuple[int, DraftTree, float, float] | None = None
        self.state = draft.new_tree_state(1, draft.device)
        self.fed = 0  # tokens of the sequence fed to the draft so far (positions 0 .. fed-1)
        self.prompt_length: int | None = None
        self.tokens: torch.Tensor | None = None  # the sequence we last returned, to check continuity
        self.stats = GenerationStats()
        if not tap.armed:  # armed already when called through the bound verifier's generate()
            tap.arm()

    # -- the part of transformers' Cache protocol that the assisted loop uses ------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.fed - 1, 0)

    def crop(self, max_length: int) -> None:
        """Ignored: the session drops rejected draft positions itself at the next round."""

    # -- one round ---------------------------------------------------------------------------------
    def step(
        self, input_ids: torch.LongTensor, num_tokens: int, sampler: Sampler
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Draft `num_tokens` tokens after `input_ids` ([1, n]); returns (tokens [1, k], k scores [1, V])."""
        n = input_ids.shape[1]
        if self.prompt_length is None:
            self.prompt_length = n
        elif self.tokens is not None and not torch.equal(input_ids[:, : self.fed], self.tokens[:, : self.fed]):
            raise RuntimeError(
                "the draft session was handed a sequence that does not continue the previous round; "
                "start a new generate() call instead of reusing the draft's cache"
            )
        self.stats.draft_rounds += 1
        self.stats.verifier_forwards = self.tap.forwards
        self.stats.emitted_tokens = n - self.prompt_length
        round_start = time.perf_counter()  # a round: from one draft call to the next
        if self.policy is not None and self.last_round is not None:
            before, chain, seconds, started = self.last_round  # the sequence grew by what was kept, plus one
            self.policy.observe(Round.of(chain, started, seconds, emitted=n - before), round_start)
        stop_below: float | None = None
        stop_scale: tuple[float, ...] = ()
        if self.policy is not None:
            spec = self.policy.spec(num_tokens)
            num_tokens, stop_below, stop_scale = spec.depth, spec.stop_below, spec.stop_scale

        device = self.draft.device
        if self.draft.verifier_layer_ids():
            # the states before each new token: positions fed-1 .. n-2 (none before position 0)
            states = self.tap.features(max(self.fed - 1, 0), n - 1)
            if states is None:
                # Called before the verifier's prefill (transformers drafts first): no hidden states exist
                # yet. One placeholder token with a point-mass score keeps greedy and sampling exact.
                token = input_ids[:, -1]
                self.stats.drafted_tokens += 1
                self.tokens = torch.cat([input_ids, token[:, None]], dim=1)
                return token[:, None], [point_mass(token, self.draft.config.vocab_size)]
            pad = 1 if self.fed == 0 else 0
            features = [torch.nn.functional.pad(f, (0, 0, pad, 0)).to(device) for f in states]
        else:
            features = []
        sampler.begin_round([0], [input_ids[0]])
        chain, chain_seconds = feed_and_draft(
            self.draft,
            self.state,
            input_ids[:, self.fed :].to(device),
            self.fed,
            features,
            num_tokens,
            sampler,
            stop_below,
            timed=self.policy is not None,
            stop_scale=stop_scale,
        )
        self.last_round = (n, chain, chain_seconds, round_start)
        tokens, scores = chain.tokens, chain.scores
        assert scores is not None  # a chain keeps the scores it was picked from
        self.fed = n
        self.stats.drafted_tokens += tokens.shape[1]
        self.tokens = torch.cat([input_ids, tokens.to(input_ids.device)], dim=1)
        return tokens.to(input_ids.device), list(scores.unbind(dim=1))
