"""A draft's recorded tokenizer hash (speculators_config.verifier.tokenizer_hash) is checked whenever a pair is
loaded: by AutoSpeculatorForCausalLM (with the verifier's own tokenizer when none is passed) and by the CLI's
generate/demo, which pass the tokenizer they load. A tokenizer that cannot be found is a warning, never a
silent pass."""

from __future__ import annotations

import shutil

import pytest
from conftest import make_verifier
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.cli import main
from speculators_hf.config import tokenizer_hash


@pytest.fixture
def verifier_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "verifier"
    make_verifier().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def saved_draft(tmp_path, verifier_dir, tiny_tokenizer, recorded_hash: str | None = None):
    """A draft made for the verifier in `verifier_dir` (its reference is that path) recording the hash of
    `tiny_tokenizer`, or `recorded_hash` instead."""
    verifier = AutoModelForCausalLM.from_pretrained(verifier_dir)
    draft = sh.Eagle3Speculator.from_verifier(verifier, tokenizer=tiny_tokenizer, draft_vocab_size=64)
    assert draft.config.verifier["name_or_path"] == str(verifier_dir)
    if recorded_hash is not None:
        draft.config.verifier["tokenizer_hash"] = recorded_hash
    draft.save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


OTHER_HASH = "0123456789abcdef"  # the hash of some other tokenizer


def test_a_draft_for_another_tokenizer_fails_to_load_as_a_pair(tmp_path, verifier_dir, tiny_tokenizer):
    draft_dir = saved_draft(tmp_path, verifier_dir, tiny_tokenizer, OTHER_HASH)
    with pytest.raises(sh.VerifierBindingError, match=rf"tokenizer_hash: draft expects {OTHER_HASH}, tokenizer has"):
        sh.AutoSpeculatorForCausalLM.from_pretrained(draft_dir)
    verifier = AutoModelForCausalLM.from_pretrained(verifier_dir)  # a loaded verifier: its name_or_path is the place
    with pytest.raises(sh.VerifierBindingError, match="tokenizer_hash"):
        sh.AutoSpeculatorForCausalLM.from_pretrained(draft_dir, verifier=verifier)


def test_the_matching_tokenizer_loads_the_pair(tmp_path, verifier_dir, tiny_tokenizer, recwarn):
    draft_dir = saved_draft(tmp_path, verifier_dir, tiny_tokenizer)
    draft = sh.AutoSpeculatorForCausalLM.from_pretrained(draft_dir)
    assert draft.config.verifier["tokenizer_hash"] == tokenizer_hash(tiny_tokenizer)
    assert draft.verifier is not None
    assert not [w for w in recwarn if "tokenizer" in str(w.message)]


def test_a_tokenizer_that_cannot_be_found_is_a_warning(tmp_path, verifier_dir, tiny_tokenizer):
    draft_dir = saved_draft(tmp_path, verifier_dir, tiny_tokenizer, OTHER_HASH)
    bare = tmp_path / "bare-verifier"
    shutil.copytree(verifier_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "*.jinja"))
    with pytest.warns(UserWarning, match="tokenizer was NOT checked"):
        draft = sh.AutoSpeculatorForCausalLM.from_pretrained(draft_dir, verifier=str(bare))
    assert draft.verifier is not None
    with pytest.raises(sh.VerifierBindingError, match="tokenizer_hash"):  # one passed explicitly is checked
        sh.AutoSpeculatorForCausalLM.from_pretrained(draft_dir, verifier=str(bare), tokenizer=tiny_tokenizer)


def test_the_cli_checks_the_tokenizer_it_loads(tmp_path, verifier_dir, tiny_tokenizer, capsys):
    draft_dir = saved_draft(tmp_path, verifier_dir, tiny_tokenizer, OTHER_HASH)
    argv = ["generate", "--draft", str(draft_dir), "--prompt", "the draft model", "--max-new-tokens", "2"]
    assert main(argv) == 1
    assert f"tokenizer_hash: draft expects {OTHER_HASH}" in capsys.readouterr().err
