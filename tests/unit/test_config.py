"""SpeculatorConfig: the speculators/vLLM fields, pydantic validation, AutoConfig dispatch."""

from __future__ import annotations

import json

import pytest
from conftest import make_verifier
from transformers import AutoConfig

import speculators_hf as sh
from speculators_hf.config import MODEL_TYPE, SpeculatorConfig, SpeculatorConfigError
from speculators_hf.models import FAMILIES


def comparable(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def eagle3_config(**overrides) -> sh.Eagle3SpeculatorConfig:
    return sh.Eagle3Speculator.config_from_verifier(make_verifier().config, draft_vocab_size=64, **overrides)


def test_to_dict_has_every_key_vllm_and_speculators_read():
    d = eagle3_config().to_dict()
    assert d["model_type"] == MODEL_TYPE == "speculators"
    assert d["speculators_model_type"] == "eagle3"
    assert d["speculators_version"]
    block = d["speculators_config"]
    assert block["algorithm"] == "eagle3"
    assert block["default_proposal_method"] == "greedy"
    assert block["proposal_methods"][0] == {
        "proposal_type": "greedy",
        "speculative_tokens": 5,
        "verifier_accept_k": 1,
        "accept_tolerance": 0.0,
    }
    assert {"name_or_path", "architectures"} <= set(block["verifier"])
    for key in (
        "draft_vocab_size",
        "target_hidden_size",
        "eagle_aux_hidden_state_layer_ids",
        "norm_before_residual",
        "norm_before_fc",
        "fc_norm",
        "norm_output",
        "embed_requires_grad",
    ):
        assert key in d, key
    assert d["transformer_layer_config"]["model_type"] == "llama"
    assert d["transformer_layer_config"]["num_hidden_layers"] == 1


def test_defaults_are_written_even_when_default(tmp_path):
    """vLLM assumes norm_before_residual=True when absent: a saved config always carries it."""
    eagle3_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["norm_before_residual"] is False
    assert saved["model_type"] == "speculators"


@pytest.mark.parametrize("config_class", [m.config_class for m in FAMILIES.values()])
def test_autoconfig_dispatches_on_speculators_model_type(tmp_path, config_class):
    model_class = FAMILIES[config_class.family]
    config = model_class.config_for(make_verifier())
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is config_class
    assert comparable(loaded) == comparable(config)
    assert type(SpeculatorConfig.from_pretrained(tmp_path)) is config_class


def test_fingerprint_is_the_verifier_token_space():
    v = make_verifier()
    config = sh.Eagle3Speculator.config_for(v)
    assert config.get_text_config().vocab_size == v.config.vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, key) == getattr(v.config, key)
    assert config.verifier["num_hidden_layers"] == v.config.num_hidden_layers


def test_speculators_09_config_without_model_type_loads(tmp_path):
    """A config.json written by `speculators` 0.9 has no top-level model_type."""
    config = eagle3_config().to_dict()
    for key in ("model_type", "auto_map", "transformers_version"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = SpeculatorConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, sh.Eagle3SpeculatorConfig)
    assert loaded.draft_vocab_size == 64


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("draft_vocab_size", "many", "draft_vocab_size: Input should be a valid integer"),
        ("draft_vocab_size", 0, "draft_vocab_size: Input should be greater than 0"),
        ("eagle_aux_hidden_state_layer_ids", [1, 1, 2], "distinct"),
        ("norm_before_residual", "perhaps", "norm_before_residual: Input should be a valid boolean"),
    ],
)
def test_wrong_field_names_field_and_expectation(tmp_path, field, value, expected):
    config = eagle3_config().to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeculatorConfigError, match=expected):
        AutoConfig.from_pretrained(tmp_path)


def test_bad_speculators_block(tmp_path):
    config = eagle3_config().to_dict()
    config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = -2
    config["speculators_config"]["verifier"]["vocab_size"] = "big"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeculatorConfigError) as err:
        SpeculatorConfig.from_pretrained(tmp_path)
    assert "speculators_config.proposal_methods.0.speculative_tokens: Input should be greater than 0 (got -2)" in str(
        err.value
    )
    assert "speculators_config.verifier.vocab_size" in str(err.value)


def test_unknown_family(tmp_path):
    config = eagle3_config().to_dict()
    config["speculators_model_type"] = "eagle7"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeculatorConfigError, match=r"unknown speculators_model_type 'eagle7'.*'eagle3'"):
        AutoConfig.from_pretrained(tmp_path)


def test_not_a_speculator(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(SpeculatorConfigError, match="no 'speculators_model_type'"):
        SpeculatorConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ['{"model_type": "speculators", "speculators_model_type": "eag', "not json at all"])
def test_malformed_or_truncated_config_json(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(OSError, match=r"config\.json.*not a valid JSON"):
        AutoConfig.from_pretrained(tmp_path)


def test_wrong_family_class_for_file():
    with pytest.raises(SpeculatorConfigError, match="expects 'eagle3'"):
        sh.Eagle3SpeculatorConfig(speculators_model_type="independent")


def test_speculative_tokens_round_trip():
    config = eagle3_config()
    config.speculative_tokens = 7
    assert SpeculatorConfig.from_dict(config.to_dict()).speculative_tokens == 7
    with pytest.raises(SpeculatorConfigError, match="speculative_tokens"):
        config.speculative_tokens = 0


def test_each_field_is_declared_once_and_its_annotation_validates_it():
    """A family's schema is derived from its config class's own dataclass fields (declared once, annotated with
    their bounds): the schema has exactly those fields, and a value breaking an annotation is refused."""
    for config_class in (m.config_class for m in FAMILIES.values()):
        schema = config_class.fields_schema()
        own = {name for name in config_class.__dataclass_fields__ if name not in SpeculatorConfig.__dataclass_fields__}
        assert own == set(schema.model_fields), config_class
    with pytest.raises(SpeculatorConfigError, match=r"draft_vocab_size: Input should be greater than 0"):
        sh.Eagle3SpeculatorConfig(draft_vocab_size=0)
    with pytest.raises(SpeculatorConfigError, match=r"medusa_num_heads: Input should be less than or equal to 64"):
        sh.MedusaSpeculatorConfig(medusa_num_heads=65)
