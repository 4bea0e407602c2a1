"""Model cards: every family renders and parses back with valid metadata; save_pretrained writes README.md,
refreshes a generated one and never replaces a person's; `inspect` maps tensor names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_verifier
from huggingface_hub import ModelCard

import speculators_hf as sh
from speculators_hf import hub
from speculators_hf.cli import main
from speculators_hf.config import default_speculators_config

VERIFIER_ID = "tiny-org/tiny-llama"
REPO_ID = "tiny-org/tiny-llama-draft"
FAMILIES = ("eagle3", "eagle", "medusa", "mlp_speculator", "independent")
RESULT = {"tau": 3.9, "speedup": 2.1, "command": "speculators-hf bench --verifier x --draft d=y", "device": "1x H100"}


def named_verifier():
    verifier = make_verifier()
    verifier.name_or_path = VERIFIER_ID
    return verifier


def stub_config(family: str, **fields) -> dict:
    """config.json content of a family (for families whose module may not exist in this checkout yet)."""
    spec = default_speculators_config(family, speculative_tokens=3)
    spec["verifier"].update(
        name_or_path=VERIFIER_ID,
        architectures=["LlamaForCausalLM"],
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return {
        "model_type": "speculators",
        "speculators_model_type": family,
        "speculators_version": "0.9.0",
        "architectures": [f"{family.title().replace('_', '')}Speculator"],
        "speculators_config": spec,
        **fields,
    }


def draft_source(family: str):
    """A real, untrained draft of `family` for the named verifier."""
    if family == "eagle3":
        return sh.Eagle3Speculator.from_verifier(named_verifier(), draft_vocab_size=64)
    registered = dict(sh.models.FAMILIES)
    return registered[family].from_verifier(named_verifier())


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 3)])


def load_card(text: str, tmp_path: Path) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_card_renders_for_every_family(family, tmp_path):
    source = draft_source(family)
    text = str(sh.create_model_card(source, repo_id=REPO_ID, license="apache-2.0"))
    card = load_card(text, tmp_path)
    meta = card.data.to_dict()
    assert meta["base_model"] == VERIFIER_ID
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"speculative-decoding", family, "speculators", "speculators-hf"} <= set(meta["tags"])
    assert front_matter(text) == meta  # the YAML header round-trips through ModelCardData

    assert hub.cards.template_name(family) == "base.md.j2"  # the family's words come from its model class
    body = card.text
    assert hub.is_generated_card(text) and hub.GENERATED_MARK in text
    assert hub.family_title(family) in body
    # transformers: the package form, the pipeline form and the remote-code form
    assert f'AutoSpeculatorForCausalLM.from_pretrained("{REPO_ID}"' in body
    assert "assistant_model=draft" in body and 'pipeline("text-generation"' in body
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True' in body
    assert f'AutoTokenizer.from_pretrained("{VERIFIER_ID}")' in body
    # the guarantee, stated precisely: identical in float32; in half precision the verifying pass decides
    prose = " ".join(body.split())
    assert "in float32, greedy decoding gives the same tokens as the verifier alone" in prose
    assert "In bfloat16 or float16 a pass over several tokens does not round like one-token passes" in prose
    assert "same tokens as without the draft" not in prose  # the snippets load the pair in bfloat16
    # vLLM: the section follows the family's checked facts (tests/unit/test_cards.py), by the repo id
    assert "## Serve with vLLM" in body and hub.cards.REPO_PLACEHOLDER not in body
    # nothing was measured or described: no such sections, no numbers
    assert "## Measured" not in body and "## Training" not in body and "tau" not in meta


def test_unknown_family_falls_back_to_the_base_template(tmp_path):
    text = str(sh.create_model_card(stub_config("future_family", block_size=8), repo_id=REPO_ID))
    assert hub.cards.template_name("future_family") == "base.md.j2"
    card = load_card(text, tmp_path)
    assert {"future_family", "speculative-decoding"} <= set(card.data.tags)
    assert "`future_family`" in card.text and "## Serve with vLLM" in card.text
    assert "license" not in card.data.to_dict()  # unknown, so not invented


def test_the_base_template_ships():
    assert (hub.cards.TEMPLATES_DIR / "base.md.j2").is_file()
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert "[tool.setuptools.package-data]\n" in pyproject and '"model_cards/*.md.j2"' in pyproject


def test_results_and_training_are_shown_with_their_command(tmp_path):
    training = {
        "data": "ShareGPT replies regenerated by the verifier",
        "steps": 20000,
        "command": "accelerate launch x",
    }
    results = [RESULT, {"k": 3, "tau": 3.1, "command": "speculators-hf bench --k 3"}]
    card = load_card(str(sh.create_model_card(draft_source("eagle3"), training=training, results=results)), tmp_path)
    body = card.text
    assert "## Training" in body and "ShareGPT replies regenerated by the verifier" in body and "20000" in body
    assert "accelerate launch x" in body
    assert "## Measured acceptance and speedup" in body
    assert "| 3.9 | 2.1x | 1x H100 |" in body and "3.1" in body
    assert RESULT["command"] in body and "speculators-hf bench --k 3" in body


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ({"tau": 3.9}, "command"),
        ({"command": "x"}, "tau"),
        ({"tau": "fast", "command": "x"}, "number"),
        (["tau=3.9"], "dict"),
    ],
)
def test_results_without_numbers_or_command_are_refused(results, match):
    with pytest.raises(sh.ModelCardInputError, match=match):
        sh.create_model_card(draft_source("eagle3"), results=results)


def test_unknown_card_input_is_an_error():
    with pytest.raises(sh.ModelCardInputError, match="licence"):
        sh.create_model_card(draft_source("eagle3"), licence="mit")


def test_license_read_from_a_local_verifier_card(tmp_path):
    verifier_dir = tmp_path / "verifier"
    verifier_dir.mkdir()
    (verifier_dir / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: https://example.com/LICENSE\n---\n# v\n"
    )
    card = sh.create_model_card(draft_source("eagle3"), verifier_card=str(verifier_dir))
    assert (card.data.license, card.data.license_name) == ("other", "tiny-license")
    assert card.data.license_link == "https://example.com/LICENSE"
    explicit = sh.create_model_card(draft_source("eagle3"), verifier_card=str(verifier_dir), license="mit")
    assert explicit.data.license == "mit"


def test_license_read_from_the_verifier_card_in_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from speculators_hf.loading import save_to_hub_cache

    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: llama3.1\n---\n# verifier\n")
    save_to_hub_cache(folder, VERIFIER_ID, tmp_path / "cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert sh.create_model_card(draft_source("eagle3")).data.license == "llama3.1"


def test_local_verifier_path_is_not_a_base_model(tmp_path):
    draft = draft_source("eagle3")
    draft.config.verifier["name_or_path"] = str(tmp_path)
    card = sh.create_model_card(draft)
    assert card.data.base_model is None
    assert "local path" in card.text and "Hub id" in card.text


# --------------------------------------------------------------------------------------------------
# save_pretrained writes README.md
# --------------------------------------------------------------------------------------------------
def test_save_pretrained_writes_the_card(tmp_path):
    draft = draft_source("eagle3")
    draft.card_info = {"license": "mit", "results": RESULT}
    draft.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == VERIFIER_ID and card.data.license == "mit"
    assert "3.9" in card.text and RESULT["command"] in card.text
    assert hub.card_inputs_of(text)["results"] == RESULT  # the inputs travel with the card
    # the draft still loads, and the card does not get in the way
    loaded = sh.load_draft(tmp_path)
    assert not hasattr(loaded, "card_info") or not loaded.card_info


def test_generated_card_is_refreshed_but_a_persons_readme_is_kept(tmp_path):
    draft = draft_source("independent")
    draft.card_info = {"license": "mit"}
    draft.save_pretrained(tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.license == "mit"

    draft.card_info = {"license": "apache-2.0", "notes": "second save"}
    draft.save_pretrained(tmp_path)  # generated card: replaced
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "apache-2.0" and "second save" in card.text

    person = "# My draft\n\nHand-written card, no mark.\n"
    (tmp_path / "README.md").write_text(person)
    draft.card_info = {"license": "mit"}
    draft.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == person
    assert (tmp_path / "model.safetensors").is_file()


def test_card_for_folder_adds_the_repo_id_and_keeps_the_inputs(tmp_path):
    draft = draft_source("eagle3")
    draft.card_info = {"results": RESULT, "license": "mit"}
    draft.save_pretrained(tmp_path)
    text = hub.card_for_folder(tmp_path, repo_id=REPO_ID)
    assert text is not None and f'"model": "{REPO_ID}"' in text and hub.cards.REPO_PLACEHOLDER not in text
    assert "3.9" in text and "license: mit" in text
    assert f"{sum(p.numel() for p in draft.parameters()):,}" in text
    (tmp_path / "README.md").write_text("mine\n")
    assert hub.card_for_folder(tmp_path, repo_id=REPO_ID) is None


def test_json_comment_cannot_close_early():
    inputs = {"notes": "a --> b <!-- c", "results": RESULT}
    text = hub.GENERATED_MARK + "\n" + hub.cards._json_comment(inputs)
    assert text.count("-->") == 2
    assert hub.card_inputs_of(text) == inputs


def test_draft_push_to_hub_is_the_one_commit_push():
    assert sh.SpeculatorModel.push_to_hub is hub.draft_push_to_hub
    assert sh.SpeculatorModel.card_writer is hub.write_model_card


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------
def test_vllm_tensor_names():
    assert hub.vllm_tensor_name("eagle3", "layers.0.hidden_norm.weight") == "layers.0.hidden_norm.weight"
    assert hub.vllm_tensor_name("independent", "model.model.layers.0.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert hub.vllm_tensor_name("medusa", "blocks.2.layers.0.bias") == "blocks.2.layers.0.bias"
    assert hub.vllm_tensor_name("mlp_speculator", "emb.0.weight") == "emb.0.weight"


def test_inspect_table_and_json(tmp_path, capsys):
    draft = draft_source("independent")
    draft.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "family:        independent (IndependentSpeculator)" in out
    assert f"verifier:      {VERIFIER_ID}" in out and "vocab_size=96" in out
    assert "draft length:  5 tokens per round" in out
    assert f"parameters:    {sum(p.numel() for p in draft.parameters()):,}" in out
    assert "vLLM / speculators name" in out
    row = next(line for line in out.splitlines() if line.startswith("model.lm_head.weight"))
    assert row.split() == ["model.lm_head.weight", "[96,", "32]", "float32", "lm_head.weight"]

    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "independent" and info["verifier"]["name_or_path"] == VERIFIER_ID
    assert info["tensors"]["model.lm_head.weight"] == [96, 32]
    assert info["vllm_tensor_names"]["model.lm_head.weight"] == "lm_head.weight"
