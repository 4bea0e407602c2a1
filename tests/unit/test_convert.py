"""Checkpoint conversion: research EAGLE-3, SpecForge and speculators 0.9 -> ours, and ours -> speculators.

Every source checkpoint is synthetic, built here with exactly the published key names, shapes and
config fields (random values), for a tiny verifier from conftest. Each converted draft is checked
against the ORIGINAL format's maths computed by hand from the source tensors (one position, where
attention reduces to o_proj(v_proj(x))), and for greedy exactness inside transformers' generate().
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_greedy_exact, fresh_proposals, make_prompts, make_verifier, publish_to_hub_cache
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.cli import main
from speculators_hf.convert import ConversionError, convert, detect, known_checkpoints, load_spec
from speculators_hf.generation.capture import verifier_hidden_states

H, V, I_SIZE, HEADS, KV = 32, 96, 64, 4, 2
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
LAYER_NAMES = [
    "input_layernorm.weight",
    "hidden_norm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waits
    made these tests 50x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# synthetic checkpoints with the published names, shapes and config fields
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
    """A LLaMA-3-like tiny verifier (8 layers so 2, L//2, L-3 = 2, 4, 5 are distinct; RoPE base 500000)."""
    folder = tmp_path_factory.mktemp("verifier")
    make_verifier(num_hidden_layers=8, rope_theta=500000.0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def verifier(verifier_dir):
    return AutoModelForCausalLM.from_pretrained(verifier_dir).eval()


def layer_tensors(prefix: str, head_dim: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    q, kv = HEADS * head_dim, KV * head_dim

    def norm():
        return 1 + 0.2 * torch.randn(H, generator=gen)

    def w(*shape):
        return 0.3 * torch.randn(*shape, generator=gen)

    shapes = {
        "self_attn.q_proj.weight": (q, 2 * H),
        "self_attn.k_proj.weight": (kv, 2 * H),
        "self_attn.v_proj.weight": (kv, 2 * H),
        "self_attn.o_proj.weight": (H, q),
        "mlp.gate_proj.weight": (I_SIZE, H),
        "mlp.up_proj.weight": (I_SIZE, H),
        "mlp.down_proj.weight": (H, I_SIZE),
    }
    out = {f"{prefix}{name}": norm() for name in LAYER_NAMES if name.endswith("norm.weight")}
    out.update({f"{prefix}{name}": w(*shape) for name, shape in shapes.items()})
    return out


def vocab_tensors(draft_vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if draft_vocab == V:  # research files keep identity buffers (SpecForge always registers them)
        return {"d2t": torch.zeros(V, dtype=torch.long), "t2d": torch.ones(V, dtype=torch.bool)}
    target = torch.randperm(V, generator=gen)[:draft_vocab].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[target] = True
    return {"d2t": target - torch.arange(draft_vocab), "t2d": t2d}


def write_research_eagle3(folder: Path, draft_vocab: int = 64, seed: int = 0, weights: str = "bin") -> Path:
    """yuhuili/EAGLE3-LLaMA3.1-Instruct-8B layout: midlayer.*, fc [H, 3H], norm, lm_head [Vd, H], d2t, t2d;
    no embed_tokens; config as eagle/traineagle3/config.json (no rope_theta)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = layer_tensors("midlayer.", H // HEADS, gen)
    tensors["fc.weight"] = 0.3 * torch.randn(H, 3 * H, generator=gen)
    tensors["norm.weight"] = 1 + 0.2 * torch.randn(H, generator=gen)
    tensors["lm_head.weight"] = 0.5 * torch.randn(draft_vocab, H, generator=gen)
    tensors.update(vocab_tensors(draft_vocab, gen))
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
        "num_key_value_heads": KV,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.1",
        "use_cache": True,
        "vocab_size": V,
        "draft_vocab_size": draft_vocab,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_specforge(
    folder: Path, verifier, aux_ids=(1, 3, 6), with_embed: bool = True, seed: int = 1, fc_norm: bool = True
) -> Path:
    """sgl-project/SpecForge LlamaForCausalLMEagle3: embed_tokens (HF export), midlayer.*, optional
    fc_norm.{0,1,2}, fc, norm, lm_head, t2d/d2t; config with head_dim, rope_theta and eagle_config."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = 16  # set in the config: SpecForge honours it (q_proj is heads * head_dim wide)
    tensors = layer_tensors("midlayer.", head_dim, gen)
    if with_embed:
        tensors["embed_tokens.weight"] = verifier.get_input_embeddings().weight.detach().clone()
    tensors["fc.weight"] = 0.3 * torch.randn(H, 3 * H, generator=gen)
    if fc_norm:
        tensors.update({f"fc_norm.{i}.weight": 1 + 0.2 * torch.randn(H, generator=gen) for i in range(3)})
    tensors["norm.weight"] = 1 + 0.2 * torch.randn(H, generator=gen)
    tensors["lm_head.weight"] = 0.5 * torch.randn(48, H, generator=gen)
    tensors.update(vocab_tensors(48, gen))
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": I_SIZE,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": 1,
        "num_key_value_heads": KV,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "vocab_size": V,
        "draft_vocab_size": 48,
        "fc_norm": fc_norm,
        "norm_output": True,
    }
    if aux_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_ids)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_speculators(folder: Path, verifier, norm_before_residual=True, seed: int = 2) -> Path:
    """A `speculators` 0.9 checkpoint as that library saves it: no top-level model_type, layers.0.*,
    embed_tokens, d2t/t2d, speculators_config, a transformers-4.x style transformer_layer_config."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = layer_tensors("layers.0.", H // HEADS, gen)
    tensors["embed_tokens.weight"] = verifier.get_input_embeddings().weight.detach().clone()
    tensors["fc.weight"] = 0.3 * torch.randn(H, 3 * H, generator=gen)
    tensors["norm.weight"] = 1 + 0.2 * torch.randn(H, generator=gen)
    tensors["lm_head.weight"] = 0.5 * torch.randn(80, H, generator=gen)
    tensors.update(vocab_tensors(80, gen))
    config = {
        "architectures": ["Eagle3Speculator"],
        "draft_vocab_size": 80,
        "eagle_aux_hidden_state_layer_ids": [1, 4, 6],
        "embed_requires_grad": False,
        "fc_norm": False,
        "norm_before_fc": False,
        "norm_output": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {"accept_tolerance": 0.0, "proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1}
            ],
            "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": "tiny-org/verifier"},
        },
        "speculators_model_type": "eagle3",
        "speculators_version": "0.9.0",
        "target_hidden_size": None,
        "torch_dtype": "float32",
        "transformer_layer_config": {
            "model_type": "llama",
            "vocab_size": V,
            "hidden_size": H,
            "intermediate_size": I_SIZE,
            "num_hidden_layers": 1,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV,
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-06,
            "rope_theta": 500000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "head_dim": H // HEADS,
        },
        "transformers_version": "4.57.1",
    }
    if norm_before_residual is not None:
        config["norm_before_residual"] = norm_before_residual
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def read_source(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", weights_only=True)
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = list(f.keys())
        return {k: f.get_tensor(k) for k in names}


def tree_hash(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------
# the original formats' maths, by hand, for one position
# ------------------------------------------------------------------------------------------------
def rms(x, weight, eps):
    x = x.float()
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def hand_logits(
    src, prefix, embed, aux, token, eps, head_dim, norm_before_residual=False, fc_norm=False, vocab=V
) -> torch.Tensor:
    """EAGLE-3 for one position, from the SOURCE tensors: fc over cat(aux) (per-state fc_norm first when
    set), x = cat(input_layernorm(embed(token)), hidden_norm(h)), attention over the single key is
    o_proj(v_proj(x)), residual h (research/SpecForge) or hidden_norm(h), MLP, lm_head(norm(out)); draft
    id d scattered to verifier id d + d2t[d] (-inf elsewhere)."""
    p = {k: v.float() for k, v in src.items()}
    if fc_norm:
        aux = [rms(a, p[f"fc_norm.{i}.weight"], eps) for i, a in enumerate(aux)]
    h = torch.cat(aux, -1) @ p["fc.weight"].T
    normed_h = rms(h, p[prefix + "hidden_norm.weight"], eps)
    e = rms(embed.float()[token], p[prefix + "input_layernorm.weight"], eps)
    x = torch.cat([e, normed_h], -1)
    v = x @ p[prefix + "self_attn.v_proj.weight"].T
    v = v.view(1, 1, KV, head_dim).repeat_interleave(HEADS // KV, dim=2).reshape(1, 1, HEADS * head_dim)
    h1 = (normed_h if norm_before_residual else h) + v @ p[prefix + "self_attn.o_proj.weight"].T
    m = rms(h1, p[prefix + "post_attention_layernorm.weight"], eps)
    gate, up = m @ p[prefix + "mlp.gate_proj.weight"].T, m @ p[prefix + "mlp.up_proj.weight"].T
    out = h1 + (F.silu(gate) * up) @ p[prefix + "mlp.down_proj.weight"].T
    draft_logits = rms(out, p["norm.weight"], eps) @ p["lm_head.weight"].T  # [1, 1, Vd]
    full = torch.full((1, vocab), float("-inf"))
    vd = draft_logits.shape[-1]
    targets = torch.arange(vd) + src["d2t"] if vd < vocab else torch.arange(vd)
    full[0, targets] = draft_logits[0, 0]
    return full


def check_parity(draft, verifier, src, prefix, embed, aux_ids, eps, head_dim, **math):
    """The converted draft's first proposal equals the original maths for prompts of length 2."""
    assert draft.config.eagle_aux_hidden_state_layer_ids == aux_ids
    for a, b in [(5, 17), (40, 3), (90, 61)]:
        ids = torch.tensor([[a, b]])
        aux = verifier_hidden_states(verifier, ids[:, :1], aux_ids)
        expected = hand_logits(
            src, prefix, embed, [x.detach() for x in aux], torch.tensor([[b]]), eps, head_dim, **math
        )
        tokens, scores = fresh_proposals(draft, verifier, ids, 1)
        torch.testing.assert_close(scores[0].float(), expected, rtol=2e-4, atol=2e-4)
        assert tokens[0, 0].item() == expected.argmax().item()


# ------------------------------------------------------------------------------------------------
# research EAGLE-3
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_research_eagle3(tmp_path, verifier, verifier_dir, weights):
    src = write_research_eagle3(tmp_path / "src", weights=weights)
    before = tree_hash(src)
    messages: list[str] = []
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), log=messages.append)
    assert tree_hash(src) == before  # the source is never written to
    assert "detected format: eagle3 (EAGLE-3, research format (SafeAILab/EAGLE))" in messages
    assert any("embed_tokens.weight copied from the verifier" in m for m in messages)
    assert {p.suffix for p in out.iterdir() if p.is_file()} <= {".json", ".safetensors", ".py", ".md"}

    draft = AutoModelForCausalLM.from_pretrained(out)  # ours, through the Auto classes
    assert sh.is_speculator(draft)
    config = draft.config
    assert config.eagle_aux_hidden_state_layer_ids == [2, 4, 5]  # 2, L//2, L-3 of the 8-layer verifier
    assert config.norm_before_residual is False and config.norm_output is False
    assert config.transformer_layer_config.rope_parameters["rope_theta"] == 10000.0  # no rope_theta: base 10000
    assert verifier.config.rope_parameters["rope_theta"] == 500000.0
    assert config.verifier["name_or_path"] == str(verifier_dir.resolve())
    assert config.verifier["num_hidden_layers"] == 8 and config.verifier["vocab_size"] == V
    assert config.dtype == torch.float32  # the file's dtype (config.json says float16: not trusted)

    source = read_source(src)
    for name in LAYER_NAMES:
        assert torch.equal(draft.state_dict()[f"layers.0.{name}"], source[f"midlayer.{name}"])
    assert torch.equal(draft.embed_tokens.weight, verifier.get_input_embeddings().weight)
    assert torch.equal(draft.d2t, source["d2t"]) and torch.equal(draft.t2d, source["t2d"])

    embed = verifier.get_input_embeddings().weight.detach()
    check_parity(draft.bind_verifier(verifier), verifier, source, "midlayer.", embed, [2, 4, 5], 1e-5, H // HEADS)
    stats = assert_greedy_exact(verifier, sh.load_draft(out).bind_verifier(verifier), make_prompts(3, max_len=12), 16)
    assert stats.drafted_tokens > 0


def test_research_eagle3_full_vocab_drops_identity_mapping(tmp_path, verifier, verifier_dir):
    src = write_research_eagle3(tmp_path / "src", draft_vocab=V, weights="safetensors")
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), to="speculators")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "d2t" not in keys and "t2d" not in keys  # vLLM fails on d2t with a full-size draft vocabulary
    draft = sh.load_draft(out).bind_verifier(verifier)
    check_parity(draft, verifier, read_source(src), "midlayer.", verifier.get_input_embeddings().weight.detach(),
                 [2, 4, 5], 1e-5, H // HEADS)  # fmt: skip


def test_dtype_is_kept(tmp_path, verifier_dir):
    """bf16 on disk stays bf16 (the verifier's fp32 embedding is cast, and that is reported)."""
    src = write_research_eagle3(tmp_path / "src", weights="safetensors")
    tensors = read_source(src)
    save_file(
        {k: t.bfloat16() if t.is_floating_point() else t for k, t in tensors.items()}, str(src / "model.safetensors")
    )
    messages: list[str] = []
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), log=messages.append)
    assert any("cast from torch.float32 to the draft's torch.bfloat16" in m for m in messages)
    written = load_file(out / "model.safetensors")
    assert {str(t.dtype) for k, t in written.items() if k not in ("d2t", "t2d")} == {"torch.bfloat16"}
    assert written["d2t"].dtype == torch.int64 and written["t2d"].dtype == torch.bool
    assert torch.equal(written["fc.weight"], tensors["fc.weight"].bfloat16())
    assert sh.load_draft(out).dtype == torch.bfloat16


def test_research_eagle3_needs_the_verifier(tmp_path):
    src = write_research_eagle3(tmp_path / "src")
    with pytest.raises(ConversionError, match=r"no embed_tokens\.weight.*pass --verifier"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_research_golden_from_the_original_code(tmp_path):
    """tests/golden/eagle3-research: logits computed by SafeAILab/EAGLE's own cnets.Model over 6
    positions (causal attention, RoPE base 10000) on a research-format draft; see make_golden.py."""
    source = GOLDEN / "eagle3-research"
    before = tree_hash(source)
    golden = load_file(source / "golden.safetensors")
    verifier = make_verifier(num_hidden_layers=8, rope_theta=500000.0)
    with torch.no_grad():
        verifier.get_input_embeddings().weight.copy_(golden["verifier_embedding"])
    out = convert(source, tmp_path / "out", verifier=verifier)  # a loaded model works as the verifier too
    assert tree_hash(source) == before
    with torch.no_grad():
        got = sh.load_draft(out)(golden["input_ids"], golden["aux"]).logits
    torch.testing.assert_close(got, golden["draft_logits"], rtol=1e-5, atol=1e-5)

    config = json.loads((out / "config.json").read_text())  # the golden data does see the RoPE base
    config["transformer_layer_config"]["rope_parameters"]["rope_theta"] = 500000.0
    (out / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert not torch.allclose(
            sh.load_draft(out)(golden["input_ids"], golden["aux"]).logits, golden["draft_logits"], atol=1e-3
        )


# ------------------------------------------------------------------------------------------------
# SpecForge
# ------------------------------------------------------------------------------------------------
def test_specforge(tmp_path, verifier, verifier_dir):
    src = write_specforge(tmp_path / "src", verifier)
    messages: list[str] = []
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir), log=messages.append)
    assert messages[0].startswith("detected format: specforge")
    draft = sh.load_draft(out)
    config = draft.config
    # SGLang capture id i is the OUTPUT of layer i: ours (HF hidden_states index) is i + 1
    assert config.eagle_aux_hidden_state_layer_ids == [2, 4, 7]
    assert config.fc_norm is True and config.norm_output is False
    assert config.transformer_layer_config.head_dim == 16
    assert config.transformer_layer_config.rope_parameters["rope_theta"] == 500000.0
    assert config.dtype == torch.float32
    source = read_source(src)
    check_parity(draft.bind_verifier(verifier), verifier, source, "midlayer.", source["embed_tokens.weight"],
                 [2, 4, 7], 1e-6, 16, fc_norm=True)  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out).bind_verifier(verifier)
    assert_greedy_exact(verifier, loaded, make_prompts(3, seed=1, max_len=12), 16)


def test_specforge_sglang_export_without_embedding_or_aux_ids(tmp_path, verifier, verifier_dir):
    """SpecForge's SGLang export drops embed_tokens; without eagle_config the default capture layers
    [1, L//2-1, L-4] + 1 = [2, L//2, L-3] apply."""
    src = write_specforge(tmp_path / "src", verifier, aux_ids=None, with_embed=False, fc_norm=False)
    with pytest.raises(ConversionError, match="pass --verifier"):
        convert(src, tmp_path / "nope")
    out = convert(src, tmp_path / "out", verifier=str(verifier_dir))
    draft = sh.load_draft(out)
    assert draft.config.eagle_aux_hidden_state_layer_ids == [2, 4, 5]
    assert torch.equal(draft.embed_tokens.weight, verifier.get_input_embeddings().weight)


def test_specforge_norm_output_false_is_refused(tmp_path, verifier):
    src = write_specforge(tmp_path / "src", verifier)
    config = json.loads((src / "config.json").read_text())
    config["norm_output"] = False
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"'norm_output' is False.*without the final norm"):
        convert(src, tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# speculators 0.9 and the export
# ------------------------------------------------------------------------------------------------
def test_speculators_import(tmp_path, verifier, verifier_dir):
    src = write_speculators(tmp_path / "src", verifier)
    messages: list[str] = []
    out = convert(src, tmp_path / "out", log=messages.append)  # no --verifier: the reference stays as the source says
    assert messages[0].startswith("detected format: speculators")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "speculators" and "auto_map" in config
    assert config["speculators_config"]["verifier"]["name_or_path"] == "tiny-org/verifier"
    assert any(p.name.startswith("speculators_") and p.suffix == ".py" for p in out.iterdir())  # remote code
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert draft.config.norm_before_residual is True and draft.config.speculative_tokens == 3
    assert draft.config.transformer_layer_config.rope_parameters["rope_theta"] == 500000.0
    source = read_source(src)
    check_parity(draft.bind_verifier(verifier), verifier, source, "layers.0.", source["embed_tokens.weight"],
                 [1, 4, 6], 1e-6, H // HEADS, norm_before_residual=True)  # fmt: skip
    assert_greedy_exact(verifier, sh.load_draft(out).bind_verifier(verifier), make_prompts(2, seed=2, max_len=12), 16)

    with_verifier = convert(src, tmp_path / "out2", verifier=str(verifier_dir))
    reference = sh.load_draft(with_verifier).config.verifier
    assert reference["name_or_path"] == str(verifier_dir.resolve()) and reference["num_hidden_layers"] == 8


def test_speculators_without_norm_before_residual_is_ambiguous(tmp_path, verifier):
    src = write_speculators(tmp_path / "src", verifier, norm_before_residual=None)
    with pytest.raises(ConversionError, match=r"speculators: false, vLLM: true.*--set norm_before_residual"):
        convert(src, tmp_path / "out")
    out = convert(src, tmp_path / "out", overrides={"norm_before_residual": True})
    assert sh.load_draft(out).config.norm_before_residual is True


def test_round_trip_through_the_speculators_export_is_lossless(tmp_path, verifier_dir):
    src = write_research_eagle3(tmp_path / "src")
    ours = convert(src, tmp_path / "ours", verifier=str(verifier_dir))
    exported = convert(ours, tmp_path / "exported", to="speculators")
    config = json.loads((exported / "config.json").read_text())
    layer = config["transformer_layer_config"]
    assert layer["rope_theta"] == 10000.0 and layer["rope_scaling"] is None  # for transformers 4.x readers
    assert config["norm_before_residual"] is False and config["model_type"] == "speculators"
    with safe_open(exported / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {f"layers.0.{n}" for n in LAYER_NAMES} | {
            "embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
        }  # fmt: skip
    back = convert(exported, tmp_path / "back")
    a, b = sh.load_draft(ours), sh.load_draft(back)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert json.loads((ours / "config.json").read_text()) == json.loads((back / "config.json").read_text())


def test_speculators_golden_written_by_the_speculators_library(tmp_path):
    """tests/golden/speculators-0.9.0-eagle3: a draft saved by speculators 0.9.0 itself, with logits from
    its own Eagle3DraftModel.forward (norm_before_residual=true); see make_golden.py."""
    source = GOLDEN / "speculators-0.9.0-eagle3"
    golden = load_file(source / "golden.safetensors")
    out = convert(source, tmp_path / "out")
    draft = sh.load_draft(out)
    assert draft.config.norm_before_residual is True and draft.config.eagle_aux_hidden_state_layer_ids == [1, 4, 6]
    with torch.no_grad():
        for k in range(len(golden["tokens"])):
            got = draft(golden["tokens"][k : k + 1, None], golden["aux"][k : k + 1]).logits[0, 0]
            torch.testing.assert_close(got, golden["draft_logits"][k], rtol=1e-5, atol=1e-5)
    exported = convert(out, tmp_path / "exported", to="speculators")
    original, again = load_file(source / "model.safetensors"), load_file(exported / "model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.parametrize(
    "golden, field",
    [
        ("speculators-0.9.0-eagle3", "eagle_aux_hidden_state_layer_ids"),
        ("speculators-0.9.0-peagle", "eagle_aux_hidden_state_layer_ids"),
        ("speculators-0.9.0-dflash", "aux_hidden_state_layer_ids"),
    ],
)
def test_aux_layer_ids_follow_one_rule_in_loading_and_converting(tmp_path, golden, field):
    """Ids are output_hidden_states indices 0..L (L: the post-norm last state) for EAGLE-3, P-EAGLE and DFlash:
    id L loads and converts, L + 1 is refused by both, with the same words; the export warns that vLLM's id L is
    the state before the final norm."""
    config = json.loads((GOLDEN / golden / "config.json").read_text())
    config["speculators_config"]["verifier"].update(num_hidden_layers=6, name_or_path="org/verifier")
    for ids in ([1, 4, 6], [1, 4, 7]):
        source = tmp_path / f"{golden}-{ids[-1]}"
        source.mkdir()
        (source / "config.json").write_text(json.dumps({**config, field: ids}))
        shutil.copy(GOLDEN / golden / "model.safetensors", source / "model.safetensors")
        if ids[-1] == 6:
            assert getattr(sh.load_draft(source).config, field) == ids
            messages: list[str] = []
            out = convert(source, tmp_path / "out", to="speculators", log=messages.append)
            assert getattr(sh.load_draft(out).config, field) == ids
            assert any(m.startswith("warning: the draft reads verifier state 6") for m in messages)
            shutil.rmtree(out)
            continue
        words = rf"{field}: \[1, 4, 7\] name hidden states a verifier of 6 layers does not have"
        with pytest.raises(ConversionError, match=words):  # the library's save loads through convert's spec
            sh.load_draft(source)
        with pytest.raises(ConversionError, match=words):
            convert(source, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_export_needs_a_resolvable_verifier_reference(tmp_path, verifier):
    src = write_speculators(tmp_path / "src", verifier)
    config = json.loads((src / "config.json").read_text())
    config["speculators_config"]["verifier"]["name_or_path"] = "./not/here"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"name_or_path is './not/here'.*Hub id or an existing path"):
        convert(src, tmp_path / "out", to="speculators")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# detection, the Hub, the command line
# ------------------------------------------------------------------------------------------------
def test_auto_detection(tmp_path, verifier):
    assert detect(write_research_eagle3(tmp_path / "a")).name == "eagle3"
    assert detect(write_specforge(tmp_path / "b", verifier)).name == "specforge"
    assert detect(write_speculators(tmp_path / "c", verifier)).name == "speculators"
    medusa = tmp_path / "medusa"
    medusa.mkdir()
    (medusa / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": 1}))
    save_file({"0.0.linear.weight": torch.zeros(4, 4)}, str(medusa / "model.safetensors"))
    assert detect(medusa).name == "medusa"
    modelopt = write_research_eagle3(tmp_path / "modelopt", weights="safetensors")
    config = json.loads((modelopt / "config.json").read_text())
    config.update(
        architectures=["LlamaForCausalLMEagle3"],
        eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 4], "use_input_layernorm_in_first_layer": True},
    )
    (modelopt / "config.json").write_text(json.dumps(config))
    assert detect(modelopt).name == "modelopt"
    with pytest.raises(ConversionError, match="recognised but has no converter yet"):
        convert(modelopt, tmp_path / "out")


def test_unknown_and_ambiguous_layouts(tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    save_file({"wte.weight": torch.zeros(4, 8)}, str(unknown / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"(?s)unknown checkpoint layout.*wte\.weight.*--from FORMAT"):
        convert(unknown, tmp_path / "out")
    ambiguous = write_research_eagle3(tmp_path / "ambiguous", weights="safetensors")
    config = json.loads((ambiguous / "config.json").read_text())
    (ambiguous / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 5}))
    with pytest.raises(ConversionError, match=r"ambiguous checkpoint layout.*\['eagle3', 'medusa'\].*--from"):
        convert(ambiguous, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_id_from_the_offline_cache(tmp_path, verifier_dir, verifier, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    publish_to_hub_cache(write_research_eagle3(tmp_path / "src"), "tiny-org/eagle3-research", cache)
    publish_to_hub_cache(verifier_dir, "tiny-org/tiny-verifier", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = convert("tiny-org/eagle3-research", tmp_path / "out", verifier="tiny-org/tiny-verifier", cache_dir=cache)
    draft = sh.load_draft(out)
    assert draft.config.verifier["name_or_path"] == "tiny-org/tiny-verifier"
    assert torch.equal(draft.embed_tokens.weight, verifier.get_input_embeddings().weight)
    exported = convert(out, tmp_path / "exported", to="speculators")  # a Hub id is a valid vLLM reference
    assert sh.load_draft(exported).config.verifier["name_or_path"] == "tiny-org/tiny-verifier"


def test_cli(tmp_path, verifier_dir, capsys):
    src = write_research_eagle3(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "out"), "--verifier", str(verifier_dir), "--set",
                 "speculative_tokens=4"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "detected format: eagle3" in captured.err and "wrote" in captured.err and not captured.out
    assert sh.load_draft(tmp_path / "out").config.speculative_tokens == 4
    assert main(["convert", str(src), str(tmp_path / "out2")]) == 1  # a failure while running, as every command
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if "error:" in line]
    assert not captured.out and len(error) == 1 and error[0].startswith("speculators-hf convert: error: ")
    assert "pass --verifier" in error[0]
    assert main(["convert", "--list-known"]) == 0
    assert "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# safety and errors
# ------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls exec(): the code would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, verifier_dir):
    src = write_research_eagle3(tmp_path / "src")
    marker = tmp_path / "pwned"
    evil = torch.load(src / "pytorch_model.bin", weights_only=True)
    evil["norm.weight"] = _Payload(marker)
    torch.save(evil, src / "pytorch_model.bin")
    before = tree_hash(src)
    with pytest.raises(ConversionError, match=r"refusing to read .*pytorch_model\.bin.*weights_only=True"):
        convert(src, tmp_path / "out", verifier=str(verifier_dir))
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert tree_hash(src) == before
    torch.load(src / "pytorch_model.bin", weights_only=False)  # proof that the payload is real
    assert marker.read_text() == "pwned"


def test_failure_midway_leaves_no_destination(tmp_path, verifier_dir, monkeypatch):
    import speculators_hf.convert as convert_module

    src = write_research_eagle3(tmp_path / "src")

    def boom(folder, model):
        assert any(folder.iterdir())  # the checkpoint was being written
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_module, "_check_written", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(src, tmp_path / "out", verifier=str(verifier_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temporary folder left

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert(src, existing, verifier=str(verifier_dir))
    with pytest.raises(RuntimeError, match="disk full"):
        convert(src, existing, verifier=str(verifier_dir), overwrite=True)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(ConversionError, match="overlaps the source"):
        convert(src, src / "inside", verifier=str(verifier_dir))


def test_shape_dtype_vocab_and_verifier_mismatches(tmp_path, verifier_dir):
    src = write_research_eagle3(tmp_path / "src", weights="safetensors")
    tensors = read_source(src)

    bad = dict(tensors, **{"fc.weight": torch.zeros(H, 2 * H)})
    save_file(bad, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"'fc\.weight' has shape \(32, 64\), the config implies \(32, 96\)"):
        convert(src, tmp_path / "out", verifier=str(verifier_dir))

    bad = dict(tensors, **{"midlayer.mlp.up_proj.weight": tensors["midlayer.mlp.up_proj.weight"].half()})
    save_file(bad, str(src / "model.safetensors"))
    with pytest.raises(
        ConversionError, match=r"'midlayer\.mlp\.up_proj\.weight' has dtype torch\.float16 but .* torch\.float32"
    ):
        convert(src, tmp_path / "out", verifier=str(verifier_dir))

    bad = dict(tensors, **{"d2t": tensors["d2t"].float()})
    save_file(bad, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"'d2t' has dtype torch\.float32, expected an integer dtype"):
        convert(src, tmp_path / "out", verifier=str(verifier_dir))

    save_file({k: t for k, t in tensors.items() if k != "midlayer.mlp.up_proj.weight"}, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"lacks \['midlayer\.mlp\.up_proj\.weight'\]"):
        convert(src, tmp_path / "out", verifier=str(verifier_dir), from_format="eagle3")

    save_file(dict(tensors, extra=torch.zeros(3)), str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected tensor 'extra'"):
        convert(src, tmp_path / "out", verifier=str(verifier_dir))

    save_file(tensors, str(src / "model.safetensors"))
    other_vocab = tmp_path / "other_vocab"
    make_verifier(num_hidden_layers=8, vocab_size=128).save_pretrained(other_vocab)
    with pytest.raises(
        ConversionError,
        match=r"vocab_size: the EAGLE-3 draft was made for a vocabulary of 96 tokens, the verifier has 128",
    ):
        convert(src, tmp_path / "out", verifier=str(other_vocab))
    other_hidden = tmp_path / "other_hidden"
    make_verifier(num_hidden_layers=8, hidden_size=64).save_pretrained(other_hidden)
    with pytest.raises(ConversionError, match=r"hidden_size: .* width 32, the verifier's are 64"):
        convert(src, tmp_path / "out", verifier=str(other_hidden))
    assert not (tmp_path / "out").exists()


def test_specs_and_known_checkpoints_are_consistent():
    formats = {
        "eagle3",
        "specforge",
        "speculators",
        "eagle",
        "medusa",
        "medusa2",
        "mlp_speculator",
        "modelopt",
        "dflash_zlab",
        "dspark_dense",
    }
    known = known_checkpoints()
    assert {entry["format"] for entry in known} == formats
    for entry in known:
        spec = load_spec(entry["format"])
        assert entry["status"] == spec.status and entry["verified"] and "/" in entry["repo"]


def test_a_spec_extends_another_and_a_bad_base_is_named(tmp_path, monkeypatch):
    """`extends: NAME`: the variant's mappings merge over the base's, its lists replace them; an unknown base
    or a cycle is refused naming the file."""
    from speculators_hf.convert import formats

    (tmp_path / "base.yaml").write_text(
        "name: base\ntitle: B\nstatus: supported\nfamily: eagle3\n"
        "tensors: {layout: {fc.weight: [a]}, optional: [fc.weight]}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "extends: base\nname: child\ntitle: C\nfamily: peagle\ntensors: {layout: {mask_hidden: [b]}, optional: []}\n"
    )
    monkeypatch.setattr(formats, "_spec_dir", lambda: tmp_path)
    child = formats.all_specs.__wrapped__()["child"]
    assert child.status == "supported" and child.family == "peagle"
    assert child.tensors.layout == {"fc.weight": ["a"], "mask_hidden": ["b"]} and child.tensors.optional == []
    (tmp_path / "base.yaml").write_text((tmp_path / "base.yaml").read_text() + "extends: child\n")
    with pytest.raises(ConversionError, match=r"(base|child).yaml extends '(child|base)': no such spec, or a cycle"):
        formats.all_specs.__wrapped__()
