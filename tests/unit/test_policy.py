"""The adaptive drafting policy's decisions (`generation.policy`), from costs given here: each rule is checked
against numbers worked out by hand, and against inputs where a policy that ignored them would decide wrongly."""

from __future__ import annotations

import pytest
import torch
from conftest import make_verifier

import speculators_hf as sh
from speculators_hf.generation import policy
from speculators_hf.generation.policy import AdaptiveDrafting, DraftingCosts, Round, auto_depth
from speculators_hf.generation.tree import DraftTree

# a CPU-like verifier: each extra token of the pass costs 0.5 ms over a 10 ms one-token pass
CPU = {1: 0.010, 2: 0.0105, 4: 0.0115, 8: 0.0135, 16: 0.0175, 32: 0.0255, 64: 0.0415}
# a GPU-like one: 48 tokens cost what one does
GPU = {1: 0.010, 8: 0.010, 16: 0.0101, 32: 0.0102, 48: 0.0105, 64: 0.014}


def test_auto_settings_are_read_and_bad_ones_named():
    assert auto_depth("auto") == 0 and auto_depth("auto:12") == 12
    assert auto_depth("chain:5") is None and auto_depth(5) is None and auto_depth(None) is None
    for bad in ("auto:x", "auto:5:0.3", "auto:-1"):
        with pytest.raises(ValueError, match="'auto' or 'auto:<maximum draft length>'"):
            auto_depth(bad)


def test_the_chain_stops_where_one_more_token_costs_more_than_it_brings():
    """threshold = rate * (draft step + verification slope): 300 tok/s * (1 ms + 0.5 ms) = 0.45."""
    costs = DraftingCosts(dict(CPU), draft_step=0.001, emitted=3.0, round_seconds=0.010)
    assert costs.slope(10) == pytest.approx(0.0005)
    assert costs.rate == pytest.approx(300.0)
    spec = AdaptiveDrafting(costs, max_depth=10).spec()
    assert (spec.kind, spec.depth, spec.stop_below) == ("chain", 10, pytest.approx(0.45))
    # the draft twice as slow, or the rounds twice as productive: a higher bar for the next token
    assert AdaptiveDrafting(DraftingCosts(dict(CPU), 0.0025, 3.0, 0.010), 10).threshold() == pytest.approx(0.9)
    assert AdaptiveDrafting(DraftingCosts(dict(CPU), 0.001, 6.0, 0.010), 10).threshold() == pytest.approx(0.9)
    # a draft step that costs more than any token brings: never more than 0.99 (the chain still starts)
    assert AdaptiveDrafting(DraftingCosts(dict(CPU), 1.0, 3.0, 0.010), 10).threshold() == 0.99


def test_before_any_round_the_rate_is_decoding_alone_and_the_draft_step_a_tenth_of_a_pass():
    fresh = AdaptiveDrafting(DraftingCosts(dict(CPU)), max_depth=10)
    assert fresh.threshold() == pytest.approx((1 / 0.010) * (0.001 + 0.0005))


def test_the_verification_slope_is_a_fit_not_two_points():
    noisy = {1: 0.010, 2: 0.011, 4: 0.013, 6: 0.030, 8: 0.017, 11: 0.020}  # width 6 timed during a hiccup
    assert DraftingCosts(noisy).slope(10) < (0.030 - 0.010) / 5  # the hiccup does not set the slope
    assert DraftingCosts({1: 0.01, 4: 0.01}).slope(10) == 0.0  # flat: width is free
    assert DraftingCosts({1: 0.01}).slope(10) == 0.0


def test_observed_rounds_update_the_running_means():
    costs = DraftingCosts(dict(CPU), smoothing=0.5)
    policy_ = AdaptiveDrafting(costs, max_depth=8)
    policy_.observe(Round(started=1.0, steps=4, draft_seconds=0.004, emitted=4.0, expected=2.5), ended=1.02)
    assert (costs.draft_step, costs.emitted, costs.round_seconds) == pytest.approx((0.001, 4.0, 0.020))
    assert costs.calibration == pytest.approx(3.0 / 2.5)
    policy_.observe(Round(started=2.0, steps=0, draft_seconds=0.0005, emitted=2.0, expected=None), ended=2.012)
    assert costs.draft_step == pytest.approx(0.001)  # a one-token chain says nothing about the step
    assert (costs.emitted, costs.round_seconds) == pytest.approx((3.0, 0.016))
    assert costs.calibration == pytest.approx(3.0 / 2.5)  # a tree (no chain probabilities) leaves it


def test_an_overconfident_draft_must_be_surer_to_draft_on():
    """The threshold is divided by the accepted/expected ratio: a draft whose probabilities promised twice
    the tokens it got needs twice the probability to extend its chain (kept within [0.5, 2])."""
    calibrated = DraftingCosts(dict(CPU), 0.001, 3.0, 0.010, accepted=2.0, expected=2.0)
    overconfident = DraftingCosts(dict(CPU), 0.001, 3.0, 0.010, accepted=1.0, expected=2.0)
    wild = DraftingCosts(dict(CPU), 0.001, 3.0, 0.010, accepted=0.1, expected=2.0)
    assert AdaptiveDrafting(calibrated, 10).threshold() == pytest.approx(0.45)
    assert AdaptiveDrafting(overconfident, 10).threshold() == pytest.approx(0.9)
    assert AdaptiveDrafting(wild, 10).threshold() == pytest.approx(0.9)


def test_a_round_reads_what_its_chain_expected():
    tree = DraftTree(
        tokens=torch.zeros(2, 3, dtype=torch.long),
        parents=torch.tensor([[-1, 0, 1]] * 2),
        depths=torch.tensor([[1, 2, 3]] * 2),
        max_depth=3,
        confidence=torch.tensor([[0.9, 0.45, 0.2], [0.5, 0.25, 0.05]]),
    )
    done = Round.of(tree, started=0.0, draft_seconds=0.002, emitted=2.5)
    assert (done.steps, done.expected) == (2, pytest.approx((1.55 + 0.8) / 2))


def test_wide_trees_where_width_is_nearly_free_and_chains_where_it_is_not():
    gpu = AdaptiveDrafting(DraftingCosts(dict(GPU)), max_depth=8).spec()
    assert gpu.kind == "dynamic" and gpu.num_nodes == 47  # the widest pass within 1.25 one-token passes, less the root
    assert AdaptiveDrafting(DraftingCosts(dict(CPU)), max_depth=8).spec().kind == "chain"
    assert AdaptiveDrafting(DraftingCosts(dict(GPU)), max_depth=8, trees=False).spec().kind == "chain"
    assert AdaptiveDrafting(DraftingCosts(dict(GPU)), max_depth=8).spec(max_depth=1).kind == "chain"
    assert AdaptiveDrafting(DraftingCosts(dict(GPU)), max_depth=8).spec(max_depth=3).depth == 3  # the room left


def test_costs_are_measured_once_per_verifier_and_learned_per_draft(monkeypatch):
    calls = []

    def fake_measure(verifier, widths, context=128, samples=30, batch_size=1):
        calls.append(batch_size)
        return dict(CPU)

    monkeypatch.setattr(policy, "verification_seconds", fake_measure)
    verifier = make_verifier()
    first = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    second = sh.MedusaSpeculator.from_verifier(verifier, medusa_num_heads=3)
    a = policy.drafting_costs(verifier, first)
    assert policy.drafting_costs(verifier, first) is a and calls == [1]
    b = policy.drafting_costs(verifier, second)
    assert b is not a and b.verify is a.verify and calls == [1]  # the verifier's pass: measured once
    assert policy.drafting_costs(verifier, first, loop="transformers") is not a  # rounds of another loop
    policy.drafting_costs(verifier, first, batch_size=4)
    assert calls == [1, 4]
    # the maximum depth: twice speculative_tokens (at least 8), cut to what the draft can predict
    assert policy.adaptive_drafting(verifier, first).max_depth == max(2 * first.config.speculative_tokens, 8)
    assert policy.adaptive_drafting(verifier, second).max_depth == 3
    assert policy.adaptive_drafting(verifier, first, max_depth=4).max_depth == 4


def test_measured_verification_seconds_grow_with_width():
    verifier = make_verifier()
    seconds = policy.verification_seconds(verifier, [1, 64], context=16, samples=3)
    assert set(seconds) == {1, 64} and all(t > 0 for t in seconds.values())
    batched = policy.verification_seconds(verifier, [2], context=16, samples=2, batch_size=3)
    assert set(batched) == {1, 2}
    with torch.inference_mode():  # usable inside a caller's inference mode too
        policy.verification_seconds(verifier, [2], context=8, samples=1)
