"""push_to_hub uploads exactly the files of a checkpoint: never a dotfile, a file reached through a symlink
(to a file or a folder), a special file or a hard-to-see name; what it leaves out is named in a warning.
Pushed through huggingface_hub's real client to the local stand-in Hub (tests/hub_server.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from conftest import make_verifier
from hub_server import LocalHub
from huggingface_hub import constants

import speculators_hf as sh

VERIFIER_ID = "tiny-org/tiny-llama"
REPO_ID = "me/tiny-llama-eagle3"
TOKEN = "hf_local_test_token"
SECRET = b"hf_THIS_IS_A_SECRET_TOKEN"


@pytest.fixture
def local_hub(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LocalHub() as server:
        server.add_repo(VERIFIER_ID, {"README.md": b"---\nlicense: mit\n---\n"})
        yield server


@pytest.fixture
def draft_folder(tmp_path) -> Path:
    verifier = make_verifier()
    verifier.name_or_path = VERIFIER_ID
    sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64).save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


def push(server: LocalHub, folder: Path, **kwargs):
    return sh.push_to_hub(folder, REPO_ID, token=TOKEN, endpoint=server.url, **kwargs)


def uploaded(server: LocalHub) -> dict[str, bytes]:
    return server.repos[REPO_ID].history("main")[0].added


def test_push_uploads_the_checkpoint_files_and_nothing_else(tmp_path, draft_folder, local_hub):
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "token.txt").write_bytes(SECRET)
    (outside / "dir" / "generate.py").write_bytes(SECRET)
    checkpoint = {p.name for p in draft_folder.iterdir()}
    # files of a checkpoint beyond what save_pretrained wrote
    (draft_folder / "tokenizer.json").write_text("{}")
    (draft_folder / "custom_generate").mkdir()
    (draft_folder / "custom_generate" / "generate.py").write_text("# hook")
    # what must never leave the machine
    (draft_folder / ".env").write_bytes(b"HF_TOKEN=" + SECRET)
    (draft_folder / ".git").mkdir()
    (draft_folder / ".git" / "config").write_bytes(SECRET)
    (draft_folder / "tokenizer_config.json").symlink_to(outside / "token.txt")  # an allowed name, but a link
    (draft_folder / "custom_generate" / "requirements.txt").symlink_to(outside / "token.txt")
    (draft_folder / "LICENSE").symlink_to(outside / "dir")  # a link to a folder
    (draft_folder / "linked").symlink_to(outside / "dir")
    (draft_folder / "notes.txt").write_bytes(SECRET)
    (draft_folder / "__pycache__").mkdir()
    (draft_folder / "__pycache__" / "x.pyc").write_bytes(SECRET)
    (draft_folder / "vocab.json\u200b").write_bytes(SECRET)  # a zero-width space: looks like vocab.json
    (draft_folder / "merges.txt ").write_bytes(SECRET)  # a trailing space
    os.mkfifo(draft_folder / "vocab.txt")  # a FIFO under an allowed name: reading it would block forever

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        push(local_hub, draft_folder)
    files = uploaded(local_hub)
    assert not [name for name, data in files.items() if SECRET in data]
    assert set(files) == checkpoint | {"tokenizer.json", "custom_generate/generate.py"}
    message = " ".join(str(w.message) for w in record if "not uploaded from" in str(w.message))
    for skipped in (
        "'.env' (hidden)",
        "'.git' (hidden)",
        "'tokenizer_config.json' (symbolic link)",
        "'custom_generate/requirements.txt' (symbolic link)",
        "'LICENSE' (symbolic link)",
        "'linked' (symbolic link)",
        "'notes.txt' (not a checkpoint file)",
        "'__pycache__' (not a checkpoint folder)",
        "'vocab.txt' (not a regular file)",
        "'merges.txt ' (not a checkpoint file)",
        "'vocab.json\\u200b' (not a checkpoint file)",
    ):
        assert skipped in message, (skipped, message)


@pytest.mark.parametrize("name", ["config.json", "README.md"])
def test_push_refuses_a_config_or_readme_that_is_a_symlink(tmp_path, draft_folder, local_hub, name):
    """push reads these two files itself (config for the checks, README for the card): never through a link."""
    target = tmp_path / f"real-{name}"
    (draft_folder / name).rename(target)
    (draft_folder / name).symlink_to(target)
    with pytest.raises(ValueError, match=rf"{name} is a symbolic link"):
        push(local_hub, draft_folder)
    assert REPO_ID not in local_hub.repos


def test_a_plain_checkpoint_pushes_without_warnings(draft_folder, local_hub, recwarn):
    push(local_hub, draft_folder)
    assert set(uploaded(local_hub)) == {p.name for p in draft_folder.iterdir()}
    assert not [w for w in recwarn if "not uploaded" in str(w.message)]
