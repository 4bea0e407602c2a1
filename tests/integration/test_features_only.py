"""Training from cached features without the verifier's decoder (`train --features`, `verifier_parts`), and the
transformers engine spread over devices (`--device-map auto`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_verifier
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from speculators_hf.cli import main
from speculators_hf.training import DraftDataset, TrainConfig, load_blocks, train
from speculators_hf.training.cli import _new_draft
from speculators_hf.training.data import verifier_parts

FAMILIES = {"eagle3": {"draft_vocab_size": 16}, "dflash": {"draft_args": {"block_size": 4}}, "eagle": {}}
STEPS = 4


def write_data(tmp_path: Path, tokenizer, family: str, extra: tuple[str, ...] = ()) -> Path:
    """`speculators-hf data --cache-features` on a few chats; returns the feature folder."""
    words = ["the draft model", "speculative decoding is exact", "fast output text", "runs on cpu and gpu"]
    records = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w}]} for w in words * 6]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    argv = ["data", "--verifier", str(tmp_path / "verifier"), "--input", str(tmp_path / "chat.jsonl")]
    argv += ["--output", str(tmp_path / "data"), "--seq-len", "16", "--cache-features", "--cache-dtype", "float32"]
    assert main([*argv, "--family", family, *extra]) == 0
    return next((tmp_path / "data").glob("features-*"))


def strip_decoder_shards(folder: Path) -> list[str]:
    """Delete every shard of `folder` that holds decoder layers only; returns their names."""
    deleted = []
    for shard in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
        if all(n.startswith("model.layers.") for n in names):
            shard.unlink()
            deleted.append(shard.name)
    return deleted


@pytest.fixture
def sharded(tmp_path, tiny_tokenizer):
    """A tiny verifier saved in 12 shards (embedding, each layer's parts, norm, lm_head) with its tokenizer."""
    verifier = make_verifier(vocab_size=len(tiny_tokenizer))
    verifier.save_pretrained(tmp_path / "verifier", max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(tmp_path / "verifier")
    assert len(list((tmp_path / "verifier").glob("model-*.safetensors"))) > 4
    return verifier


def losses(verifier, family: str, data: Path, features: Path, out: Path) -> list[float]:
    """The per-step losses of STEPS steps of a new `family` draft trained on the cached features."""
    options = FAMILIES[family]
    torch.manual_seed(0)
    draft = _new_draft(family, verifier, options.get("draft_vocab_size"), None, options.get("draft_args"))
    ids, mask = load_blocks(data)
    config = TrainConfig(output_dir=str(out), steps=STEPS, batch_size=2, log_every=1, warmup_steps=1)
    result = train(draft, verifier, DraftDataset(ids, mask, features), config, resume=False)
    return [r["loss"] for r in result["history"]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_without_the_decoder_layers_equals_training_with_the_verifier(
    tmp_path, tiny_tokenizer, sharded, family, capsys
):
    """A verifier folder whose decoder-layer shards are deleted trains (`train --features`) to the same losses
    as the whole verifier from the same features and seed; a stand-in with a wrong embedding is caught."""
    features = write_data(tmp_path, tiny_tokenizer, family)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "verifier").eval()
    reference = losses(full, family, tmp_path / "data", features, tmp_path / "full")

    deleted = strip_decoder_shards(tmp_path / "verifier")
    assert len(deleted) >= 8  # every layer's tensors are gone
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "verifier")
    parts = verifier_parts(tmp_path / "verifier")
    assert parts.model.layers[0].mlp.up_proj.weight.is_meta
    assert losses(parts, family, tmp_path / "data", features, tmp_path / "parts") == pytest.approx(reference, abs=1e-6)

    # the CLI: the same run, and the evaluation skipped with a line saying so
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--family", family]
    argv += ["--features", str(features), "--output", str(tmp_path / "cli"), "--steps", str(STEPS)]
    argv += ["--batch-size", "2", "--log-every", "1", "--warmup-steps", "1", "--eval-blocks", "1", "--seed", "0"]
    options = FAMILIES[family]
    if "draft_vocab_size" in options:
        argv += ["--draft-vocab-size", str(options["draft_vocab_size"])]
    for key, value in options.get("draft_args", {}).items():
        argv += ["--draft-arg", f"{key}={value}"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "evaluation: skipped: with --features the verifier's decoder is not loaded" in capsys.readouterr().err
    assert (tmp_path / "cli" / "final" / "model.safetensors").exists()

    # a mutant stand-in: its embedding rows belong to other tokens, so the losses move
    with torch.no_grad():
        weight = parts.get_input_embeddings().weight
        weight.copy_(weight.roll(1, dims=0))
    mutant = losses(parts, family, tmp_path / "data", features, tmp_path / "mutant")
    assert max(abs(a - b) for a, b in zip(mutant, reference)) > 1e-4


def test_features_only_evaluates_tau_with_the_eval_verifier(tmp_path, tiny_tokenizer, sharded, capsys):
    """`--eval-verifier` loads the whole verifier for tau only; training still reads the parts."""
    features = write_data(tmp_path, tiny_tokenizer, "eagle3")
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data")]
    argv += ["--features", str(features), "--output", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2"]
    argv += ["--eval-blocks", "1", "--eval-prompt-len", "6", "--draft-vocab-size", "16"]
    assert main([*argv, "--eval-verifier", str(tmp_path / "verifier")]) == 0
    summary = json.loads((tmp_path / "out" / "final" / "training_summary.json").read_text())
    assert len(summary["evals"]) == 1 and summary["evals"][0]["tau"] >= 1.0


def test_parts_of_a_tied_verifier_stay_tied_and_a_missing_tensor_is_named(tmp_path):
    verifier = make_verifier(tie_word_embeddings=True)
    verifier.save_pretrained(tmp_path / "tied")
    parts = verifier_parts(tmp_path / "tied")
    assert parts.lm_head.weight is parts.model.embed_tokens.weight
    assert torch.equal(parts.lm_head.weight, verifier.lm_head.weight)
    with pytest.raises(RuntimeError, match="loaded without its decoder layers"):
        parts(torch.tensor([[3, 4]]))

    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "tied" / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "tied" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight .* is not in its model\.safetensors"):
        verifier_parts(tmp_path / "tied")


def test_device_map_auto_gives_the_same_features(tmp_path, tiny_tokenizer, sharded):
    """`data --device-map auto` (accelerate's placement; on this CPU-only machine every layer lands on the CPU,
    so this checks the path, not a split over GPUs) caches the same features as the default placement."""
    plain = write_data(tmp_path, tiny_tokenizer, "eagle3")
    before = {p.name: p.read_bytes() for p in plain.iterdir()}
    for p in plain.iterdir():
        p.unlink()
    mapped = write_data(tmp_path, tiny_tokenizer, "eagle3", ("--device-map", "auto"))
    assert mapped == plain and {p.name: p.read_bytes() for p in mapped.iterdir()} == before


def test_train_with_device_map_auto_trains_the_same_draft(tmp_path, tiny_tokenizer, sharded):
    """`train --device-map auto` (features computed on the fly by the verifier accelerate placed; all on the CPU
    here) ends with the same losses as the default placement."""
    write_data(tmp_path, tiny_tokenizer, "eagle3")
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--steps", "3"]
    argv += ["--batch-size", "2", "--log-every", "1", "--eval-blocks", "0", "--draft-vocab-size", "16"]
    assert main([*argv, "--output", str(tmp_path / "plain")]) == 0
    assert main([*argv, "--output", str(tmp_path / "mapped"), "--device-map", "auto"]) == 0
    logs = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "training_log.jsonl").read_text().splitlines()]
        for name in ("plain", "mapped")
    ]
    assert len(logs[0]) == 3 and logs[0] == pytest.approx(logs[1], abs=1e-6)
