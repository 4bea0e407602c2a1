"""EAGLE-1 / EAGLE-2 / HASS: the maths of a step by hand, the research tensor layout, exact generation
(greedy and sampled), the draft cache, save/load (also as remote code without the package), bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
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
from safetensors import safe_open

from speculators_hf.config import SpeculatorConfig, SpeculatorConfigError
from speculators_hf.generation import VerifierBindingError, expand_draft_vocab
from speculators_hf.models.base import SpeculatorLoadError
from speculators_hf.models.eagle import EagleSpeculator, EagleSpeculatorConfig

H, V = 32, 96
LAYER_SHAPES = {
    "layers.0.self_attn.q_proj.weight": (32, 32),  # 4 heads x 8
    "layers.0.self_attn.k_proj.weight": (16, 32),  # 2 kv heads x 8
    "layers.0.self_attn.v_proj.weight": (16, 32),
    "layers.0.self_attn.o_proj.weight": (32, 32),
    "layers.0.mlp.gate_proj.weight": (64, 32),
    "layers.0.mlp.up_proj.weight": (64, 32),
    "layers.0.mlp.down_proj.weight": (32, 64),
    "layers.0.post_attention_layernorm.weight": (32,),
}


def comparable(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def perturbed(draft: EagleSpeculator, scale: float = 0.1, seed: int = 0) -> EagleSpeculator:
    """Noise on every draft weight, so that the fc bias is non-zero and the norm weights differ from 1
    (a misplaced bias or norm then shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return draft


# ------------------------------------------------------------------------------------------------
# the maths
# ------------------------------------------------------------------------------------------------
def rms(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, positions, theta):
    """Rotary embedding as the research code (and HF Llama) apply it: [.., T, d] by rotate_half."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    freqs = positions[:, None].float() * inv_freq[None]
    emb = torch.cat([freqs, freqs], -1)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * emb.cos() + rotated * emb.sin()


def draft_by_hand(sd, head_weight, tokens, features, eps, theta):
    """The research step with plain torch ops, every position at once (causal): tokens [T] are the tokens
    t+1 beside the features [T, H] of positions t = 0..T-1. Returns (predicted features [T, H], logits [T, V])."""
    length = tokens.shape[0]
    x = torch.cat([sd["embed_tokens.weight"][tokens], features], -1) @ sd["fc.weight"].T  # embedding FIRST
    if "fc.bias" in sd:
        x = x + sd["fc.bias"]
    # attention WITHOUT an input norm: 4 query heads, 2 kv heads (GQA), head_dim 8, RoPE at positions 0..T-1
    positions = torch.arange(length)
    q = (x @ sd["layers.0.self_attn.q_proj.weight"].T).view(length, 4, 8).transpose(0, 1)
    k = (x @ sd["layers.0.self_attn.k_proj.weight"].T).view(length, 2, 8).transpose(0, 1)
    v = (x @ sd["layers.0.self_attn.v_proj.weight"].T).view(length, 2, 8).transpose(0, 1)
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    k, v = k.repeat_interleave(2, dim=0), v.repeat_interleave(2, dim=0)
    scores = q @ k.transpose(1, 2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, 32) @ sd["layers.0.self_attn.o_proj.weight"].T
    h = x + attn  # residual around the attention is x itself
    m = rms(h, sd["layers.0.post_attention_layernorm.weight"], eps)
    gate, up = m @ sd["layers.0.mlp.gate_proj.weight"].T, m @ sd["layers.0.mlp.up_proj.weight"].T
    out = h + (F.silu(gate) * up) @ sd["layers.0.mlp.down_proj.weight"].T
    return out, out @ head_weight.T  # the verifier's lm_head on the raw output: no final norm, no draft head


@pytest.mark.parametrize("fc_bias", [True, False])
def test_steps_by_hand(fc_bias):
    """Synthetic weights: the draft's features and logits over 5 positions, its first proposal (from the
    verifier's features) and its second (fed back its own predicted feature) equal the hand computation."""
    verifier = make_verifier()
    draft = perturbed(EagleSpeculator.from_verifier(verifier, fc_bias=fc_bias))
    layer = draft.config.transformer_layer_config
    eps, theta = layer.rms_norm_eps, layer.rope_parameters["rope_theta"]
    sd = {k: v.detach() for k, v in draft.state_dict().items()}
    head = verifier.get_output_embeddings().weight.detach()
    torch.manual_seed(1)
    tokens, features = torch.randint(3, V, (5,)), torch.randn(5, H)

    want_features, want_logits = draft_by_hand(sd, head, tokens, features, eps, theta)
    with torch.no_grad():
        got_features = draft(tokens[None], features[None]).hidden_states
        got_logits = draft.logits(got_features)
    torch.testing.assert_close(got_features[0], want_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logits[0], want_logits, rtol=1e-5, atol=1e-5)

    # propose after the sequence x_0..x_5 (tokens = x_1..x_5): step 1 reads the verifier's f_0..f_4,
    # step 2 reads x_6 (the drafted token) beside the draft's own output at position 4
    input_ids = torch.cat([torch.tensor([7]), tokens])[None]
    with torch.no_grad():
        drafted, scores = propose_with(draft, input_ids, [features[None]], 2)
    torch.testing.assert_close(scores[0][0], want_logits[-1], rtol=1e-5, atol=1e-5)
    assert drafted[0, 0].item() == want_logits[-1].argmax().item()
    _, second = draft_by_hand(
        sd, head, torch.cat([tokens, drafted[0, :1]]), torch.cat([features, want_features[-1:]]), eps, theta
    )
    torch.testing.assert_close(scores[1][0], second[-1], rtol=1e-5, atol=1e-5)


def test_embedding_comes_first_and_fc_bias_is_used():
    """Swapping the halves of fc (feature first) or dropping the bias changes the output: the hand
    computation above is sensitive to both."""
    verifier = make_verifier()
    draft = perturbed(EagleSpeculator.from_verifier(verifier))
    tokens, features = torch.randint(3, V, (1, 4)), torch.randn(1, 4, H)
    with torch.no_grad():
        reference = draft(tokens, features).hidden_states
        w = draft.fc.weight.clone()
        draft.fc.weight.copy_(torch.cat([w[:, H:], w[:, :H]], 1))
        assert not torch.allclose(draft(tokens, features).hidden_states, reference, atol=1e-3)
        draft.fc.weight.copy_(w)
        draft.fc.bias.zero_()
        assert not torch.allclose(draft(tokens, features).hidden_states, reference, atol=1e-3)


def test_reads_the_verifiers_post_norm_last_hidden_state():
    verifier = make_verifier()
    draft = EagleSpeculator.from_verifier(verifier)
    assert draft.verifier_layer_ids() == [4]
    ids = torch.randint(3, V, (1, 7))
    (features,) = verifier_features(verifier, ids, draft.verifier_layer_ids())
    with torch.no_grad():
        assert torch.equal(features, verifier.model(ids).last_hidden_state)


def test_unrolled_training_steps_match_generation():
    """Step j of the HASS unroll at row t equals draft step j after the prefix x_0..x_{t+1} when the draft
    is fed the true tokens: training and generation share the maths."""
    verifier = make_verifier()
    draft = perturbed(EagleSpeculator.from_verifier(verifier))
    torch.manual_seed(0)
    ids = torch.randint(3, V, (1, 12))
    (features,) = verifier_features(verifier, ids, draft.verifier_layer_ids())
    with torch.no_grad():
        unrolled = draft.unrolled_features(ids, features, steps=3)
        torch.testing.assert_close(
            unrolled[0][:, :-1], draft(ids[:, 1:], features[:, :-1]).hidden_states, rtol=1e-5, atol=1e-5
        )

    for t in (0, 4, 7):
        prefix = ids[:, : t + 2]  # positions 0..t verified, x_{t+1} is the newest token
        with torch.no_grad():
            _, scores = propose_with(draft, prefix, [features[:, : t + 1]], 3, Replay(ids[0, t + 2 : t + 5]))
            for j in range(3):
                expected = expand_draft_vocab(draft.logits(unrolled[j][:, t]), None, V)
                torch.testing.assert_close(scores[j], expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# config and checkpoint layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fc_bias", [True, False])
def test_config_round_trip(tmp_path, fc_bias):
    verifier = make_verifier("qwen3", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = EagleSpeculator.config_for(verifier, fc_bias=fc_bias, speculative_tokens=4)
    assert isinstance(config, EagleSpeculatorConfig)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "speculators" and saved["speculators_model_type"] == "eagle"
    assert saved["fc_bias"] is fc_bias and saved["architectures"] == ["EagleSpeculator"]
    assert saved["speculators_config"]["algorithm"] == "eagle"
    assert saved["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    layer = saved["transformer_layer_config"]
    # research drafts are llama layers whatever the verifier (no qwen3 q_norm/k_norm tensors)
    assert (layer["model_type"], layer["num_hidden_layers"], layer["hidden_size"]) == ("llama", 1, H)
    assert (layer["head_dim"], layer["rope_parameters"]["rope_theta"]) == (8, 1000000.0)  # the verifier's RoPE
    for loader in (SpeculatorConfig.from_pretrained, EagleSpeculatorConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is EagleSpeculatorConfig
        assert comparable(loaded) == comparable(config)
        assert loaded.fc_bias is fc_bias and loaded.speculative_tokens == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_hidden_layers": 2}, "num_hidden_layers: must be 1"),
        ({"model_type": "gpt2"}, r"model_type: must be one of \['llama', 'mistral', 'qwen2', 'qwen3'\]"),
    ],
)
def test_bad_layer_config_is_an_error_naming_the_field(tmp_path, change, message):
    EagleSpeculator.config_for(make_verifier()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["transformer_layer_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SpeculatorConfigError, match=message):
        SpeculatorConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("fc_bias", [True, False])
def test_saved_tensors_are_exactly_the_research_layout(tmp_path, fc_bias):
    """No input_layernorm, no final norm, no lm_head: the verifier's tensors are never saved, even bound."""
    verifier = make_verifier()
    draft = EagleSpeculator.from_verifier(verifier, fc_bias=fc_bias)
    assert draft.verifier is verifier and draft.verifier_head is verifier.get_output_embeddings()
    draft.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    expected = {**LAYER_SHAPES, "embed_tokens.weight": (V, H), "fc.weight": (H, 2 * H)}
    if fc_bias:
        expected["fc.bias"] = (H,)
    assert shapes == expected
    assert not any(m is verifier.get_output_embeddings() for m in draft.modules())


def test_verifier_head_is_referenced_not_owned():
    verifier = make_verifier()
    draft = EagleSpeculator.from_verifier(verifier)
    draft.to(torch.float64)  # moving the draft leaves the verifier alone
    assert verifier.get_output_embeddings().weight.dtype == torch.float32
    assert draft.verifier_head is verifier.get_output_embeddings()
    assert torch.equal(draft.embed_tokens.weight.float(), verifier.get_input_embeddings().weight)
    assert not draft.embed_tokens.weight.requires_grad  # research: the verifier's embedding, frozen
    draft.to(torch.float32)
    ids, features = torch.randint(3, V, (1, 3)), torch.randn(1, 3, H)
    with torch.no_grad():
        draft.logits(draft(ids, features).hidden_states)
    draft.unbind_verifier()
    with pytest.raises(VerifierBindingError, match=r"bind_verifier\(verifier\)"), torch.no_grad():
        draft.logits(draft(ids, features).hidden_states)


# ------------------------------------------------------------------------------------------------
# exact generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fc_bias", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_exact_on_20_prompts(family, fc_bias):
    verifier = make_verifier(family)
    draft = perturbed(EagleSpeculator.from_verifier(verifier, fc_bias=fc_bias))
    stats = assert_greedy_exact(verifier, draft, make_prompts(20, seed=7), max_new_tokens=16)
    assert stats.drafted_tokens > 0 and stats.verifier_forwards <= stats.emitted_tokens


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_draft_cache_matches_recomputation_every_round(family):
    """The draft's KV cache, cropped to the verified prefix every round, gives the same proposals as
    drafting from scratch."""
    verifier = make_verifier(family)
    assert_rounds_match_recomputation(verifier, EagleSpeculator.from_verifier(verifier))


def test_sampling_follows_verifier_distribution():
    """KS test (false-alarm rate 1e-3) of the randomised PIT of every sampled token under the verifier's
    exact conditional distribution (see test_sampling_test_has_power in tests/integration)."""
    verifier = make_verifier()
    draft = EagleSpeculator.from_verifier(verifier)
    _stat, _crit, stats = assert_sampling_exact(verifier, draft, make_prompts(1, seed=3)[0], n_samples=150)
    assert stats.accepted_tokens > 50  # the acceptance branch of speculative sampling was exercised


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    verifier = make_verifier()
    draft = perturbed(EagleSpeculator.from_verifier(verifier, fc_bias=False))
    draft.save_pretrained(tmp_path)
    loaded = EagleSpeculator.from_pretrained(tmp_path)
    assert type(loaded) is EagleSpeculator and loaded.verifier is None
    assert not loaded.embed_tokens.weight.requires_grad and loaded.fc.weight.requires_grad
    assert comparable(loaded.config) == comparable(draft.config)
    assert loaded.state_dict().keys() == draft.state_dict().keys()
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids = torch.randint(3, V, (1, 9))
    with pytest.raises(VerifierBindingError, match="no lm_head of its own"):
        fresh_proposals(loaded, verifier, ids, 3)
    loaded.bind_verifier(verifier)
    tokens, scores = fresh_proposals(loaded, verifier, ids, 3)
    expected = fresh_proposals(draft, verifier, ids, 3)
    assert torch.equal(tokens, expected[0])
    for a, b in zip(scores, expected[1]):
        torch.testing.assert_close(a, b)
    assert_greedy_exact(verifier, loaded, make_prompts(3, seed=2), max_new_tokens=12)


def test_exact_after_save_load_with_remote_code_and_package_hidden(tmp_path):
    verifier = make_verifier("qwen3")
    draft = perturbed(EagleSpeculator.from_verifier(verifier))
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
        assert type(draft).__name__ == "EagleSpeculator", type(draft)
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


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_draft(tmp_path):
    EagleSpeculator.from_verifier(make_verifier()).save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


def test_wrong_fc_shape_is_an_error_naming_it(saved_draft):
    rewrite_weights(saved_draft, lambda w: w.update({"fc.weight": torch.zeros(H, 3 * H)}))
    with pytest.raises(
        SpeculatorLoadError, match=r"fc\.weight: checkpoint has shape \(32, 96\), config expects \(32, 64\)"
    ):
        EagleSpeculator.from_pretrained(saved_draft)


@pytest.mark.parametrize("key", ["fc.bias", "layers.0.post_attention_layernorm.weight", "embed_tokens.weight"])
def test_missing_tensor_is_an_error_naming_it(saved_draft, key):
    rewrite_weights(saved_draft, lambda w: w.pop(key))
    with pytest.raises(SpeculatorLoadError, match=rf"missing {key}: expected shape"):
        EagleSpeculator.from_pretrained(saved_draft)


def test_unexpected_tensor_is_an_error(saved_draft):
    """An fc bias under `fc_bias: false` (or an input_layernorm, a draft lm_head) would be dropped silently."""
    config = json.loads((saved_draft / "config.json").read_text())
    (saved_draft / "config.json").write_text(json.dumps({**config, "fc_bias": False}))
    with pytest.raises(SpeculatorLoadError, match=r"unexpected fc\.bias(.|\n)*has an fc bias: set fc_bias to true"):
        EagleSpeculator.from_pretrained(saved_draft)
    (saved_draft / "config.json").write_text(json.dumps(config))
    rewrite_weights(saved_draft, lambda w: w.update({"layers.0.input_layernorm.weight": torch.ones(H)}))
    with pytest.raises(SpeculatorLoadError, match=r"unexpected layers\.0\.input_layernorm\.weight"):
        EagleSpeculator.from_pretrained(saved_draft)


def test_verifier_of_another_hidden_size_is_an_error_at_bind_time():
    draft = EagleSpeculator.from_verifier(make_verifier())
    other = make_verifier(hidden_size=48, head_dim=8)
    with pytest.raises(VerifierBindingError, match="hidden_size: draft expects 32, verifier has 48"):
        draft.bind_verifier(other)
    # a converted checkpoint without the fingerprint: the family's own check catches it
    for name in ("hidden_size", "num_hidden_layers"):
        draft.config.verifier[name] = None
    with pytest.raises(VerifierBindingError, match="features of size 32, verifier has hidden size 48"):
        draft.bind_verifier(other)
    draft.bind_verifier(make_verifier(num_hidden_layers=3))  # without the fingerprint: the bound verifier's depth
    assert draft.verifier_layer_ids() == [3]
