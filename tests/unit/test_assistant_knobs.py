"""transformers' knobs for an assistant model (`num_assistant_tokens`, `num_assistant_tokens_schedule`,
`assistant_confidence_threshold`, `assistant_lookbehind`, `target_lookbehind`) in both loops: each is applied or
refused with an error naming it, in one precedence order (keyword > the call's `generation_config` > the verifier's
`generation_config` > the draft's `generation_config` > the draft's config), and bad values are refused by name.

Every check counts the tokens actually drafted in each round: in transformers' loop by watching the draft's
`generate` (what the assisted loop calls once per round), in the own loop by watching `build_tree`."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_prompts, make_verifier
from transformers import GenerationConfig

import speculators_hf as sh
from speculators_hf.generation import loop as own_loop
from speculators_hf.generation.settings import GenerationSettingError

MAX_NEW = 24
LOOPS = ["transformers", "own"]


def copy_draft(verifier, noise: float = 0.0) -> sh.IndependentSpeculator:
    """An independent draft (tokens only: no placeholder round) made from the verifier's weights, plus noise."""
    model = copy.deepcopy(verifier)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return sh.IndependentSpeculator.from_model(model, verifier)


@pytest.fixture
def pair():
    torch.manual_seed(0)
    verifier = make_verifier(eos_token_id=None)
    return verifier, copy_draft(verifier)


@pytest.fixture
def prompt():
    return make_prompts(1, seed=3, min_len=6, max_len=6)[0]


class Rounds:
    """What each round of one generation drafted: `drafted[i]` tokens after a sequence of `lengths[i]` tokens."""

    def __init__(self) -> None:
        self.drafted: list[int] = []
        self.lengths: list[int] = []
        self.final = 0  # the output's length


def run(loop: str, verifier, draft, prompt, monkeypatch, **kwargs) -> Rounds:
    """Generate greedily with `draft` in `loop` (MAX_NEW tokens unless `kwargs` say otherwise), recording every
    round, and check the output is the verifier's."""
    rounds = Rounds()
    config = kwargs.get("generation_config")
    max_new = config.max_new_tokens if config is not None else kwargs.setdefault("max_new_tokens", MAX_NEW)
    with monkeypatch.context() as patch:  # undone on return, leaving the test's other patches in place
        if loop == "transformers":
            original = draft.generate

            def spy(input_ids=None, **kw):
                out = original(input_ids=input_ids, **kw)
                rounds.lengths.append(input_ids.shape[1])
                rounds.drafted.append(len(out.scores))
                return out

            patch.setattr(draft, "generate", spy)
            out = verifier.generate(prompt, do_sample=False, assistant_model=draft, **kwargs)
        else:
            build_tree = own_loop.build_tree

            def spy_tree(*args, **kw):
                tree = build_tree(*args, **kw)
                rounds.drafted.append(tree.size)
                return tree

            patch.setattr(own_loop, "build_tree", spy_tree)
            out = sh.generate(verifier, draft, prompt, **kwargs)
    rounds.final = out.shape[1]
    assert torch.equal(out, verifier.generate(prompt, max_new_tokens=max_new, do_sample=False))  # still exact
    return rounds


def assert_length(rounds: Rounds, k: int) -> None:
    """Every round drafted k tokens, but the last, which may be cut to the room left."""
    assert len(rounds.drafted) >= 2 and rounds.drafted[:-1] == [k] * (len(rounds.drafted) - 1), rounds.drafted
    assert 1 <= rounds.drafted[-1] <= k, rounds.drafted


# -- each place that sets the draft length, alone -------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_the_drafts_generation_config_sets_the_length(loop, pair, prompt, monkeypatch):
    verifier, draft = pair
    assert_length(run(loop, verifier, draft, prompt, monkeypatch), draft.config.speculative_tokens)  # the default: 5
    draft.generation_config.num_assistant_tokens = 2  # transformers' documented knob
    assert_length(run(loop, verifier, draft, prompt, monkeypatch), 2)
    assert draft.generation_config.num_assistant_tokens == 2  # left as the user set it


@pytest.mark.parametrize("loop", LOOPS)
def test_the_verifiers_generation_config_sets_the_length(loop, pair, prompt, monkeypatch):
    verifier, draft = pair
    verifier.generation_config.num_assistant_tokens = 2
    assert_length(run(loop, verifier, draft, prompt, monkeypatch), 2)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_calls_generation_config_sets_the_length(loop, pair, prompt, monkeypatch):
    verifier, draft = pair
    config = GenerationConfig(num_assistant_tokens=2, max_new_tokens=MAX_NEW, do_sample=False)
    assert_length(run(loop, verifier, draft, prompt, monkeypatch, generation_config=config), 2)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_keyword_sets_the_length(loop, pair, prompt, monkeypatch):
    verifier, draft = pair
    assert_length(run(loop, verifier, draft, prompt, monkeypatch, num_assistant_tokens=3), 3)
    assert draft.generation_config.num_assistant_tokens is None  # for this call only


@pytest.mark.parametrize("loop", LOOPS)
def test_precedence_keyword_call_config_verifier_draft_then_speculative_tokens(loop, pair, prompt, monkeypatch):
    verifier, draft = pair
    draft.config.speculative_tokens = 6
    draft.generation_config.num_assistant_tokens = 4
    verifier.generation_config.num_assistant_tokens = 3
    config = GenerationConfig(num_assistant_tokens=2, max_new_tokens=MAX_NEW, do_sample=False)
    assert_length(run(loop, verifier, draft, prompt, monkeypatch, generation_config=config, num_assistant_tokens=1), 1)
    assert_length(run(loop, verifier, draft, prompt, monkeypatch, generation_config=config), 2)
    assert_length(run(loop, verifier, draft, prompt, monkeypatch), 3)
    verifier.generation_config.num_assistant_tokens = None
    assert_length(run(loop, verifier, draft, prompt, monkeypatch), 4)
    draft.generation_config.num_assistant_tokens = None
    assert_length(run(loop, verifier, draft, prompt, monkeypatch), 6)


def test_binding_keeps_the_drafts_generation_config(pair, prompt, monkeypatch):
    """Binding used to overwrite `num_assistant_tokens` with `speculative_tokens`; it drops only a saved value
    equal to `speculative_tokens` (what earlier versions wrote there), which says nothing more."""
    verifier, draft = pair
    draft.generation_config.num_assistant_tokens = 2
    draft.bind_verifier(verifier)
    assert draft.generation_config.num_assistant_tokens == 2
    assert_length(run("transformers", verifier, draft, prompt, monkeypatch), 2)
    draft.generation_config.num_assistant_tokens = draft.config.speculative_tokens
    draft.bind_verifier(verifier)
    assert draft.generation_config.num_assistant_tokens is None
    draft.config.speculative_tokens = 3
    assert_length(run("transformers", verifier, draft, prompt, monkeypatch), 3)


def test_custom_generate_reads_the_knob(pair, prompt, monkeypatch):
    from speculators_hf.custom_generate import custom_generate

    verifier, draft = pair
    rounds = Rounds()
    build_tree = own_loop.build_tree

    def spy_tree(*args, **kw):
        tree = build_tree(*args, **kw)
        rounds.drafted.append(tree.size)
        return tree

    monkeypatch.setattr(own_loop, "build_tree", spy_tree)
    out = custom_generate(verifier, draft=draft, input_ids=prompt, max_new_tokens=MAX_NEW, num_assistant_tokens=2)
    assert torch.equal(out, verifier.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False))
    assert_length(rounds, 2)


# -- "auto" from any of the places ---------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_auto_from_the_drafts_generation_config(loop, pair, prompt, monkeypatch):
    from speculators_hf.generation import policy

    verifier, draft = pair
    free = policy.DraftingCosts({1: 1e-3, 8: 1e-3}, draft_step=0.0, emitted=1.0, round_seconds=1e-3, smoothing=0.0)
    monkeypatch.setattr(policy, "drafting_costs", lambda *args, **kwargs: free)
    draft.generation_config.num_assistant_tokens = "auto:3"  # a maximum of 3; free drafting drafts all of it
    rounds = run(loop, verifier, draft, prompt, monkeypatch)
    assert_length(rounds, 3)
    assert draft.generation_config.num_assistant_tokens == "auto:3"


# -- the schedule ------------------------------------------------------------------------------------------
def check_heuristic(rounds: Rounds, start: int) -> int:
    """transformers' rule, round by round: 2 more after a round whose every drafted token was accepted, else 1
    fewer (at least 1). Returns the length after the last round."""
    k, grew, shrank = start, False, False
    for i, drafted in enumerate(rounds.drafted):
        assert drafted == k or (i == len(rounds.drafted) - 1 and drafted < k), (rounds.drafted, i, k)
        if i + 1 < len(rounds.lengths):
            accepted = rounds.lengths[i + 1] - rounds.lengths[i] - 1
        else:  # the last round: the output's length tells
            accepted = rounds.final - rounds.lengths[i] - 1
        all_accepted = accepted == drafted
        grew, shrank = grew or all_accepted, shrank or not all_accepted
        k = k + 2 if all_accepted else max(1, k - 1)
    assert grew and shrank, rounds.drafted  # both branches of the rule were exercised
    return k


@pytest.mark.parametrize("schedule", ["heuristic", "heuristic_transient"])
def test_heuristic_schedules_run_as_in_transformers(schedule, prompt, monkeypatch):
    """transformers' assisted loop runs the schedule itself on what the draft proposes; "heuristic" keeps the
    adapted length in the draft's generation_config for the next call, "heuristic_transient" does not."""
    torch.manual_seed(0)
    verifier = make_verifier(eos_token_id=None)
    draft = copy_draft(verifier, noise=0.03)  # accepts some chains whole, rejects others
    draft.generation_config.num_assistant_tokens = 3
    draft.generation_config.num_assistant_tokens_schedule = schedule
    rounds = run("transformers", verifier, draft, prompt, monkeypatch, max_new_tokens=40)
    after = check_heuristic(rounds, start=3)
    expected = after if schedule == "heuristic" else 3
    assert draft.generation_config.num_assistant_tokens == expected
    assert draft.generation_config.num_assistant_tokens_schedule == schedule
    assert (
        run("transformers", verifier, draft, prompt, monkeypatch).drafted[0] == expected
    )  # where the next call starts


def test_a_constant_schedule_is_accepted_in_both_loops(pair, prompt, monkeypatch):
    verifier, draft = pair
    for loop in LOOPS:
        assert_length(run(loop, verifier, draft, prompt, monkeypatch, num_assistant_tokens_schedule="constant"), 5)


def test_the_own_loop_refuses_a_heuristic_schedule_by_name(pair, prompt):
    verifier, draft = pair
    with pytest.raises(GenerationSettingError, match=r"num_assistant_tokens_schedule='heuristic'.*tree='auto'"):
        sh.generate(verifier, draft, prompt, max_new_tokens=4, num_assistant_tokens_schedule="heuristic")
    draft.generation_config.num_assistant_tokens_schedule = "heuristic_transient"
    with pytest.raises(GenerationSettingError, match=r"schedule='heuristic_transient' \(draft\.generation_config\)"):
        sh.generate(verifier, draft, prompt, max_new_tokens=4)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_heuristic_schedule_with_auto_is_refused(loop, pair, prompt):
    verifier, draft = pair
    kwargs = dict(num_assistant_tokens="auto", num_assistant_tokens_schedule="heuristic", max_new_tokens=4)
    with pytest.raises(GenerationSettingError, match=r"num_assistant_tokens_schedule='heuristic'.*'auto'"):
        if loop == "own":
            sh.generate(verifier, draft, prompt, **kwargs)
        else:
            verifier.generate(prompt, assistant_model=draft, **kwargs)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_unknown_schedule_is_refused_by_name(loop, pair, prompt):
    verifier, draft = pair
    draft.generation_config.num_assistant_tokens_schedule = "Heuristic"
    with pytest.raises(GenerationSettingError, match=r"num_assistant_tokens_schedule='Heuristic'.*'constant'"):
        if loop == "own":
            sh.generate(verifier, draft, prompt, max_new_tokens=4)
        else:
            verifier.generate(prompt, assistant_model=draft, max_new_tokens=4)


# -- the knobs that do not apply -------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_a_confidence_threshold_is_refused_by_name_and_zero_accepted(loop, pair, prompt, monkeypatch):
    verifier, draft = pair
    for where in ("keyword", "draft"):
        kwargs = {"max_new_tokens": 4}
        if where == "keyword":
            kwargs["assistant_confidence_threshold"] = 0.4
        else:
            draft.generation_config.assistant_confidence_threshold = 0.4
        pattern = r"assistant_confidence_threshold=0\.4.*num_assistant_tokens='auto'"
        with pytest.raises(GenerationSettingError, match=pattern):
            if loop == "own":
                sh.generate(verifier, draft, prompt, **kwargs)
            else:
                verifier.generate(prompt, assistant_model=draft, **kwargs)
        draft.generation_config.assistant_confidence_threshold = None
    assert_length(run(loop, verifier, draft, prompt, monkeypatch, assistant_confidence_threshold=0.0), 5)


@pytest.mark.parametrize("loop", LOOPS)
def test_lookbehinds_have_no_effect_and_bad_ones_are_refused(loop, pair, prompt, monkeypatch):
    """transformers reads them only for an assistant with another tokenizer; a draft shares its verifier's."""
    verifier, draft = pair
    assert_length(run(loop, verifier, draft, prompt, monkeypatch, assistant_lookbehind=3, target_lookbehind=7), 5)
    with pytest.raises(GenerationSettingError, match=r"target_lookbehind=-1"):
        if loop == "own":
            sh.generate(verifier, draft, prompt, max_new_tokens=4, target_lookbehind=-1)
        else:
            verifier.generate(prompt, assistant_model=draft, max_new_tokens=4, target_lookbehind=-1)


# -- bad values --------------------------------------------------------------------------------------------------
BAD_LENGTHS = [-3, 0, True, 5.5, "AUTO", " auto", "auto:0", "auto:x", "5"]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("value", BAD_LENGTHS, ids=repr)
def test_bad_lengths_are_refused_with_the_field_name(loop, value, pair, prompt):
    verifier, draft = pair
    pattern = re.escape(f"num_assistant_tokens={value!r} (keyword argument): must be an integer >= 1, 'auto' or 'auto:")
    with pytest.raises(GenerationSettingError, match=pattern):
        if loop == "own":
            sh.generate(verifier, draft, prompt, max_new_tokens=4, num_assistant_tokens=value)
        else:
            verifier.generate(prompt, assistant_model=draft, max_new_tokens=4, num_assistant_tokens=value)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_bad_length_in_a_generation_config_names_that_config(loop, pair, prompt):
    verifier, draft = pair
    draft.generation_config.num_assistant_tokens = "auto:0"
    with pytest.raises(GenerationSettingError, match=r"num_assistant_tokens='auto:0' \(draft\.generation_config\)"):
        if loop == "own":
            sh.generate(verifier, draft, prompt, max_new_tokens=4)
        else:
            verifier.generate(prompt, assistant_model=draft, max_new_tokens=4)
    assert draft.generation_config.num_assistant_tokens == "auto:0"  # the call changed nothing


def test_the_own_loop_refuses_a_tree_and_a_length_in_one_call(pair, prompt):
    verifier, draft = pair
    with pytest.raises(GenerationSettingError, match=r"tree='chain:3'.*num_assistant_tokens=2"):
        sh.generate(verifier, draft, prompt, max_new_tokens=4, tree="chain:3", num_assistant_tokens=2)
    with pytest.raises(ValueError, match=r"tree='auto:0'.*'auto:<maximum"):
        sh.generate(verifier, draft, prompt, max_new_tokens=4, tree="auto:0")
    # settings that leave the length alone go with a tree; the draft's own yield to the call's tree
    draft.generation_config.num_assistant_tokens = 2
    draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    sh.generate(verifier, draft, prompt, max_new_tokens=4, tree="chain:3", num_assistant_tokens_schedule="constant")
    sh.generate(verifier, draft, prompt, max_new_tokens=4, tree="chain:3", assistant_lookbehind=4)
