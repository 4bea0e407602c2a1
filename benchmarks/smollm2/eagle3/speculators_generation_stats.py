# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.stats. Do not edit.
"""Acceptance statistics of one generate() call with a draft."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    """Counts of one generation with a draft.

    tau (mean acceptance length) is the number of tokens emitted per verifier forward pass, the bonus
    token included, as the EAGLE papers count it: plain decoding has tau = 1, a chain of k draft tokens
    at most k + 1. The verifier's prefill pass counts as a forward pass.
    """

    verifier_forwards: int = 0
    draft_rounds: int = 0
    drafted_tokens: int = 0
    emitted_tokens: int = 0

    @property
    def accepted_tokens(self) -> int:
        """Tokens that came from the draft (every verifier pass adds one token of its own)."""
        return max(self.emitted_tokens - self.verifier_forwards, 0)

    @property
    def tau(self) -> float:
        return self.emitted_tokens / self.verifier_forwards if self.verifier_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens that were accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "accepted_tokens": self.accepted_tokens,
            "tau": self.tau,
            "acceptance_rate": self.acceptance_rate,
        }

    def __add__(self, other: GenerationStats) -> GenerationStats:
        return GenerationStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def __str__(self) -> str:
        return (
            f"tau={self.tau:.2f} ({self.emitted_tokens} tokens / {self.verifier_forwards} verifier passes), "
            f"accepted {self.accepted_tokens}/{self.drafted_tokens} drafted"
        )
