"""The Hub side of a draft: model cards, one-commit uploads and the verifier-reference check.

A draft on the Hub explains itself: which verifier it serves (and at which revision), how to run it in
transformers (with and without this package) and in vLLM, how it was trained and how well it accepts,
when those are known. Never an invented number: sections without inputs are left out.

Model cards
    `create_model_card(draft_or_config, **card_inputs)` renders the Jinja template of the draft's family
    (`model_cards/<speculators_model_type>.md.j2`, falling back to `model_cards/base.md.j2` for a family
    without one) into a `huggingface_hub.ModelCard` whose metadata is a `ModelCardData`: the verifier as
    `base_model`, `library_name: transformers`, `pipeline_tag: text-generation`, the tags
    `speculative-decoding`, the algorithm, `speculators`, `speculators-hf`, and the license when known.

    `library_name` is `transformers`, not `speculators-hf`: the Hub knows only registered library names,
    and for `transformers` it shows the right "Use this model" snippet (AutoModelForCausalLM with
    `trust_remote_code=True`, which works because `config.json` carries `auto_map`) and counts downloads
    through config.json. The package name is in the tags instead.

    Card inputs (all optional; see `CARD_INPUT_KEYS`): `license` (+ `license_name`, `license_link` for
    `license: other`), `verifier_card` (a local README.md, or a folder holding one, to read the license
    from), `training` (a dict such as {"data": ..., "recipe": ..., "command": ...} or a string), `datasets`
    (Hub dataset ids, for the metadata), `results` (a dict or a list of dicts with `tau` and/or `speedup`,
    the `command` that measured them — required — and optionally `device`, `k`, `dataset`, `dtype`),
    `tags`, `language`, `notes`, and `repo_id` (the Hub id the draft is, or will be, published under: the
    snippets load it by that id; without it the card says it does not know the id and the snippets read it
    from a `DRAFT` variable). Without a `license`, the license
    is read from `verifier_card`, else from the verifier's card in the local Hub cache, else (at push
    time) from the verifier's Hub metadata.

save_pretrained writes README.md
    Importing `speculators_hf` sets `SpeculatorModel.card_writer = write_model_card`, so every
    `save_pretrained` writes the card as README.md, with the inputs found in `draft.card_info` (a dict
    of card inputs that you set on the model: `draft.card_info = {"license": "llama3.1", "results":
    {...}}`). A generated card has `GENERATED_MARK` (an HTML comment) right after its metadata and
    carries its inputs in a last HTML comment, so `push_to_hub(folder, repo)` can render it again with the repo id. A
    README.md without the mark was written by a person and is never replaced, by saving or pushing; to
    have a card generated again, delete that file (or put the mark back). `card_info` is not stored in
    the weights or the config: a draft loaded again has none, so set it before saving if it matters.

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
import struct
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    get_session,
    hf_hub_url,
    hf_raise_for_status,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, validate_repo_id

from .config import FINGERPRINT_FIELDS
from .models.base import FAMILIES, SpeculatorModel, is_speculator
from .models.checkpoint import CHECKPOINT_FILES, matches

TEMPLATES_DIR = Path(__file__).parent / "model_cards"
# First line of the body of every generated card: its presence means "generated, may be replaced".
GENERATED_MARK = (
    "<!-- speculators-hf: generated model card. save_pretrained and push_to_hub rewrite this file while this "
    "line is here; delete the line to keep your edits. -->"
)
_MARK_KEY = "<!-- speculators-hf: generated model card"  # what identifies the mark, whatever its wording
_INPUTS_PREFIX = "<!-- speculators-hf card inputs: "
_INPUTS_RE = re.compile(re.escape(_INPUTS_PREFIX) + r"(\{.*?\}) -->", re.DOTALL)
# A card that does not know where the draft is published (written by save_pretrained or convert before a
# push, without a `repo_id` card input) says so in words, and its snippets read the draft from this
# variable (a Python name and a shell variable) instead of showing a fake id that looks ready to copy.
REPO_PLACEHOLDER = "DRAFT"
VERIFIER_PLACEHOLDER = "<verifier-id>"
BASE_TAGS = ("speculative-decoding", "speculators", "speculators-hf")
CARD_INPUT_KEYS = frozenset(
    {
        "license",
        "license_name",
        "license_link",
        "verifier_card",
        "training",
        "datasets",
        "results",
        "tags",
        "language",
        "notes",
        "repo_id",
        "num_parameters",
    }
)
RESULT_NUMBERS = ("tau", "speedup")
RESULT_COLUMNS = ("k", "dataset", "tau", "speedup", "device", "dtype")


class VerifierReferenceError(ValueError):
    """The draft's verifier reference cannot be published (unset, a local path, or not on the Hub)."""


class ModelCardInputError(ValueError):
    """A card input is unknown or malformed (e.g. a result without the command that measured it)."""


# -------------------------------------------------------------------------------------------------
# what the card says about each family: declared by the family's model class (`title`, `card_details`)
# -------------------------------------------------------------------------------------------------
def family_title(family: str) -> str:
    """The family's name in cards and commit messages (its model class's `title`), or the family id."""
    model_class = FAMILIES.get(family)
    return (model_class.title if model_class is not None else "") or family


def vllm_tensor_name(family: str, name: str) -> str:
    """The name tensor `name` of a `family` draft has in the checkpoint vLLM (or `speculators`) loads."""
    model_class = FAMILIES.get(family)
    return model_class.vllm_tensor_name(name) if model_class is not None else name


# -------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------
def is_generated_card(text: str) -> bool:
    """True when a README.md was generated by speculators-hf (and so may be replaced)."""
    return _MARK_KEY in text


def looks_like_local_path(name: str) -> bool:
    """An existing path, or a string shaped like a path rather than a Hub id (`org/name` or `name`)."""
    if os.path.exists(name) or name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _hub_id(name: Any) -> str | None:
    return name if isinstance(name, str) and name and not looks_like_local_path(name) else None


def _config_dict(source: Any) -> dict[str, Any]:
    """config.json content of a draft, a config, a config dict or a checkpoint folder."""
    if is_speculator(source):
        return source.config.to_dict()
    if hasattr(source, "to_dict") and hasattr(source, "speculators_model_type"):
        return source.to_dict()
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} holds no config.json: not a draft checkpoint folder")
        return json.loads(config_file.read_text())
    raise TypeError(f"expected a draft, a SpeculatorConfig, a config dict or a checkpoint folder, got {type(source)}")


def _verifier_block(config: Mapping[str, Any]) -> dict[str, Any]:
    spec = config.get("speculators_config") or {}
    return dict(spec.get("verifier") or {})


def _draft_length(config: Mapping[str, Any]) -> int | None:
    spec = config.get("speculators_config") or {}
    default = spec.get("default_proposal_method", "greedy")
    for method in spec.get("proposal_methods") or []:
        if method.get("proposal_type") == default:
            return int(method.get("speculative_tokens", 0)) or None
    return None


def safetensors_parameter_count(folder: str | os.PathLike) -> int | None:
    """Number of values in the safetensors files of `folder`, read from their headers (no tensor loaded)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
    return total


def _json_comment(inputs: Mapping[str, Any]) -> str:
    # "<" and ">" only occur inside JSON strings, where \u escapes are valid: the comment cannot close early.
    text = json.dumps(inputs, sort_keys=True, default=str).replace("<", "\\u003c").replace(">", "\\u003e")
    return f"{_INPUTS_PREFIX}{text} -->"


def card_inputs_of(text: str) -> dict[str, Any]:
    """The card inputs a generated card carries (empty for a person's README or an older card)."""
    if not is_generated_card(text):
        return {}
    match = _INPUTS_RE.search(text)
    if not match:
        return {}
    try:
        return dict(json.loads(match[1]))
    except json.JSONDecodeError:
        return {}


# -------------------------------------------------------------------------------------------------
# card inputs
# -------------------------------------------------------------------------------------------------
def _check_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(inputs) - CARD_INPUT_KEYS)
    if unknown:
        raise ModelCardInputError(f"unknown model card inputs {unknown}; known: {sorted(CARD_INPUT_KEYS)}")
    return {k: v for k, v in inputs.items() if v is not None}


def _normalise_results(results: Any) -> list[dict[str, Any]]:
    """A list of result dicts, each with at least one number and the command that measured it."""
    if results is None:
        return []
    rows = [results] if isinstance(results, Mapping) else list(results)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ModelCardInputError(f"results[{i}] must be a dict like {{'tau': 3.9, 'command': ...}}, got {row!r}")
        numbers = {k: row[k] for k in RESULT_NUMBERS if row.get(k) is not None}
        if not numbers:
            raise ModelCardInputError(
                f"results[{i}] has none of {list(RESULT_NUMBERS)}: give the measured tau (acceptance length) "
                "and/or speedup, or leave `results` out"
            )
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelCardInputError(f"results[{i}].{key} must be a number, got {value!r}")
        if not row.get("command"):
            raise ModelCardInputError(
                f"results[{i}] has no 'command': a published number needs the command that measured it "
                "(e.g. 'speculators-hf bench --verifier ... --draft ...'); add it, with the 'device'"
            )
        out.append({**dict.fromkeys(RESULT_COLUMNS), **row})
    return out


def _normalise_training(training: Any) -> dict[str, Any] | None:
    if training is None or training == {}:
        return None
    if isinstance(training, str):
        return {"text": training, "items": [], "command": None}
    if not isinstance(training, Mapping):
        raise ModelCardInputError(f"training must be a dict or a string, got {type(training).__name__}")
    items = []
    for key, value in training.items():
        if key in ("command", "text"):
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        items.append((str(key).replace("_", " "), str(value)))
    return {"text": training.get("text"), "items": items, "command": training.get("command")}


def _license_from_card(path: str | os.PathLike) -> dict[str, Any]:
    card_path = Path(path)
    if card_path.is_dir():
        card_path = card_path / "README.md"
    if not card_path.is_file():
        raise FileNotFoundError(f"verifier_card: {card_path} does not exist (give the verifier's README.md or folder)")
    data = ModelCard.load(card_path, ignore_metadata_errors=True).data
    return {k: getattr(data, k, None) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


def _license_from_cache(verifier_id: str | None, revision: str | None) -> dict[str, Any]:
    """The license in the verifier's card, when the card is in the local Hub cache (no network)."""
    if not verifier_id:
        return {}
    try:
        cached = try_to_load_from_cache(verifier_id, "README.md", revision=revision)
    except Exception:  # a malformed id or cache: no license rather than a failed save
        return {}
    if not isinstance(cached, str):
        return {}
    try:
        return _license_from_card(cached)
    except Exception:
        return {}


# -------------------------------------------------------------------------------------------------
# rendering
# -------------------------------------------------------------------------------------------------
def _environment() -> Any:
    try:
        import jinja2
    except ImportError as err:  # pragma: no cover - jinja2 ships with the dev and test extras
        raise ImportError("speculators-hf model cards need Jinja2: pip install jinja2") from err
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def template_name(family: str) -> str:
    """The template of `family`, or the shared base for a family without one."""
    name = f"{family}.md.j2"
    return name if family and (TEMPLATES_DIR / name).is_file() else "base.md.j2"


def _format_count(n: int | None) -> str | None:
    if n is None:
        return None
    if n >= 1e9:
        return f"{n / 1e9:.2f}B ({n:,})"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M ({n:,})"
    return f"{n:,}"


def create_model_card(source: Any, **card_inputs: Any) -> ModelCard:
    """The model card of a draft (a model, a SpeculatorConfig, a config.json dict or a checkpoint folder).

    `card_inputs` are described in this module's docstring (`license`, `training`, `results`, ...);
    on a model they are added to `model.card_info`, which they override.
    """
    config = _config_dict(source)
    inputs = _check_inputs({**dict(getattr(source, "card_info", None) or {}), **card_inputs})
    if is_speculator(source) and "num_parameters" not in inputs:
        inputs["num_parameters"] = sum(p.numel() for p in source.parameters())

    family = str(config.get("speculators_model_type") or "unknown")
    spec = config.get("speculators_config") or {}
    algorithm = str(spec.get("algorithm") or family)
    verifier = _verifier_block(config)
    verifier_name = verifier.get("name_or_path")
    verifier_id = _hub_id(verifier_name)
    repo_id = inputs.get("repo_id")

    license_info = {k: inputs[k] for k in ("license", "license_name", "license_link") if inputs.get(k)}
    if not license_info.get("license") and inputs.get("verifier_card"):
        license_info = _license_from_card(inputs["verifier_card"])
    if not license_info.get("license"):
        license_info = _license_from_cache(verifier_id, verifier.get("revision"))
    results = _normalise_results(inputs.get("results"))
    training = _normalise_training(inputs.get("training"))
    datasets = inputs.get("datasets")
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or []) or None

    tags = [*BASE_TAGS[:1], family, *BASE_TAGS[1:]]
    if algorithm != family:
        tags.insert(2, algorithm)
    tags += [t for t in inputs.get("tags") or [] if t not in tags]
    card_data = ModelCardData(
        base_model=verifier_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets,
        language=inputs.get("language"),
        **license_info,
    )

    fingerprint = [(name, verifier.get(name)) for name in (*FINGERPRINT_FIELDS, "tokenizer_hash")]
    details = [
        (label, config[key])
        for label, key in (FAMILIES[family].card_details if family in FAMILIES else ())
        if config.get(key) not in (None, "")
    ]
    layer_config = config.get("transformer_layer_config") or config.get("draft_model_config")
    if isinstance(layer_config, Mapping) and layer_config.get("model_type"):
        layers = layer_config.get("num_hidden_layers")
        what = "decoder layer" if family != "independent" else "draft LM"
        details.append((what, f"{layer_config['model_type']}" + (f", {layers} layer(s)" if layers else "")))
    result_columns = [c for c in RESULT_COLUMNS if any(r.get(c) is not None for r in results)]
    commands = list(dict.fromkeys(str(r["command"]) for r in results))
    # what a later render (push_to_hub, which passes its own repo id) needs to say the same thing
    embedded = {k: v for k, v in {**inputs, **license_info}.items() if k != "verifier_card"}

    context = {
        "card_data": card_data.to_yaml(),
        "mark": GENERATED_MARK,
        "inputs_comment": _json_comment(embedded),
        "family": family,
        "family_title": family_title(family),
        "algorithm": algorithm,
        "architectures": list(config.get("architectures") or []),
        "repo_id": repo_id,
        "repo_known": bool(repo_id),
        # how the snippets name the draft: its id, or the variable the card tells the reader to set
        "py_draft": json.dumps(repo_id) if repo_id else REPO_PLACEHOLDER,
        "sh_draft": repo_id if repo_id else f'"${REPO_PLACEHOLDER}"',
        "draft_variable": REPO_PLACEHOLDER,
        "verifier_name": verifier_name,
        "verifier_id": verifier_id or (verifier_name if verifier_name else VERIFIER_PLACEHOLDER),
        "verifier_on_hub": verifier_id is not None,
        "verifier_revision": verifier.get("revision"),
        "verifier_architectures": list(verifier.get("architectures") or []),
        "fingerprint": fingerprint,
        "verifier_vocab_size": verifier.get("vocab_size"),
        "k": _draft_length(config) or 5,
        "num_parameters": _format_count(inputs.get("num_parameters")),
        "details": details,
        "license": license_info.get("license"),
        "training": training,
        "results": results,
        "result_columns": result_columns,
        "commands": commands,
        "notes": inputs.get("notes"),
        "config": config,
    }
    text = _environment().get_template(template_name(family)).render(**context)
    return ModelCard(re.sub(r"\n{3,}", "\n\n", text))  # optional sections leave runs of blank lines


def write_model_card(model: Any, folder: str | os.PathLike) -> None:
    """`SpeculatorModel.card_writer`: write README.md into a folder being saved, unless the folder
    already has a README.md written by a person (one without `GENERATED_MARK`)."""
    readme = Path(folder) / "README.md"
    if readme.is_file() and not is_generated_card(readme.read_text(encoding="utf-8", errors="replace")):
        return
    try:
        card = create_model_card(model)
    except ImportError as err:  # pragma: no cover - without jinja2 the draft still saves, without a card
        warnings.warn(f"no model card written: {err}", stacklevel=2)
        return
    readme.write_text(str(card), encoding="utf-8")


def card_for_folder(
    folder: str | os.PathLike, repo_id: str | None = None, config: Mapping[str, Any] | None = None, **card_inputs: Any
) -> str | None:
    """The README.md text a checkpoint folder is published with, or None when the folder's README.md was
    written by a person (it is then published as it is). Otherwise the card is generated again from the
    folder's config.json (or `config`, when the uploaded config differs), the inputs its generated card
    carries, `card_inputs` (which win) and `repo_id` (used in the snippets)."""
    folder = Path(folder)
    readme = folder / "README.md"
    existing = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None
    if existing is not None and not is_generated_card(existing):
        return None
    inputs = card_inputs_of(existing or "")
    if "num_parameters" not in inputs:
        inputs["num_parameters"] = safetensors_parameter_count(folder)
    inputs.update({k: v for k, v in card_inputs.items() if v is not None})
    if repo_id:
        inputs["repo_id"] = repo_id
    return str(create_model_card(dict(config) if config is not None else folder, **inputs))


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


def _draft_push_to_hub(
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


def tensor_table(draft: Any) -> list[dict[str, Any]]:
    """name, shape, dtype and vLLM/speculators name of every tensor of `draft`'s state dict."""
    family = draft.config.speculators_model_type
    return [
        {
            "name": name,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "vllm_name": vllm_tensor_name(family, name),
        }
        for name, tensor in draft.state_dict().items()
    ]


def _install() -> None:
    SpeculatorModel.card_writer = write_model_card
    SpeculatorModel.push_to_hub = _draft_push_to_hub  # type: ignore[method-assign,assignment]


_install()

__all__ = [
    "CARD_INPUT_KEYS",
    "GENERATED_MARK",
    "ModelCardInputError",
    "VerifierReferenceError",
    "card_for_folder",
    "card_inputs_of",
    "check_verifier_reference",
    "create_model_card",
    "is_generated_card",
    "push_to_hub",
    "tensor_table",
    "vllm_tensor_name",
    "write_model_card",
]
