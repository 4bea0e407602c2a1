"""Adaptive drafting ("auto"): how much to draft each round, from what drafting and verifying cost on this
device and how well the draft is doing in this generation.

A round that drafts n tokens costs n draft steps plus one verifier pass over n + 1 tokens, and emits the
accepted tokens plus one of the verifier's own. Drafting one more token adds the draft step c and the
verification slope s (the verifier's pass is one token wider), and adds to the expected emitted tokens the
chance that every token up to the new one is accepted: the draft's probability of the whole chain so far,
times k, the tokens accepted per token those probabilities predicted (`DraftingCosts.calibration`,
learned; below 1 for an overconfident draft). With the rounds emitting R tokens per second, the extra
token raises the rate exactly when

    k * p(chain) > R * (c + s)

(a round's fixed costs, the rest of the verifier's pass and the loop's own work, are in R but do not grow
with the draft). So the chain is drafted up to a maximum depth and stopped at the first depth where the
draft's probability of it falls below R * (c + s) / k: EAGLE-2's observation that the draft's confidence
predicts acceptance, turned into a stopping rule with the machine's costs in it. The rule reads only the
draft's probabilities, the costs and the acceptance counts of past rounds: which tokens are emitted, and
their distribution when sampling, stay exactly the verifier's.

The costs: the verifier's pass over each width is measured once per (verifier, device, dtype, batch size)
and cached for the process (`drafting_costs`); c, R and k are learned from the rounds as generation goes
and kept for the next generation. Where a wide verifier pass costs about what a narrow one does (a GPU), the
own loop verifies an EAGLE-2 dynamic tree as wide as stays nearly free instead of a chain (transformers'
assisted loop takes chains only).
"""

from __future__ import annotations

import itertools
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .tree import DraftTree, TreeSpec

# Widths at which the verifier's pass is timed; between them the cost is interpolated linearly.
CALIBRATION_WIDTHS = (1, 2, 3, 4, 6, 8, 11, 16, 24, 32, 48, 64)
# A verifier pass this much dearer than a one-token pass still counts as "nearly free" (wide trees).
FREE_WIDTH_COST = 1.25


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def interpolate(costs: dict[int, float], width: float) -> float:
    """The verifier's cost of a pass over `width` tokens (possibly fractional: the mean width of a run's
    rounds), linear between the measured widths, constant beyond them."""
    points = sorted((int(n), float(c)) for n, c in costs.items())
    if width <= points[0][0]:
        return points[0][1]
    for (n0, c0), (n1, c1) in itertools.pairwise(points):
        if width <= n1:
            return c0 + (c1 - c0) * (width - n0) / (n1 - n0)
    return points[-1][1]


@torch.inference_mode()
def verification_seconds(
    verifier: Any, widths: Any, context: int = 128, samples: int = 30, batch_size: int = 1
) -> dict[int, float]:
    """The median seconds of a verifier pass over n new tokens after `context` cached ones, for each n in
    `widths` (and 1), as the package's loop runs it: explicit positions, a 4D mask, a `MaskedCache`."""
    from .kvcache import MaskedCache, cache_kwargs, causal_block

    vocab = verifier.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    cache = MaskedCache(batch_size, verifier.device)
    ids = torch.randint(vocab, (batch_size, context), generator=generator).to(verifier.device)
    valid = torch.ones_like(ids, dtype=torch.bool)

    def forward(block: torch.Tensor, start: int) -> None:
        width = block.shape[1]
        verifier(
            input_ids=block,
            position_ids=torch.arange(start, start + width, device=block.device)[None].expand(batch_size, width),
            attention_mask=cache.mask(causal_block(torch.ones_like(block, dtype=torch.bool)), verifier.dtype),
            **cache_kwargs(cache.cache),
            use_cache=True,
        )

    forward(ids, 0)
    cache.commit(valid)
    seconds = {}
    for n in sorted({1, *widths}):
        block = torch.randint(vocab, (batch_size, n), generator=generator).to(verifier.device)
        times = []
        for i in range(samples + 3):  # 3 warm-up passes
            sync(verifier.device)
            start = time.perf_counter()
            forward(block, context)
            sync(verifier.device)
            cache.truncate()
            if i >= 3:
                times.append(time.perf_counter() - start)
        seconds[n] = statistics.median(times)
    return seconds


def verification_costs(verifier: Any, widths: list[int], context: int = 128, samples: int = 30) -> dict[int, float]:
    """What verifying n tokens at once costs, in passes over one token (`verification_seconds` divided by
    the one-token pass). This is what decides between chains and trees on a machine: a tree pays when its
    extra tau outweighs the extra cost of its width."""
    seconds = verification_seconds(verifier, widths, context, samples)
    return {n: t / seconds[1] for n, t in seconds.items()}


@dataclass(frozen=True)
class Round:
    """What one round did, for the policy to learn from once it is over."""

    started: float  # time.perf_counter() when the draft began
    steps: int  # draft forward steps after the root (a chain's tokens less one)
    draft_seconds: float  # their time
    emitted: float  # tokens emitted: the accepted draft tokens plus the verifier's own (per row, on average)
    expected: float | None  # the accepted tokens the draft expected: the sum of its chain probabilities; None: a tree

    @classmethod
    def of(cls, tree: DraftTree, started: float, draft_seconds: float, emitted: float) -> Round:
        expected = None if tree.confidence is None else tree.confidence.sum(1).mean().item()
        return cls(started, tree.max_depth - 1, draft_seconds, emitted, expected)


@dataclass
class DraftingCosts:
    """What rounds cost and bring for one draft with one verifier on one device, in seconds: `verify` maps
    a width to the seconds of a verifier pass over that many tokens (measured once, shared by the drafts of
    that verifier). Learned as generation goes, and kept for the next generation: `draft_step` (seconds
    per draft step) and the running means of tokens emitted per round, of a round's wall time, and of the
    draft tokens accepted and expected per round (how well calibrated the draft's probabilities are)."""

    verify: dict[int, float]
    draft_step: float | None = None
    emitted: float | None = None
    round_seconds: float | None = None
    accepted: float | None = None
    expected: float | None = None
    smoothing: float = 0.05  # weight of the newest round in the running means

    def verify_seconds(self, width: float) -> float:
        return interpolate(self.verify, width)

    def slope(self, max_depth: int) -> float:
        """Extra seconds of the verifier's pass per token: the least-squares slope over the measured widths
        up to max_depth + 1 (robust to one noisy width)."""
        points = [(n, t) for n, t in self.verify.items() if n <= max_depth + 1] or list(self.verify.items())
        mean_n = sum(n for n, _ in points) / len(points)
        mean_t = sum(t for _, t in points) / len(points)
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        return max(sum((n - mean_n) * (t - mean_t) for n, t in points) / spread, 0.0) if spread else 0.0

    def free_width(self) -> int:
        """The widest measured pass costing at most `FREE_WIDTH_COST` one-token passes."""
        base = self.verify_seconds(1)
        return max(n for n, t in self.verify.items() if t <= FREE_WIDTH_COST * base or n == 1)

    @property
    def rate(self) -> float:
        """Tokens per second the rounds are emitting (before any round: decoding alone, one per pass)."""
        if self.emitted is None or self.round_seconds is None:
            return 1.0 / self.verify_seconds(1)
        return self.emitted / self.round_seconds

    @property
    def calibration(self) -> float:
        """Draft tokens accepted per token the draft's own probabilities expected (1: calibrated, below 1:
        overconfident), kept within [0.5, 2]; 1 before any chain was observed."""
        if not self.accepted or not self.expected:
            return 1.0
        return min(max(self.accepted / self.expected, 0.5), 2.0)

    def observe(self, done: Round, seconds: float) -> None:
        """A round that took `seconds` in all."""

        def mean(old: float | None, new: float) -> float:
            return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

        if done.steps > 0:
            self.draft_step = mean(self.draft_step, done.draft_seconds / done.steps)
        self.emitted = mean(self.emitted, done.emitted)
        self.round_seconds = mean(self.round_seconds, seconds)
        if done.expected is not None:
            self.accepted = mean(self.accepted, done.emitted - 1)
            self.expected = mean(self.expected, done.expected)


_VERIFY: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, int], dict[int, float]]] = weakref.WeakKeyDictionary()
_LEARNED: weakref.WeakKeyDictionary[Any, dict[tuple[int, str, str, int, str], DraftingCosts]] = (
    weakref.WeakKeyDictionary()
)


def drafting_costs(verifier: Any, draft: Any, batch_size: int = 1, loop: str = "own") -> DraftingCosts:
    """The costs of `draft` with `verifier` on its device and dtype at `batch_size` in `loop` ("own" or
    "transformers": their rounds' overheads differ). The verifier's pass by width is measured on first use
    (13 passes at each of 12 widths: 1.6 s for the zoo's verifier on this project's CPU, a few seconds for
    a 7B model on a GPU) and cached for the process, as is what each draft learns."""
    key = (str(verifier.device), str(verifier.dtype), batch_size)
    measured = _VERIFY.setdefault(verifier, {})
    if key not in measured:
        measured[key] = verification_seconds(verifier, CALIBRATION_WIDTHS, samples=10, batch_size=batch_size)
    learned = _LEARNED.setdefault(draft, {})
    return learned.setdefault((id(verifier), *key, loop), DraftingCosts(measured[key]))


def auto_depth(value: Any) -> int | None:
    """The maximum depth of an "auto" or "auto:D" setting (0: the policy's default), None when `value` is
    not one."""
    if not isinstance(value, str) or value.split(":")[0] != "auto":
        return None
    _, *rest = value.split(":")
    try:
        depth = int(rest[0]) if rest else 0
    except ValueError:
        depth = -1
    if len(rest) > 1 or depth < 0:
        raise ValueError(f"cannot read {value!r}: use 'auto' or 'auto:<maximum draft length>', e.g. 'auto:10'")
    return depth


@dataclass
class AdaptiveDrafting:
    """One generation's policy: `spec()` before each round, `observe()` after it."""

    costs: DraftingCosts
    max_depth: int = 10
    trees: bool = True  # may verify a dynamic tree where width is nearly free (the own loop)
    timed = True  # the loop times the draft for `observe`

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise ValueError(f"the maximum draft length must be >= 1, got {self.max_depth}")

    def threshold(self) -> float:
        """The draft probability of the chain below which one more draft token costs more than it brings."""
        costs = self.costs
        step = costs.draft_step if costs.draft_step is not None else 0.1 * costs.verify_seconds(1)
        return min(costs.rate * (step + costs.slope(self.max_depth)) / costs.calibration, 0.99)

    def spec(self, max_depth: int | None = None) -> TreeSpec:
        """The tree of the next round, at most `max_depth` deep (a draft's limit, or the room left)."""
        depth = min(self.max_depth, max_depth or self.max_depth)
        width = self.costs.free_width() - 1
        if self.trees and depth > 1 and width >= 4 * depth:  # wide passes nearly free: verify a tree
            top_k = min(8, width // depth)
            return TreeSpec.dynamic(depth, top_k=top_k, total_tokens=width)
        return TreeSpec.chain(depth, stop_below=self.threshold())

    def observe(self, done: Round, ended: float) -> None:
        """After round `done`, which ended (the next round's draft began) at `ended` (time.perf_counter())."""
        self.costs.observe(done, ended - done.started)


@dataclass
class FixedDrafting:
    """The same tree every round (the interface of `AdaptiveDrafting`, with nothing to learn)."""

    tree: TreeSpec
    timed = False  # whether the loop should time the draft for `observe`

    def spec(self, max_depth: int | None = None) -> TreeSpec:
        return self.tree.clamped(max_depth)

    def observe(self, done: Round, ended: float) -> None:
        pass


def adaptive_drafting(
    verifier: Any, draft: Any, max_depth: int = 0, batch_size: int = 1, trees: bool = True
) -> AdaptiveDrafting:
    """The policy for one generation with `draft` for `verifier`. `max_depth` 0: twice the draft's
    `speculative_tokens`, at least 8; always cut to what the draft can predict (`max_tree_depth`).
    `trees` False: chains only (transformers' assisted loop)."""
    depth = max_depth or max(2 * int(draft.config.speculative_tokens or 5), 8)
    limit = draft.max_tree_depth()
    depth = depth if limit is None else min(depth, limit)
    costs = drafting_costs(verifier, draft, batch_size, loop="own" if trees else "transformers")
    trees = trees and not getattr(draft, "drafts_in_parallel", False)  # parallel drafters draft chains only
    return AdaptiveDrafting(costs, max_depth=depth, trees=trees)


def drafting_for(verifier: Any, draft: Any, tree: Any, batch_size: int = 1) -> FixedDrafting | AdaptiveDrafting:
    """What decides each round's draft in the own loop: for "auto[:max_depth]" (or None with the draft's
    `config.adaptive_drafting`) an `adaptive_drafting`, for anything else a `FixedDrafting` of
    `TreeSpec.parse(tree)`."""
    max_depth = auto_depth("auto" if tree is None and draft.config.adaptive_drafting else tree)
    if max_depth is None:
        return FixedDrafting(TreeSpec.parse(tree, default_depth=int(draft.config.speculative_tokens or 5)))
    return adaptive_drafting(verifier, draft, max_depth, batch_size)
