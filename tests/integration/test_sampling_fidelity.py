"""Sampling with a draft follows the verifier's distribution, under temperature, top-k, top-p and min-p, on
transformers' assisted path and on the package's own loop (chains drawn from the draft's q, and trees of
deterministic siblings) — and each test can fail: every check is also run against a deliberately wrong
implementation (a mutant) that it must reject.

Two kinds of check:
- KS test of randomised PIT values of every sampled token under the verifier's exact conditionals, which are
  i.i.d. Uniform(0, 1) when the output follows the verifier (false-alarm rate 1e-3);
- an exact distribution check: a verifier with an 8-token vocabulary, two new tokens, all 64 continuations
  enumerated, chi-square of the observed counts against their exact probabilities.
The reference distributions are built with transformers' own warpers in the test (`conftest.reference_probs`),
never with the code under test.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from conftest import (
    chi_square,
    ks_critical_value,
    ks_uniform_statistic,
    make_prompts,
    make_verifier,
    reference_probs,
    sampling_pit_values,
)
from test_batch import perturbed_copy

import speculators_hf as sh
import speculators_hf.generation.acceptance as acceptance
import speculators_hf.generation.loop as loop
import speculators_hf.generation.sampling as sampling

CASES = {
    "T=0.7": {"temperature": 0.7, "top_k": 0},
    "T=1.3": {"temperature": 1.3, "top_k": 0},
    "top_k=5": {"temperature": 1.0, "top_k": 5},
    "top_p=0.8": {"temperature": 0.9, "top_k": 0, "top_p": 0.8},
    "min_p=0.1": {"temperature": 1.0, "top_k": 0, "min_p": 0.1},
}
PATHS = ("assisted", "own chain", "own tree")
NEW_TOKENS = 12
N_SEQUENCES = {"assisted": 200, "own chain": 300, "own tree": 300}  # 2400-3600 PIT values per check


def _verifier_and_draft(noise: float):
    verifier = make_verifier(pad_token_id=None, eos_token_id=None)  # no early stop: every row has NEW_TOKENS tokens
    with torch.no_grad():  # flatter conditionals than a peaked random model: sampling settings matter more
        verifier.lm_head.weight.mul_(0.5)
    return verifier, perturbed_copy(verifier, noise=noise)


def _sample(verifier, draft, prompt, path: str, n: int, new_tokens: int, seed: int, **case) -> list[torch.Tensor]:
    """`n` sampled continuations of `prompt` ([1, L] each) along `path`."""
    if path == "assisted":
        out = []
        for i in range(n):
            torch.manual_seed(seed + i)
            out.append(
                verifier.generate(prompt, max_new_tokens=new_tokens, do_sample=True, assistant_model=draft, **case)
            )
        return out
    tree = "chain:3" if path == "own chain" else "dynamic:3:2:6"
    rows = []
    for start in range(0, n, 50):
        torch.manual_seed(seed + start)
        batch = prompt.expand(min(50, n - start), -1)
        out = sh.generate(verifier, draft, batch, tree=tree, max_new_tokens=new_tokens, do_sample=True, **case)
        rows += [row[None] for row in out]
    return rows


def _ks(verifier, draft, path: str, case: dict, seed: int = 0) -> tuple[float, float]:
    prompt = make_prompts(1, seed=3)[0]
    sequences = _sample(verifier, draft, prompt, path, N_SEQUENCES[path], NEW_TOKENS, seed, **case)
    warp = {k: v for k, v in case.items() if k != "temperature"}
    values = sampling_pit_values(verifier, sequences, prompt.shape[1], case["temperature"], **warp)
    return ks_uniform_statistic(values), ks_critical_value(len(values), 1e-3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_sampled_tokens_follow_the_verifier(case, path):
    # transformers' loop is slow when rounds are short: there the draft is one that is accepted often
    verifier, draft = _verifier_and_draft(noise=0.02 if path == "assisted" else 0.1)
    stat, crit = _ks(verifier, draft, path, CASES[case])
    assert stat < crit, f"{path}, {case}: KS {stat:.4f} >= {crit:.4f}"


# ------------------------------------------------------------------------------------------------
# mutants: each is a plausible bug; the same checks must reject it
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _temperature_inverted():
    """The own loop applies 1/T instead of T."""
    original = loop.prepare_config

    def wrong(*args, **kwargs):
        config, *rest = original(*args, **kwargs)
        config.temperature = 1.0 / config.temperature
        return (config, *rest)

    loop.prepare_config = wrong
    try:
        yield
    finally:
        loop.prepare_config = original


@contextlib.contextmanager
def _draws_at_another_temperature():
    """The draft draws its token at T=0.7 but reports its q at the verifier's temperature."""
    original = sampling.choose

    def wrong(scores, do_sample, generator=None):
        return original(scores / 0.7, do_sample, generator) if do_sample else original(scores, do_sample, generator)

    sampling.choose = wrong
    try:
        yield
    finally:
        sampling.choose = original


@contextlib.contextmanager
def _residual_from_p():
    """After a rejection the next candidate is tested against p instead of norm(max(p - q, 0)) (or, for a
    deterministic sibling, against p still holding the rejected token)."""
    original = acceptance.rejection_residual
    acceptance.rejection_residual = lambda p, q, x: p
    try:
        yield
    finally:
        acceptance.rejection_residual = original


MUTANTS = [
    ("own chain", _temperature_inverted, "T=0.7", 0.1),
    ("own tree", _temperature_inverted, "T=1.3", 0.1),
    ("assisted", _draws_at_another_temperature, "T=1.3", 0.01),  # a draft that is accepted often
    ("own chain", _residual_from_p, "T=1.3", 0.6),
]


@pytest.mark.parametrize(("path", "mutant", "case", "noise"), MUTANTS, ids=[f"{m[1].__name__}-{m[0]}" for m in MUTANTS])
def test_ks_check_rejects_a_wrong_sampler(path, mutant, case, noise):
    verifier, draft = _verifier_and_draft(noise=noise)
    with mutant():
        stat, crit = _ks(verifier, draft, path, CASES[case])
    assert stat > crit, f"the check missed {mutant.__name__} on the {path}: KS {stat:.4f} <= {crit:.4f}"


# ------------------------------------------------------------------------------------------------
# exact distribution on an enumerable vocabulary
# ------------------------------------------------------------------------------------------------
TINY_VOCAB, EXACT_DRAWS = 8, 3000
EXACT_CASE = {"temperature": 0.8, "top_k": 6}


def _exact_setup(noise: float = 0.3):
    verifier = make_verifier(vocab_size=TINY_VOCAB, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    verifier.generation_config.pad_token_id = -1
    with torch.no_grad():  # flatter conditionals, so that many of the 64 continuations are likely
        verifier.lm_head.weight.mul_(0.3)
    draft = perturbed_copy(verifier, noise=noise)
    prompt = torch.tensor([[3, 5, 4, 6]])
    # P(x1, x2) = p(x1 | prompt) p(x2 | prompt, x1), under the sampling settings
    with torch.no_grad():
        first = reference_probs(verifier(prompt).logits[:, -1], **EXACT_CASE)[0]
        both = torch.cat([prompt.expand(TINY_VOCAB, -1), torch.arange(TINY_VOCAB)[:, None]], dim=1)
        second = reference_probs(verifier(both).logits[:, -1], **EXACT_CASE)
    joint = (first[:, None] * second).reshape(-1)
    return verifier, draft, prompt, joint


def _exact_chi_square(path: str, draws: int, noise: float = 0.3) -> tuple[float, float]:
    verifier, draft, prompt, joint = _exact_setup(noise)
    sequences = _sample(verifier, draft, prompt, path, draws, 2, seed=7, **EXACT_CASE)
    new = torch.cat(sequences)[:, prompt.shape[1] :]
    counts = torch.bincount(new[:, 0] * TINY_VOCAB + new[:, 1], minlength=TINY_VOCAB**2)
    return chi_square(counts, joint)


@pytest.mark.parametrize(("path", "draws"), [("own chain", EXACT_DRAWS), ("own tree", EXACT_DRAWS), ("assisted", 1500)])
def test_exact_distribution_of_two_tokens(path, draws):
    stat, crit = _exact_chi_square(path, draws)
    assert stat < crit, f"{path}: chi-square {stat:.1f} >= {crit:.1f}"


@pytest.mark.parametrize(
    ("path", "mutant"),
    [("own chain", _temperature_inverted), ("own chain", _residual_from_p), ("own tree", _residual_from_p)],
)
def test_exact_check_rejects_a_wrong_sampler(path, mutant):
    with mutant():
        stat, crit = _exact_chi_square(path, EXACT_DRAWS)
    assert stat > crit, f"the exact check missed {mutant.__name__} on the {path}: {stat:.1f} <= {crit:.1f}"


def test_all_continuations_are_enumerated():
    *_, joint = _exact_setup()
    assert joint.shape == (TINY_VOCAB**2,) and abs(joint.sum().item() - 1) < 1e-5
    assert sum(1 for p in joint.tolist() if p * EXACT_DRAWS >= 5) >= 20  # enough cells for the test to mean much
    assert len(list(itertools.product(range(TINY_VOCAB), repeat=2))) == joint.numel()
