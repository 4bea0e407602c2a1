"""Exact speculative generation through the stock transformers API, for every draft family.

Greedy output with a draft must equal the verifier alone, token for token; sampled output must follow
the verifier's distribution. The drafts here have random weights (their proposals are mostly wrong,
which exercises rejection) or are copies of the verifier (everything accepted).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    assert_greedy_exact,
    assert_rounds_match_recomputation,
    assert_sampling_exact,
    make_prompts,
    make_verifier,
    publish_to_hub_cache,
    run_without_package,
)
from transformers import AutoModelForCausalLM, pipeline

import speculators_hf as sh
from speculators_hf.generation import VerifierBindingError


def perturbed_copy(verifier, noise: float = 0.05) -> sh.IndependentSpeculator:
    """An independent draft that is the verifier plus noise: accepts often, not always."""
    model = copy.deepcopy(verifier)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return sh.IndependentSpeculator.from_model(model, verifier)


DRAFTS = {
    "eagle3": lambda v: sh.Eagle3Speculator.from_verifier(v, draft_vocab_size=64),
    "eagle3-full-vocab": lambda v: sh.Eagle3Speculator.from_verifier(
        v, draft_vocab_size=v.config.vocab_size, norm_before_residual=True
    ),
    "independent-perturbed": perturbed_copy,
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("draft_name", list(DRAFTS))
def test_greedy_exact_on_20_prompts(family, draft_name):
    verifier = make_verifier(family)
    draft = DRAFTS[draft_name](verifier)
    stats = assert_greedy_exact(verifier, draft, make_prompts(20, seed=7), max_new_tokens=20)
    assert stats.drafted_tokens > 0 and stats.verifier_forwards <= stats.emitted_tokens


def test_copy_of_verifier_accepts_everything():
    verifier = make_verifier(eos_token_id=None)
    draft = sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier, speculative_tokens=5)
    stats = assert_greedy_exact(verifier, draft, make_prompts(20, seed=3), max_new_tokens=30)
    # 30 tokens in rounds of k+1 = 6: tau = k+1 = 6 exactly, as no round is cut by eos or the length limit
    assert stats.tau == pytest.approx(6.0)
    assert stats.accepted_tokens == stats.drafted_tokens


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_draft_cache_matches_recomputation_every_round(family):
    """The draft's KV cache, cropped to the verified prefix every round, gives the same proposals as
    drafting from scratch."""
    verifier = make_verifier(family)
    assert_rounds_match_recomputation(verifier, sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64))


def test_eos_mid_generation():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompt = make_prompts(1, seed=5)[0]
    free = verifier.generate(prompt, max_new_tokens=20, do_sample=False)
    stop = free[0, prompt.shape[1] + 6].item()  # make the 7th generated token the eos
    first = (free[0, prompt.shape[1] :] == stop).nonzero()[0].item()
    ref = verifier.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=stop)
    out = verifier.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=stop, assistant_model=draft)
    assert torch.equal(ref, out)
    assert out.shape[1] == prompt.shape[1] + first + 1 and out[0, -1].item() == stop
    copy_draft = sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier)
    out = verifier.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=stop, assistant_model=copy_draft)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 6, 7])
def test_max_length_edges(max_new_tokens):
    verifier = make_verifier()
    for draft in (
        sh.Eagle3Speculator.from_verifier(verifier),
        sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier),
    ):
        assert_greedy_exact(verifier, draft, make_prompts(3, seed=max_new_tokens), max_new_tokens=max_new_tokens)


def test_prompt_at_max_length():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompt = make_prompts(1, min_len=10, max_len=10)[0]
    for max_length in (11, 12):
        ref = verifier.generate(prompt, max_length=max_length, do_sample=False)
        assert torch.equal(
            ref, verifier.generate(prompt, max_length=max_length, do_sample=False, assistant_model=draft)
        )


@pytest.mark.parametrize("draft_name", ["eagle3", "independent-perturbed"])
def test_sampling_follows_verifier_distribution(draft_name):
    """KS test (false-alarm rate 1e-3) of the randomised PIT of every sampled token under the
    verifier's exact conditional distribution; the same test rejects a sampler at temperature 1.15
    (see test_sampling_test_has_power)."""
    verifier = make_verifier()
    draft = DRAFTS[draft_name](verifier)
    _stat, _crit, stats = assert_sampling_exact(verifier, draft, make_prompts(1, seed=3)[0], n_samples=150)
    assert stats.accepted_tokens > 50  # the acceptance branch of speculative sampling was exercised


def test_sampling_test_has_power():
    from conftest import ks_critical_value, ks_uniform_statistic, sampling_pit_values

    verifier = make_verifier()
    prompt = make_prompts(1, seed=3)[0]
    samples = []
    for i in range(150):
        torch.manual_seed(i)
        samples.append(
            verifier.generate(prompt, max_new_tokens=8, do_sample=True, temperature=1.15, top_k=0, top_p=1.0)
        )
    values = sampling_pit_values(verifier, samples, prompt.shape[1], temperature=1.0)
    assert ks_uniform_statistic(values) > ks_critical_value(len(values), 1e-3)


def test_sampling_with_temperature_and_top_k():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompt = make_prompts(1, seed=4)[0]
    for seed in range(5):
        torch.manual_seed(seed)
        out = verifier.generate(
            prompt, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=5, assistant_model=draft
        )
        assert out.shape[1] <= prompt.shape[1] + 12


def test_pipeline_returns_the_same_text(tiny_tokenizer):
    verifier = make_verifier(vocab_size=len(tiny_tokenizer))
    draft = sh.Eagle3Speculator.from_verifier(verifier, tokenizer=tiny_tokenizer)
    plain = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer)
    assisted = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer, assistant_model=draft)
    for text in ["the draft model", "speculative decoding is exact", "fast"]:
        expected = plain(text, max_new_tokens=15, do_sample=False)[0]["generated_text"]
        got = assisted(text, max_new_tokens=15, do_sample=False)[0]["generated_text"]
        assert got == expected
        assert draft.generation_stats.verifier_forwards > 0


def test_unbound_draft_fails_at_once_with_the_fix():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    draft.unbind_verifier()
    with pytest.raises(VerifierBindingError, match=r"bind_verifier\(verifier\)"):
        verifier.generate(make_prompts(1)[0], max_new_tokens=5, assistant_model=draft)


def test_stats_count_real_verifier_passes():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    calls = []
    handle = verifier.register_forward_pre_hook(lambda m, a: calls.append(1))
    prompt = make_prompts(1, seed=2)[0]
    out = verifier.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=draft)
    handle.remove()
    stats = draft.generation_stats
    assert stats.verifier_forwards == len(calls)
    assert stats.emitted_tokens == out.shape[1] - prompt.shape[1]
    assert stats.tau == pytest.approx(stats.emitted_tokens / len(calls))


def test_draft_length_from_config_and_per_call_override():
    verifier = make_verifier(eos_token_id=None)
    draft = sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier, speculative_tokens=3)
    prompt = make_prompts(1, seed=2)[0]
    verifier.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft)
    assert draft.generation_stats.tau == pytest.approx(4.0)
    verifier.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft, num_assistant_tokens=7)
    assert draft.generation_stats.tau == pytest.approx(8.0)
    assert draft.generation_config.num_assistant_tokens is None  # the override lasted one call
    draft.config.speculative_tokens = 5
    verifier.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft)
    assert draft.generation_stats.tau == pytest.approx(6.0)


def test_plain_generate_after_assisted_is_unaffected():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompt = make_prompts(1)[0]
    ref = verifier.generate(prompt, max_new_tokens=10, do_sample=False)
    verifier.generate(prompt, max_new_tokens=10, do_sample=False, assistant_model=draft)
    assert not draft._binding["tap"].armed
    assert torch.equal(ref, verifier.generate(prompt, max_new_tokens=10, do_sample=False))


def test_exact_after_save_load_with_remote_code_and_package_hidden(tmp_path):
    verifier = make_verifier("qwen3")
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    verifier.save_pretrained(tmp_path / "verifier")
    draft.save_pretrained(tmp_path / "draft")
    prompts = [p.tolist() for p in make_prompts(20, seed=9)]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained("draft", trust_remote_code=True)
        assert type(config).__module__.startswith("transformers_modules"), type(config)
        draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True)
        verifier = AutoModelForCausalLM.from_pretrained("verifier").eval()
        draft.bind_verifier(verifier)
        for prompt in {prompts}:
            ids = torch.tensor(prompt)
            ref = verifier.generate(ids, max_new_tokens=16, do_sample=False)
            got = verifier.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=draft)
            assert torch.equal(ref, got), (ref, got)
        state = {{k: v.sum().item() for k, v in draft.state_dict().items()}}
        print(sorted(state.items()))
        print("EXACT", draft.generation_stats.verifier_forwards)
        """,
        cwd=tmp_path,
    )
    assert "EXACT" in out
    expected = sorted({k: v.sum().item() for k, v in draft.state_dict().items()}.items())
    assert out.splitlines()[-2] == str(expected)


def test_load_pair_by_hub_id_from_offline_cache(tmp_path):
    verifier = make_verifier()
    verifier.save_pretrained(tmp_path / "v")
    verifier.name_or_path = "tiny-org/tiny-llama"
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    assert draft.config.verifier["name_or_path"] == "tiny-org/tiny-llama"
    draft.save_pretrained(tmp_path / "d")
    cache = tmp_path / "hub"
    publish_to_hub_cache(tmp_path / "v", "tiny-org/tiny-llama", cache)
    publish_to_hub_cache(tmp_path / "d", "tiny-org/tiny-llama-eagle3", cache)

    loaded = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-llama-eagle3", cache_dir=cache)
    assert isinstance(loaded, sh.Eagle3Speculator)
    pair = sh.AutoSpeculatorForCausalLM.from_pretrained("tiny-org/tiny-llama-eagle3", cache_dir=cache)
    assert isinstance(pair.verifier, type(verifier))
    assert_greedy_exact(pair.verifier, pair, make_prompts(3), max_new_tokens=12)


def test_load_pair_without_verifier_reference_says_what_to_do(tmp_path):
    draft = sh.Eagle3Speculator.from_verifier(make_verifier())
    draft.save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="pass verifier="):
        sh.AutoSpeculatorForCausalLM.from_pretrained(tmp_path / "d")
    pair = sh.AutoSpeculatorForCausalLM.from_pretrained(tmp_path / "d", verifier=make_verifier())
    assert pair.verifier is not None
