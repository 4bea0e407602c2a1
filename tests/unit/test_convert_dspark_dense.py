"""Conversion of DSpark drafts for dense targets in the layout vLLM 0.32 loads as `Qwen3DSparkModel` (deepseek-ai's
DeepSpec drafts, e.g. deepseek-ai/dspark_qwen3_8b_block7; `specs/dspark_dense.yaml`): folders in that layout are
built here from the `speculators` 0.9.0 DSpark golden weights (tests/golden/speculators-0.9.0-dspark) as vLLM's
loader reads them (the flat Qwen3 config of the draft layers with the DSpark keys at its top level, target_layer_ids
= our aux ids - 1, the tensor names of the speculators layout, and the verifier's embedding as DeepSpec stores it),
converted, and held to the library's logits and confidence to 1e-5: a reduced vocabulary with d2t (every golden
has one), a full-size one with DeepSpec's copies of the verifier's embedding and lm_head, vLLM's defaults for
absent keys, and the errors (a missing Markov tensor, a head vLLM's dense loader cannot build)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dspark import GOLDEN, golden_draft, golden_outputs

import speculators_hf as sh
from speculators_hf.convert import ConversionError, convert, detect

# the DSpark keys vLLM reads from the flat config (written only when the golden's value is not vLLM's default)
DEFAULTS = {"sample_from_anchor": True, "markov_head_type": "vanilla", "enable_confidence_head": False}


def dense_source(folder: Path, variant: str, drop: tuple[str, ...] = (), **changes) -> Path:
    """The golden `variant` in the dense layout: its `transformer_layer_config` as the flat config, the DSpark keys
    at the top level (target_layer_ids = aux ids - 1, num_target_layers; keys equal to vLLM's defaults left out),
    the same tensors plus the verifier's embedding (DeepSpec saves its frozen copy). `drop`: tensor or config names
    to leave out; `changes`: config keys to set."""
    golden = json.loads((GOLDEN / variant / "config.json").read_text())
    config = {
        **golden["transformer_layer_config"],
        "architectures": ["DSparkDraftModel"],
        "block_size": golden["block_size"],
        "mask_token_id": golden["mask_token_id"],
        "target_layer_ids": [i - 1 for i in golden["aux_hidden_state_layer_ids"]],
        "num_target_layers": 6,
        "draft_vocab_size": golden["draft_vocab_size"],
        "markov_rank": golden["markov_rank"],
        "confidence_head_with_markov": golden["confidence_head_with_markov"],
    }
    config.update({key: golden[key] for key, default in DEFAULTS.items() if golden[key] != default})
    config.update(changes)
    tensors = load_file(GOLDEN / variant / "model.safetensors")
    tensors["embed_tokens.weight"] = load_file(GOLDEN / variant / "golden.safetensors")["embed"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(folder / "model.safetensors"))
    return folder


def converted_outputs(out: Path, variant: str, verifier=None):
    """The converted draft's `parallel_heads` over the golden blocks, bound to the golden verifier."""
    draft = sh.load_draft(out)
    draft.bind_verifier(verifier if verifier is not None else golden_draft(variant).verifier)
    return draft, *golden_outputs(draft, variant)


@pytest.mark.parametrize("variant", ["vanilla", "confidence"])
def test_a_dense_draft_converts_with_the_library_logits_and_confidence(tmp_path, variant):
    source = dense_source(tmp_path / "dense", variant)
    assert detect(source).name == "dspark_dense"
    messages: list[str] = []
    out = convert(source, tmp_path / "out", log=messages.append)
    draft, logits, confidence, golden = converted_outputs(out, variant)
    config = draft.config
    assert isinstance(draft, sh.DSparkSpeculator) and config.aux_hidden_state_layer_ids == [1, 3, 5]
    assert (config.block_size, config.mask_token_id, config.draft_vocab_size, config.markov_rank) == (4, 95, 64, 8)
    assert config.sample_from_anchor and config.speculative_tokens == 4 and config.markov_head_type == "vanilla"
    assert config.verifier["num_hidden_layers"] == 6 and draft.d2t is not None and draft.lm_head is not None
    assert any("source ids [0, 2, 4] -> verifier hidden_states [1, 3, 5]" in m for m in messages)
    assert any(m.startswith("dropping embed_tokens.weight") for m in messages)
    torch.testing.assert_close(logits, golden["draft_logits"], rtol=1e-5, atol=1e-5)
    assert (confidence is None) == (variant == "vanilla")
    if confidence is not None:
        torch.testing.assert_close(confidence, golden["confidence_logits"], rtol=1e-5, atol=1e-5)
    original = load_file(GOLDEN / variant / "model.safetensors")
    exported = convert(out, tmp_path / "vllm", to="vllm", verifier_id="org/tiny-verifier")  # the file names none
    for folder in (out, exported):  # the library's tensors, bit for bit
        saved = load_file(folder / "model.safetensors")
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    config = json.loads((exported / "config.json").read_text())
    assert (config["speculators_model_type"], config["aux_hidden_state_layer_ids"]) == ("dspark", [1, 3, 5])


def test_architecture_qwen3dsparkmodel_is_the_same_layout(tmp_path):
    """DeepSpec's own config names the class Qwen3DSparkModel; vLLM reads both names alike."""
    source = dense_source(tmp_path / "dense", "vanilla", architectures=["Qwen3DSparkModel"])
    assert detect(source).name == "dspark_dense"


def test_a_full_vocabulary_draft_drops_deepspec_s_copies_of_the_verifier_s_tensors(tmp_path):
    """As DeepSpec saves a draft (draft vocabulary = the verifier's, no d2t, its frozen copies of the verifier's
    embedding and lm_head stored): both copies dropped and said, the Markov W2 rows at the golden vocabulary's ids
    kept, so the draft scores those ids as the library's reduced draft did."""
    reference = golden_draft("confidence")
    weights = load_file(GOLDEN / "confidence" / "model.safetensors")
    ids = torch.arange(64) + weights["d2t"]  # the verifier ids of the golden draft vocabulary
    verifier = reference.verifier
    with torch.no_grad():
        verifier.get_output_embeddings().weight[ids] = weights["lm_head.weight"]
    source = dense_source(tmp_path / "dense", "confidence", drop=("d2t", "t2d"), draft_vocab_size=96)
    tensors = load_file(source / "model.safetensors")
    w2 = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    w2[ids] = weights["markov_head.markov_w2.weight"]
    tensors.update({"markov_head.markov_w2.weight": w2, "lm_head.weight": verifier.lm_head.weight.detach().clone()})
    save_file(tensors, str(source / "model.safetensors"))
    messages: list[str] = []
    out = convert(source, tmp_path / "out", log=messages.append)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert any(m.startswith(f"dropping {name}") for m in messages), (name, messages)
    draft, logits, confidence, golden = converted_outputs(out, "confidence", verifier)
    assert draft.config.draft_vocab_size == 96 and draft.lm_head is None and draft.d2t is None
    torch.testing.assert_close(logits[:, ids], golden["draft_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(confidence, golden["confidence_logits"], rtol=1e-5, atol=1e-5)


def test_absent_keys_take_vllm_s_defaults(tmp_path):
    """No sample_from_anchor (vLLM's DSparkSpeculator: true), markov_head_type (vLLM builds the vanilla head),
    enable_confidence_head / confidence_head_with_markov (qwen3_dspark.py: false): the confidence tensors in the
    file are then dropped as vLLM drops them, and the logits are the library's."""
    drop = ("markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "sample_from_anchor")
    source = dense_source(tmp_path / "dense", "confidence", drop=drop)
    assert not set(drop) & set(json.loads((source / "config.json").read_text()))
    messages: list[str] = []
    draft, logits, confidence, golden = converted_outputs(
        convert(source, tmp_path / "out", log=messages.append), "confidence"
    )
    config = draft.config
    assert (config.sample_from_anchor, config.markov_head_type, config.speculative_tokens) == (True, "vanilla", 4)
    assert not config.enable_confidence_head and not config.confidence_head_with_markov and confidence is None
    assert any(
        m.startswith("dropping confidence_head.proj.bias, confidence_head.proj.weight (enable_confidence_head is")
        for m in messages
    )
    torch.testing.assert_close(logits, golden["draft_logits"], rtol=1e-5, atol=1e-5)


def test_an_enabled_confidence_head_without_tensors_is_off_as_in_vllm(tmp_path):
    source = dense_source(
        tmp_path / "dense", "vanilla", enable_confidence_head=True, sample_from_anchor=False
    )  # sample_from_anchor false: the 1 + N layout, a block proposes block_size - 1 tokens
    messages: list[str] = []
    draft = sh.load_draft(convert(source, tmp_path / "out", log=messages.append))
    assert not draft.config.enable_confidence_head and draft.confidence_head is None
    assert (draft.config.sample_from_anchor, draft.config.speculative_tokens) == (False, 3)
    assert any("enable_confidence_head is true but the file holds no confidence_head.* tensors" in m for m in messages)


def test_layer_ids_listed_out_of_order_keep_fc_as_stored(tmp_path):
    """vLLM concatenates the verifier states fc reads in layer order whatever the listed order (its aux states are
    captured as the layers run), so fc.weight is taken as stored, unlike z-lab's: the library's logits. (Checked
    against the mutant `aux_layers.order: listed` in the spec, which reorders fc's columns: this test fails.)"""
    source = dense_source(tmp_path / "dense", "vanilla", target_layer_ids=[4, 0, 2])
    messages: list[str] = []
    draft, logits, _, golden = converted_outputs(convert(source, tmp_path / "out", log=messages.append), "vanilla")
    assert draft.config.aux_hidden_state_layer_ids == [1, 3, 5]
    assert not any("column blocks reordered" in m for m in messages)
    torch.testing.assert_close(logits, golden["draft_logits"], rtol=1e-5, atol=1e-5)


def test_a_missing_markov_tensor_is_named(tmp_path):
    source = dense_source(tmp_path / "dense", "vanilla", drop=("markov_head.markov_w2.weight",))
    with pytest.raises(ConversionError, match=r"(?s)tensors do not match the converted config.*markov_w2\.weight"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_markov_rank_is_required(tmp_path):
    source = dense_source(tmp_path / "dense", "vanilla", drop=("markov_rank",))
    with pytest.raises(ConversionError, match=r"config.json has no 'markov_rank'. vLLM's Qwen3DSparkModel sizes"):
        convert(source, tmp_path / "out")


@pytest.mark.parametrize("variant", ["gated", "rnn"])
def test_a_head_vllm_s_dense_loader_cannot_build_is_refused(tmp_path, variant):
    source = dense_source(tmp_path / "dense", variant)
    assert detect(source).name == "dspark_dense"
    with pytest.raises(
        ConversionError,
        match=rf"config field 'markov_head_type' is '{variant}'; this converter handles only \['vanilla'\]\. "
        r"vLLM's dense DSpark .*only a vanilla head converts from this layout .*--from speculators_dspark",
    ):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vllm_only_settings_are_refused_naming_the_key(tmp_path):
    for key, value, why in [
        ("logit_scale", 2.0, "vLLM scales the draft logits and the Markov bias"),
        ("dspark_block_size", 4, "rename it block_size"),
        ("is_causal", True, "causal inside the block"),
    ]:
        source = dense_source(tmp_path / key, "vanilla", **{key: value})
        with pytest.raises(ConversionError, match=rf"config field '{key}' is {value!r};.*{why}"):
            convert(source, tmp_path / "out")
