"""Medusa heads: the maths by hand, vLLM's tensor layout, Medusa's initialisation, exact generation,
save/load (also as remote code with the package hidden) and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    VOCAB,
    Replay,
    assert_greedy_exact,
    assert_rounds_match_recomputation,
    assert_sampling_exact,
    fresh_proposals,
    make_prompts,
    make_verifier,
    propose_with,
    rewrite_weights,
    run_without_package,
    verifier_features,
)
from safetensors.torch import load_file

from speculators_hf.config import SpeculatorConfig, SpeculatorConfigError
from speculators_hf.generation import VerifierBindingError
from speculators_hf.models.base import SpeculatorLoadError
from speculators_hf.models.medusa import MedusaSpeculator, MedusaSpeculatorConfig

HIDDEN = 32


def random_draft(verifier, **overrides) -> MedusaSpeculator:
    """A draft with random weights everywhere (Medusa's own start makes the blocks the identity)."""
    draft = MedusaSpeculator.from_verifier(verifier, **overrides)
    with torch.no_grad():
        for p in draft.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return draft


def comparable(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


# ------------------------------------------------------------------------------------------------
# config and initialisation
# ------------------------------------------------------------------------------------------------
def test_config_round_trip(tmp_path):
    config = MedusaSpeculator.config_for(make_verifier(), medusa_num_heads=4, medusa_num_layers=2, speculative_tokens=3)
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "speculators" and raw["speculators_model_type"] == "medusa"
    assert (raw["hidden_size"], raw["medusa_num_heads"], raw["medusa_num_layers"]) == (HIDDEN, 4, 2)
    assert raw["speculators_config"]["verifier"]["vocab_size"] == VOCAB
    for loader in (SpeculatorConfig.from_pretrained, MedusaSpeculatorConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is MedusaSpeculatorConfig and comparable(loaded) == comparable(config)
        assert loaded.speculative_tokens == 3


def test_draft_length_defaults_to_the_number_of_heads():
    assert MedusaSpeculator.config_for(make_verifier()).speculative_tokens == 5  # five published heads
    config = MedusaSpeculator.config_for(make_verifier(), speculative_tokens=3)
    assert (config.medusa_num_heads, config.speculative_tokens) == (3, 3)


def test_new_draft_starts_as_medusa_does():
    """Each lm_head a copy of the verifier's, each block the identity: head i initially guesses that x_{t+i+2}
    is the verifier's own next-token choice."""
    verifier = make_verifier()
    draft = MedusaSpeculator.from_verifier(verifier, medusa_num_heads=3, medusa_num_layers=2)
    for head in draft.lm_heads:
        assert torch.equal(head.weight, verifier.lm_head.weight)
    hidden = torch.randn(2, 5, HIDDEN)
    torch.testing.assert_close(draft(hidden).logits[2], verifier.lm_head(hidden))


# ------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------
def test_heads_by_hand():
    """Medusa's ResBlock (FasterDecoding/Medusa medusa_model.py: x + SiLU(linear(x)), linear with bias),
    stacked `medusa_num_layers` times, then the head's own bias-free lm_head; vLLM's ResidualBlock and
    Medusa.forward compute the same."""
    torch.manual_seed(0)
    verifier = make_verifier()
    draft = random_draft(verifier, medusa_num_heads=3, medusa_num_layers=2)
    sd = draft.state_dict()
    features = torch.randn(1, 4, HIDDEN)
    h = features[:, -1]

    def head(i):
        x = h
        for j in range(2):
            x = x + torch.nn.functional.silu(
                x @ sd[f"blocks.{i}.layers.{j}.weight"].T + sd[f"blocks.{i}.layers.{j}.bias"]
            )
        return x @ sd[f"lm_heads.{i}.weight"].T

    input_ids = torch.tensor([[5, 17, 40, 63, 9]])
    with torch.no_grad():
        tokens, scores = propose_with(draft, input_ids, [features], 3)
        for i in range(3):
            torch.testing.assert_close(scores[i], head(i), rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == [[head(i).argmax().item() for i in range(3)]]


def test_forward_matches_drafting():
    """Row t of head i in `forward` equals draft step i after the prefix x_0..x_{t+1} (head i at row t
    predicts x_{t+i+2}); training and generation share the alignment."""
    verifier = make_verifier()
    draft = random_draft(verifier, medusa_num_heads=3)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 12))
    (features,) = verifier_features(verifier, ids, draft.verifier_layer_ids())
    with torch.no_grad():
        heads = draft(features).logits
    assert heads.shape == (3, 1, 12, VOCAB)
    for t in (0, 4, 7):
        with torch.no_grad():
            _, scores = propose_with(draft, ids[:, : t + 2], [features[:, : t + 1]], 3, Replay(ids[0, t + 2 : t + 5]))
        for i in range(3):
            torch.testing.assert_close(scores[i], heads[i, :, t], rtol=1e-5, atol=1e-5)


def test_saved_tensors_are_vllm_medusa_names(tmp_path):
    draft = MedusaSpeculator.from_verifier(make_verifier(), medusa_num_heads=3, medusa_num_layers=2)
    draft.save_pretrained(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "model.safetensors").items()}
    expected = {f"lm_heads.{i}.weight": (VOCAB, HIDDEN) for i in range(3)}
    for i in range(3):
        for j in range(2):
            expected[f"blocks.{i}.layers.{j}.weight"] = (HIDDEN, HIDDEN)
            expected[f"blocks.{i}.layers.{j}.bias"] = (HIDDEN,)
    assert shapes == expected


# ------------------------------------------------------------------------------------------------
# exact generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_exact_on_20_prompts(family):
    verifier = make_verifier(family)
    draft = random_draft(verifier, medusa_num_heads=4, medusa_num_layers=2)
    stats = assert_greedy_exact(verifier, draft, make_prompts(20, seed=7), max_new_tokens=20)
    assert stats.drafted_tokens > 0 and stats.verifier_forwards <= stats.emitted_tokens
    ids = make_prompts(1, seed=1, min_len=6)[0]
    assert fresh_proposals(draft, verifier, ids, 10)[0].shape == (1, 4)  # at most one token per head


def test_greedy_exact_with_medusa_initialisation():
    """Medusa's start (heads = the verifier's head) proposes tokens the verifier often accepts."""
    verifier = make_verifier()
    draft = MedusaSpeculator.from_verifier(verifier, medusa_num_heads=3)
    assert_greedy_exact(verifier, draft, make_prompts(20, seed=8), max_new_tokens=16)


def test_sampling_follows_verifier_distribution():
    verifier = make_verifier()
    draft = MedusaSpeculator.from_verifier(verifier, medusa_num_heads=3)
    _stat, _crit, stats = assert_sampling_exact(verifier, draft, make_prompts(1, seed=3)[0], n_samples=150, alpha=1e-3)
    assert stats.accepted_tokens > 0  # the acceptance branch of speculative sampling was exercised


def test_rounds_match_drafting_from_scratch():
    verifier = make_verifier()
    draft = MedusaSpeculator.from_verifier(verifier, medusa_num_heads=3)
    assert_rounds_match_recomputation(verifier, draft, n_prompts=3, max_new_tokens=16, min_accepted=1, min_rounds=5)


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    verifier = make_verifier()
    draft = random_draft(verifier, medusa_num_heads=3, medusa_num_layers=2)
    draft.save_pretrained(tmp_path)
    ids = torch.randint(3, VOCAB, (1, 9))
    expected = fresh_proposals(draft, verifier, ids, 3)
    loaded = MedusaSpeculator.from_pretrained(tmp_path).bind_verifier(verifier)
    assert type(loaded) is MedusaSpeculator and comparable(loaded.config) == comparable(draft.config)
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    tokens, scores = fresh_proposals(loaded, verifier, ids, 3)
    assert torch.equal(tokens, expected[0])
    for a, b in zip(scores, expected[1]):
        torch.testing.assert_close(a, b)


def test_exact_after_save_load_with_remote_code_and_package_hidden(tmp_path):
    verifier = make_verifier("qwen3")
    draft = random_draft(verifier, medusa_num_heads=3)
    verifier.save_pretrained(tmp_path / "verifier")
    draft.save_pretrained(tmp_path / "draft")
    prompts = [p.tolist() for p in make_prompts(20, seed=9)]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True)
        assert type(draft).__module__.startswith("transformers_modules"), type(draft)
        assert type(draft).__name__ == "MedusaSpeculator"
        verifier = AutoModelForCausalLM.from_pretrained("verifier").eval()
        draft.bind_verifier(verifier)
        for prompt in {prompts}:
            ids = torch.tensor(prompt)
            ref = verifier.generate(ids, max_new_tokens=16, do_sample=False)
            got = verifier.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=draft)
            assert torch.equal(ref, got), (ref, got)
        print("EXACT", draft.generation_stats.drafted_tokens)
        """,
        cwd=tmp_path,
    )
    assert "EXACT" in out


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_draft(tmp_path):
    MedusaSpeculator.from_verifier(make_verifier(), medusa_num_heads=3).save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


def test_missing_tensor_is_an_error_naming_it(saved_draft):
    rewrite_weights(saved_draft, lambda w: w.pop("lm_heads.1.weight"))
    with pytest.raises(SpeculatorLoadError, match=r"missing lm_heads\.1\.weight: expected shape \(96, 32\)"):
        MedusaSpeculator.from_pretrained(saved_draft)


def test_extra_head_is_an_error_naming_it(saved_draft):
    """The published Vicuna heads say 2 heads but hold 5: a file with more heads than its config is refused
    (`speculators-hf convert` counts the heads from the tensors)."""
    rewrite_weights(saved_draft, lambda w: w.update({"lm_heads.3.weight": torch.zeros(VOCAB, HIDDEN)}))
    with pytest.raises(SpeculatorLoadError, match=r"unexpected lm_heads\.3\.weight"):
        MedusaSpeculator.from_pretrained(saved_draft)


def test_wrong_shape_is_an_error_naming_it(saved_draft):
    rewrite_weights(saved_draft, lambda w: w.update({"blocks.0.layers.0.weight": torch.zeros(HIDDEN, 30)}))
    with pytest.raises(
        SpeculatorLoadError,
        match=r"blocks\.0\.layers\.0\.weight: checkpoint has shape \(32, 30\), config expects \(32, 32\)",
    ):
        MedusaSpeculator.from_pretrained(saved_draft)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"medusa_num_heads": 0}, r"medusa_num_heads: Input should be greater than 0 \(got 0\)"),
        ({"medusa_num_layers": 0}, r"medusa_num_layers: Input should be greater than 0"),
    ],
)
def test_invalid_fields_are_pydantic_errors(fields, message):
    with pytest.raises(SpeculatorConfigError, match=message):
        MedusaSpeculatorConfig(hidden_size=HIDDEN, vocab_size=VOCAB, **fields)


def test_draft_length_beyond_the_heads_is_an_error():
    with pytest.raises(
        SpeculatorConfigError,
        match=r"speculative_tokens: 5 exceeds 3, the most a medusa draft proposes in a round \(one token per head",
    ):
        MedusaSpeculator.config_for(make_verifier(), medusa_num_heads=3, speculative_tokens=5)


def test_verifier_of_another_width_is_refused_at_bind_time():
    draft = MedusaSpeculator.from_verifier(make_verifier())
    draft.unbind_verifier()
    draft.config.verifier["hidden_size"] = None  # a converted file without the fingerprint: on_bind checks
    with pytest.raises(VerifierBindingError, match=r"hidden_size: .* size 32, verifier has hidden size 48"):
        draft.bind_verifier(make_verifier(hidden_size=48))
