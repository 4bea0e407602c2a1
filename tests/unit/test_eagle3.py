"""EAGLE-3: the math of one step, the exact vLLM tensor layout, aux layer defaults, draft vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_verifier
from safetensors import safe_open

import speculators_hf as sh
from speculators_hf.models.eagle3 import default_aux_layer_ids

LAYER = {
    "layers.0.input_layernorm.weight",
    "layers.0.hidden_norm.weight",
    "layers.0.post_attention_layernorm.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
}


def rms(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("norm_before_residual", [False, True])
@pytest.mark.parametrize("norm_output", [False, True])
def test_one_step_by_hand(norm_before_residual, norm_output):
    """One position (attention over a single key is just o_proj(v_proj(x)), whatever RoPE does):
    x = cat(input_layernorm(embed(token)), hidden_norm(h)) with h = fc(cat(aux states)); residual is h
    (or hidden_norm(h) with norm_before_residual); logits = lm_head(norm(out)) over the draft vocab."""
    torch.manual_seed(0)
    draft = sh.Eagle3Speculator.from_verifier(
        make_verifier(), draft_vocab_size=64, norm_before_residual=norm_before_residual, norm_output=norm_output
    )
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from 1, so a misplaced norm shows
    eps = draft.config.transformer_layer_config.rms_norm_eps
    sd = draft.state_dict()
    token = torch.tensor([[7]])
    aux = [torch.randn(1, 1, 32) for _ in range(3)]

    h = torch.cat(aux, -1) @ sd["fc.weight"].T
    normed_h = rms(h, sd["layers.0.hidden_norm.weight"], eps)
    e = rms(sd["embed_tokens.weight"][token], sd["layers.0.input_layernorm.weight"], eps)
    x = torch.cat([e, normed_h], -1)
    v = x @ sd["layers.0.self_attn.v_proj.weight"].T  # [1,1,kv_heads*head_dim]
    v = v.view(1, 1, 2, 8).repeat_interleave(2, dim=2).reshape(1, 1, 32)  # GQA: 4 heads share 2 kv heads
    attn = v @ sd["layers.0.self_attn.o_proj.weight"].T
    h1 = (normed_h if norm_before_residual else h) + attn
    m = rms(h1, sd["layers.0.post_attention_layernorm.weight"], eps)
    mlp = (F.silu(m @ sd["layers.0.mlp.gate_proj.weight"].T) * (m @ sd["layers.0.mlp.up_proj.weight"].T)) @ sd[
        "layers.0.mlp.down_proj.weight"
    ].T
    out = h1 + mlp
    logits = rms(out, sd["norm.weight"], eps) @ sd["lm_head.weight"].T

    with torch.no_grad():
        got = draft(token, aux).logits
        fed_back = draft.advance(token, draft.project(aux), torch.tensor([0]))
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fed_back, rms(out, sd["norm.weight"], eps) if norm_output else out)


@pytest.mark.parametrize("draft_vocab_size", [64, 96])
def test_saved_tensors_are_exactly_the_vllm_layout(tmp_path, draft_vocab_size):
    """vLLM refuses any extra tensor; d2t must be present exactly when the draft vocabulary is smaller."""
    sh.Eagle3Speculator.from_verifier(make_verifier(), draft_vocab_size=draft_vocab_size).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    expected = LAYER | {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight"}
    if draft_vocab_size < 96:
        expected |= {"d2t", "t2d"}
    assert keys == expected
    assert shapes["fc.weight"] == (32, 96)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (32, 64)  # q/k/v read [embedding, hidden] = 2H
    assert shapes["lm_head.weight"] == (draft_vocab_size, 32)
    assert shapes["embed_tokens.weight"] == (96, 32)


@pytest.mark.parametrize("num_layers", range(3, 41))
def test_default_aux_layers_are_distinct_and_in_range(num_layers):
    ids = default_aux_layer_ids(num_layers)
    assert len(set(ids)) == 3 and all(0 <= i < num_layers for i in ids) and ids == sorted(ids)
    if num_layers >= 8:
        assert ids == [2, num_layers // 2, num_layers - 3]  # the research default


def test_too_shallow_verifier_for_default_aux_layers():
    with pytest.raises(sh.SpeculatorConfigError, match="at least 3 layers"):
        default_aux_layer_ids(2)


def test_draft_vocab_maps_to_verifier_ids():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=4)
    draft.set_draft_vocab(torch.tensor([50, 3, 90, 7]))
    assert draft.d2t.tolist() == [3, 6, 48, 87]  # sorted ids 3, 7, 50, 90 minus their draft index
    assert draft.t2d.nonzero().flatten().tolist() == [3, 7, 50, 90]
    with pytest.raises(ValueError, match="exactly draft_vocab_size=4"):
        draft.set_draft_vocab(torch.tensor([1, 2]))


def test_embeddings_and_head_start_from_the_verifier():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    assert torch.equal(draft.embed_tokens.weight, verifier.get_input_embeddings().weight)
    assert torch.equal(draft.lm_head.weight, verifier.get_output_embeddings().weight[:64])


def test_verifier_with_too_few_layers_for_the_aux_ids():
    draft = sh.Eagle3Speculator.from_verifier(make_verifier(num_hidden_layers=8))
    assert draft.config.eagle_aux_hidden_state_layer_ids == [2, 4, 5]
    draft.config.verifier["num_hidden_layers"] = None  # an old file without the fingerprint
    with pytest.raises(sh.VerifierBindingError, match=r"needs verifier hidden states \[5\].*4 layers"):
        draft.bind_verifier(make_verifier(num_hidden_layers=4))


def test_trust_remote_code_with_package_installed(tmp_path):
    from transformers import AutoModelForCausalLM

    draft = sh.Eagle3Speculator.from_verifier(make_verifier())
    draft.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert sh.is_speculator(loaded)
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), loaded.state_dict().values()))


def test_unrolled_training_steps_match_generation():
    """Step j of the training-time-test unroll at row t equals draft step j at generation time after
    the prefix x_0..x_{t+1} when the draft is fed the true tokens: training and inference share the math."""
    from conftest import Replay, propose_with, verifier_features

    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    torch.manual_seed(0)
    ids = torch.randint(3, 96, (1, 12))
    features = verifier_features(verifier, ids, draft.verifier_layer_ids())
    with torch.no_grad():
        unrolled = draft.unrolled_logits(ids, features, steps=3)

    for t in (0, 4, 7):
        prefix = ids[:, : t + 2]  # positions 0..t verified, x_{t+1} is the newest token
        with torch.no_grad():
            _, scores = propose_with(draft, prefix, [f[:, : t + 1] for f in features], 3, Replay(ids[0, t + 2 : t + 5]))
        for j in range(3):
            expected = sh.generation.expand_draft_vocab(unrolled[j][:, t], draft.d2t, 96)
            torch.testing.assert_close(scores[j], expected, rtol=1e-4, atol=1e-4)


def test_embedding_stays_frozen_after_loading(tmp_path):
    sh.Eagle3Speculator.from_verifier(make_verifier()).save_pretrained(tmp_path)
    loaded = sh.Eagle3Speculator.from_pretrained(tmp_path)
    assert not loaded.embed_tokens.weight.requires_grad
    assert loaded.fc.weight.requires_grad
