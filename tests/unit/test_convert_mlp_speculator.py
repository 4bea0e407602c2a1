"""IBM MLP speculators (fms-extras; as published on the Hub, e.g. ibm-ai-platform/llama3-8b-accelerator)
-> ours, and `--to vllm`.

Synthetic checkpoints with the published names (`speculator.emb.{i}.weight`, `speculator.proj.{i}.weight`,
`speculator.head.{i}.weight`, `speculator.ln.{i}.weight/.bias`), shapes and config fields (model_type
mlp_speculator, vocab_size, emb_dim, inner_dim, n_predict, top_k_tokens_per_head, n_candidates,
tie_weights, scale_input), random values. Parity: the converted draft's proposals equal fms-extras'
maths written out here from the source tensors (a chain of n_predict greedy stages)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_greedy_exact, fresh_proposals, make_prompts, make_verifier
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_convert import tree_hash
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.convert import ConversionError, convert, detect

H, V, INNER = 32, 96, 48


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verifier")
    make_verifier(num_hidden_layers=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def verifier(verifier_dir):
    return AutoModelForCausalLM.from_pretrained(verifier_dir).eval()


def write_mlp_speculator(
    folder: Path, n_predict: int = 3, tie: bool = False, scale_input: bool = False, prefix: str = "speculator.",
    inner_dim: int = INNER, seed: int = 0,
) -> Path:  # fmt: skip
    """The fms-extras HF checkpoint layout (MLPSpeculatorPreTrainedModel, module under `speculator`)."""
    gen = torch.Generator().manual_seed(seed)
    inner = inner_dim or H
    folder.mkdir(parents=True, exist_ok=True)

    def w(*shape):
        return torch.randn(*shape, generator=gen) / math.sqrt(inner)

    tensors: dict[str, torch.Tensor] = {}
    for i in range(n_predict):
        tensors[f"emb.{i}.weight"] = w(V, inner)
        tensors[f"proj.{i}.weight"] = w(inner, H if i == 0 else inner)
        tensors[f"head.{i}.weight"] = w(V, inner)
        tensors[f"ln.{i}.weight"] = 1 + 0.2 * torch.randn(inner, generator=gen)
        tensors[f"ln.{i}.bias"] = 0.2 * torch.randn(inner, generator=gen)
    if tie:  # fms-extras shares one parameter; HF saving materialises equal copies
        for i in range(1, n_predict):
            for name in ("emb", "head"):
                tensors[f"{name}.{i}.weight"] = tensors[f"{name}.0.weight"].clone()
            tensors[f"ln.{i}.weight"] = tensors["ln.0.weight"].clone()
            tensors[f"ln.{i}.bias"] = tensors["ln.0.bias"].clone()
            if i >= 2:
                tensors[f"proj.{i}.weight"] = tensors["proj.1.weight"].clone()
    config = {
        "architectures": ["MLPSpeculatorPreTrainedModel"],
        "emb_dim": H,
        "inner_dim": inner_dim,
        "model_type": "mlp_speculator",
        "n_candidates": 5,
        "n_predict": n_predict,
        "scale_input": scale_input,
        "tie_weights": tie,
        "top_k_tokens_per_head": [4, 3, 2, 2][:n_predict],
        "torch_dtype": "float32",
        "transformers_version": "4.40.2",
        "vocab_size": V,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({prefix + k: v for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def fms_chain(src: dict[str, torch.Tensor], hidden: torch.Tensor, token: int, n: int, scale_input: bool):
    """fms-extras MLPSpeculator, greedy chain from the verifier state `hidden` [H] and newest token:
    s = gelu(ln_i(proj_i(s) + emb_weight/state_weight * emb_i(tok))), logits_i = head_i(s), with
    ln(x) = x * rsqrt(mean(x^2) + 1e-6) * w + b; scale_input: s0 = ln0(h) / sqrt(2) (no parameters)."""
    p = {k.removeprefix("speculator."): v for k, v in src.items()}
    inner = p["proj.0.weight"].shape[0]
    state_weight = 0.5 ** (0.5 / n)
    emb_weight = math.sqrt((1 - state_weight**2) * (inner / 2))
    state = hidden
    if scale_input:
        state = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(2)
    all_logits, tokens = [], []
    for i in range(n):
        z = state @ p[f"proj.{i}.weight"].T + (emb_weight / state_weight) * p[f"emb.{i}.weight"][token]
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * p[f"ln.{i}.weight"] + p[f"ln.{i}.bias"]
        state = F.gelu(z)
        logits = state @ p[f"head.{i}.weight"].T
        token = int(logits.argmax())
        all_logits.append(logits)
        tokens.append(token)
    return tokens, all_logits


@pytest.mark.parametrize(
    "tie,scale_input,prefix,inner_dim",
    [(False, False, "speculator.", INNER), (True, True, "speculator.", INNER), (False, False, "", 0)],
)
def test_mlp_speculator(tmp_path, verifier, verifier_dir, tie, scale_input, prefix, inner_dim):
    src = write_mlp_speculator(tmp_path / "src", tie=tie, scale_input=scale_input, prefix=prefix, inner_dim=inner_dim)
    before = tree_hash(src)
    messages: list[str] = []
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), log=messages.append)
    assert tree_hash(src) == before
    assert messages[0] == "detected format: mlp_speculator (MLP speculator (IBM fms-extras; vLLM mlp_speculator))"
    assert ("tie_weights: every tied copy equals the first (checked)" in messages) is tie
    draft = sh.load_draft(out)
    config = draft.config
    assert (config.emb_dim, config.inner_dim, config.n_predict, config.tie_weights, config.scale_input) == (
        H, inner_dim, 3, tie, scale_input,
    )  # fmt: skip
    assert config.top_k_tokens_per_head == [4, 3, 2] and config.n_candidates == 5
    assert config.vocab_size == V and config.verifier["num_hidden_layers"] == 4
    source = load_file(src / "model.safetensors")
    for name, tensor in source.items():
        assert torch.equal(draft.state_dict()[name.removeprefix("speculator.")], tensor), name

    draft.bind_verifier(verifier)
    for ids in ([[5, 17, 40]], [[90, 61]], [[7, 8, 9, 10, 11]]):
        ids = torch.tensor(ids)
        drafted, scores = fresh_proposals(draft, verifier, ids, 3)
        with torch.no_grad():
            hidden = verifier.model(ids[:, :-1]).last_hidden_state[0, -1]
        want_tokens, want_logits = fms_chain(source, hidden, int(ids[0, -1]), 3, scale_input)
        assert drafted[0].tolist() == want_tokens
        for got, want in zip(scores, want_logits):
            torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
    assert_greedy_exact(verifier, sh.load_draft(out).bind_verifier(verifier), make_prompts(3, max_len=12), 12)


def test_vllm_export_and_round_trip(tmp_path, verifier_dir):
    src = write_mlp_speculator(tmp_path / "src", n_predict=4, tie=True)
    ours = convert(src, tmp_path / "ours", verifier=str(verifier_dir))
    exported = convert(ours, tmp_path / "vllm", to="vllm")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    source_config = json.loads((src / "config.json").read_text())
    for key in ("model_type", "architectures", "vocab_size", "emb_dim", "inner_dim", "n_predict", "n_candidates",
                "tie_weights", "scale_input", "top_k_tokens_per_head"):  # fmt: skip
        assert config[key] == source_config[key], key
    original, written = load_file(src / "model.safetensors"), load_file(exported / "model.safetensors")
    assert original.keys() == written.keys()  # the published names, `speculator.` prefix and tied copies included
    assert all(torch.equal(original[k], written[k]) for k in original)
    assert detect(exported).name == "mlp_speculator"
    back = convert(exported, tmp_path / "back")
    a, b = sh.load_draft(ours), sh.load_draft(back)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    # straight from the published layout, too
    direct = convert(src, tmp_path / "direct", to="vllm")
    with safe_open(direct / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(original)


def test_tied_copies_that_differ_are_an_error_naming_the_tensor(tmp_path):
    src = write_mlp_speculator(tmp_path / "src", tie=True)
    tensors = load_file(src / "model.safetensors")
    tensors["speculator.head.2.weight"] = tensors["speculator.head.2.weight"] + 1e-3
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(
        ConversionError, match=r"tensor 'speculator\.head\.2\.weight' differs from 'speculator\.head\.0\.weight'"
    ):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatches_are_errors(tmp_path, verifier_dir):
    src = write_mlp_speculator(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    save_file(dict(tensors, **{"speculator.proj.1.weight": torch.zeros(INNER, H)}), str(src / "model.safetensors"))
    with pytest.raises(
        ConversionError, match=r"'speculator\.proj\.1\.weight' has shape \(48, 32\), the config implies \(48, 48\)"
    ):
        convert(src, tmp_path / "out")
    save_file({k: v for k, v in tensors.items() if k != "speculator.ln.2.bias"}, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"lacks \['speculator\.ln\.2\.bias'\]"):
        convert(src, tmp_path / "out")
    save_file(dict(tensors, **{"speculator.emb.3.weight": torch.zeros(V, INNER)}), str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected tensor 'speculator\.emb\.3\.weight'"):
        convert(src, tmp_path / "out")
    save_file(tensors, str(src / "model.safetensors"))
    other = tmp_path / "other"
    make_verifier(num_hidden_layers=4, hidden_size=64).save_pretrained(other)
    with pytest.raises(
        ConversionError, match=r"hidden_size: the MLP speculator reads verifier hidden states of width 32"
    ):
        convert(src, tmp_path / "out", verifier=str(other))
    assert not (tmp_path / "out").exists()
