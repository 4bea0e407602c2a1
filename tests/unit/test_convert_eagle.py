"""Research EAGLE-1 / EAGLE-2 / HASS checkpoints (SafeAILab/EAGLE cnets1.py) -> ours, and `--to vllm`.

Synthetic checkpoints with exactly the published key names, shapes and config fields (random values):
the Vicuna style (`pytorch_model.bin`, fc bias, no `bias` key, no `rope_theta`, embed_tokens kept) and
the LLaMA-3 style (`"bias": false`, `rope_theta`, safetensors, no embed_tokens). Parity is checked
against the research maths written out by hand (test_eagle.draft_by_hand) over several positions, and
against golden data computed by SafeAILab's own cnets1.Model (tests/golden/eagle-research)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_exact, fresh_proposals, make_prompts, make_verifier
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_convert import tree_hash
from test_eagle import draft_by_hand
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.cli import main
from speculators_hf.convert import ConversionError, convert, detect

H, V, I_SIZE, HEADS, KV = 32, 96, 64, 4, 2
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "eagle-research"
LAYER = {
    "layers.0.self_attn.q_proj.weight": (HEADS * 8, H),
    "layers.0.self_attn.k_proj.weight": (KV * 8, H),
    "layers.0.self_attn.v_proj.weight": (KV * 8, H),
    "layers.0.self_attn.o_proj.weight": (H, HEADS * 8),
    "layers.0.mlp.gate_proj.weight": (I_SIZE, H),
    "layers.0.mlp.up_proj.weight": (I_SIZE, H),
    "layers.0.mlp.down_proj.weight": (H, I_SIZE),
}


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verifier")
    make_verifier(num_hidden_layers=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def verifier(verifier_dir):
    return AutoModelForCausalLM.from_pretrained(verifier_dir).eval()


def write_research_eagle(
    folder: Path, verifier, style: str = "vicuna", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """yuhuili/EAGLE-Vicuna-7B-v1.3 style ("vicuna": pytorch_model.bin, fc.bias, embed_tokens = a copy of
    the verifier's, config without bias/rope_theta, says float16 over float32 tensors) or
    yuhuili/EAGLE-LLaMA3-Instruct-8B style ("llama3": "bias": false, rope_theta, no fc.bias; stored here as
    safetensors without embed_tokens, as the research loader allows)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: 0.3 * torch.randn(*shape, generator=gen) for name, shape in LAYER.items()}
    tensors["layers.0.post_attention_layernorm.weight"] = 1 + 0.2 * torch.randn(H, generator=gen)
    tensors["fc.weight"] = 0.3 * torch.randn(H, 2 * H, generator=gen)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": I_SIZE,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": 1,
        "num_key_value_heads": KV,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.1",
        "use_cache": True,
        "vocab_size": V,
    }
    if style == "vicuna":
        tensors["fc.bias"] = 0.3 * torch.randn(H, generator=gen)
        tensors["embed_tokens.weight"] = verifier.get_input_embeddings().weight.detach().clone()
    else:
        config.update(bias=False, rope_theta=500000.0, max_position_embeddings=8192)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if style == "vicuna":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def read(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", weights_only=True)
    return load_file(folder / "model.safetensors")


def research_reference(src: dict[str, torch.Tensor], verifier, theta: float, eps: float = 1e-5):
    """The research tensors (embed_tokens from the verifier when absent, as ea_model.py loads it)."""
    sd = dict(src)
    sd.setdefault("embed_tokens.weight", verifier.get_input_embeddings().weight.detach())
    head = verifier.get_output_embeddings().weight.detach()
    return sd, head, eps, theta


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["vicuna", "llama3"])
def test_research_eagle(tmp_path, verifier, verifier_dir, style):
    src = write_research_eagle(tmp_path / "src", verifier, style)
    before = tree_hash(src)
    messages: list[str] = []
    if style == "llama3":  # no embed_tokens: the verifier's is needed
        with pytest.raises(ConversionError, match=r"no embed_tokens\.weight.*pass --verifier"):
            convert(src, tmp_path / "nope")
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), log=messages.append)
    assert tree_hash(src) == before
    assert messages[0].startswith("detected format: eagle (EAGLE-1/2 and HASS")
    assert {p.suffix for p in out.iterdir() if p.is_file()} <= {".json", ".safetensors", ".py", ".md"}
    draft = sh.load_draft(out)
    assert type(draft).__name__ == "EagleSpeculator"
    config = draft.config
    assert config.fc_bias is (style == "vicuna")
    theta = 10000.0 if style == "vicuna" else 500000.0  # no rope_theta: the research base 10000
    assert config.transformer_layer_config.rope_parameters["rope_theta"] == theta
    assert config.transformer_layer_config.head_dim == H // HEADS
    assert config.verifier["num_hidden_layers"] == 4 and config.verifier["vocab_size"] == V
    assert draft.dtype == torch.float32  # the file's dtype, whatever config.json says

    source = read(src)
    for name, tensor in source.items():
        assert torch.equal(draft.state_dict()[name], tensor), name
    if style == "llama3":
        assert "fc.bias" not in draft.state_dict()
        assert torch.equal(draft.embed_tokens.weight, verifier.get_input_embeddings().weight)

    # the research step by hand, 6 positions at once (causal attention, RoPE), features and logits
    sd, head, eps, _ = research_reference(source, verifier, theta)
    torch.manual_seed(3)
    tokens, features = torch.randint(3, V, (6,)), torch.randn(6, H)
    want_features, want_logits = draft_by_hand(sd, head, tokens, features, eps, theta)
    draft.bind_verifier(verifier)
    with torch.no_grad():
        got = draft(tokens[None], features[None]).hidden_states
        torch.testing.assert_close(got[0], want_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(draft.logits(got)[0], want_logits, rtol=1e-5, atol=1e-5)

    # proposals from the verifier's own post-norm last hidden state
    ids = torch.tensor([[5, 17, 40, 3, 61]])
    drafted, scores = fresh_proposals(draft, verifier, ids, 2)
    with torch.no_grad():
        last = verifier.model(ids[:, :-1]).last_hidden_state[0]
    _, logits = draft_by_hand(sd, head, ids[0, 1:], last, eps, theta)
    torch.testing.assert_close(scores[0][0], logits[-1], rtol=1e-4, atol=1e-4)
    assert drafted[0, 0].item() == logits[-1].argmax().item()

    stats = assert_greedy_exact(verifier, sh.load_draft(out).bind_verifier(verifier), make_prompts(3, max_len=12), 12)
    assert stats.drafted_tokens > 0


def test_bias_quirks_of_the_research_loader(tmp_path, verifier, verifier_dir):
    """`bias: false` with a fc.bias in the file: the research loader (strict=False) ignores it, and so do
    we (reported). `bias` true/absent without fc.bias: the research code would use a random bias: error."""
    src = write_research_eagle(tmp_path / "src", verifier, "llama3")
    tensors = read(src)
    save_file(dict(tensors, **{"fc.bias": torch.ones(H)}), str(src / "model.safetensors"))
    messages: list[str] = []
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), log=messages.append)
    assert any("dropping fc.bias: config.json says bias=false" in m for m in messages)
    assert "fc.bias" not in sh.load_draft(out).state_dict()

    config = json.loads((src / "config.json").read_text())
    del config["bias"]
    (src / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"no fc\.bias; the research code would run with a randomly"):
        convert(src, tmp_path / "out2", verifier=str(verifier_dir))
    assert not (tmp_path / "out2").exists()


def test_mismatches_are_errors_naming_the_tensor(tmp_path, verifier, verifier_dir):
    src = write_research_eagle(tmp_path / "src", verifier)
    tensors = read(src)
    torch.save(dict(tensors, **{"fc.weight": torch.zeros(H, 3 * H)}), src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"'fc\.weight' has shape \(32, 96\), the config implies \(32, 64\)"):
        convert(src, tmp_path / "out")
    torch.save(dict(tensors, **{"layers.0.input_layernorm.weight": torch.ones(H)}), src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"unexpected tensor 'layers\.0\.input_layernorm\.weight'"):
        convert(src, tmp_path / "out")
    torch.save(tensors, src / "pytorch_model.bin")
    other = tmp_path / "other"
    make_verifier(num_hidden_layers=4, vocab_size=128).save_pretrained(other)
    with pytest.raises(ConversionError, match=r"vocabulary of 96 tokens, the verifier has 128"):
        convert(src, tmp_path / "out", verifier=str(other))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ConversionError, match=r"'num_hidden_layers' is 2; this converter handles only \[1\]"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# --to vllm
# ------------------------------------------------------------------------------------------------
def test_vllm_export_and_round_trip(tmp_path, verifier, verifier_dir):
    src = write_research_eagle(tmp_path / "src", verifier, "vicuna")
    ours = convert(src, tmp_path / "ours", verifier=str(verifier_dir))
    messages: list[str] = []
    exported = convert(ours, tmp_path / "vllm", to="vllm", log=messages.append)
    assert messages[0].startswith("detected format: ours")
    assert any("WARNING" in m and "DROPS fc.bias" in m for m in messages)  # vLLM ignores the bias
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    # fc bias: `bias` absent (the research default, true); an explicit true means attention biases to vLLM
    assert "bias" not in config and config["rope_theta"] == 10000.0 and config["num_hidden_layers"] == 1
    with safe_open(exported / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(read(src))  # exactly the research / vLLM names (no model. prefix, no lm_head)
    assert detect(exported).name == "eagle"
    back = convert(exported, tmp_path / "back")
    a, b = sh.load_draft(ours), sh.load_draft(back)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.state_dict().keys() == b.state_dict().keys()

    # a draft without bias exports without the warning; the research converter's export too
    src2 = write_research_eagle(tmp_path / "src2", verifier, "llama3")
    messages.clear()
    direct = convert(src2, tmp_path / "vllm2", verifier=str(verifier_dir), to="vllm", log=messages.append)
    assert not any("WARNING" in m for m in messages)
    assert json.loads((direct / "config.json").read_text())["bias"] is False
    written = load_file(direct / "model.safetensors")
    assert all(torch.equal(written[k], t) for k, t in read(src2).items())
    assert torch.equal(written["embed_tokens.weight"], verifier.get_input_embeddings().weight)


def test_cli_and_wrong_export_target(tmp_path, verifier, verifier_dir, capsys):
    src = write_research_eagle(tmp_path / "src", verifier)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "vllm"]) == 0
    assert "detected format: eagle" in capsys.readouterr().err  # notices go to stderr, as train's
    with pytest.raises(ConversionError, match=r"cannot export a eagle draft to 'speculators'"):
        convert(src, tmp_path / "nope", to="speculators")


def test_golden_from_the_original_code(tmp_path):
    """tests/golden/eagle-research: features that SafeAILab/EAGLE's own cnets1.Model computes over 6
    positions (fc with bias, causal attention, RoPE base 10000, no input_layernorm); see make_golden.py."""
    before = tree_hash(GOLDEN)
    golden = load_file(GOLDEN / "golden.safetensors")
    out = convert(GOLDEN, tmp_path / "out")
    assert tree_hash(GOLDEN) == before
    draft = sh.load_draft(out)
    with torch.no_grad():
        got = draft(golden["input_ids"], golden["hidden_states"]).hidden_states
    torch.testing.assert_close(got, golden["draft_features"], rtol=1e-5, atol=1e-5)
