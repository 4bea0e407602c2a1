"""Adaptive drafting ("auto") end to end: in the package's own loop (`tree="auto"`) and inside transformers'
`generate(assistant_model=draft, num_assistant_tokens="auto")`, for every family, greedy output equals the
verifier alone and sampled output follows its distribution; and the policy really acts: given costs that
make drafting dear it drafts short chains, given free drafting it drafts to its maximum, so a policy that
ignored the costs (a fixed chain) fails these tests."""

from __future__ import annotations

import time
import weakref

import pytest
import torch
from conftest import ks_critical_value, ks_uniform_statistic, make_prompts, make_verifier, sampling_pit_values
from test_batch import ALL_DRAFTS, assert_rows_exact, left_padded, perturbed_copy

import speculators_hf as sh
from speculators_hf.generation import policy
from speculators_hf.generation.policy import DraftingCosts


@pytest.mark.parametrize("draft_name", list(ALL_DRAFTS))
def test_auto_is_exact_in_the_own_loop_in_batches(draft_name):
    verifier = make_verifier()
    draft = ALL_DRAFTS[draft_name](verifier)
    prompts = make_prompts(5, seed=11)
    ids, mask = left_padded(prompts)
    out = sh.generate(verifier, draft, ids, mask, tree="auto", max_new_tokens=16, return_dict_in_generate=True)
    assert_rows_exact(verifier, prompts, out.sequences, 16)
    assert out.stats.drafted_tokens > 0


@pytest.mark.parametrize("draft_name", list(ALL_DRAFTS))
def test_auto_is_exact_inside_transformers_generate(draft_name):
    verifier = make_verifier()
    draft = ALL_DRAFTS[draft_name](verifier)
    for prompt in make_prompts(6, seed=7):
        ref = verifier.generate(prompt, max_new_tokens=20, do_sample=False)
        out = verifier.generate(
            prompt, max_new_tokens=20, do_sample=False, assistant_model=draft, num_assistant_tokens="auto"
        )
        assert torch.equal(ref, out), f"auto drafting changed the output: {ref.tolist()} != {out.tolist()}"
        assert draft.generation_stats.drafted_tokens > 0
    assert draft.generation_config.num_assistant_tokens is None  # "auto" for these calls only


def _with_costs(monkeypatch, costs: DraftingCosts) -> None:
    monkeypatch.setattr(policy, "drafting_costs", lambda *args, **kwargs: costs)


def _drafted_per_round(verifier, draft, loop: str) -> float:
    drafted = rounds = 0
    for prompt in make_prompts(4, seed=5):
        if loop == "own":
            sh.generate(verifier, draft, prompt, tree="auto:6", max_new_tokens=24)
        else:
            verifier.generate(
                prompt, max_new_tokens=24, do_sample=False, assistant_model=draft, num_assistant_tokens="auto:6"
            )
        drafted += draft.generation_stats.drafted_tokens
        rounds += draft.generation_stats.draft_rounds
    return drafted / rounds


@pytest.mark.parametrize("loop", ["own", "transformers"])
def test_the_policy_drafts_less_when_drafting_is_dear_and_to_its_maximum_when_it_is_free(monkeypatch, loop):
    verifier = make_verifier(eos_token_id=None)
    draft = perturbed_copy(verifier, noise=0.08)
    # a draft step dearer than anything a token brings: the chain stops after its first token (threshold 0.99,
    # the draft is rarely that sure); observed rounds then keep it there, whatever this machine's timings
    _with_costs(monkeypatch, DraftingCosts({1: 1e-3, 8: 1e-3}, draft_step=10.0, emitted=1.0, round_seconds=1e-3))
    dear = _drafted_per_round(verifier, draft, loop)
    # free: no draft or width cost, so any chance of acceptance is worth a token
    free_costs = DraftingCosts({1: 1e-3, 8: 1e-3}, draft_step=0.0, emitted=1.0, round_seconds=1e-3, smoothing=0.0)
    _with_costs(monkeypatch, free_costs)
    free = _drafted_per_round(verifier, draft, loop)
    assert dear < 2.0 and free > 5.0, (dear, free)


@pytest.mark.parametrize("loop", ["own", "transformers"])
def test_sampling_with_auto_follows_the_verifier(loop):
    """120 sampled continuations of 8 tokens: PIT values under the verifier's exact conditionals are
    Uniform(0, 1) (KS at false-alarm rate 1e-3), with the chain length chosen by the policy."""
    verifier = make_verifier(pad_token_id=None, eos_token_id=None)
    draft = perturbed_copy(verifier, noise=0.05)
    prompt = make_prompts(1, seed=3)[0]
    sequences = []
    for i in range(6 if loop == "own" else 120):
        torch.manual_seed(i)
        if loop == "own":
            out = sh.generate(
                verifier, draft, prompt.expand(20, -1), tree="auto", max_new_tokens=8, do_sample=True, top_k=0
            )
            sequences += [row[None] for row in out]
        else:
            sequences.append(
                verifier.generate(
                    prompt,
                    max_new_tokens=8,
                    do_sample=True,
                    top_k=0,
                    assistant_model=draft,
                    num_assistant_tokens="auto",
                )
            )
    values = sampling_pit_values(verifier, sequences, prompt.shape[1], 1.0)
    stat, crit = ks_uniform_statistic(values), ks_critical_value(len(values), 1e-3)
    assert stat < crit, f"KS {stat:.4f} >= {crit:.4f}"


def test_the_config_switch_makes_auto_the_default(monkeypatch, tmp_path):
    """`config.adaptive_drafting = True` (saved as `adaptive` in the default proposal method): both loops
    choose the length round by round unless the call fixes it."""
    verifier = make_verifier(eos_token_id=None)
    draft = perturbed_copy(verifier, noise=0.08)
    _with_costs(monkeypatch, DraftingCosts({1: 1e-3, 8: 1e-3}, draft_step=10.0, emitted=1.0, round_seconds=1e-3))
    draft.config.adaptive_drafting = True
    draft.config.save_pretrained(tmp_path)
    assert type(draft.config).from_pretrained(tmp_path).adaptive_drafting is True
    prompt = make_prompts(1, seed=5)[0]

    def per_round() -> float:
        return draft.generation_stats.drafted_tokens / draft.generation_stats.draft_rounds

    verifier.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft)
    assert per_round() < 2.0  # the dear costs stop every chain early
    sh.generate(verifier, draft, prompt, max_new_tokens=24)
    assert per_round() < 2.0
    verifier.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft, num_assistant_tokens=5)
    assert per_round() > 3.0  # a fixed length asked for in the call
    sh.generate(verifier, draft, prompt, tree="chain:5", max_new_tokens=24)
    assert per_round() > 3.0
    with pytest.raises(sh.SpeculatorConfigError, match="adaptive must be true or false"):
        draft.config.adaptive_drafting = "yes"
    assert draft.config.adaptive_drafting is True


def _sampled(loop: str, verifier, draft, prompt) -> torch.Tensor:
    torch.manual_seed(0)
    if loop == "own":
        return sh.generate(verifier, draft, prompt, tree="auto", max_new_tokens=24, do_sample=True, top_k=0)
    return verifier.generate(
        prompt, max_new_tokens=24, do_sample=True, top_k=0, assistant_model=draft, num_assistant_tokens="auto"
    )


@pytest.mark.parametrize("draft_name", ["independent-perturbed", "dflash"])
@pytest.mark.parametrize("loop", ["own", "transformers"])
def test_frozen_auto_gives_one_output_per_seed(monkeypatch, loop, draft_name):
    """Learning "auto" follows the rounds' timings, so on machines of different speeds (here: clocks that tick at
    different rates) one seed gives different sampled outputs; frozen (SPECULATORS_HF_AUTO_FROZEN=1) the threshold
    reads only the saved calibration, and one seed gives one output whatever the clock, in both loops."""
    # a CPU-like calibration (chains, not trees: width costs), whatever the clock says
    monkeypatch.setattr(policy, "verification_seconds", lambda *a, **k: {n: 0.01 + 5e-4 * n for n in a[1]})
    verifier = make_verifier(pad_token_id=None, eos_token_id=None)
    draft = perturbed_copy(verifier, noise=0.05) if draft_name != "dflash" else ALL_DRAFTS["dflash"](verifier)
    prompt = make_prompts(1, seed=3)[0]

    def sampled_at(tick: float) -> tuple[int, ...]:
        monkeypatch.setattr(policy, "_LEARNED", weakref.WeakKeyDictionary())  # a new process: nothing learned
        now = [0.0]

        def perf_counter() -> float:
            now[0] += tick
            return now[0]

        monkeypatch.setattr(time, "perf_counter", perf_counter)
        return tuple(_sampled(loop, verifier, draft, prompt)[0].tolist())

    ticks = (1e-6, 1e-3, 1.0)
    assert len({sampled_at(tick) for tick in ticks}) > 1, "learning auto: the clock did not change the output"
    monkeypatch.setenv(policy.FROZEN_ENV, "1")
    frozen = {sampled_at(tick) for tick in ticks}
    assert len(frozen) == 1, f"frozen auto, one seed, several outputs: {frozen}"
