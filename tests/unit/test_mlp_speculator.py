"""MLP speculator (IBM fms-extras / vLLM `mlp_speculator`): the maths of the first stages by hand, the
published tensor layout (tied and untied), exact generation, save/load (also as remote code), bad input.

The module registers its config family on import; AutoConfig/AutoModel registration comes with
`speculators_hf.models.FAMILIES`, so these tests load through the family classes and remote code."""

from __future__ import annotations

import json
import math

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
from speculators_hf.models.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig, MLPSpeculatorNorm

HIDDEN, INNER = 32, 24  # verifier hidden size (emb_dim) and a different inner_dim, so proj.0 differs in shape


def new_draft(verifier, **overrides) -> MLPSpeculator:
    return MLPSpeculator.from_verifier(verifier, **{"inner_dim": INNER, **overrides})


def comparable(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_config_round_trip(tmp_path):
    config = MLPSpeculator.config_for(
        make_verifier(),
        inner_dim=INNER,
        n_predict=4,
        tie_weights=True,
        scale_input=True,
        top_k_tokens_per_head=[4, 3, 2, 2],
        n_candidates=6,
        speculative_tokens=2,
    )
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "speculators" and raw["speculators_model_type"] == "mlp_speculator"
    published = ("emb_dim", "inner_dim", "n_predict", "top_k_tokens_per_head", "n_candidates", "tie_weights")
    assert {k: raw[k] for k in (*published, "scale_input")} == {
        "emb_dim": HIDDEN,
        "inner_dim": INNER,
        "n_predict": 4,
        "top_k_tokens_per_head": [4, 3, 2, 2],
        "n_candidates": 6,
        "tie_weights": True,
        "scale_input": True,
    }
    assert raw["speculators_config"]["verifier"]["vocab_size"] == VOCAB
    for loader in (SpeculatorConfig.from_pretrained, MLPSpeculatorConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is MLPSpeculatorConfig
        assert comparable(loaded) == comparable(config)
        assert (loaded.vocab_size, loaded.speculative_tokens, loaded.inner_size) == (VOCAB, 2, INNER)


def test_config_defaults_follow_the_references():
    config = MLPSpeculator.config_for(make_verifier(), n_predict=5)
    assert config.emb_dim == config.inner_dim == HIDDEN  # inner_dim defaults to the verifier's width
    assert config.speculative_tokens == 5  # one token per head
    assert config.top_k_tokens_per_head == [5, 4, 3, 1, 1]  # fms-extras' [5, 4, 3], one per extra head
    assert (config.tie_weights, config.scale_input, config.n_candidates) == (False, False, 5)
    assert MLPSpeculatorConfig(emb_dim=16, vocab_size=8).inner_size == 16  # published: inner_dim 0 means emb_dim
    config = MLPSpeculator.config_for(make_verifier(), speculative_tokens=4)  # one head per draft token
    assert (config.n_predict, config.speculative_tokens) == (4, 4)


def test_new_draft_is_initialised_like_fms_extras():
    """fms-extras `reset_parameters` (speculator.py:108-114): N(0, 1/sqrt(inner_dim)) for embeddings and
    linears, norm weights 1 and biases 0."""
    torch.manual_seed(0)
    draft = new_draft(make_verifier(), n_predict=2)
    for name, p in draft.named_parameters():
        if name.startswith("ln."):
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        else:
            assert p.std().item() == pytest.approx(1 / math.sqrt(INNER), rel=0.1), name
            assert abs(p.mean().item()) < 0.02, name


# ------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------
def test_norm_is_rms_with_bias_and_no_mean_subtraction():
    norm = MLPSpeculatorNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)
    torch.testing.assert_close(norm(x), torch.tensor([1 / rms, 4 / rms, 3 / rms + 0.5, 4 / rms]))
    assert dict(MLPSpeculatorNorm(4, affine=False).named_parameters()) == {}  # ln0 of scale_input: no tensor


@pytest.mark.parametrize("tie_weights", [False, True])
@pytest.mark.parametrize("scale_input", [False, True])
def test_first_two_steps_by_hand(tie_weights, scale_input):
    """The first two stages with plain torch ops, following the references:
    - state_weight = 0.5 ** (0.5 / n_predict), emb_weight = sqrt((1 - state_weight**2) * inner_dim / 2):
      fms-extras fms_extras/models/speculator.py:84-85 (inner_dim after `0 -> emb_dim`, :55); vLLM
      mlp_speculator.py `self.state_weight` / `self.emb_weight` in __init__.
    - stage i: z = emb_i(token); s = proj_i(s) + (emb_weight / state_weight) * z (`torch.add(..., alpha=)`,
      speculator.py:160-165, vLLM `states.add_(z, alpha=...)`); s = gelu(ln_i(s)) (:166, nn.GELU() exact
      erf, :86); logits = head_i(s) (:167).
    - ln: x * rsqrt(mean(x^2) + 1e-6) * weight + bias, no mean subtraction (fms/modules/layernorm.py:56-69
      with eps=1e-06 and use_mean=False by default, :27-30; the speculator enables scale and shift,
      speculator.py:71-78; vLLM MLPSpeculatorLayerNorm).
    - scale_input: s0 = ln0(h) / sqrt(2) with a parameter-free ln0 (speculator.py:79-82 and :157; vLLM SQRT2).
    - tie_weights: one emb, head and ln for all stages; proj.0 separate, proj.1 shared by stages >= 1
      (speculator.py:89-106)."""
    torch.manual_seed(0)
    n_predict = 3
    config = MLPSpeculatorConfig(
        emb_dim=HIDDEN,
        inner_dim=INNER,
        n_predict=n_predict,
        tie_weights=tie_weights,
        scale_input=scale_input,
        vocab_size=VOCAB,
        num_hidden_layers=4,
    )
    draft = MLPSpeculator(config).eval()
    with torch.no_grad():  # synthetic weights: norms away from 1 and 0, so a misplaced norm or bias shows
        for p in draft.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    sd = draft.state_dict()

    def stage_tensor(stack, i, name="weight"):
        if tie_weights:  # the reference's tying pattern, independent of how the model stores it
            i = min(i, 1) if stack == "proj" else 0
        return sd[f"{stack}.{i}.{name}"]

    state_weight = 0.5 ** (0.5 / n_predict)
    emb_weight = math.sqrt((1 - state_weight**2) * (INNER / 2))
    assert (draft.state_weight, draft.emb_weight) == pytest.approx((state_weight, emb_weight))

    def ln(x, weight=None, bias=None):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x if weight is None else weight * x + bias

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    features = torch.randn(1, 3, HIDDEN) * 3  # verifier states at positions 0..2
    input_ids = torch.tensor([[5, 17, 40, 63]])  # x_3 = 63 came from the state at position 2
    s = features[:, -1]
    if scale_input:
        s = ln(s) / math.sqrt(2)
    logits, token = [], input_ids[0, -1]
    for i in range(2):
        u = s @ stage_tensor("proj", i).T + (emb_weight / state_weight) * stage_tensor("emb", i)[token]
        s = gelu(ln(u, stage_tensor("ln", i), stage_tensor("ln", i, "bias")))
        logits.append(s @ stage_tensor("head", i).T)
        token = logits[-1].argmax(-1)[0]

    with torch.no_grad():
        tokens, scores = propose_with(draft, input_ids, [features], 2)
    assert tokens.tolist() == [[logits[0].argmax().item(), logits[1].argmax().item()]]
    for got, want in zip(scores, logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_teacher_forced_forward_matches_drafting():
    """Head i of `forward` at row t equals draft step i after the prefix x_0..x_{t+1} when the draft is fed
    the true tokens: training and generation share the alignment (head i at row t predicts x_{t+i+2})."""
    verifier = make_verifier()
    draft = new_draft(verifier, n_predict=3, scale_input=True)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 12))
    (features,) = verifier_features(verifier, ids, draft.verifier_layer_ids())
    with torch.no_grad():
        heads = draft(features, ids).logits
    assert heads.shape == (3, 1, 12, VOCAB)
    for t in (0, 4, 7):
        with torch.no_grad():
            _, scores = propose_with(draft, ids[:, : t + 2], [features[:, : t + 1]], 3, Replay(ids[0, t + 2 : t + 5]))
        for i in range(3):
            torch.testing.assert_close(scores[i], heads[i, :, t], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# tensor layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie_weights", [False, True])
@pytest.mark.parametrize("scale_input", [False, True])
def test_saved_tensors_are_exactly_the_published_layout(tmp_path, tie_weights, scale_input):
    """emb/proj/head/ln per stage, without the Hub's `speculator.` prefix; no ln0 tensor, no verifier
    tensor; tied stacks are written as equal copies (vLLM reads the first, HF wrappers every one)."""
    draft = new_draft(make_verifier(), n_predict=3, tie_weights=tie_weights, scale_input=scale_input)
    with torch.no_grad():  # norms start at 1 and 0 in every stage: make the untied stages differ
        for p in draft.parameters():
            p.add_(torch.randn_like(p))
    draft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {
        f"{stack}.{i}.{name}"
        for i in range(3)
        for stack, name in (("emb", "weight"), ("proj", "weight"), ("head", "weight"), ("ln", "weight"), ("ln", "bias"))
    }
    assert set(tensors) == expected
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for i in range(3):
        assert shapes[f"emb.{i}.weight"] == shapes[f"head.{i}.weight"] == (VOCAB, INNER)
        assert shapes[f"proj.{i}.weight"] == ((INNER, HIDDEN) if i == 0 else (INNER, INNER))
        assert shapes[f"ln.{i}.weight"] == shapes[f"ln.{i}.bias"] == (INNER,)
    copies = [("emb", 1, 0), ("emb", 2, 0), ("head", 2, 0), ("ln", 1, 0), ("proj", 2, 1)]
    for stack, i, j in copies:
        same = torch.equal(tensors[f"{stack}.{i}.weight"], tensors[f"{stack}.{j}.weight"])
        assert same == tie_weights, (stack, i, j)


# ------------------------------------------------------------------------------------------------
# exact generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("tie_weights", [False, True])
def test_greedy_exact_on_20_prompts(family, tie_weights):
    verifier = make_verifier(family)
    draft = new_draft(verifier, n_predict=4, tie_weights=tie_weights, scale_input=tie_weights)
    stats = assert_greedy_exact(verifier, draft, make_prompts(20, seed=7), max_new_tokens=20)
    assert stats.drafted_tokens > 0 and stats.verifier_forwards <= stats.emitted_tokens
    ids = make_prompts(1, seed=1, min_len=6)[0]
    assert fresh_proposals(draft, verifier, ids, 10)[0].shape == (1, 4)  # at most one token per head


def test_sampling_follows_verifier_distribution():
    verifier = make_verifier()
    draft = new_draft(verifier, n_predict=3)
    _stat, _crit, stats = assert_sampling_exact(verifier, draft, make_prompts(1, seed=3)[0], n_samples=150, alpha=1e-3)
    assert stats.accepted_tokens > 0  # the acceptance branch of speculative sampling was exercised


def test_rounds_match_drafting_from_scratch():
    """Each round reads only the newly verified states; its proposals equal drafting from the full prefix."""
    verifier = make_verifier()
    draft = new_draft(verifier, n_predict=3, tie_weights=True)
    assert_rounds_match_recomputation(verifier, draft, n_prompts=3, max_new_tokens=16, min_accepted=1, min_rounds=5)


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie_weights", [False, True])
def test_save_load_round_trip(tmp_path, tie_weights):
    verifier = make_verifier()
    draft = new_draft(verifier, n_predict=3, tie_weights=tie_weights, scale_input=True)
    draft.save_pretrained(tmp_path)
    ids = torch.randint(3, VOCAB, (1, 9))
    expected = fresh_proposals(draft, verifier, ids, 3)
    loaded = MLPSpeculator.from_pretrained(tmp_path).bind_verifier(verifier)
    assert type(loaded) is MLPSpeculator and comparable(loaded.config) == comparable(draft.config)
    assert loaded.state_dict().keys() == draft.state_dict().keys()
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # tied stages still share one module after loading (one set of weights to train), untied ones do not
    assert (loaded.emb[2] is loaded.emb[0]) == (loaded.proj[2] is loaded.proj[1]) == tie_weights
    assert loaded.proj[1] is not loaded.proj[0]
    tokens, scores = fresh_proposals(loaded, verifier, ids, 3)
    assert torch.equal(tokens, expected[0])
    for a, b in zip(scores, expected[1]):
        torch.testing.assert_close(a, b)


def test_exact_after_save_load_with_remote_code_and_package_hidden(tmp_path):
    verifier = make_verifier("qwen3")
    draft = new_draft(verifier, n_predict=3, tie_weights=True, scale_input=True)
    verifier.save_pretrained(tmp_path / "verifier")
    draft.save_pretrained(tmp_path / "draft")
    prompts = [p.tolist() for p in make_prompts(20, seed=9)]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True)
        assert type(draft).__module__.startswith("transformers_modules"), type(draft)
        assert type(draft).__name__ == "MLPSpeculator" and draft.emb[2] is draft.emb[0]
        verifier = AutoModelForCausalLM.from_pretrained("verifier").eval()
        draft.bind_verifier(verifier)
        for prompt in {prompts}:
            ids = torch.tensor(prompt)
            ref = verifier.generate(ids, max_new_tokens=16, do_sample=False)
            got = verifier.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=draft)
            assert torch.equal(ref, got), (ref, got)
        print(sorted((k, v.sum().item()) for k, v in draft.state_dict().items()))
        print("EXACT", draft.generation_stats.verifier_forwards)
        """,
        cwd=tmp_path,
    )
    assert "EXACT" in out
    assert out.splitlines()[-2] == str(sorted((k, v.sum().item()) for k, v in draft.state_dict().items()))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_draft(tmp_path):
    new_draft(make_verifier(), n_predict=3).save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


def test_missing_tensor_is_an_error_naming_it(saved_draft):
    rewrite_weights(saved_draft, lambda w: w.pop("head.1.weight"))
    with pytest.raises(SpeculatorLoadError, match=r"missing head\.1\.weight: expected shape \(96, 24\)"):
        MLPSpeculator.from_pretrained(saved_draft)


def test_wrong_shape_is_an_error_naming_it(saved_draft):
    rewrite_weights(saved_draft, lambda w: w.update({"proj.0.weight": torch.zeros(INNER, 30)}))
    with pytest.raises(
        SpeculatorLoadError, match=r"proj\.0\.weight: checkpoint has shape \(24, 30\), config expects \(24, 32\)"
    ):
        MLPSpeculator.from_pretrained(saved_draft)


def test_tied_checkpoint_needs_one_copy_of_each_shared_tensor(tmp_path):
    """A tied stage is one module listed once per stage, so transformers fills every stage from one
    copy: a file with only the first copies (what vLLM's parameters name) loads; no copy at all is an error."""
    draft = new_draft(make_verifier(), n_predict=3, tie_weights=True)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p))
    draft.save_pretrained(tmp_path)
    first_copies = {"emb.0.weight", "proj.0.weight", "proj.1.weight", "head.0.weight", "ln.0.weight", "ln.0.bias"}
    rewrite_weights(tmp_path, lambda w: [w.pop(k) for k in set(w) - first_copies])
    loaded = MLPSpeculator.from_pretrained(tmp_path)
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    rewrite_weights(tmp_path, lambda w: w.pop("head.0.weight"))
    with pytest.raises(SpeculatorLoadError, match=r"missing head\.\d\.weight: expected shape \(96, 24\)"):
        MLPSpeculator.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_predict": 0}, r"n_predict: Input should be greater than 0 \(got 0\)"),
        ({"n_predict": 3, "top_k_tokens_per_head": [5, 4]}, "top_k_tokens_per_head: needs one entry per head"),
        ({"n_predict": 1, "tie_weights": True}, "tie_weights: needs n_predict >= 2"),
        ({"n_predict": 2, "inner_dim": -1}, r"inner_dim: Input should be greater than or equal to 0"),
    ],
)
def test_invalid_fields_are_pydantic_errors(fields, message):
    with pytest.raises(SpeculatorConfigError, match=message):
        MLPSpeculatorConfig(emb_dim=HIDDEN, vocab_size=VOCAB, **fields)


def test_invalid_config_file_and_draft_length(saved_draft):
    raw = json.loads((saved_draft / "config.json").read_text())
    (saved_draft / "config.json").write_text(json.dumps({**raw, "n_predict": 0}))
    with pytest.raises(SpeculatorConfigError, match="n_predict"):
        SpeculatorConfig.from_pretrained(saved_draft)
    with pytest.raises(
        SpeculatorConfigError,
        match=r"speculative_tokens: 5 exceeds 3, the most a mlp_speculator draft proposes in a round \(one token per head",
    ):
        MLPSpeculator.config_for(make_verifier(), n_predict=3, speculative_tokens=5)


def test_verifier_of_another_width_is_refused_at_bind_time():
    draft = new_draft(make_verifier())
    draft.unbind_verifier()
    draft.config.verifier["hidden_size"] = None  # a file without the fingerprint: on_bind still checks emb_dim
    with pytest.raises(VerifierBindingError, match=r"emb_dim: .* size 32, verifier has hidden size 48"):
        draft.bind_verifier(make_verifier(hidden_size=48))
