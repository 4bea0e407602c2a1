"""Conversion of DFlash drafts (`speculators-hf convert`): the `speculators` 0.9 library's own save
(tests/golden/speculators-0.9.0-dflash) in and back out (`--to speculators` / `--to vllm`) with its reference
logits and byte-identical tensors; the z-lab layout (flat Qwen3 config + `dflash_config`, body tensors only),
built here from the same weights, in with its layer ids shifted, the library's logits and exact greedy output;
and the errors (mask token, shapes, missing tensors, vocabulary map), which leave nothing on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_prompts, make_verifier
from safetensors.torch import load_file, save_file

import speculators_hf as sh
from speculators_hf.convert import ConversionError, convert, detect

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "speculators-0.9.0-dflash"
BORROWED = ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight")


def golden_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


def write_source(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def zlab_source(folder: Path, block_size_in: str = "dflash_config", **dflash_config) -> Path:
    """The golden draft in z-lab's published layout: the flat Qwen3 config of the draft layers, dflash_config
    {mask_token_id, target_layer_ids = our aux ids - 1}, num_target_layers, and only the body tensors (a
    full-size vocabulary: the verifier's embedding and lm_head)."""
    golden = golden_config()
    config = {
        **golden["transformer_layer_config"],
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "dflash_config": {
            "mask_token_id": 95,
            "target_layer_ids": [i - 1 for i in golden["aux_hidden_state_layer_ids"]],
        },
        "num_target_layers": 6,
    }
    config["dflash_config"].update(dflash_config)
    (config if block_size_in == "top" else config["dflash_config"])["block_size"] = golden["block_size"]
    body = {
        k: v for k, v in load_file(GOLDEN / "model.safetensors").items() if k not in ("lm_head.weight", "d2t", "t2d")
    }
    return write_source(folder, config, body)


def golden_verifier() -> torch.nn.Module:
    """A tiny Qwen3 verifier holding the embedding the golden draft was made with and, at the golden draft
    vocabulary's target ids, the golden lm_head rows (so a full-vocabulary draft scores those ids as it did)."""
    golden, weights = load_file(GOLDEN / "golden.safetensors"), load_file(GOLDEN / "model.safetensors")
    verifier = make_verifier("qwen3", vocab_size=96, hidden_size=32, num_hidden_layers=6)
    with torch.no_grad():
        verifier.get_input_embeddings().weight.copy_(golden["embed"])
        verifier.get_output_embeddings().weight[target_ids()] = weights["lm_head.weight"]
    return verifier


def target_ids() -> torch.Tensor:
    """The verifier ids of the golden draft vocabulary, in draft order."""
    return torch.arange(64) + load_file(GOLDEN / "model.safetensors")["d2t"]


def block_logits(draft) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's logits of the four golden blocks, and the library's (as tests/unit/test_dflash.py)."""
    golden = load_file(GOLDEN / "golden.safetensors")
    with torch.no_grad():
        got = draft.parallel_forward(golden["tokens"], list(golden["aux"].chunk(3, dim=-1)), golden["anchors"][None])
    return got[0].flatten(0, 1), golden["draft_logits"]


# --------------------------------------------------------------------------------------------------
# the speculators 0.9 format
# --------------------------------------------------------------------------------------------------
def test_the_library_save_converts_in_keeps_its_logits_and_exports_back(tmp_path):
    assert detect(GOLDEN).name == "speculators_dflash"
    messages: list[str] = []
    out = convert(GOLDEN, tmp_path / "ours", log=messages.append)
    assert "detected format: speculators_dflash (speculators 0.9 / vLLM speculators format (DFlash))" in messages
    draft = sh.load_draft(out)
    assert isinstance(draft, sh.DFlashSpeculator) and draft.config.aux_hidden_state_layer_ids == [1, 3, 5]
    got, want = block_logits(draft.bind_verifier(golden_verifier()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    original = load_file(GOLDEN / "model.safetensors")
    for target in ("speculators", "vllm"):
        exported = convert(out, tmp_path / target, to=target)
        again = load_file(exported / "model.safetensors")
        assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
        config = json.loads((exported / "config.json").read_text())
        assert config["speculators_model_type"] == "dflash" and config["mask_token_id"] == 95
        assert set(golden_config()) <= set(config) and config["model_type"] == "speculators"
        assert (config["block_size"], config["aux_hidden_state_layer_ids"]) == (4, [1, 3, 5])


def test_the_verifier_s_tensors_in_a_save_are_dropped_and_said(tmp_path):
    """A save carrying what the draft takes from its verifier (the embedding, the training-only verifier head
    and norm, and, for a full-size draft vocabulary, lm_head) converts without them, each named in the log."""
    config = {**golden_config(), "draft_vocab_size": 96}
    tensors = {k: v for k, v in load_file(GOLDEN / "model.safetensors").items() if k not in ("d2t", "t2d")}
    extra = {"lm_head.weight": torch.randn(96, 32), "verifier_lm_head.weight": torch.randn(96, 32)}
    extra.update({"embed_tokens.weight": torch.randn(96, 32), "verifier_norm.weight": torch.ones(32)})
    source = write_source(tmp_path / "src", config, {**tensors, **extra})
    messages: list[str] = []
    out = convert(source, tmp_path / "out", log=messages.append)
    for name in (*BORROWED, "lm_head.weight"):
        assert any(m.startswith(f"dropping {name}") for m in messages), (name, messages)
    saved = load_file(out / "model.safetensors")
    assert not set(saved) & {*BORROWED, "lm_head.weight", "d2t", "t2d"}
    assert all(torch.equal(saved[k], tensors[k]) for k in saved)


def test_another_family_with_the_eagle3_format_names_the_right_one(tmp_path):
    with pytest.raises(ConversionError, match=r"speculators_model_type 'dflash' .*pass --from speculators_dflash"):
        convert(GOLDEN, tmp_path / "out", from_format="speculators")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# the z-lab layout
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size_in", ["top", "dflash_config"])
def test_a_zlab_draft_converts_with_shifted_layer_ids_and_stays_exact(tmp_path, block_size_in):
    source = zlab_source(tmp_path / "zlab", block_size_in)
    assert detect(source).name == "dflash_zlab"
    messages: list[str] = []
    out = convert(source, tmp_path / "out", log=messages.append)
    draft = sh.load_draft(out)
    config = draft.config
    assert config.aux_hidden_state_layer_ids == [1, 3, 5] and config.verifier["num_hidden_layers"] == 6
    assert (config.block_size, config.mask_token_id, config.draft_vocab_size) == (4, 95, 96)
    assert config.speculative_tokens == 3 and draft.lm_head is None and draft.d2t is None
    assert any("source ids [0, 2, 4] -> verifier hidden_states [1, 3, 5]" in m for m in messages)
    assert any(m.startswith("warning:") and "sliding_attention" in m for m in messages)  # the window rules differ
    verifier = golden_verifier()
    got, want = block_logits(draft.bind_verifier(verifier))  # the verifier's head, at the golden vocabulary's ids
    torch.testing.assert_close(got[:, target_ids()], want, rtol=1e-5, atol=1e-5)
    for prompt in make_prompts(4, seed=5):
        ref = verifier.generate(prompt, max_new_tokens=16, do_sample=False)
        assert torch.equal(ref, verifier.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=draft))
        assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree="chain:3", max_new_tokens=16))
    exported = convert(out, tmp_path / "vllm", to="vllm", verifier_id="org/tiny-verifier")  # z-lab names none
    body = load_file(source / "model.safetensors")
    again = load_file(exported / "model.safetensors")
    assert body.keys() == again.keys() and all(torch.equal(body[k], again[k]) for k in body)
    assert json.loads((exported / "config.json").read_text())["aux_hidden_state_layer_ids"] == [1, 3, 5]


def test_zlab_layer_ids_may_name_the_last_state_but_not_beyond(tmp_path):
    """target_layer_ids L-1 reads hidden_states[L] (the post-norm last state, as z-lab reads it): kept, where
    speculators' converter drops it; L is outside a verifier of L layers."""
    out = convert(zlab_source(tmp_path / "last", target_layer_ids=[0, 2, 5]), tmp_path / "out")
    assert sh.load_draft(out).config.aux_hidden_state_layer_ids == [1, 3, 6]
    with pytest.raises(ConversionError, match=r"\[1, 3, 7\] name hidden states a verifier of 6 layers does not have"):
        convert(zlab_source(tmp_path / "beyond", target_layer_ids=[0, 2, 6]), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def zlab_fc(states: dict[int, torch.Tensor], target_layer_ids: list[int], fc: torch.Tensor) -> torch.Tensor:
    """z-lab's context projection: fc over hidden_states[i + 1] concatenated in target_layer_ids order
    (dflash/model.py extract_context_feature)."""
    return torch.cat([states[i + 1] for i in target_layer_ids], dim=-1) @ fc.T


def test_zlab_layer_ids_out_of_order_reorder_the_fc_columns(tmp_path):
    """z-lab concatenates the verifier states in target_layer_ids order, ours (as vLLM) in layer order: the ids are
    sorted and fc.weight's column blocks reordered with them, so the draft computes the source's fc output."""
    source = zlab_source(tmp_path / "zlab", target_layer_ids=[3, 0, 1])
    messages: list[str] = []
    draft = sh.load_draft(convert(source, tmp_path / "out", log=messages.append))
    assert draft.config.aux_hidden_state_layer_ids == [1, 2, 4]
    assert any(
        "column blocks reordered from the listed verifier states [4, 1, 2] to layer order" in m for m in messages
    )
    fc = load_file(source / "model.safetensors")["fc.weight"].double()  # float64: no rounding differences
    states = {i: torch.randn(5, 32, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(7)}
    want = zlab_fc(states, [3, 0, 1], fc)
    ours = torch.cat([states[i] for i in draft.config.aux_layer_ids], dim=-1)  # the draft's order
    with torch.no_grad():
        got = draft.fc.double()(ours)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    kept = ours @ fc.T  # columns left as stored
    assert (kept - want).abs().max() > 1e-2  # what the draft computed before the columns were reordered


def test_a_zlab_draft_listing_its_layers_out_of_order_keeps_the_library_logits(tmp_path):
    """The golden draft with its ids listed [4, 0, 2] and fc's column blocks stored in that order (what z-lab's
    code needs to compute the same): the converted draft gives the library's logits."""
    source = zlab_source(tmp_path / "zlab", target_layer_ids=[4, 0, 2])
    tensors = load_file(source / "model.safetensors")
    blocks = tensors["fc.weight"].chunk(3, dim=-1)  # for the states 1, 3, 5
    tensors["fc.weight"] = torch.cat([blocks[2], blocks[0], blocks[1]], dim=-1).contiguous()
    save_file(tensors, str(source / "model.safetensors"))
    draft = sh.load_draft(convert(source, tmp_path / "out"))
    assert draft.config.aux_hidden_state_layer_ids == [1, 3, 5]
    got, want = block_logits(draft.bind_verifier(golden_verifier()))
    torch.testing.assert_close(got[:, target_ids()], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "key, top, nested",
    [("block_size", 7, 4), ("mask_token_id", 94, 95), ("target_layer_ids", [0, 2, 3], [0, 2, 4])],
)
def test_a_dflash_key_set_at_the_top_and_in_dflash_config_differently_is_refused(tmp_path, key, top, nested):
    """z-lab's code reads dflash_config first, speculators' converter a top-level block_size: two different values
    leave the draft's own unknown, so the error names both keys and both values."""
    source = zlab_source(tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config[key], config["dflash_config"][key] = top, nested
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as info:
        convert(source, tmp_path / "out")
    assert f"dflash_config.{key} = {nested!r} but the top-level {key} = {top!r}" in str(info.value)
    assert not (tmp_path / "out").exists()
    config[key] = nested  # the same value in both places is no conflict
    (source / "config.json").write_text(json.dumps(config))
    assert sh.load_draft(convert(source, tmp_path / "same")).config.block_size == 4


@pytest.mark.parametrize("key, value, field", [("mask_token_id", 90, "mask_token_id"), ("block_size", 5, "block_size")])
def test_a_dflash_key_only_at_the_top_level_is_read_there(tmp_path, key, value, field):
    source = zlab_source(tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    del config["dflash_config"][key]
    config[key] = value
    (source / "config.json").write_text(json.dumps(config))
    draft = sh.load_draft(convert(source, tmp_path / "out"))
    assert getattr(draft.config, field) == value and "mask_token_id" not in draft.config.transformer_layer_config


# --------------------------------------------------------------------------------------------------
# errors: each names the problem and the fix, and leaves no output folder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["speculators", "zlab"])
def test_a_draft_without_mask_token_id_names_the_fix(tmp_path, layout):
    if layout == "speculators":
        config = golden_config()
        del config["mask_token_id"]
        source = write_source(tmp_path / "src", config, load_file(GOLDEN / "model.safetensors"))
    else:
        source = zlab_source(tmp_path / "src")
        config = json.loads((source / "config.json").read_text())
        del config["dflash_config"]["mask_token_id"]
        (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"has no '(dflash_config\.)?mask_token_id'.*--set mask_token_id=ID"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = convert(source, tmp_path / "fixed", overrides={"mask_token_id": 95})
    assert sh.load_draft(out).config.mask_token_id == 95


@pytest.mark.parametrize(
    "layout, name, shape, message",
    [
        (
            "speculators",
            "layers.1.self_attn.k_proj.weight",
            (8, 32),
            "tensor 'layers.1.self_attn.k_proj.weight' has shape (8, 32), the config implies (16, 32)",
        ),
        ("zlab", "fc.weight", (32, 64), "tensor 'fc.weight' has shape (32, 64), the config implies (32, 96)"),
    ],
)
def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path, layout, name, shape, message):
    source = (
        zlab_source(tmp_path / "src")
        if layout == "zlab"
        else write_source(tmp_path / "src", golden_config(), load_file(GOLDEN / "model.safetensors"))
    )
    tensors = load_file(source / "model.safetensors")
    tensors[name] = torch.zeros(shape)
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "missing, message",
    [
        (
            "layers.1.mlp.down_proj.weight",
            r"lacks \['layers\.1\.mlp\.down_proj\.weight'\], which this format always has",
        ),
        ("lm_head.weight", r"missing lm_head\.weight: expected shape \(64, 32\)"),  # a reduced vocabulary's own head
    ],
)
def test_a_missing_tensor_is_named(tmp_path, missing, message):
    tensors = load_file(GOLDEN / "model.safetensors")
    del tensors[missing]
    source = write_source(tmp_path / "src", golden_config(), tensors)
    with pytest.raises(ConversionError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_invalid_vocabulary_map_is_refused(tmp_path):
    tensors = load_file(GOLDEN / "model.safetensors")
    tensors["d2t"] = tensors["d2t"].clone()
    tensors["d2t"][1] = tensors["d2t"][0] - 1  # draft ids 0 and 1 both map to the same verifier id
    source = write_source(tmp_path / "src", golden_config(), tensors)
    with pytest.raises(ConversionError, match=r"invalid vocabulary map \('d2t', 't2d'\)"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
