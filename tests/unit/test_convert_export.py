"""`convert ... --to vllm` of a draft trained here: the verifier reference vLLM will use, the dtype of the
export, and the model card's snippets (the draft's repo id, or words saying it is unknown)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_verifier
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf import hub
from speculators_hf.cli import main
from speculators_hf.convert import ConversionError, convert


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A draft saved the way `speculators-hf train` saves it: its verifier is a local folder."""
    root = tmp_path_factory.mktemp("export")
    make_verifier().save_pretrained(root / "verifier")
    verifier = AutoModelForCausalLM.from_pretrained(root / "verifier")
    sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64).save_pretrained(root / "draft")
    return root


def verifier_reference(folder):
    return json.loads((folder / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"]


def test_a_local_verifier_path_in_an_export_warns(trained, tmp_path):
    messages: list[str] = []
    out = convert(trained / "draft", tmp_path / "out", to="vllm", log=messages.append)
    assert verifier_reference(out) == str(trained / "verifier")
    warning = next(m for m in messages if m.startswith("warning: the export names its verifier by the local path"))
    assert "loads the verifier from exactly that path" in warning and "--verifier-id ORG/NAME" in warning


def test_verifier_id_is_written_and_nothing_is_warned(trained, tmp_path):
    messages: list[str] = []
    out = convert(trained / "draft", tmp_path / "out", to="vllm", verifier_id="org/tiny-verifier", log=messages.append)
    assert verifier_reference(out) == "org/tiny-verifier"
    assert not any("warning" in m for m in messages)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-verifier"
    original = sh.load_draft(trained / "draft").state_dict()
    exported = sh.load_draft(out).state_dict()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    with pytest.raises(ConversionError, match="verifier_id 'tiny-verifier' is not a Hub id: pass it as ORG/NAME"):
        convert(trained / "draft", tmp_path / "bad", to="vllm", verifier_id="tiny-verifier")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_dtype(trained, tmp_path, dtype):
    out = convert(trained / "draft", tmp_path / "out", to="vllm", dtype=dtype, verifier_id="org/tiny-verifier")
    written, original = load_file(out / "model.safetensors"), load_file(trained / "draft" / "model.safetensors")
    assert {str(t.dtype) for k, t in written.items() if k not in ("d2t", "t2d")} == {f"torch.{dtype}"}
    assert written["d2t"].dtype == torch.int64 and written["t2d"].dtype == torch.bool
    assert torch.equal(written["fc.weight"], original["fc.weight"].to(getattr(torch, dtype)))
    assert torch.equal(written["d2t"], original["d2t"]) and torch.equal(written["t2d"], original["t2d"])
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.55 * (trained / "draft" / "model.safetensors").stat().st_size
    assert sh.load_draft(out).dtype == getattr(torch, dtype)
    with pytest.raises(ConversionError, match=r"dtype 'int8' is not one of \['bfloat16', 'float16', 'float32'\]"):
        convert(trained / "draft", tmp_path / "bad", dtype="int8")


def test_repo_id_fills_the_card_and_an_unknown_one_is_said_in_words(trained, tmp_path):
    out = convert(trained / "draft", tmp_path / "known", to="vllm", repo_id="org/tiny-eagle3")
    text = (out / "README.md").read_text()
    assert "vllm serve org/tiny-eagle3\n" in text and '"model": "org/tiny-eagle3"' in text
    assert 'from_pretrained("org/tiny-eagle3"' in text and "does not know" not in text

    out = convert(trained / "draft", tmp_path / "unknown", to="vllm")
    text = (out / "README.md").read_text()
    assert "does not know the draft's repository id" in text
    assert 'vllm serve "$DRAFT"' in text and "from_pretrained(DRAFT," in text
    # no command with an angle-bracket placeholder (a shell reads `<x>` as a redirection)
    commands = "\n".join(re.findall(r"```(?:bash|python)\n(.*?)```", text, re.DOTALL))
    assert not re.search(r"<[a-z][^>]*>", commands), commands
    # pushing renders the card again with the id it pushes to
    again = hub.card_for_folder(out, repo_id="org/pushed")
    assert again is not None and "vllm serve org/pushed\n" in again and "$DRAFT" not in again


@pytest.mark.parametrize("family", ["eagle", "medusa", "mlp_speculator", "independent"])
def test_no_family_card_shows_a_placeholder_command(family):
    draft_class = sh.models.FAMILIES[family]
    verifier = make_verifier()
    verifier.name_or_path = "org/tiny-verifier"
    text = str(hub.create_model_card(draft_class.from_verifier(verifier)))
    commands = "\n".join(re.findall(r"```(?:bash|python)\n(.*?)```", text, re.DOTALL))
    assert not re.search(r"<[a-z][^>]*>", commands), commands


def test_cli_flags(trained, tmp_path, capsys):
    argv = ["convert", str(trained / "draft"), str(tmp_path / "out"), "--to", "vllm", "--verifier-id"]
    argv += ["org/tiny-verifier", "--dtype", "bfloat16", "--repo-id", "org/tiny-eagle3"]
    assert main(argv) == 0
    out = capsys.readouterr().err  # notices go to stderr, as train's
    assert "verifier reference: org/tiny-verifier" in out and "cast from torch.float32 to torch.bfloat16" in out
    assert verifier_reference(tmp_path / "out") == "org/tiny-verifier"
    assert sh.load_draft(tmp_path / "out").dtype == torch.bfloat16
    assert "vllm serve org/tiny-eagle3" in (tmp_path / "out" / "README.md").read_text()
