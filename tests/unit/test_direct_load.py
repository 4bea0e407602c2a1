"""Checkpoints the `speculators` library wrote (no `model_type`; tests/golden/speculators-0.9.0-*) load as they are
with `AutoSpeculatorForCausalLM.from_pretrained` and `load_draft`, from a folder or a Hub repo: the draft is the one
`speculators-hf convert` writes (same tensors, same config, same errors), and it generates the verifier's tokens.
Without this package, transformers still needs this package's format, which `convert` writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_prompts, make_verifier, run_without_package

import speculators_hf as sh
from speculators_hf.convert import ConversionError, convert
from speculators_hf.loading import save_to_hub_cache

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
# the library's saves, and a verifier of the fingerprint each was made for (its name: tiny-org/tiny-verifier)
LIBRARY = {"eagle3": "llama", "peagle": "llama", "dflash": "qwen3"}
VERIFIER_NAME = "tiny-org/tiny-verifier"


def library_folder(family: str) -> Path:
    return GOLDEN / f"speculators-0.9.0-{family}"


def verifier_for(family: str):
    verifier = make_verifier(LIBRARY[family], vocab_size=96, hidden_size=32, num_hidden_layers=6)
    verifier.name_or_path = VERIFIER_NAME
    return verifier


def same_draft(a, b) -> None:
    """Equal tensors (bit for bit) and config; the remote-code map and the folder name are written at save."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    ignore = {"_name_or_path", "auto_map"}
    ca, cb = ({k: v for k, v in d.config.to_dict().items() if k not in ignore} for d in (a, b))
    assert ca == cb


@pytest.mark.parametrize("family", sorted(LIBRARY))
def test_library_checkpoint_loads_as_convert_writes_it_and_generates_exactly(family, tmp_path):
    source = library_folder(family)
    assert "model_type" not in json.loads((source / "config.json").read_text())  # the library's own save
    verifier = verifier_for(family)
    draft = sh.AutoSpeculatorForCausalLM.from_pretrained(source, verifier=verifier)
    assert draft.config.verifier["vocab_size"] == 96  # the fingerprint, from the verifier as convert fills it
    same_draft(draft, sh.load_draft(convert(source, tmp_path / "converted", verifier=verifier)))
    for prompt in make_prompts(4, seed=3, vocab=90):
        reference = verifier.generate(prompt, max_new_tokens=16, do_sample=False)
        assert torch.equal(
            verifier.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=draft), reference
        )
        assert torch.equal(sh.generate(verifier, draft, prompt, tree="chain:3", max_new_tokens=16), reference)
    # without a verifier, load_draft gives what `convert` without --verifier writes
    same_draft(sh.load_draft(source), sh.load_draft(convert(source, tmp_path / "alone")))


def test_library_checkpoint_from_the_hub_with_the_verifier_its_config_names(tmp_path, monkeypatch):
    """A Hub repo of the library's save, and the verifier named in its config from the Hub cache: one call."""
    cache = tmp_path / "cache"
    save_to_hub_cache(library_folder("peagle"), "org/library-peagle", cache)
    verifier = verifier_for("peagle")
    verifier.save_pretrained(tmp_path / "verifier")
    save_to_hub_cache(tmp_path / "verifier", VERIFIER_NAME, cache)
    draft = sh.AutoSpeculatorForCausalLM.from_pretrained("org/library-peagle", cache_dir=str(cache))
    assert isinstance(draft, sh.PEagleSpeculator) and draft.verifier.name_or_path == VERIFIER_NAME
    prompt = make_prompts(1, seed=5, vocab=90)[0]
    reference = draft.verifier.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(
        draft.verifier.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=draft), reference
    )


def test_library_checkpoint_errors_are_converts(tmp_path):
    source = tmp_path / "no-norm-flag"
    shutil.copytree(library_folder("eagle3"), source)
    config = json.loads((source / "config.json").read_text())
    del config["norm_before_residual"]  # ambiguous between readers: convert requires it
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="has no 'norm_before_residual'") as converting:
        convert(source, tmp_path / "out")
    with pytest.raises(ConversionError) as loading:
        sh.load_draft(source)
    assert str(loading.value) == str(converting.value)
    with pytest.raises(TypeError, match=r"takes no \['attn_implementation'\].*speculators-hf convert"):
        sh.load_draft(library_folder("eagle3"), attn_implementation="eager")


def test_without_the_package_transformers_needs_the_converted_folder(tmp_path):
    verifier = verifier_for("eagle3")
    converted = convert(library_folder("eagle3"), tmp_path / "converted", verifier=verifier)
    out = run_without_package(
        f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(library_folder("eagle3"))!r}, trust_remote_code=True)
        except Exception as err:
            print("library:", type(err).__name__, "model_type" in str(err))
        draft = AutoModelForCausalLM.from_pretrained({str(converted)!r}, trust_remote_code=True)
        print("converted:", type(draft).__name__, draft.config.verifier["vocab_size"])
        """,
        tmp_path,
    )
    assert "library: ValueError True" in out
    assert "converted: Eagle3Speculator 96" in out
