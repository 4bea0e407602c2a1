"""Training against hostile or damaged checkpoints and against kills: resume never runs code from the output
folder, falls back past a damaged checkpoint, refuses changed settings, keeps the log to one line per step,
and a run SIGKILLed at any moment resumes to the bit-identical result of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_verifier
from safetensors.torch import load_file

import speculators_hf as sh
from speculators_hf.cli import main
from speculators_hf.training import DraftDataset, TrainConfig, select_draft_vocab, train
from speculators_hf.training import trainer as trainer_module
from speculators_hf.training.data import save_blocks

CONFIG = dict(steps=6, batch_size=2, learning_rate=1e-3, ttt_steps=2, warmup_steps=1, save_every=2, log_every=1)
CONFIG["keep_checkpoints"] = 3
# what accelerate's save_state writes and load_state unpickles, and other names a loader might try
PICKLE_NAMES = [
    "custom_checkpoint_0.pkl",
    "random_states_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "scaler.pt",
    "sampler.bin",
    "dl_state_dict.bin",
    "pytorch_model.bin",
    "training_args.bin",
    "rng_state.pth",
]


class Payload:
    """Unpickling this writes `marker`: the proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code from the checkpoint ran')",)


def plant(path: Path, marker: Path) -> None:
    """A pickle with the payload, written as accelerate writes every state file it unpickles (torch.save)."""
    torch.save(Payload(marker), path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny verifier, 24 random blocks, and an uninterrupted 6-step run (checkpoints at 2, 4, 6)."""
    verifier = make_verifier(eos_token_id=None)
    ids = torch.randint(3, 96, (24, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.uint8)
    reference = tmp_path_factory.mktemp("reference")
    run(verifier, ids, mask, reference)
    return verifier, ids, mask, reference


def new_draft(verifier, ids, mask, family="eagle3"):
    torch.manual_seed(1)
    if family == "eagle":
        return sh.EagleSpeculator.from_verifier(verifier)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=32)
    select_draft_vocab(draft, ids, mask)
    draft.init_from_verifier(verifier)
    return draft


def run(verifier, ids, mask, output, resume=True, family="eagle3", **overrides):
    draft = new_draft(verifier, ids, mask, family)
    torch.manual_seed(123)  # a different process state: a resume takes everything from the checkpoint
    config = TrainConfig(output_dir=str(output), **{**CONFIG, **overrides})
    return train(draft, verifier, DraftDataset(ids, mask), config, resume=resume)


def interrupted_copy(reference: Path, target: Path) -> Path:
    """The reference run as if killed after its step-4 checkpoint (step-2 and step-4 on disk, log to step 5)."""
    shutil.copytree(reference, target)
    shutil.rmtree(target / "checkpoints" / "step-6")
    shutil.rmtree(target / "final")
    lines = (target / "training_log.jsonl").read_text().splitlines()
    (target / "training_log.jsonl").write_text("\n".join(lines[:5]) + "\n")
    return target


def weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "final" / "model.safetensors")


def log_steps(output: Path) -> list[dict]:
    """The log without wall-clock seconds (which differ between runs)."""
    records = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_same_result(output: Path, reference: Path) -> None:
    got, want = weights(output), weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert log_steps(output) == log_steps(reference)  # each step once, the same numbers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(output: Path) -> list[Path]:
    return [p for p in output.rglob("*") if p.name.startswith((".tmp-", ".final."))]


# ---------------------------------------------------------------------------------------------------------
# 1. nothing in the output folder runs code
# ---------------------------------------------------------------------------------------------------------
def test_the_payload_runs_when_unpickled(tmp_path):
    """The planted files are live: an unsafe load runs them (so the tests below can fail)."""
    marker = tmp_path / "marker"
    plant(tmp_path / "custom_checkpoint_0.pkl", marker)
    torch.load(tmp_path / "custom_checkpoint_0.pkl", weights_only=False)  # what accelerate's load_state does
    assert marker.exists()


@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_resume_ignores_planted_pickles(setup, tmp_path, capsys, name):
    """A pickle planted under a name some loader reads (accelerate's load_state ran custom_checkpoint_0.pkl)
    in every folder of the run: the resume never opens it, and continues from step-4 as if it were not there."""
    verifier, ids, mask, reference = setup
    output = interrupted_copy(reference, tmp_path / "run")
    marker = tmp_path / "marker"
    checkpoints = output / "checkpoints"
    for folder in (output, checkpoints, checkpoints / "step-4", checkpoints / "step-2"):
        plant(folder / name, marker)
    capsys.readouterr()
    try:
        run(verifier, ids, mask, output)
    finally:
        assert not marker.exists(), "code from the checkpoint ran"
    assert re.search(r"resuming from \S+step-4 \(step 4\)", capsys.readouterr().err)
    assert_same_result(output, reference)


@pytest.mark.parametrize("damage", ["truncated", "replaced by a pickle", "one bit flipped"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(setup, tmp_path, capsys, damage):
    """Each file of the newest checkpoint in turn is cut short, replaced by a pickle or has its last bit
    flipped (in a safetensors file that is tensor data: the file still parses, only the manifest's sha256
    tells): the resume names the file in one line, falls back to step-2, never runs the pickle, and ends
    bit-identical."""
    verifier, ids, mask, reference = setup
    marker = tmp_path / "marker"
    files = sorted(p.name for p in (reference / "checkpoints" / "step-4").iterdir())
    for name in files:
        output = interrupted_copy(reference, tmp_path / name)
        victim = output / "checkpoints" / "step-4" / name
        if damage == "truncated":
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
        elif damage == "one bit flipped":
            data = bytearray(victim.read_bytes())
            data[-1] ^= 1
            victim.write_bytes(bytes(data))
        else:
            plant(victim, marker)
        capsys.readouterr()
        run(verifier, ids, mask, output)
        err = capsys.readouterr().err
        assert not marker.exists(), name
        lines = [line for line in err.splitlines() if "step-4 is unusable" in line]
        assert len(lines) == 1 and name in lines[0], (name, err)
        assert re.search(r"resuming from the previous checkpoint \S+step-2 \(step 2\)", err), err
        assert_same_result(output, reference)
        assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    assert len(files) == 7, files  # weights, optimizer (2), scheduler, RNG (2), state: every file was damaged once


def test_no_usable_checkpoint_is_a_clear_error_and_no_resume_starts_over(setup, tmp_path):
    verifier, ids, mask, reference = setup
    output = interrupted_copy(reference, tmp_path / "run")
    marker = tmp_path / "marker"
    plant(output / "checkpoints" / "step-4" / "scheduler.json", marker)
    with open(output / "checkpoints" / "step-2" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(trainer_module.ResumeError) as info:
        run(verifier, ids, mask, output)
    message = str(info.value)
    assert "step-4: scheduler.json" in message and "step-2: model.safetensors has 1000 bytes" in message
    assert "--no-resume" in message and not marker.exists()
    run(verifier, ids, mask, output, resume=False)  # starts over: the damaged checkpoints are deleted
    assert_same_result(output, reference)


def test_checkpoint_of_the_old_pickle_format_is_never_loaded(setup, tmp_path):
    """A checkpoint as accelerate's save_state wrote it (this package before the safe format) is refused."""
    verifier, ids, mask, _ = setup
    old = tmp_path / "run" / "checkpoints" / "step-2"
    old.mkdir(parents=True)
    marker = tmp_path / "marker"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        plant(old / name, marker)
    draft = new_draft(verifier, ids, mask)
    from safetensors.torch import save_file

    save_file({f"draft.{k}": v.contiguous() for k, v in draft.state_dict().items()}, old / "model.safetensors")
    (old / "trainer_state.json").write_text(json.dumps({"step": 2, "history": [], "evals": []}))
    with pytest.raises(trainer_module.ResumeError, match=r"accelerate's pickle format .*never loaded.*--no-resume"):
        run(verifier, ids, mask, tmp_path / "run")
    assert not marker.exists()


def test_state_file_with_a_rewritten_manifest_can_only_set_known_values(setup, tmp_path, capsys):
    """Whoever can write the folder can also rewrite the manifest; the JSON states are still checked against
    this run's own objects, so a file can set the values they hold and nothing else (here: an extra
    attribute for the scheduler, a string where the optimizer has a number)."""
    verifier, ids, mask, reference = setup
    for name, edit in [
        ("scheduler.json", lambda state: {**state, "optimizer": None}),
        ("optimizer.json", lambda state: {**state, "param_groups": [{**state["param_groups"][0], "lr": "0.1"}]}),
    ]:
        output = interrupted_copy(reference, tmp_path / name)
        folder = output / "checkpoints" / "step-4"
        (folder / name).write_text(json.dumps(edit(json.loads((folder / name).read_text()))))
        state = json.loads((folder / "trainer_state.json").read_text())
        state["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        capsys.readouterr()
        run(verifier, ids, mask, output)
        assert re.search(rf"step-4 is unusable: {name}: (\S+: )?expected", capsys.readouterr().err), name
        assert_same_result(output, reference)


def test_resume_restores_the_random_streams(setup, tmp_path, monkeypatch):
    """A loss that draws from torch's, Python's and NumPy's global generators: the resumed run equals the
    uninterrupted one only if each stream continues where the checkpoint left it."""
    import random

    import numpy as np

    verifier, ids, mask, _ = setup
    loss = sh.Eagle3Speculator.training_loss

    def noisy(*args, **kwargs):
        value, metrics = loss(*args, **kwargs)
        return value * (1 + 0.1 * torch.rand(()) + 0.1 * random.random() + 0.1 * np.random.rand()), metrics

    monkeypatch.setattr(sh.Eagle3Speculator, "training_loss", noisy)
    run(verifier, ids, mask, tmp_path / "straight")
    with monkeypatch.context() as patch:
        patch.setattr(sh.Eagle3Speculator, "training_loss", crash_after(5, noisy))
        with pytest.raises(KeyboardInterrupt):
            run(verifier, ids, mask, tmp_path / "resumed")
    torch.manual_seed(7), random.seed(7), np.random.seed(7)  # a different process state
    run(verifier, ids, mask, tmp_path / "resumed")
    assert_same_result(tmp_path / "resumed", tmp_path / "straight")


# ---------------------------------------------------------------------------------------------------------
# 3. a resume keeps the settings that decide the result
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(batch_size=4, learning_rate=2e-3), ["batch_size: 2 -> 4", "learning_rate: 0.001 -> 0.002"]),
        (dict(grad_accum=2, steps=8), ["grad_accum: 1 -> 2", "steps: 6 -> 8"]),
        (dict(family="eagle"), ["family eagle3 -> eagle"]),
        (dict(data="other"), ["data.sha256: "]),
    ],
)
def test_changed_settings_are_refused_naming_each_change(setup, tmp_path, change, expected):
    verifier, ids, mask, reference = setup
    output = interrupted_copy(reference, tmp_path / "run")
    if change.pop("data", None):
        ids = ids.flip(0)
    with pytest.raises(trainer_module.ResumeError) as info:
        run(verifier, ids, mask, output, **change)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    assert "a new --output" in message and "--no-resume" in message
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-2", "step-4"]  # nothing touched


def test_another_family_is_named_in_one_sentence_not_as_every_field_that_differs(setup, tmp_path):
    """Every draft field differs between two families: the message says the family changed and what to do, and
    lists none of them."""
    verifier, ids, mask, reference = setup
    output = interrupted_copy(reference, tmp_path / "run")
    with pytest.raises(trainer_module.ResumeError) as info:
        run(verifier, ids, mask, output, family="eagle")
    message = str(info.value)
    assert "family eagle3 -> eagle" in message and f"{output} holds a run of family eagle3" in message
    assert "new --output" in message and "delete" in message
    assert "draft." not in message and len(message) < 400, message


def test_settings_that_do_not_change_the_result_may_change(setup, tmp_path):
    verifier, ids, mask, reference = setup
    output = interrupted_copy(reference, tmp_path / "run")
    run(verifier, ids, mask, output, save_every=1, keep_checkpoints=5, eval_every=3, eval_max_new_tokens=8)
    assert_same_result(output, reference)


# ---------------------------------------------------------------------------------------------------------
# 4. the log holds each step once after a resume
# ---------------------------------------------------------------------------------------------------------
def crash_after(steps: int, loss):
    """A loss that raises KeyboardInterrupt on step `steps + 1` (an interrupted run, in process)."""
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    return crashing


def test_log_is_cut_back_to_the_checkpoint_on_resume(setup, tmp_path, monkeypatch):
    verifier, ids, mask, reference = setup
    output = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(sh.Eagle3Speculator, "training_loss", crash_after(5, sh.Eagle3Speculator.training_loss))
        with pytest.raises(KeyboardInterrupt):
            run(verifier, ids, mask, output)
    assert [r["step"] for r in log_steps(output)] == [1, 2, 3, 4, 5]  # step 5 is after the step-4 checkpoint
    run(verifier, ids, mask, output)
    assert [r["step"] for r in log_steps(output)] == [1, 2, 3, 4, 5, 6]
    assert_same_result(output, reference)


# ---------------------------------------------------------------------------------------------------------
# 6. progress lines when the output is a log, not a terminal
# ---------------------------------------------------------------------------------------------------------
def test_progress_lines_when_stderr_is_not_a_terminal(setup, tmp_path, capsys):
    verifier, ids, mask, _ = setup
    run(verifier, ids, mask, tmp_path / "run", log_every=2)
    err = capsys.readouterr().err
    lines = re.findall(
        r"^training \w+ draft: (\d+)/6 step \(\d+%\), \d+\.\d\d step/s, elapsed \d+:\d\d, ETA \d+:\d\d "
        r"\[loss \d+\.\d{4}, acc \d\.\d\d\]$",
        err,
        re.M,
    )
    assert lines == ["2", "4", "6"], err


# ---------------------------------------------------------------------------------------------------------
# 7. the held-out evaluation says what it uses, and refuses data that leaves nothing to evaluate on
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_verifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verifier")
    make_verifier(eos_token_id=None).save_pretrained(folder)
    return folder


def cli_train(folder: Path, verifier: Path, blocks: int, *extra: str) -> int:
    ids = torch.randint(3, 96, (blocks, 16), generator=torch.Generator().manual_seed(0))
    save_blocks(folder / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": str(verifier)})
    argv = ["train", "--verifier", str(verifier), "--data", str(folder / "data"), "--output", str(folder / "out")]
    argv += ["--steps", "1", "--batch-size", "2", "--ttt-steps", "2", "--draft-vocab-size", "16", *extra]
    return main(argv)


def test_too_little_data_for_the_evaluation_is_refused(tmp_path, cli_verifier, capsys):
    assert cli_train(tmp_path, cli_verifier, 7, "--eval-blocks", "16") == 1
    message = capsys.readouterr().err
    assert "the data has 7 blocks" in message and "--eval-blocks 0" in message and "more data" in message
    assert not (tmp_path / "out").exists()


def test_evaluation_says_what_it_uses_and_warns_when_less_than_asked(tmp_path, cli_verifier, capsys):
    assert cli_train(tmp_path, cli_verifier, 25, "--eval-blocks", "16", "--eval-prompt-len", "32") == 0
    err = capsys.readouterr().err
    assert "evaluation: 2 held-out blocks (the last of 25; training uses the other 23), 16 prompt tokens each" in err
    assert "warning: --eval-blocks 16 asked for more" in err
    assert "warning: --eval-prompt-len 32 is longer than a block (16 tokens)" in err
    assert cli_train(tmp_path / "off", cli_verifier, 5, "--eval-blocks", "0") == 0
    assert "evaluation: off (--eval-blocks 0)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# 5. SIGKILL at varied moments: each resume continues from the last complete checkpoint and the end result
#    equals the uninterrupted run bit for bit, with no temporary file left behind
# ---------------------------------------------------------------------------------------------------------
# Runs `speculators-hf train` after arming one kill point (KILL_AT) inside the real training code.
KILLER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from speculators_hf.training import trainer

    kind, _, arg = os.environ["KILL_AT"].partition(":")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "pause":  # after step N: tell the test, then wait for its SIGKILL (an external kill mid-run)
        update = trainer.Progress.update
        def paused(self, n=1, postfix=None, line=None):
            update(self, n, postfix, line)
            if self.done == int(arg):
                Path(os.environ["READY"]).write_text("ready")
                time.sleep(120)
        trainer.Progress.update = paused
    elif kind == "file":  # inside a checkpoint write: right after `arg` is written into the temporary folder
        save_file = trainer.save_file
        def dying_save(tensors, path, *a, **k):
            save_file(tensors, path, *a, **k)
            if Path(path).name == arg:
                die()
        trainer.save_file = dying_save
    elif kind == "commit":  # the temporary folder is complete (manifest written), not yet renamed
        def dying_commit(tmp, target):
            die()
        trainer._commit = dying_commit
    elif kind == "prune":  # the new checkpoint is in place; an old one is renamed away for deletion
        remove = trainer._remove
        def dying_remove(path):
            if path.name.endswith("-old") and path.exists():
                die()
            remove(path)
        trainer._remove = dying_remove
    elif kind == "log":  # while the resume rewrites the log: the temporary log is written, not renamed
        replace = os.replace
        def dying_replace(src, dst):
            if Path(dst).name == "training_log.jsonl":
                die()
            replace(src, dst)
        os.replace = dying_replace

    from speculators_hf.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_at_varied_moments_then_resume_equals_uninterrupted(tmp_path, cli_verifier):
    ids = torch.randint(3, 96, (24, 16), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": str(cli_verifier)})
    (tmp_path / "killer.py").write_text(KILLER)
    args = ["train", "--verifier", str(cli_verifier), "--data", str(tmp_path / "data"), "--steps", "12"]
    args += ["--batch-size", "2", "--save-every", "3", "--ttt-steps", "2", "--warmup-steps", "1"]
    args += ["--eval-blocks", "0", "--draft-vocab-size", "16"]
    assert main([*args, "--output", str(tmp_path / "reference")]) == 0  # log_every 10: log lines at 10 and 12

    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "READY": str(tmp_path / "ready")}

    def start(kill_at: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(tmp_path / "killer.py"), *args, "--output", str(output)],
            env={**env, "KILL_AT": kill_at},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def killed(kill_at: str) -> str:
        proc = start(kill_at)
        if kill_at.startswith("pause"):
            deadline = time.monotonic() + 120
            while not (tmp_path / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            (tmp_path / "ready").unlink(missing_ok=True)
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, err)
        return err

    def steps_on_disk() -> list[str]:
        return sorted(p.name for p in (output / "checkpoints").iterdir() if not p.name.startswith("."))

    # (kill point, checkpoints on disk after the kill, what the kill left half-written, where the NEXT run resumes)
    plan = [
        ("pause:5", ["step-3"], [], None),  # the first run: nothing to resume
        ("file:model.safetensors", ["step-3"], ["checkpoints/.tmp-step-6"], 3),
        ("commit", ["step-3"], ["checkpoints/.tmp-step-6"], 3),
        ("prune", ["step-6", "step-9"], ["checkpoints/.tmp-step-3-old"], 3),
        ("pause:11", ["step-6", "step-9"], [], 9),  # log line 10 written after the step-9 checkpoint
        ("log", ["step-6", "step-9"], [".tmp-training_log.jsonl"], 9),
    ]
    for kill_at, on_disk, left, resumed_from in plan:
        err = killed(kill_at)
        if resumed_from is not None:
            assert f"step-{resumed_from} (step {resumed_from})" in err, (kill_at, err)
        assert steps_on_disk() == on_disk, kill_at
        for name in left:
            assert (output / name).exists(), (kill_at, name)
        if kill_at == "pause:11":
            assert [r["step"] for r in log_steps(output)] == [10]  # to be cut back: the checkpoint is step 9
    proc = start("none")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "step-9 (step 9)" in err
    assert_same_result(output, tmp_path / "reference")
    assert [r["step"] for r in log_steps(output)] == [10, 12]
    assert temporaries(output) == []
