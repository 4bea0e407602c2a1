"""Every generation setting is applied exactly as transformers applies it, or refused by name.

Greedy output with each supported setting equals the verifier alone, token for token, on every path: transformers'
assisted loop (`verifier.generate(..., assistant_model=draft)`), the package's own loop with chains, dynamic and
static trees, and left-padded batches (each row as the verifier generates that prompt alone). Settings that
depend on the whole sequence (repetition penalty, n-gram bans, min new tokens, forced eos) must see the right
tokens at every tree node and every batch row, so the drafts here accept often (a perturbed copy of the
verifier) as well as rarely (untrained EAGLE-3, Medusa).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_prompts, make_verifier
from test_batch import DRAFTS, PARALLEL_DRAFTS, assert_rows_exact, left_padded
from transformers import GenerationConfig

import speculators_hf as sh
from speculators_hf.generation import settings

EOS = 2


def _early_eos_verifier():
    """A verifier whose greedy continuation of the test prompts meets its eos within a few tokens."""
    verifier = make_verifier(eos_token_id=None)
    prompts = make_prompts(4, seed=21)
    free = verifier.generate(prompts[0], max_new_tokens=6, do_sample=False)[0, prompts[0].shape[1] :]
    verifier.generation_config.eos_token_id = int(free[1])  # prompt 0 stops after 2 tokens
    verifier.generation_config.pad_token_id = 0
    return verifier, prompts


# name -> generate() arguments; the values are chosen so that each one changes the verifier's own output
SETTINGS = {
    "min_new_tokens": {"min_new_tokens": 15},
    "min_length": {"min_length": 30},
    "suppress_tokens": {"suppress_tokens": list(range(3, 40))},
    "begin_suppress_tokens": {"begin_suppress_tokens": list(range(3, 60))},
    "bad_words_ids": {"bad_words_ids": [[t] for t in range(3, 30)] + [[40, 41]]},
    "sequence_bias": {"sequence_bias": {(t,): 4.0 for t in range(50, 60)}},
    "repetition_penalty": {"repetition_penalty": 3.0},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
    "forced_eos_token_id": {"forced_eos_token_id": 7},
    "exponential_decay_length_penalty": {"exponential_decay_length_penalty": (3, 1.5)},
    "combined": {"min_new_tokens": 12, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "suppress_tokens": [5]},
}
MAX_NEW = 18


def test_each_setting_changes_the_verifiers_own_output():
    """Without this, an exactness test could pass on a setting the loop ignores."""
    verifier, prompts = _early_eos_verifier()
    for name, kwargs in SETTINGS.items():
        changed = any(
            not torch.equal(
                verifier.generate(p, max_new_tokens=MAX_NEW, do_sample=False),
                verifier.generate(p, max_new_tokens=MAX_NEW, do_sample=False, **kwargs),
            )
            for p in prompts
        )
        assert changed, f"{name} does not change the verifier's output on these prompts"


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("draft_name", ["independent-perturbed", "eagle3", "medusa"])
def test_greedy_exact_with_each_setting_on_every_path(setting, draft_name):
    verifier, prompts = _early_eos_verifier()
    draft = DRAFTS[draft_name](verifier)
    kwargs = SETTINGS[setting]
    for prompt in prompts:
        ref = verifier.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
        assisted = verifier.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft, **kwargs)
        assert torch.equal(ref, assisted), f"assisted path: {assisted.tolist()} != {ref.tolist()}"
        for tree in ("chain:4", "dynamic:4:3:8", [[0], [1], [0, 0], [0, 0, 0]]):
            own = sh.generate(verifier, draft, prompt, tree=tree, max_new_tokens=MAX_NEW, **kwargs)
            assert torch.equal(ref, own), f"own loop, tree {tree}: {own.tolist()} != {ref.tolist()}"
    ids, mask = left_padded(prompts)
    for tree in ("chain:4", "dynamic:4:3:8"):
        out = sh.generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=MAX_NEW, **kwargs)
        assert_rows_exact(verifier, prompts, out, MAX_NEW, **kwargs)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("draft_name", list(PARALLEL_DRAFTS))
def test_greedy_exact_with_each_setting_for_parallel_drafters(setting, draft_name):
    """The drafts that propose from one block or pass (P-EAGLE, DFlash, DSpark, DFlash2): chains, both loops, batches."""
    verifier, prompts = _early_eos_verifier()
    draft = PARALLEL_DRAFTS[draft_name](verifier)
    kwargs = SETTINGS[setting]
    for prompt in prompts:
        ref = verifier.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
        assisted = verifier.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft, **kwargs)
        assert torch.equal(ref, assisted), f"assisted path: {assisted.tolist()} != {ref.tolist()}"
        own = sh.generate(verifier, draft, prompt, tree="chain:5", max_new_tokens=MAX_NEW, **kwargs)
        assert torch.equal(ref, own), f"own loop: {own.tolist()} != {ref.tolist()}"
    ids, mask = left_padded(prompts)
    out = sh.generate(verifier, draft, ids, mask, tree="chain:5", max_new_tokens=MAX_NEW, **kwargs)
    assert_rows_exact(verifier, prompts, out, MAX_NEW, **kwargs)


def test_min_new_tokens_past_an_early_eos():
    """The issue's case: greedy output hits eos after 2 tokens; with min_new_tokens=15 the verifier writes 15+,
    and so does the own loop, token for token."""
    verifier, prompts = _early_eos_verifier()
    prompt = prompts[0]
    draft = DRAFTS["independent-perturbed"](verifier)
    assert verifier.generate(prompt, max_new_tokens=30, do_sample=False).shape[1] == prompt.shape[1] + 2
    ref = verifier.generate(prompt, max_new_tokens=30, do_sample=False, min_new_tokens=15)
    assert ref.shape[1] >= prompt.shape[1] + 15
    out = sh.generate(verifier, draft, prompt, max_new_tokens=30, min_new_tokens=15, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted_tokens > 0  # drafted tokens were accepted across the eos the verifier skipped


def test_default_max_length_and_generation_config_object():
    """Nothing set: transformers' default of 20 new tokens; a GenerationConfig object works like keywords."""
    verifier = make_verifier(eos_token_id=None)
    draft = DRAFTS["eagle3"](verifier)
    prompt = make_prompts(1, seed=2)[0]
    assert torch.equal(sh.generate(verifier, draft, prompt), verifier.generate(prompt))
    config = GenerationConfig(max_new_tokens=9, repetition_penalty=2.0, do_sample=False)
    ref = verifier.generate(prompt, generation_config=config)
    assert torch.equal(sh.generate(verifier, draft, prompt, generation_config=config), ref)


def test_draft_never_drafts_past_the_tokens_allowed():
    """max_new_tokens=4 with a draft length of 60: no round drafts more than the tokens still allowed."""
    verifier = make_verifier(eos_token_id=None)
    draft = sh.IndependentSpeculator.from_model(make_verifier(eos_token_id=None, seed=3), verifier)
    draft.config.speculative_tokens = 60
    prompt = make_prompts(1, seed=4)[0]
    out = sh.generate(verifier, draft, prompt, max_new_tokens=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, verifier.generate(prompt, max_new_tokens=4, do_sample=False))
    assert out.stats.drafted_tokens <= 3 * out.stats.draft_rounds and out.stats.drafted_tokens <= 6


# ------------------------------------------------------------------------------------------------
# refused settings
# ------------------------------------------------------------------------------------------------
def test_every_generation_config_field_is_classified():
    """Each field of transformers' GenerationConfig is applied, without effect, or refused: a field added by a
    newer transformers fails here until it is classified (and is refused at run time when set)."""
    known = {
        *settings.PROCESSOR_SETTINGS,
        *settings.LOOP_SETTINGS,
        *settings.NO_EFFECT_SETTINGS,
        *settings.REFUSED_SETTINGS,
        *settings.ASSISTANT_SETTINGS,
    }
    fields = set(GenerationConfig().to_dict())
    assert fields - known == set(), f"unclassified GenerationConfig fields: {sorted(fields - known)}"
    groups = [
        settings.PROCESSOR_SETTINGS,
        settings.LOOP_SETTINGS,
        settings.NO_EFFECT_SETTINGS,
        settings.REFUSED_SETTINGS,
        settings.ASSISTANT_SETTINGS,
    ]
    assert sum(len(set(g)) for g in groups) == len(known), "a field is in two groups"


REFUSED_VALUES = {
    "num_beams": 2,
    "penalty_alpha": 0.6,
    "dola_layers": "high",
    "constraints": ["x"],
    "force_words_ids": [[5]],
    "guidance_scale": 1.5,
    "watermarking_config": {"bias": 2.0},
    "stop_strings": ["stop"],
    "max_time": 5.0,
    "token_healing": True,
    "output_scores": True,
    "output_logits": True,
    "output_attentions": True,
    "output_hidden_states": True,
    "encoder_repetition_penalty": 1.2,
    "encoder_no_repeat_ngram_size": 2,
    "prompt_lookup_num_tokens": 3,
    "max_matching_ngram_size": 2,
    "assistant_early_exit": 2,
    "assistant_ensemble_weight": 0.5,
    "speculation_type": "mtp",
    "use_mtp": True,
}


def test_every_refused_setting_is_refused_by_name():
    assert set(REFUSED_VALUES) == set(settings.REFUSED_SETTINGS)
    for name, value in REFUSED_VALUES.items():
        config = GenerationConfig()
        setattr(config, name, value)
        with pytest.raises(settings.GenerationSettingError, match=rf"\b{name}="):
            settings.check_settings(config)


def test_refused_and_out_of_range_settings_fail_up_front():
    verifier = make_verifier()
    draft = DRAFTS["eagle3"](verifier)
    prompt = make_prompts(1)[0]
    calls = []
    draft.tree_extend = lambda *a, **k: calls.append(1)  # nothing may run before the settings are checked
    for kwargs, match in [
        ({"num_beams": 2}, "num_beams=2: beam search"),
        ({"top_p": 2.0, "do_sample": True}, r"top_p=2.0: must be in \(0, 1\]"),
        ({"top_p": 2.0}, r"top_p=2.0"),  # an error even when greedy
        ({"temperature": -1.0, "do_sample": True}, "temperature=-1.0: must be > 0"),
        ({"top_k": -3}, "top_k=-3"),
        ({"min_p": 1.5, "do_sample": True}, "min_p=1.5"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"stop_strings": ["x"]}, "stop_strings"),
        ({"guidance_scale": 2.0}, "guidance_scale"),
        ({"max_length": 3}, "leaves no room under max_length=3"),
    ]:
        with pytest.raises(ValueError, match=match):
            sh.generate(verifier, draft, prompt, **kwargs)
    with pytest.raises(TypeError, match="unexpected arguments"):
        sh.generate(verifier, draft, prompt, max_new_tokens=3, no_such_setting=1)
    assert calls == []


def test_settings_without_effect_are_accepted():
    verifier = make_verifier(eos_token_id=None)
    draft = DRAFTS["eagle3"](verifier)
    prompt = make_prompts(1, seed=8)[0]
    ref = verifier.generate(prompt, max_new_tokens=8, do_sample=False)
    out = sh.generate(
        verifier, draft, prompt, max_new_tokens=8, use_cache=False, num_assistant_tokens=3, length_penalty=2.0,
        temperature=0.3, top_k=3,  # sampling settings without do_sample: unused, as in transformers
    )  # fmt: skip
    assert torch.equal(out, ref)


def test_num_return_sequences_samples_each_prompt_several_times():
    verifier = make_verifier(eos_token_id=None)
    draft = DRAFTS["independent-perturbed"](verifier)
    ids, mask = left_padded(make_prompts(2, seed=9))
    torch.manual_seed(0)
    out = sh.generate(verifier, draft, ids, mask, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    assert out.shape[0] == 6
    for row in range(6):
        assert torch.equal(out[row, : ids.shape[1]], ids[row // 3])
    assert len({tuple(r.tolist()) for r in out[:3]}) > 1  # independent samples of the same prompt


def test_custom_generate_refuses_what_it_cannot_apply(tmp_path):
    from speculators_hf.custom_generate import custom_generate

    verifier = make_verifier()
    draft = DRAFTS["eagle3"](verifier)
    prompt = make_prompts(1)[0]
    with pytest.raises(ValueError, match="logits_processor"):
        custom_generate(verifier, draft=draft, input_ids=prompt, logits_processor=[lambda i, s: s])
    with pytest.raises(ValueError, match="repetition_penalty=-1"):
        custom_generate(verifier, draft=draft, input_ids=prompt, repetition_penalty=-1.0)
    ref = verifier.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, repetition_penalty=1.4)
    got = custom_generate(verifier, draft=draft, input_ids=prompt, max_new_tokens=8, min_new_tokens=8,
                          repetition_penalty=1.4)  # fmt: skip
    assert torch.equal(got, ref)
