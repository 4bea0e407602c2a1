"""Uploading drafts to the Hub: one commit of the checkpoint's files and its card, after the verifier reference is checked.

Pushing
    `push_to_hub(draft_or_folder, repo_id, ...)` checks the verifier reference (set, a Hub id rather
    than a local path, and found on the Hub unless `check_verifier=False`), creates the repo (and the
    branch for `revision` when missing), and uploads the files of the saved checkpoint plus the card in
    ONE commit (`HfApi.create_commit`), so a failed upload leaves the repo as it was. Only checkpoint files
    go up (`CHECKPOINT_FILES`: config, weights and their index, remote code, README.md, custom_generate/,
    tokenizer files, training_summary.json, a license), and only regular files inside the folder: never a
    dotfile or dot-folder (`.env`, `.git`), a symlink (to a file or a folder), or a special file; every
    file left out is named in a warning. The command line is
    `speculators-hf push PATH REPO_ID [--private] [--revision R]`. `draft.push_to_hub(repo_id, ...)`
    (the transformers method) goes through the same function: transformers' own version would replace
    README.md with its generic card after `save_pretrained`, so this module installs the draft's
    `push_to_hub` when the package is imported.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_session, hf_hub_url, hf_raise_for_status
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers

from ..loading import looks_like_local_path
from ..models.base import is_speculator
from ..models.checkpoint import CHECKPOINT_FILES, matches
from .cards import _check_inputs, _config_dict, _verifier_block, card_for_folder, family_title, is_generated_card


class VerifierReferenceError(ValueError):
    """The draft's verifier reference cannot be published (unset, a local path, or not on the Hub)."""


# -------------------------------------------------------------------------------------------------
# verifier reference
# -------------------------------------------------------------------------------------------------
def check_verifier_reference(
    config: Mapping[str, Any], api: HfApi | None = None, check_hub: bool = True, source: Any = "the draft"
) -> Any:
    """Raise `VerifierReferenceError` unless `speculators_config.verifier.name_or_path` is a Hub id that
    exists (checked with `model_info` when `check_hub`). Returns the verifier's `ModelInfo` (or None)."""
    verifier = _verifier_block(config)
    name = verifier.get("name_or_path")
    how_to_fix = (
        "pass verifier='<org/name>' (the verifier's Hub id) to push_to_hub, or --verifier to `speculators-hf push`; "
        "or set draft.config.verifier['name_or_path'] = '<org/name>' and save again"
    )
    if not name:
        raise VerifierReferenceError(
            f"{source} does not name its verifier (speculators_config.verifier.name_or_path is empty). A draft on the "
            f"Hub must say which model it accelerates: {how_to_fix}."
        )
    if looks_like_local_path(str(name)):
        raise VerifierReferenceError(
            f"{source} names its verifier by the local path {name!r}, which means nothing to anyone loading the "
            f"draft from the Hub (and vLLM would look for that path on the serving machine): {how_to_fix}."
        )
    if not check_hub:
        return None
    api = api or HfApi()
    revision = verifier.get("revision")
    try:
        return api.model_info(str(name), revision=revision)
    except GatedRepoError:
        return None  # it exists; this token just may not read it
    except RevisionNotFoundError as err:
        raise VerifierReferenceError(
            f"the verifier {name!r} has no revision {revision!r} on {api.endpoint}. Fix "
            "speculators_config.verifier.revision (a branch, tag or commit of the verifier) and save again."
        ) from err
    except RepositoryNotFoundError as err:
        raise VerifierReferenceError(
            f"the verifier {name!r} was not found on {api.endpoint} (HTTP {err.response.status_code}). Check the "
            f"id's spelling ({how_to_fix}); if it is private, use a token that can read it, or pass "
            "check_verifier=False (--no-check-verifier)."
        ) from err
    except HfHubHTTPError as err:
        raise VerifierReferenceError(
            f"could not check the verifier {name!r} on {api.endpoint}: {err}. Retry, or pass check_verifier=False "
            "(--no-check-verifier) to skip the check."
        ) from err


# -------------------------------------------------------------------------------------------------
# push
# -------------------------------------------------------------------------------------------------
def checkpoint_files(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The files of `folder` that `push_to_hub` uploads, and what it leaves out ("path (why)").

    Uploaded: regular files whose path matches `CHECKPOINT_FILES` (the files save_pretrained, convert, the
    trainer and a tokenizer write). Left out: dotfiles and dot-folders (`.env`, `.git`; not entered),
    symlinks to files or folders (their target may lie anywhere: a link to a token file would upload the
    token), special files, and every other file or folder."""
    folder = Path(folder)
    nested = [PurePosixPath(p).parts for p in CHECKPOINT_FILES if "/" in p]
    files: list[Path] = []
    skipped: list[str] = []

    def walk(directory: Path, prefix: tuple[str, ...]) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = "/".join((*prefix, entry.name))
            shown = ascii(rel)  # quoted and escaped: a trailing space or a zero-width character shows
            if entry.name.startswith("."):
                skipped.append(f"{shown} (hidden)")
            elif entry.is_symlink():
                skipped.append(f"{shown} (symbolic link)")
            elif entry.is_dir(follow_symlinks=False):
                parts = (*prefix, entry.name)
                if any(len(p) > len(parts) and p[: len(parts)] == parts for p in nested):
                    walk(Path(entry.path), parts)
                else:
                    skipped.append(f"{shown} (not a checkpoint folder)")
            elif not entry.is_file(follow_symlinks=False):
                skipped.append(f"{shown} (not a regular file)")
            elif matches(rel, CHECKPOINT_FILES):
                files.append(Path(entry.path))
            else:
                skipped.append(f"{shown} (not a checkpoint file)")

    walk(folder, ())
    return files, skipped


def _regular_file(folder: Path, name: str) -> bool:
    """True when `folder/name` is a regular file; a symlink there is an error (push reads these files)."""
    path = folder / name
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link: push_to_hub reads and uploads only regular files inside the folder. Replace "
            f'the link by a copy of the file (cp --remove-destination "$(readlink -f {path})" {path}).'
        )
    return path.is_file()


def _remote_readme(api: HfApi, repo_id: str, revision: str | None) -> str | None:
    """README.md of the repo at `revision`, or None when it has none."""
    url = hf_hub_url(repo_id, "README.md", revision=revision, endpoint=api.endpoint)
    response = get_session().get(url, headers=build_hf_headers(token=api.token), follow_redirects=True)
    if response.status_code == 404:
        return None
    hf_raise_for_status(response)
    return response.content.decode("utf-8", errors="replace")


def _needs_branch(revision: str | None) -> bool:
    """A branch name other than main (not a PR ref, not a commit id): created when missing."""
    if not revision or revision == "main" or revision.startswith("refs/"):
        return False
    return re.fullmatch(r"[0-9a-f]{40}", revision) is None


def push_to_hub(
    draft_or_path: Any,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    *,
    commit_description: str | None = None,
    create_pr: bool = False,
    check_verifier: bool = True,
    verifier: str | None = None,
    max_shard_size: int | str | None = None,
    **card_inputs: Any,
) -> CommitInfo:
    """Upload a draft (a model, or a folder written by `save_pretrained`) to `repo_id` in one commit.

    The verifier reference is checked first (see `check_verifier_reference`); `verifier` replaces it in
    the uploaded config.json (the local draft and folder are left unchanged), for drafts made from a
    local copy of their verifier. The repo is created if missing (`private` applies to a new repo), and
    so is the branch `revision`. The checkpoint's files (`checkpoint_files`: config, weights and index,
    remote code, README.md, custom_generate/, tokenizer files, training_summary.json, a license; regular
    files inside the folder only, never a dotfile, symlink or special file; anything else is named in a
    warning and left out) go up in one `create_commit` together with the model card (generated again with
    `repo_id` in its snippets and `card_inputs` added), unless a person wrote the folder's README.md or the
    README.md already in the repo: those are kept. Returns the `CommitInfo`.
    """
    _check_inputs(card_inputs)
    api = HfApi(endpoint=endpoint, token=token)
    draft = draft_or_path if is_speculator(draft_or_path) else None
    if draft is not None:
        config = draft.config.to_dict()
        source = f"{type(draft).__name__} (for {repo_id})"
    else:
        source = str(draft_or_path)
        if not _regular_file(Path(draft_or_path), "config.json"):
            raise FileNotFoundError(f"{draft_or_path} holds no config.json: push a folder written by save_pretrained")
        _regular_file(Path(draft_or_path), "README.md")  # read for the card: never through a link
        config = _config_dict(draft_or_path)
    if not config.get("speculators_model_type"):
        raise ValueError(f"{source}: config.json has no speculators_model_type, so it is not a draft checkpoint")
    if verifier is not None:
        config.setdefault("speculators_config", {}).setdefault("verifier", {})["name_or_path"] = verifier
    # checked before anything is written or uploaded
    info = check_verifier_reference(config, api, check_hub=check_verifier, source=source)
    if not card_inputs.get("license") and info is not None and info.card_data is not None:
        for key in ("license", "license_name", "license_link"):
            value = getattr(info.card_data, key, None)
            if value and not card_inputs.get(key):
                card_inputs[key] = value

    with tempfile.TemporaryDirectory(prefix="speculators-hf-push-") as tmp:
        if draft is not None:
            folder = Path(tmp) / "draft"
            draft.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        else:
            folder = Path(draft_or_path)
        overrides: dict[str, bytes] = {}
        if verifier is not None:
            # rewritten in the format transformers writes config.json in, so only that field changes
            saved = _config_dict(folder)
            saved["speculators_config"]["verifier"]["name_or_path"] = verifier
            overrides["config.json"] = (json.dumps(saved, indent=2, sort_keys=True) + "\n").encode()
            config = saved
        card = card_for_folder(folder, repo_id=repo_id, config=config, **card_inputs)

        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = repo_url.repo_id
        if _needs_branch(revision) and not create_pr:
            api.create_branch(repo_id, branch=str(revision), exist_ok=True)

        skip_readme = False
        if card is not None:  # otherwise the folder's README.md is a person's: uploaded as written
            remote = _remote_readme(api, repo_id, revision)
            if remote is not None and not is_generated_card(remote):
                warnings.warn(
                    f"{repo_id} already has a README.md written by a person: it is kept and the generated card is "
                    "not uploaded. Delete it on the Hub (or add the speculators-hf mark) to have a card generated.",
                    stacklevel=2,
                )
                skip_readme = True
            else:
                overrides["README.md"] = card.encode("utf-8")

        files, skipped = checkpoint_files(folder)
        if skipped:
            warnings.warn(
                f"not uploaded from {folder}: {', '.join(skipped)}. push_to_hub uploads only the files of a checkpoint "
                "(see speculators_hf.models.checkpoint.CHECKPOINT_FILES), as regular files inside the folder.",
                stacklevel=2,
            )
        operations = []
        for path in files:
            rel = path.relative_to(folder).as_posix()
            if rel == "README.md" and skip_readme:
                continue
            content = overrides.pop(rel, None)
            operations.append(
                CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path) if content is None else content)
            )
        for rel, content in overrides.items():  # a card for a folder that had no README.md
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))

        family = config["speculators_model_type"]
        verifier_name = _verifier_block(config).get("name_or_path")
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {family_title(family)} draft for {verifier_name}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def draft_push_to_hub(
    self: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: Sequence[str] | None = None,
    endpoint: str | None = None,
    check_verifier: bool = True,
    verifier: str | None = None,
    **card_inputs: Any,
) -> CommitInfo:
    """Upload this draft to the Hub in one commit, with its model card as README.md.

    Same arguments as transformers' `PreTrainedModel.push_to_hub`, plus those of
    `speculators_hf.push_to_hub` (`endpoint`, `check_verifier`, `verifier`, card inputs); `tags` are added
    to the card's tags.
    """
    if tags:
        card_inputs["tags"] = [*(card_inputs.get("tags") or []), *tags]
    return push_to_hub(
        self,
        repo_id,
        private=bool(private),
        revision=revision,
        token=token,
        commit_message=commit_message,
        endpoint=endpoint,
        commit_description=commit_description,
        create_pr=create_pr,
        check_verifier=check_verifier,
        verifier=verifier,
        max_shard_size=max_shard_size,
        **card_inputs,
    )
