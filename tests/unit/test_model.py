"""Every registered family survives save/load; the base class works for any family; bad checkpoints fail clearly."""

from __future__ import annotations

import ast
import json
import os

import pytest
import torch
from conftest import OneTokenDraft, assert_greedy_exact, fresh_proposals, make_prompts, make_verifier
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

import speculators_hf as sh
from speculators_hf.config import SpeculatorConfig
from speculators_hf.generation import Sampler, VerifierBindingError, expand_draft_vocab
from speculators_hf.models import FAMILIES


def comparable(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


PAIRS = [(m.config_class, m) for m in FAMILIES.values()]  # the built-in families (before the one below)


# ------------------------------------------------------------------------------------------------
# a minimal family, to show that the base class carries the whole contract
# ------------------------------------------------------------------------------------------------
class SpeculatorTestConfig(SpeculatorConfig):
    family = "test_mlp"
    hidden_size: int = 8


@sh.register_family
class SpeculatorTestModel(OneTokenDraft):
    """Predicts token t+2 from the verifier's last hidden state at t and the embedding of token t+1."""

    config_class = SpeculatorTestConfig

    @classmethod
    def config_from_verifier(cls, verifier_config, **overrides):
        return SpeculatorTestConfig(hidden_size=verifier_config.hidden_size, **overrides)


def test_speculator_test_model_forward_and_exact_generation():
    verifier = make_verifier()
    draft = SpeculatorTestModel.from_verifier(verifier)
    ids = torch.randint(3, 90, (1, 6))
    logits = draft(ids, torch.randn(1, 6, 32))
    assert logits.shape == (1, 6, verifier.config.vocab_size)
    stats = assert_greedy_exact(verifier, draft, make_prompts(5), max_new_tokens=12)
    assert stats.drafted_tokens > 0 and stats.verifier_forwards > 0


# ------------------------------------------------------------------------------------------------
# every registered family
# ------------------------------------------------------------------------------------------------
FAMILY_IDS = [m.__name__ for _, m in PAIRS]


@pytest.mark.parametrize("config_class, model_class", PAIRS, ids=FAMILY_IDS)
def test_reload_and_populate_configs(tmp_path, config_class, model_class):
    config = model_class.config_for(make_verifier())
    assert isinstance(config, config_class)
    config.save_pretrained(tmp_path)
    for loader in (AutoConfig.from_pretrained, SpeculatorConfig.from_pretrained, config_class.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is config_class
        assert comparable(loaded) == comparable(config)


@pytest.mark.parametrize("config_class, model_class", PAIRS, ids=FAMILY_IDS)
def test_reload_and_populate_models(tmp_path, config_class, model_class):
    verifier = make_verifier()
    draft = model_class.from_verifier(verifier)
    draft.save_pretrained(tmp_path)
    ids = torch.randint(3, 90, (1, 9))
    expected = fresh_proposals(draft, verifier, ids, 3)
    for loader in (
        AutoModelForCausalLM.from_pretrained,
        AutoModel.from_pretrained,
        sh.load_draft,
        model_class.from_pretrained,
    ):
        loaded = loader(tmp_path)
        assert type(loaded) is model_class
        assert comparable(loaded.config) == comparable(draft.config)
        assert loaded.state_dict().keys() == draft.state_dict().keys()
        for key, value in draft.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
        loaded.bind_verifier(verifier)  # EAGLE-1 drafts compute logits with the verifier's lm_head
        tokens, scores = fresh_proposals(loaded, verifier, ids, 3)
        loaded.unbind_verifier()
        assert torch.equal(tokens, expected[0])
        for a, b in zip(scores, expected[1]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("config_class, model_class", PAIRS, ids=FAMILY_IDS)
def test_only_safetensors_and_remote_code_are_written(tmp_path, config_class, model_class):
    model_class.from_verifier(make_verifier()).save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    for ref in auto_map.values():
        assert (tmp_path / (ref.split(".")[0] + ".py")).exists()
    for name in names:
        if name.endswith(".py"):  # transformers scans every import of remote code: none may name the package
            for node in ast.walk(ast.parse((tmp_path / name).read_text())):
                if isinstance(node, ast.Import):
                    assert not any(a.name.startswith("speculators_hf") for a in node.names), name
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 1 or not (node.module or "").startswith("speculators_hf"), name


# ------------------------------------------------------------------------------------------------
# binding
# ------------------------------------------------------------------------------------------------
def test_from_verifier_records_reference_and_fingerprint(tiny_tokenizer):
    verifier = make_verifier()
    verifier.name_or_path = "org/tiny-llama"
    draft = sh.Eagle3Speculator.from_verifier(verifier, tokenizer=tiny_tokenizer)
    ref = draft.config.verifier
    assert ref["name_or_path"] == "org/tiny-llama"
    assert ref["architectures"] == ["LlamaForCausalLM"]
    assert (ref["vocab_size"], ref["hidden_size"], ref["num_hidden_layers"]) == (96, 32, 4)
    assert ref["tokenizer_hash"]
    assert draft.verifier is verifier


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vocab_size": 100}, "vocab_size: draft expects 96, verifier has 100"),
        ({"hidden_size": 48}, "hidden_size: draft expects 32, verifier has 48"),
        ({"num_hidden_layers": 6}, "num_hidden_layers: draft expects 4, verifier has 6"),
        ({"eos_token_id": 5}, "eos_token_id: draft expects 2, verifier has 5"),
    ],
)
def test_wrong_verifier_is_an_error_at_bind_time(overrides, message):
    draft = sh.Eagle3Speculator.from_verifier(make_verifier())
    with pytest.raises(VerifierBindingError, match=message):
        draft.bind_verifier(make_verifier(**overrides))


def test_wrong_tokenizer_is_an_error(tiny_tokenizer):
    draft = sh.Eagle3Speculator.from_verifier(make_verifier(), tokenizer=tiny_tokenizer)
    other = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    other.add_tokens(["extra"])
    with pytest.raises(VerifierBindingError, match="tokenizer_hash"):
        draft.bind_verifier(make_verifier(), tokenizer=other)


def test_unbind_removes_every_hook():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    assert "generate" in verifier.__dict__
    draft.unbind_verifier()
    assert "generate" not in verifier.__dict__
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in verifier.modules())


# ------------------------------------------------------------------------------------------------
# bad checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_draft(tmp_path):
    draft = sh.Eagle3Speculator.from_verifier(make_verifier(), draft_vocab_size=64)
    draft.save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


def test_missing_tensor_is_an_error_naming_it(saved_draft):
    weights = load_file(saved_draft / "model.safetensors")
    del weights["fc.weight"]
    save_file(weights, saved_draft / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(sh.SpeculatorLoadError, match=r"missing fc.weight: expected shape \(32, 96\)"):
        AutoModelForCausalLM.from_pretrained(saved_draft)


def test_wrong_shape_is_an_error_naming_it(saved_draft):
    weights = load_file(saved_draft / "model.safetensors")
    weights["lm_head.weight"] = torch.zeros(65, 32)
    save_file(weights, saved_draft / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        sh.SpeculatorLoadError, match=r"lm_head\.weight: checkpoint has shape \(65, 32\), config expects \(64, 32\)"
    ):
        AutoModelForCausalLM.from_pretrained(saved_draft)


def test_pickle_instead_of_safetensors_is_refused(saved_draft):
    weights = load_file(saved_draft / "model.safetensors")
    (saved_draft / "model.safetensors").unlink()
    torch.save(weights, saved_draft / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(saved_draft)


def test_interrupted_save_leaves_previous_checkpoint_intact(saved_draft, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved_draft.iterdir()}
    draft = sh.Eagle3Speculator.from_verifier(make_verifier(seed=1), draft_vocab_size=64)

    def crash(self, directory, *args, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        draft.save_pretrained(saved_draft)
    assert {p.name: p.read_bytes() for p in saved_draft.iterdir()} == before
    assert sorted(p.name for p in saved_draft.parent.iterdir()) == ["draft"]


def test_save_keeps_foreign_files(saved_draft):
    (saved_draft / "tokenizer.json").write_text("{}")
    sh.Eagle3Speculator.from_verifier(make_verifier(), draft_vocab_size=64).save_pretrained(saved_draft)
    assert (saved_draft / "tokenizer.json").exists()


def test_draft_is_not_a_text_generator():
    draft = sh.Eagle3Speculator.from_verifier(make_verifier())
    with pytest.raises(TypeError, match="assistant_model=draft"):
        draft.generate(torch.tensor([[5, 6]]))


def test_sampler_applies_processors_and_picks_from_scores():
    sampler = Sampler(do_sample=False, row_processors=[[lambda ids, s: s / 0.5]])
    sampler.begin_round([0], [torch.tensor([1])])
    token, scores = sampler.pick(torch.tensor([[0.0, 2.0, 1.0]]))
    assert token.item() == 1 and torch.equal(scores, torch.tensor([[0.0, 4.0, 2.0]]))


def test_expand_draft_vocab_maps_ids():
    d2t = torch.tensor([2, 2, 5])  # draft ids 0,1,2 -> verifier ids 2,3,7
    full = expand_draft_vocab(torch.tensor([[1.0, 2.0, 3.0]]), d2t, 8)
    assert full[0, [2, 3, 7]].tolist() == [1.0, 2.0, 3.0]
    assert torch.isinf(full[0, [0, 1, 4, 5, 6]]).all()


def test_unexpected_tensor_is_an_error_for_every_family(tmp_path):
    """A tensor the config does not describe would be dropped silently by transformers: refuse it."""
    verifier = make_verifier()
    for model_class in FAMILIES.values():
        folder = tmp_path / model_class.__name__
        model_class.from_verifier(verifier).save_pretrained(folder)
        weights = load_file(folder / "model.safetensors")
        save_file({**weights, "extra.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(sh.SpeculatorLoadError, match=r"unexpected extra\.weight"):
            model_class.from_pretrained(folder)


def test_dtype_applies_to_every_family(tmp_path):
    """`dtype=` reaches every weight, also the independent LM built from a nested config that records its
    own dtype (as a trained draft's does)."""
    verifier = make_verifier()
    for model_class in FAMILIES.values():
        folder = tmp_path / model_class.__name__
        draft = model_class.from_verifier(verifier)
        if hasattr(draft.config, "draft_model_config"):
            draft.config.draft_model_config.dtype = "float32"
        draft.save_pretrained(folder)
        loaded = model_class.from_pretrained(folder, dtype=torch.float16)
        floats = {p.dtype for p in loaded.parameters()}
        assert floats == {torch.float16}, (model_class.__name__, floats)
