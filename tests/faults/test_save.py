"""Saving over an existing checkpoint, and saves that die: nothing stale is carried over (weights, indexes),
no symlink becomes a real file, `sub/..` is resolved first, modes follow the umask, and a save SIGKILLed at
any moment (a real process, a draft of several MB) leaves the old or the new checkpoint at NAME, loadable and
never a mix, with every temporary folder gone after the next save."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_verifier

import speculators_hf as sh
from speculators_hf.convert import convert

INDEX = "model.safetensors.index.json"


def eagle3_draft(seed: int = 0, **verifier_overrides) -> sh.Eagle3Speculator:
    draft = sh.Eagle3Speculator.from_verifier(make_verifier(**verifier_overrides), draft_vocab_size=64)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_()  # every seed gives different weights everywhere
    return draft


def same_weights(model, reference) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------------------------------
# what is carried over from the folder saved into
# --------------------------------------------------------------------------------------------------
def test_sharded_save_over_an_unsharded_checkpoint_reloads_the_new_weights(tmp_path):
    old, new = eagle3_draft(seed=0), eagle3_draft(seed=1)
    old.save_pretrained(tmp_path / "draft")
    new.save_pretrained(tmp_path / "draft", max_shard_size="20KB")
    names = {p.name for p in (tmp_path / "draft").iterdir()}
    assert INDEX in names and "model.safetensors" not in names, names
    assert same_weights(sh.load_draft(tmp_path / "draft"), new)


def test_unsharded_save_over_a_sharded_checkpoint_leaves_no_index(tmp_path):
    old, new = eagle3_draft(seed=0), eagle3_draft(seed=1)
    old.save_pretrained(tmp_path / "draft", max_shard_size="20KB")
    new.save_pretrained(tmp_path / "draft")
    names = {p.name for p in (tmp_path / "draft").iterdir()}
    assert not any(n.endswith(".index.json") or n.startswith("model-") for n in names), names
    convert(tmp_path / "draft", tmp_path / "converted")  # reads the index first: a stale one named missing shards
    assert same_weights(sh.load_draft(tmp_path / "converted"), new)


def test_files_a_save_writes_are_never_carried_over_but_others_are(tmp_path):
    folder = tmp_path / "draft"
    eagle3_draft().save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"old pickle")
    (folder / "speculators_models_gone.py").write_text("# remote code of an older version")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "custom_generate").mkdir()
    (folder / "custom_generate" / "generate.py").write_text("# hook")
    eagle3_draft(seed=1).save_pretrained(folder)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert "pytorch_model.bin" not in names and "speculators_models_gone.py" not in names
    assert {"tokenizer.json", "custom_generate/generate.py"} <= names


def test_save_never_turns_a_symlink_into_a_file(tmp_path):
    secret = tmp_path / "token.txt"
    secret.write_text("hf_SECRET_TOKEN")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "notes.txt").write_text("hf_SECRET_TOKEN")
    folder = tmp_path / "draft"
    eagle3_draft().save_pretrained(folder)
    (folder / "token-link").symlink_to(secret)
    (folder / "linked-dir").symlink_to(tmp_path / "private")
    with pytest.warns(UserWarning, match=r"not carried over .*'linked-dir', 'token-link'"):
        eagle3_draft(seed=1).save_pretrained(folder)
    assert not (folder / "token-link").exists() and not (folder / "linked-dir").exists()
    assert not any(b"hf_SECRET_TOKEN" in p.read_bytes() for p in folder.rglob("*") if p.is_file())
    assert secret.read_text() == "hf_SECRET_TOKEN"  # the target is untouched


def test_the_target_is_resolved_before_anything_is_copied(tmp_path):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "keep.txt").write_text("mine")
    draft = eagle3_draft()
    draft.save_pretrained(str(work / "sub" / ".."))  # means `work`
    assert same_weights(sh.load_draft(work), draft)
    assert sorted(p.name for p in (work / "sub").iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_folder_modes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        eagle3_draft().save_pretrained(tmp_path / "draft")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "draft").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o777 & ~umask, oct(mode)


def test_a_resave_keeps_the_folder_mode(tmp_path):
    folder = tmp_path / "draft"
    eagle3_draft().save_pretrained(folder)
    folder.chmod(0o750)
    eagle3_draft(seed=1).save_pretrained(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


# --------------------------------------------------------------------------------------------------
# saves that die
# --------------------------------------------------------------------------------------------------
SERVER = textwrap.dedent(
    """
    # Imports once, then forks one saving process per command, so a test can SIGKILL real saves quickly.
    import json, os, signal, sys, time, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import speculators_hf as sh

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "save":
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.close(read)
                    draft = sh.load_draft(cmd["source"])
                    if cmd.get("die_between_renames"):  # a file system that cannot swap folders, and a death
                        import speculators_hf.models.checkpoint as checkpoint  # between its two renames

                        checkpoint.exchange = lambda a, b: False
                        target, rename = Path(cmd["target"]).resolve(), Path.rename

                        def dying_rename(self, dst):
                            out = rename(self, dst)
                            if self == target:
                                os.kill(os.getpid(), signal.SIGKILL)
                            return out

                        Path.rename = dying_rename
                    os.write(write, b"go")
                    draft.save_pretrained(cmd["target"])
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            os.close(write)
            os.read(read, 2)  # the child has loaded its draft and starts saving now
            os.close(read)
            started = time.perf_counter()
            print(json.dumps({"pid": pid}), flush=True)
        elif cmd["op"] == "wait":
            _, status = os.waitpid(cmd["pid"], 0)
            print(json.dumps({"status": status, "seconds": time.perf_counter() - started}), flush=True)
    """
)


class SaveServer:
    def __init__(self, log: Path):
        self.log = open(log, "w")  # noqa: SIM115 - the server's stderr for its whole life, closed in close()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env,
        )  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready", Path(log).read_text()[-3000:]

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, Path(self.log.name).read_text()[-3000:]
        return json.loads(line)

    def save(self, source: Path, target: Path, kill_after: float | None = None, **flags) -> int:
        """Start a save of `source`'s draft into `target` in a new process; SIGKILL it `kill_after` seconds
        after it starts saving (None: let it finish). Returns its wait status; `self.seconds` is how long it
        ran."""
        pid = self.ask(op="save", source=str(source), target=str(target), **flags)["pid"]
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):  # it finished first
                os.kill(pid, signal.SIGKILL)
        reply = self.ask(op="wait", pid=pid)
        self.seconds = reply["seconds"]
        return reply["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """Two drafts of a few MB each (vocabulary 4096, hidden size 256), saved as sources."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        draft = eagle3_draft(seed, vocab_size=4096, hidden_size=256, intermediate_size=512)
        draft.save_pretrained(root / name)
        out[name] = (root / name, draft)
    size = sum(p.stat().st_size for p in (root / "a").iterdir())
    assert size > 4_000_000, size
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = SaveServer(tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.close()


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != name)


def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path, drafts, server):
    target = tmp_path / "ckpt" / "draft"
    (src_a, draft_a), (src_b, draft_b) = drafts["a"], drafts["b"]
    draft_a.save_pretrained(target)
    for _ in range(2):  # the second save replaces a checkpoint, as the killed ones do
        assert server.save(src_b, tmp_path / "timing") == 0
    seconds = server.seconds  # how long a save takes in a saving process: the kills spread over it
    rng = random.Random(0)
    delays = [0.0, *sorted(rng.uniform(0, 1.2 * seconds) for _ in range(9))]
    current, outcomes = draft_a, []
    for i, delay in enumerate(delays):
        source, new = (src_b, draft_b) if current is draft_a else (src_a, draft_a)
        server.save(source, target, kill_after=delay)
        loaded = sh.load_draft(target)
        if same_weights(loaded, new):
            current = new
        assert same_weights(loaded, current), f"kill {i} after {delay:.3f}s left a mix of two checkpoints"
        outcomes.append(("new" if current is new else "old", len(leftovers(target.parent, "draft"))))
    # some kills landed mid-save (they left temporary folders behind) ...
    assert any(left for _, left in outcomes), outcomes
    assert server.save(src_b, target) == 0  # ... and the next complete save removes them
    assert leftovers(target.parent, "draft") == []
    assert same_weights(sh.load_draft(target), draft_b), outcomes
    print(f"save {seconds:.3f}s; kills at {[round(d, 3) for d in delays]}: {outcomes}")


def test_a_death_between_the_two_renames_is_recovered(tmp_path, drafts, server):
    """Where folders cannot be swapped atomically, NAME is moved aside before the new folder moves in; a
    death in between leaves no NAME, and the next load or save puts the previous checkpoint back."""
    target = tmp_path / "ckpt" / "draft"
    (_, draft_a), (src_b, draft_b) = drafts["a"], drafts["b"]
    draft_a.save_pretrained(target)
    status = server.save(src_b, target, die_between_renames=True)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not target.exists()  # the window the fallback has (renameat2 closes it on Linux)
    with pytest.warns(UserWarning, match="previous checkpoint was restored"):
        assert same_weights(sh.load_draft(target), draft_a)
    server.save(src_b, target, die_between_renames=True)
    assert not target.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draft_b.save_pretrained(target)  # restores, then replaces
    assert same_weights(sh.load_draft(target), draft_b)
    assert leftovers(target.parent, "draft") == []


def test_only_leftovers_of_dead_processes_are_removed(tmp_path, server):
    from speculators_hf.models.checkpoint import _host

    target = tmp_path / "draft"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid is gone
    dead = tmp_path / f".draft.saving-{_host()}-{finished.pid}-0123abcd"
    alive = tmp_path / f".draft.saving-{_host()}-{server.proc.pid}-0123abcd"  # a save still running
    other_host = tmp_path / f".draft.saving-otherhost-{finished.pid}-0123abcd"  # another machine's (shared disk)
    nested = tmp_path / f".{dead.name}.saving-{_host()}-{finished.pid}-4567abcd"  # convert saves into its own temp
    for folder in (dead, alive, other_host, nested):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    eagle3_draft().save_pretrained(target)
    assert not dead.exists() and not nested.exists()
    assert alive.exists() and other_host.exists()
