"""Pushing drafts through huggingface_hub's real HTTP client to a local stand-in Hub (tests/hub_server.py):
one commit holding exactly the saved checkpoint plus its card, nothing committed when the commit fails,
private/revision honoured, the verifier reference checked first, and a pushed draft loading back by repo
id from a Hub-layout cache with HF_HUB_OFFLINE=1, exact under greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_exact, make_prompts, make_verifier, publish_to_hub_cache
from hub_server import GITATTRIBUTES, LocalHub
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf import hub as sh_hub
from speculators_hf.cli import main

VERIFIER_ID = "tiny-org/tiny-llama"
REPO_ID = "me/tiny-llama-eagle3"
TOKEN = "hf_local_test_token"
RESULT = {"tau": 2.5, "speedup": 1.4, "command": "speculators-hf bench --verifier tiny-org/tiny-llama", "device": "cpu"}


@pytest.fixture
def local_hub(monkeypatch):
    """The local Hub, holding the verifier's repo (with a card that names its license); the client is
    allowed online for the test (conftest makes the suite offline)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LocalHub() as server:
        server.add_repo(VERIFIER_ID, {"README.md": b"---\nlicense: llama3.1\n---\n# tiny llama\n"})
        yield server


def named_verifier():
    verifier = make_verifier()
    verifier.name_or_path = VERIFIER_ID
    return verifier


def eagle3_draft(verifier=None):
    return sh.Eagle3Speculator.from_verifier(verifier or named_verifier(), draft_vocab_size=64)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def commits(server: LocalHub, branch: str = "main"):
    return server.repos[REPO_ID].history(branch)


def push(server: LocalHub, source, **kwargs):
    return sh.push_to_hub(source, kwargs.pop("repo_id", REPO_ID), token=TOKEN, endpoint=server.url, **kwargs)


def test_push_is_one_commit_of_the_saved_checkpoint_and_loads_back(tmp_path, local_hub, monkeypatch):
    verifier = named_verifier()
    verifier.save_pretrained(tmp_path / "verifier")
    draft = eagle3_draft(verifier)
    draft.card_info = {"license": "llama3.1", "results": RESULT}
    draft.save_pretrained(tmp_path / "draft")
    saved = folder_files(tmp_path / "draft")

    info = push(local_hub, tmp_path / "draft", private=True, revision="v1")

    repo = local_hub.repos[REPO_ID]
    create = local_hub.requests_to("/api/repos/create", "POST")
    assert [r["json"] for r in create] == [{"name": "tiny-llama-eagle3", "organization": "me", "visibility": "private"}]
    assert repo.private
    assert local_hub.requests_to(f"/api/models/{REPO_ID}/branch/v1", "POST")
    assert len(local_hub.requests_to(f"/api/models/{REPO_ID}/commit/", "POST")) == 1
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in local_hub.requests)
    # one commit on the branch, main untouched
    assert [c.message for c in commits(local_hub, "main")] == ["initial commit"]
    ours, initial = commits(local_hub, "v1")
    assert info.oid == ours.oid and initial.message == "initial commit"
    assert ours.message.startswith("Upload EAGLE-3 draft for tiny-org/tiny-llama")
    # exactly the saved checkpoint, byte for byte, plus the card generated again with the repo id
    assert set(ours.added) == set(saved)
    for name, data in saved.items():
        if name != "README.md":
            assert ours.added[name] == data, name
    card_text = ours.added["README.md"].decode()
    assert card_text == sh_hub.card_for_folder(tmp_path / "draft", repo_id=REPO_ID)
    card = ModelCard(card_text)
    assert card.data.base_model == VERIFIER_ID and card.data.license == "llama3.1"
    assert f'"model": "{REPO_ID}"' in card.text and f'from_pretrained("{REPO_ID}"' in card.text
    assert "| 2.5 | 1.4x | cpu |" in card.text and RESULT["command"] in card.text
    assert set(repo.tree("v1")) == set(saved) | {".gitattributes"}
    assert repo.tree("v1")[".gitattributes"] == GITATTRIBUTES

    # what the server holds loads back by repo id, offline, from a Hub-layout cache
    received = tmp_path / "received"
    for name, data in repo.tree("v1").items():
        (received / name).parent.mkdir(parents=True, exist_ok=True)
        (received / name).write_bytes(data)
    cache = tmp_path / "hub-cache"
    publish_to_hub_cache(received, REPO_ID, cache)
    publish_to_hub_cache(tmp_path / "verifier", VERIFIER_ID, cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained(REPO_ID, cache_dir=cache)
    assert isinstance(loaded, sh.Eagle3Speculator)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    pair = sh.AutoSpeculatorForCausalLM.from_pretrained(REPO_ID, cache_dir=cache)
    assert_greedy_exact(pair.verifier, pair, make_prompts(3), max_new_tokens=12)


def test_draft_push_to_hub_method_uploads_the_card(tmp_path, local_hub):
    draft = eagle3_draft()
    info = draft.push_to_hub(REPO_ID, token=TOKEN, endpoint=local_hub.url, tags=["my-tag"])
    (ours, _) = commits(local_hub)
    assert info.oid == ours.oid
    assert {"config.json", "model.safetensors", "README.md", "speculators_models_eagle3.py"} <= set(ours.added)
    card = ModelCard(ours.added["README.md"].decode())
    assert sh_hub.is_generated_card(str(card))
    assert "my-tag" in card.data.tags and "eagle3" in card.data.tags
    assert card.data.license == "llama3.1"  # from the verifier's card on the Hub
    assert f'"model": "{REPO_ID}"' in card.text
    config = json.loads(ours.added["config.json"])
    assert config["speculators_config"]["verifier"]["name_or_path"] == VERIFIER_ID

    # a second push of the same draft from the function: one more commit, same files
    sh.push_to_hub(draft, REPO_ID, token=TOKEN, endpoint=local_hub.url, commit_message="again")
    assert commits(local_hub)[0].message == "again"


def test_failed_commit_leaves_nothing_committed(tmp_path, local_hub):
    draft = eagle3_draft()
    draft.save_pretrained(tmp_path / "draft")
    local_hub.fail_commits = 1
    with pytest.raises(HfHubHTTPError, match="500"):
        push(local_hub, tmp_path / "draft")
    assert [c.message for c in commits(local_hub)] == ["initial commit"]
    assert set(local_hub.repos[REPO_ID].tree("main")) == {".gitattributes"}
    # the same push succeeds afterwards, in one commit
    push(local_hub, tmp_path / "draft")
    assert len(commits(local_hub)) == 2
    assert set(local_hub.repos[REPO_ID].tree("main")) == set(folder_files(tmp_path / "draft")) | {".gitattributes"}


def test_verifier_reference_is_checked_before_anything_is_uploaded(tmp_path, local_hub):
    draft = eagle3_draft()

    draft.config.verifier["name_or_path"] = None
    with pytest.raises(sh.VerifierReferenceError, match=r"does not name its verifier.*verifier="):
        push(local_hub, draft)

    draft.config.verifier["name_or_path"] = str(tmp_path)  # an existing local folder
    with pytest.raises(sh.VerifierReferenceError, match=r"local path.*Hub id"):
        push(local_hub, draft)

    draft.config.verifier["name_or_path"] = "nobody/missing-model"
    with pytest.raises(sh.VerifierReferenceError, match=r"not found.*check_verifier=False"):
        push(local_hub, draft)
    assert local_hub.requests_to("/api/models/nobody/missing-model", "GET")

    draft.config.verifier.update(name_or_path=VERIFIER_ID, revision="no-such-branch")
    with pytest.raises(sh.VerifierReferenceError, match="no revision 'no-such-branch'"):
        push(local_hub, draft)
    assert not local_hub.requests_to("/api/repos/create") and REPO_ID not in local_hub.repos

    # check_verifier=False skips the Hub lookup (a private verifier the token cannot see), not the local checks
    draft.config.verifier.update(name_or_path="nobody/private-model", revision=None)
    n_lookups = len(local_hub.requests_to("/api/models/nobody/"))
    push(local_hub, draft, check_verifier=False)
    assert len(local_hub.requests_to("/api/models/nobody/")) == n_lookups
    assert len(commits(local_hub)) == 2


def test_verifier_override_fixes_a_local_path_reference(tmp_path, local_hub):
    draft = eagle3_draft()
    draft.config.verifier["name_or_path"] = str(tmp_path / "my-local-llama")
    draft.save_pretrained(tmp_path / "draft")
    push(local_hub, tmp_path / "draft", verifier=VERIFIER_ID)
    (ours, _) = commits(local_hub)
    local = json.loads((tmp_path / "draft" / "config.json").read_text())
    uploaded = json.loads(ours.added["config.json"])
    assert uploaded["speculators_config"]["verifier"]["name_or_path"] == VERIFIER_ID
    local["speculators_config"]["verifier"]["name_or_path"] = VERIFIER_ID
    assert uploaded == local  # nothing else changed
    assert ModelCard(ours.added["README.md"].decode()).data.base_model == VERIFIER_ID
    assert json.loads((tmp_path / "draft" / "config.json").read_text()) != uploaded  # the folder is untouched


def test_a_persons_readme_is_never_replaced(tmp_path, local_hub):
    draft = eagle3_draft()
    draft.save_pretrained(tmp_path / "draft")
    (tmp_path / "draft" / "README.md").write_text("# Written by hand\n")
    push(local_hub, tmp_path / "draft")
    assert commits(local_hub)[0].added["README.md"] == b"# Written by hand\n"

    # a README on the Hub written by a person wins over a generated one
    other = "me/other-draft"
    local_hub.add_repo(other, {"README.md": b"# Their card\n"})
    (tmp_path / "draft" / "README.md").unlink()
    with pytest.warns(UserWarning, match="written by a person"):
        push(local_hub, tmp_path / "draft", repo_id=other)
    latest = local_hub.repos[other].history()[0]
    assert "README.md" not in latest.added and "model.safetensors" in latest.added
    assert local_hub.repos[other].tree("main")["README.md"] == b"# Their card\n"


def test_cli_push(tmp_path, local_hub, capsys):
    draft = eagle3_draft()
    draft.save_pretrained(tmp_path / "draft")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULT))
    argv = ["push", str(tmp_path / "draft"), REPO_ID, "--private", "--revision", "v2", "--license", "mit"]
    argv += ["--results", str(results), "--endpoint", local_hub.url, "--token", TOKEN]
    assert main(argv) == 0
    assert f"pushed {tmp_path / 'draft'} to {REPO_ID} (v2)" in capsys.readouterr().out
    repo = local_hub.repos[REPO_ID]
    assert repo.private and [c.message for c in repo.history("main")] == ["initial commit"]
    card = ModelCard(repo.tree("v2")["README.md"].decode())
    assert card.data.license == "mit" and "| 2.5 | 1.4x | cpu |" in card.text
