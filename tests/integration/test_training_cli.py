"""`speculators-hf data` + `accelerate launch ... train` end to end on CPU, and the example configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_exact, make_prompts, make_verifier
from transformers import AutoModelForCausalLM

from speculators_hf.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.mixed_precision in {"bf16", "no"}


def test_data_then_accelerate_launch_train(tmp_path, tiny_tokenizer):
    verifier = make_verifier(vocab_size=len(tiny_tokenizer))
    verifier.save_pretrained(tmp_path / "verifier")
    tiny_tokenizer.save_pretrained(tmp_path / "verifier")
    words = ["the draft model", "speculative decoding is exact", "fast output text", "runs on cpu and gpu"]
    records = [
        {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": "same"}]} for w in words * 12
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))

    argv = [
        "data",
        "--verifier",
        str(tmp_path / "verifier"),
        "--input",
        str(tmp_path / "chat.jsonl"),
        "--output",
        str(tmp_path / "data"),
    ]
    argv += [
        "--seq-len",
        "32",
        "--regenerate",
        "--max-new-tokens",
        "12",
        "--cache-features",
        "--cache-dtype",
        "float32",
    ]
    assert main(argv) == 0
    info = json.loads((tmp_path / "data" / "data_info.json").read_text())
    assert info["regenerated"] and info["blocks"] >= 10
    features = next((tmp_path / "data").glob("features-*"))

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples/accelerate/cpu.yaml"),
    ]
    cmd += [
        "-m",
        "speculators_hf.cli",
        "train",
        "--verifier",
        str(tmp_path / "verifier"),
        "--data",
        str(tmp_path / "data"),
    ]
    cmd += ["--output", str(tmp_path / "out"), "--features", str(features), "--steps", "6", "--batch-size", "2"]
    cmd += [
        "--save-every",
        "3",
        "--eval-blocks",
        "2",
        "--eval-prompt-len",
        "8",
        "--draft-vocab-size",
        "16",
        "--ttt-steps",
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-3", "step-6"]

    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").bind_verifier(verifier)
    assert draft.config.draft_vocab_size == 16
    assert draft.config.verifier["name_or_path"] == str(tmp_path / "verifier")
    assert_greedy_exact(verifier, draft, make_prompts(5, vocab=len(tiny_tokenizer)), max_new_tokens=12)


def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path):
    """`torchrun --nproc_per_node 2` (DDP over gloo on CPU): each process takes its own share of the global
    batch, so 2 processes x 4 blocks train the same draft as 1 process x 8 blocks (full loss masks make
    the mean of the per-process means the global mean). A DDP run resumed from its step-4 checkpoint (each
    rank restores its own RNG state) ends bit-identical to the uninterrupted one."""
    from safetensors.torch import load_file

    from speculators_hf.training.data import save_blocks

    verifier = make_verifier(eos_token_id=None)
    verifier.save_pretrained(tmp_path / "verifier")
    ids = torch.randint(3, 96, (48, 24), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": "verifier"})
    common = ["-m", "speculators_hf.cli", "train", "--verifier", "verifier", "--data", "data", "--steps", "5"]
    common += ["--eval-blocks", "0", "--ttt-steps", "2", "--warmup-steps", "1", "--save-every", "2"]
    common += ["--draft-vocab-size", "96"]  # the full vocabulary: every target counts in every process's loss
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common, "--batch-size", "4"],
        "single": [sys.executable, *common, "--batch-size", "8"],
    }

    def launch(name: str) -> subprocess.CompletedProcess:
        run_env = {**env, "ACCELERATE_USE_CPU": "true"} if name == "ddp" else env
        proc = subprocess.run(
            [*runs[name], "--output", name], capture_output=True, text=True, env=run_env, timeout=300, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    for name in runs:
        launch(name)
    assert (tmp_path / "ddp" / "checkpoints" / "step-5" / "rng-1.safetensors").exists()  # two ranks took part
    ddp, single = (load_file(tmp_path / name / "final" / "model.safetensors") for name in runs)
    # as if killed after the step-4 checkpoint: the DDP resume must end where the uninterrupted run did
    shutil.rmtree(tmp_path / "ddp" / "checkpoints" / "step-5")
    shutil.rmtree(tmp_path / "ddp" / "final")
    assert "step-4 (step 4)" in launch("ddp").stderr  # resumed, not restarted
    resumed = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    assert all(torch.equal(resumed[key], ddp[key]) for key in ddp)
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_train_a_dflash_draft_with_its_own_arguments(tmp_path, capsys):
    """`train --family dflash --draft-arg block_size=4 --draft-arg num_layers=2`: a new family's construction
    arguments reach `from_verifier`, the draft trains and stays exact; a wrong argument is refused in one line."""
    from speculators_hf.training.data import save_blocks

    verifier = make_verifier(eos_token_id=None)
    verifier.save_pretrained(tmp_path / "verifier")
    ids = torch.randint(3, 90, (12, 24), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": "verifier"})
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--steps", "3"]
    argv += ["--family", "dflash", "--batch-size", "2", "--eval-blocks", "2", "--eval-prompt-len", "8"]
    assert (
        main([*argv, "--output", str(tmp_path / "out"), "--draft-arg", "block_size=4", "--draft-arg", "num_layers=2"])
        == 0
    )
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").bind_verifier(verifier)
    assert draft.config.block_size == 4 and len(draft.layers) == 2 and draft.config.speculative_tokens == 3
    assert_greedy_exact(verifier, draft, make_prompts(3), max_new_tokens=10)
    with pytest.raises(SystemExit, match=r"--draft-arg .*not accepted by a new dflash draft"):
        main([*argv, "--output", str(tmp_path / "bad"), "--draft-arg", "block_size=1"])
