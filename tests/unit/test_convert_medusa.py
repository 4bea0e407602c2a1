"""Medusa heads -> ours: Medusa-1 (`medusa_lm_head.pt`, FasterDecoding/medusa-vicuna-7b-v1.3 layout),
Medusa-2 (`medusa_head.*` inside a fine-tuned model, FasterDecoding/medusa-1.0-* layout), vLLM's native
Medusa layout, and `--to vllm`.

Synthetic checkpoints with the published names, shapes and config fields (random values), including the
published quirks: the config says 2 heads over a file holding 5, bf16 pickles, and with several layers per
head the equal copies of the one shared ResBlock. Parity: every head's logits equal Medusa's maths written
out here (x = x + silu(W x + b) per layer, then the head's lm_head) on the verifier's post-norm last hidden
state, and the proposals are those heads' argmaxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_greedy_exact, fresh_proposals, make_prompts, make_verifier
from safetensors.torch import load_file, save_file
from test_convert import tree_hash
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.convert import ConversionError, convert, detect

H, V = 32, 96


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verifier")
    make_verifier(num_hidden_layers=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def verifier(verifier_dir):
    return AutoModelForCausalLM.from_pretrained(verifier_dir).eval()


def medusa_heads(
    heads: int, layers: int, seed: int, dtype: torch.dtype, shared: bool = True
) -> dict[str, torch.Tensor]:
    """medusa_head.state_dict() as the original code saves it: {i}.{j}.linear.weight/bias for j < layers
    (ONE ResBlock repeated, so equal copies, unless `shared` is false) and {i}.{layers}.weight."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(heads):
        for j in range(layers):
            if j == 0 or not shared:
                w, b = 0.3 * torch.randn(H, H, generator=gen), 0.3 * torch.randn(H, generator=gen)
            out[f"{i}.{j}.linear.weight"], out[f"{i}.{j}.linear.bias"] = w.clone(), b.clone()
        out[f"{i}.{layers}.weight"] = 0.5 * torch.randn(V, H, generator=gen)
    return {k: v.to(dtype) for k, v in out.items()}


def write_medusa1(folder: Path, heads: int = 5, config_heads: int = 2, layers: int = 1, dtype=torch.bfloat16,
                  seed: int = 0, base: str = "tiny-org/vicuna") -> Path:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model_name_or_path": base,
        "medusa_num_heads": config_heads,
        "medusa_num_layers": layers,
        "transformers_version": "4.33.2",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(medusa_heads(heads, layers, seed, dtype), folder / "medusa_lm_head.pt")
    return folder


def write_medusa2(folder: Path, verifier_dir: Path, heads: int = 3, layers: int = 2, seed: int = 1) -> Path:
    """A fine-tuned model (here the tiny verifier itself) whose weights also hold medusa_head.*."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((verifier_dir / "config.json").read_text())
    config.update(medusa_num_heads=heads, medusa_num_layers=layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = load_file(verifier_dir / "model.safetensors")
    model.update({f"medusa_head.{k}": v for k, v in medusa_heads(heads, layers, seed, torch.float32).items()})
    save_file(model, str(folder / "model.safetensors"))
    return folder


def medusa_logits(src: dict[str, torch.Tensor], hidden: torch.Tensor, heads: int, layers: int, prefix: str = ""):
    """Medusa's heads: medusa_head[i] = Sequential(ResBlock * layers, Linear(H, V, bias=False)) on the
    verifier's last hidden state, in the checkpoint's dtype."""
    out = []
    for i in range(heads):
        x = hidden.to(src[f"{prefix}{i}.{layers}.weight"].dtype)
        for j in range(layers):
            x = x + F.silu(F.linear(x, src[f"{prefix}{i}.{j}.linear.weight"], src[f"{prefix}{i}.{j}.linear.bias"]))
        out.append(F.linear(x, src[f"{prefix}{i}.{layers}.weight"]))
    return out


def check_parity(draft, verifier, src, heads, layers, prefix="", tol=1e-5):
    for ids in ([[5, 17, 40]], [[90, 61]], [[7, 8, 9, 10, 11, 12]]):
        ids = torch.tensor(ids)
        drafted, scores = fresh_proposals(draft, verifier, ids, heads)
        with torch.no_grad():
            hidden = verifier.model(ids[:, :-1]).last_hidden_state[0, -1]
            want = medusa_logits(src, hidden, heads, layers, prefix)
            got_all = draft(hidden[None, None]).logits[:, 0, 0]
        assert drafted[0].tolist() == [int(w.argmax()) for w in want]
        for i in range(heads):
            torch.testing.assert_close(scores[i][0].float(), want[i].float(), rtol=tol, atol=tol)
            torch.testing.assert_close(got_all[i].float(), want[i].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_medusa1(tmp_path, verifier, verifier_dir, dtype):
    src = write_medusa1(tmp_path / "src", dtype=dtype)
    before = tree_hash(src)
    messages: list[str] = []
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), log=messages.append)
    assert tree_hash(src) == before
    assert messages[0] == "detected format: medusa (Medusa-1 heads (FasterDecoding/Medusa medusa_lm_head.pt))"
    assert any("medusa_num_heads=2 but the checkpoint holds 5 heads" in m for m in messages)
    draft = sh.load_draft(out)
    assert type(draft).__name__ == "MedusaSpeculator" and draft.dtype == dtype
    config = draft.config
    assert (config.medusa_num_heads, config.medusa_num_layers, config.hidden_size, config.vocab_size) == (5, 1, H, V)
    assert config.verifier["num_hidden_layers"] == 4
    source = torch.load(src / "medusa_lm_head.pt", weights_only=True)
    for i in range(5):
        assert torch.equal(draft.state_dict()[f"lm_heads.{i}.weight"], source[f"{i}.1.weight"])
        assert torch.equal(draft.state_dict()[f"blocks.{i}.layers.0.bias"], source[f"{i}.0.linear.bias"])
    check_parity(draft.bind_verifier(verifier), verifier, source, 5, 1, tol=1e-5 if dtype == torch.float32 else 2e-2)
    if dtype == torch.float32:
        assert_greedy_exact(verifier, sh.load_draft(out).bind_verifier(verifier), make_prompts(3, max_len=12), 12)


def test_medusa1_reference_and_shared_resblock(tmp_path, verifier):
    """Without --verifier the reference is base_model_name_or_path; two layers per head are the equal
    copies of the one ResBlock the original code shares (reported); copies that differ are warned about."""
    src = write_medusa1(tmp_path / "src", heads=3, config_heads=3, layers=2, dtype=torch.float32)
    messages: list[str] = []
    out = convert(src, tmp_path / "out", log=messages.append)
    assert any("equal copies (the original code shares one ResBlock)" in m for m in messages)
    draft = sh.load_draft(out)
    assert draft.config.verifier["name_or_path"] == "tiny-org/vicuna" and draft.config.medusa_num_layers == 2
    check_parity(
        draft.bind_verifier(verifier), verifier, torch.load(src / "medusa_lm_head.pt", weights_only=True), 3, 2
    )

    tensors = medusa_heads(3, 2, 0, torch.float32, shared=False)
    torch.save(tensors, src / "medusa_lm_head.pt")
    messages.clear()
    convert(src, tmp_path / "out2", log=messages.append)
    assert any("repeats ONE ResBlock per head" in m and "'0.1.linear.weight'" in m for m in messages)


def test_medusa2_takes_only_the_heads(tmp_path, verifier, verifier_dir):
    src = write_medusa2(tmp_path / "src", verifier_dir)
    messages: list[str] = []
    out = convert(src, tmp_path / "out", log=messages.append)
    assert messages[0].startswith("detected format: medusa2")
    draft = sh.load_draft(out)
    assert set(draft.state_dict()) == {f"blocks.{i}.layers.{j}.{p}" for i in range(3) for j in range(2)
                                       for p in ("weight", "bias")} | {f"lm_heads.{i}.weight" for i in range(3)}  # fmt: skip
    reference = draft.config.verifier  # the fine-tuned model in the same folder is the verifier
    assert (
        reference["name_or_path"] == str(src) and reference["num_hidden_layers"] == 4 and reference["vocab_size"] == V
    )
    source = load_file(src / "model.safetensors")
    check_parity(draft.bind_verifier(verifier), verifier, source, 3, 2, prefix="medusa_head.")
    assert_greedy_exact(verifier, sh.load_draft(out).bind_verifier(verifier), make_prompts(2, max_len=10), 10)


def test_vllm_export_and_round_trip(tmp_path, verifier, verifier_dir):
    src = write_medusa1(tmp_path / "src", dtype=torch.float32)
    ours = convert(src, tmp_path / "ours", verifier=str(verifier_dir))
    exported = convert(ours, tmp_path / "vllm", to="vllm")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["num_heads"] == 5 and config["num_hidden_layers"] == 1
    assert config["hidden_size"] == H and config["vocab_size"] == V == config["truncated_vocab_size"]
    assert config["medusa_fc_bias"] is True  # vLLM drops the biases otherwise
    written = load_file(exported / "model.safetensors")
    source = torch.load(src / "medusa_lm_head.pt", weights_only=True)
    assert set(written) == {f"blocks.{i}.layers.0.{p}" for i in range(5) for p in ("weight", "bias")} | {
        f"lm_heads.{i}.weight" for i in range(5)
    }
    assert all(torch.equal(written[f"blocks.{i}.layers.0.weight"], source[f"{i}.0.linear.weight"]) for i in range(5))
    assert detect(exported).name == "medusa_vllm"
    back = convert(exported, tmp_path / "back", verifier=str(verifier_dir))
    a, b = sh.load_draft(ours), sh.load_draft(back)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    check_parity(b.bind_verifier(verifier), verifier, source, 5, 1)

    # vLLM's layout without medusa_fc_bias: vLLM ignores the biases, and so does the import (warned)
    config["medusa_fc_bias"] = False
    (exported / "config.json").write_text(json.dumps(config))
    messages: list[str] = []
    nobias = sh.load_draft(convert(exported, tmp_path / "nobias", log=messages.append))
    assert any("ignores them; converted as vLLM runs it" in m for m in messages)
    assert not any(bool(t.any()) for k, t in nobias.state_dict().items() if k.endswith(".bias"))


def test_mismatches_are_errors(tmp_path, verifier_dir):
    src = write_medusa1(tmp_path / "src", dtype=torch.float32)
    tensors = torch.load(src / "medusa_lm_head.pt", weights_only=True)
    torch.save(dict(tensors, **{"3.0.linear.weight": torch.zeros(H, H + 1)}), src / "medusa_lm_head.pt")
    with pytest.raises(
        ConversionError, match=r"'3\.0\.linear\.weight' has shape \(32, 33\), the config implies \(32, 32\)"
    ):
        convert(src, tmp_path / "out")
    torch.save({k: v for k, v in tensors.items() if k != "4.0.linear.bias"}, src / "medusa_lm_head.pt")
    with pytest.raises(ConversionError, match=r"blocks\.4\.layers\.0\.bias"):
        convert(src, tmp_path / "out")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "medusa_num_layers": 2}))
    torch.save(tensors, src / "medusa_lm_head.pt")
    with pytest.raises(ConversionError, match=r"tensor '\d\.1\.weight' is read as lm_heads\.\d\.weight"):
        convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps(config))
    other = tmp_path / "other"
    make_verifier(num_hidden_layers=4, vocab_size=128).save_pretrained(other)
    with pytest.raises(ConversionError, match=r"vocabulary of 96 tokens, the verifier has 128"):
        convert(src, tmp_path / "out", verifier=str(other))
    assert not (tmp_path / "out").exists()
