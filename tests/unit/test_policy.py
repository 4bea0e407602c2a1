"""The adaptive drafting policy's decisions (`generation.policy`), from costs given here: each rule is checked
against numbers worked out by hand, and against inputs where a policy that ignored them would decide wrongly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_verifier, verifier_features

import speculators_hf as sh
from speculators_hf.generation import policy
from speculators_hf.generation.policy import AdaptiveDrafting, DraftingCosts, Round, auto_depth
from speculators_hf.generation.sampling import Sampler
from speculators_hf.generation.session import feed_and_draft
from speculators_hf.generation.tree import DraftTree

# a CPU-like verifier: each extra token of the pass costs 0.5 ms over a 10 ms one-token pass
CPU = {1: 0.010, 2: 0.0105, 4: 0.0115, 8: 0.0135, 16: 0.0175, 32: 0.0255, 64: 0.0415}
# a GPU-like one: 48 tokens cost what one does
GPU = {1: 0.010, 8: 0.010, 16: 0.0101, 32: 0.0102, 48: 0.0105, 64: 0.014}


def test_auto_settings_are_read_and_bad_ones_named():
    assert auto_depth("auto") == 0 and auto_depth("auto:12") == 12
    assert auto_depth("chain:5") is None and auto_depth(5) is None and auto_depth(None) is None
    for bad in ("auto:x", "auto:5:0.3", "auto:-1", "auto:0", "auto:", "auto: 3", "auto:+3"):
        with pytest.raises(ValueError, match=r"tree='.*': use 'auto' or 'auto:<maximum draft length>'"):
            auto_depth(bad, "tree")


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
    convex = {1: 0.010, 2: 0.0101, 3: 0.0102, 4: 0.0103, 6: 0.0105, 8: 0.0125, 11: 0.0155, 16: 0.0205}
    flat, steep = DraftingCosts(convex).slope(10, width=3), DraftingCosts(convex).slope(10, width=11)
    assert flat == pytest.approx(0.0001) and steep > 0.0009 and flat < DraftingCosts(convex).slope(10) < steep


def test_each_depth_stops_at_its_own_cost_and_calibration():
    """A flat-then-steep pass: a shallow chain's next token costs little (a low bar), a deep one's much; and a
    depth where the draft was overconfident needs a surer draft. Depths are folded into `stop_scale`."""
    convex = {1: 0.010, 2: 0.0101, 3: 0.0102, 4: 0.0103, 6: 0.0105, 8: 0.0125, 11: 0.0155, 16: 0.0205}
    costs = DraftingCosts(convex, 0.001, 3.0, 0.010, accepted=[0.9, 0.4], expected=[0.9, 0.8])
    policy_ = AdaptiveDrafting(costs, max_depth=8)
    spec = policy_.spec()
    assert spec.stop_below == pytest.approx(policy_.threshold())
    effective = [spec.stop_below / scale for scale in spec.stop_scale]  # the probability each depth must reach
    expected = [policy_.threshold(d) / k for d, k in zip(range(1, 9), (1.0,) + (0.5,) * 7)]
    assert effective == pytest.approx(expected)
    assert effective[0] < effective[2] < effective[7]  # cheaper shallow, dearer deep (and overconfident from 2)


def test_observed_rounds_update_the_running_means():
    costs = DraftingCosts(dict(CPU), smoothing=0.5)
    policy_ = AdaptiveDrafting(costs, max_depth=8)
    chain = Round(started=1.0, steps=4, draft_seconds=0.004, emitted=4.0, expected=[0.9, 0.6], accepted=[1.0, 0.3])
    policy_.observe(chain, ended=1.02)
    assert (costs.draft_step, costs.emitted, costs.round_seconds) == pytest.approx((0.001, 4.0, 0.020))
    assert costs.calibration() == pytest.approx((1.0 / 0.9, 0.5))
    policy_.observe(Round(started=2.0, steps=0, draft_seconds=0.0005, emitted=2.0), ended=2.012)
    assert costs.draft_step == pytest.approx(0.001)  # a one-token chain says nothing about the step
    assert (costs.emitted, costs.round_seconds) == pytest.approx((3.0, 0.016))
    assert costs.calibration() == pytest.approx((1.0 / 0.9, 0.5))  # a tree (no chain probabilities) leaves it
    deeper = Round(started=3.0, steps=2, draft_seconds=0.002, emitted=2.0, expected=[0.7, 0.4, 0.2], accepted=[1, 0, 0])
    policy_.observe(deeper, ended=3.02)  # depth 3 seen for the first time: taken as it is
    assert costs.calibration() == pytest.approx((1.0 / 0.8, 0.15 / 0.5, 0.25))  # 0 / 0.2, kept at 0.25 at least
    assert costs.calibration(5) == pytest.approx((1.0 / 0.8, 0.3, 0.25, 0.25, 0.25))  # deeper: the deepest seen
    assert DraftingCosts(dict(CPU)).calibration(5) == ()  # nothing seen: the draft's probabilities as they are


def test_an_overconfident_depth_must_be_surer_to_draft_on():
    """The chain's probability is scaled per depth by the accepted/expected ratio there: a depth whose
    probabilities promised twice the acceptance it got needs twice the probability to extend the chain."""
    costs = DraftingCosts(dict(CPU), 0.001, 3.0, 0.010, accepted=[0.9, 0.4], expected=[0.9, 0.8])
    spec = AdaptiveDrafting(costs, 10).spec()
    assert spec.stop_below == pytest.approx(0.45) and spec.stop_scale == pytest.approx((1.0,) + (0.5,) * 9)


def test_a_chain_stops_on_its_calibrated_probability():
    """`stop_scale` moves the stop: the same draft probabilities stop a chain sooner at an overconfident depth."""
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    prompt = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    states = verifier_features(verifier, prompt[:, :-1], draft.verifier_layer_ids())
    features = [torch.nn.functional.pad(f, (0, 0, 1, 0)) for f in states]

    def chain(**stop):
        sampler = Sampler(do_sample=False)
        sampler.begin_round([0], [prompt[0]])
        with torch.no_grad():
            return feed_and_draft(draft, draft.new_tree_state(1), prompt, 0, features, 6, sampler, **stop)[0]

    p = chain(stop_below=0.0).confidence[0].tolist()
    threshold = (p[2] + p[3]) / 2  # between the third and the fourth token's chain probability
    assert chain(stop_below=threshold).size == 4
    for scale in [(1.0, 1.0, 0.5), (2.0,), (1.0, 1.0, 1.0, 0.1)]:  # depths past the scale's end take its last
        scaled = [q * scale[min(d, len(scale) - 1)] for d, q in enumerate(p)]
        stop = next((d + 1 for d, q in enumerate(scaled) if q < threshold), 6)
        assert chain(stop_below=threshold, stop_scale=scale).size == stop, scale
    assert chain(stop_below=threshold, stop_scale=(1.0, 1.0, 0.5)).size == 3  # the third depth now falls below


def test_a_round_reads_what_its_chain_expected_and_each_row_accepted():
    tree = DraftTree(
        tokens=torch.zeros(2, 3, dtype=torch.long),
        parents=torch.tensor([[-1, 0, 1]] * 2),
        depths=torch.tensor([[1, 2, 3]] * 2),
        max_depth=3,
        confidence=torch.tensor([[0.9, 0.45, 0.2], [0.5, 0.25, 0.05]]),
    )
    done = Round.of(tree, started=0.0, draft_seconds=0.002, emitted=torch.tensor([3, 1]))  # accepted 2 and 0
    assert (done.steps, done.emitted) == (2, 2.0)
    assert done.expected == pytest.approx([0.7, 0.35, 0.125]) and done.accepted == pytest.approx([0.5, 0.5, 0.0])
    assert Round.of(tree, 0.0, 0.002, emitted=4.0).accepted == [1.0, 1.0, 1.0]  # a mean: taken as every row's


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


# -- the calibration on disk -------------------------------------------------------------------------------------
class Measure:
    """Stands in for `verification_seconds`, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, verifier, widths, context=128, samples=30, batch_size=1):
        self.calls += 1
        return {n: 0.01 + 0.0005 * n for n in widths}


def saved_files(tmp_path):
    return sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_the_calibration_is_saved_and_a_new_process_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv(policy.CALIBRATION_DIR_ENV, str(tmp_path))
    measure = Measure()
    monkeypatch.setattr(policy, "verification_seconds", measure)
    seconds = policy.verifier_calibration(make_verifier())
    assert measure.calls == 1 and set(seconds) == set(policy.CALIBRATION_WIDTHS)
    [path] = saved_files(tmp_path)
    saved = json.loads(path.read_text())
    assert saved["key"]["batch_size"] == 1 and saved["seconds"] == {str(n): t for n, t in seconds.items()}
    # a new process: nothing cached in memory, a new verifier object of the same model
    monkeypatch.setattr(policy, "_VERIFY", type(policy._VERIFY)())
    assert policy.verifier_calibration(make_verifier(seed=1)) == seconds and measure.calls == 1
    # another batch size, dtype or model is another calibration
    policy.verifier_calibration(make_verifier(), batch_size=2)
    policy.verifier_calibration(make_verifier(num_hidden_layers=2))
    assert measure.calls == 3 and len(saved_files(tmp_path)) == 3


def test_linears_on_other_kernels_are_calibrated_again(tmp_path, monkeypatch):
    """A verifier whose linears were prepacked for oneDNN (or patched otherwise) after a calibration, in the same
    process or the next, runs its passes at other costs: its calibration is measured again, as is the stock
    one's after `restore()`."""
    from speculators_hf.cpu_kernels import prepack_linears

    monkeypatch.setenv(policy.CALIBRATION_DIR_ENV, str(tmp_path))
    measure = Measure()
    monkeypatch.setattr(policy, "verification_seconds", measure)
    verifier = make_verifier()
    policy.verifier_calibration(verifier)
    packed = prepack_linears(verifier, min_elements=0)
    assert policy.linear_kernels(verifier) == f"_PackedForward x{packed.count}"
    policy.verifier_calibration(verifier)
    assert measure.calls == 2 and len(saved_files(tmp_path)) == 2
    packed.restore()
    assert policy.linear_kernels(verifier) == "stock"
    policy.verifier_calibration(verifier)
    assert measure.calls == 2


def test_the_calibration_directory_defaults_to_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv(policy.CALIBRATION_DIR_ENV)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert policy.calibration_dir() == tmp_path / "speculators_hf" / "calibration"


def _corrupt(path, good: dict) -> dict:
    """Damaged or hostile versions of a good calibration file, by what is wrong with them."""
    other_key = {**good["key"], "batch_size": 8}
    seconds = good["seconds"]
    return {
        "not json": b"\x00\xffgarbage",
        "a list": json.dumps([1, 2]).encode(),
        "another format": json.dumps({**good, "format": 2}).encode(),
        "another key": json.dumps({**good, "key": other_key}).encode(),
        "a width missing": json.dumps({**good, "seconds": {k: v for k, v in seconds.items() if k != "64"}}).encode(),
        "an extra width": json.dumps({**good, "seconds": {**seconds, "5": 0.01}}).encode(),
        "a negative time": json.dumps({**good, "seconds": {**seconds, "1": -0.01}}).encode(),
        "a zero time": json.dumps({**good, "seconds": {**seconds, "1": 0}}).encode(),
        "NaN": json.dumps({**good, "seconds": {**seconds, "1": math.nan}}).encode(),
        "infinity": json.dumps({**good, "seconds": {**seconds, "1": math.inf}}).encode(),
        "a string": json.dumps({**good, "seconds": {**seconds, "1": "0.01"}}).encode(),
        "a bool": json.dumps({**good, "seconds": {**seconds, "1": True}}).encode(),
        "an hour-long pass": json.dumps({**good, "seconds": {**seconds, "1": 1e9}}).encode(),
        "huge": json.dumps({**good, "padding": "x" * policy.MAX_CALIBRATION_BYTES}).encode(),
    }


def test_a_damaged_or_hostile_calibration_is_refused_with_a_warning_and_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv(policy.CALIBRATION_DIR_ENV, str(tmp_path))
    measure = Measure()
    monkeypatch.setattr(policy, "verification_seconds", measure)
    verifier = make_verifier()
    expected = policy.verifier_calibration(verifier)
    [path] = saved_files(tmp_path)
    good = json.loads(path.read_text())
    for what, content in _corrupt(path, good).items():
        path.write_bytes(content)
        monkeypatch.setattr(policy, "_VERIFY", type(policy._VERIFY)())  # a new process
        calls = measure.calls
        with pytest.warns(UserWarning, match=f"ignoring the calibration file {path}"):
            assert policy.verifier_calibration(verifier) == expected, what
        assert measure.calls == calls + 1, f"{what}: not measured again"
        assert json.loads(path.read_text()) == good, f"{what}: not replaced by the new measurement"
    assert saved_files(tmp_path) == [path]  # no temporary files left behind
    # a folder in the file's place: measured, and the failure to save is a warning too
    path.unlink()
    path.mkdir()
    monkeypatch.setattr(policy, "_VERIFY", type(policy._VERIFY)())
    with pytest.warns(UserWarning) as caught:
        assert policy.verifier_calibration(verifier) == expected
    messages = " ".join(str(w.message) for w in caught)
    assert "not a regular file" in messages and "could not save the calibration" in messages


# -- frozen "auto" -----------------------------------------------------------------------------------------------
def test_frozen_auto_reads_only_the_saved_costs_and_learns_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(policy.CALIBRATION_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(policy, "verification_seconds", lambda *args, **kwargs: dict(CPU))
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    learning = policy.adaptive_drafting(verifier, draft)
    learning.observe(Round(0.0, 4, 0.02, 4.0, expected=[0.9, 0.5], accepted=[1.0, 1.0]), ended=0.05)
    monkeypatch.setenv(policy.FROZEN_ENV, "1")
    frozen = policy.adaptive_drafting(verifier, draft)
    assert frozen.frozen and not frozen.timed and frozen.costs is not learning.costs  # not what was learned
    before = frozen.threshold()
    assert before == pytest.approx((1 / 0.010) * (0.1 * 0.010 + 0.0005))  # a fresh policy's: rate 1/pass, step 0.1
    for _ in range(5):
        frozen.observe(Round(0.0, 4, 0.2, 5.0, expected=[0.5], accepted=[1.0]), ended=0.3)
    assert frozen.threshold() == before and frozen.spec() == policy.adaptive_drafting(verifier, draft).spec()
    monkeypatch.setenv(policy.FROZEN_ENV, "0")
    assert not policy.adaptive_drafting(verifier, draft).frozen
    monkeypatch.setenv(policy.FROZEN_ENV, "sometimes")
    with pytest.raises(ValueError, match="SPECULATORS_HF_AUTO_FROZEN='sometimes'"):
        policy.adaptive_drafting(verifier, draft)
