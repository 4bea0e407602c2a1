"""Model cards of drafts: what a draft on the Hub says about itself.

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
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from ..config import FINGERPRINT_FIELDS
from ..loading import looks_like_local_path
from ..models.base import FAMILIES, is_speculator

TEMPLATES_DIR = Path(__file__).parent.parent / "model_cards"
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


class ModelCardInputError(ValueError):
    """A card input is unknown or malformed (e.g. a result without the command that measured it)."""


# -------------------------------------------------------------------------------------------------
# what the card says about each family: declared by the family's model class (`title`, `description`,
# `card_details`, `vllm_serving`)
# -------------------------------------------------------------------------------------------------
def family_title(family: str) -> str:
    """The family's name in cards and commit messages (its model class's `title`), or the family id."""
    model_class = FAMILIES.get(family)
    return (model_class.title if model_class is not None else "") or family


def family_description(family: str) -> str:
    """What the card says the family is (its model class's `description`), or "" for a family not registered."""
    model_class = FAMILIES.get(family)
    return model_class.description if model_class is not None else ""


def vllm_card_facts(family: str, k: int, repo_id: str | None) -> dict[str, Any] | None:
    """The family's `vllm_serving` facts as the card's "Serve with vLLM" shows them (None when it has none):
    `{draft}` filled in, and `speculative_config`, the shell argument of `--speculative-config` (the draft by its
    repo id or the folder vLLM reads; the `$DRAFT` shell variable in double quotes when neither is known)."""
    facts = getattr(FAMILIES.get(family), "vllm_serving", None)
    if facts is None:
        return None
    draft = repo_id or f'"${REPO_PLACEHOLDER}"'
    out = dataclasses.asdict(facts)
    out.update(prepare=facts.prepare.replace("{draft}", draft), notes=facts.notes.replace("{draft}", draft))
    if facts.method is not None:
        model = facts.folder or repo_id or f"${REPO_PLACEHOLDER}"
        spec = json.dumps({"method": facts.method, "model": model, "num_speculative_tokens": k, **dict(facts.options)})
        shell = f"'{spec}'" if model != f"${REPO_PLACEHOLDER}" else '"' + spec.replace('"', '\\"') + '"'
        out["speculative_config"] = shell
    return out


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

    k = _draft_length(config) or 5
    context = {
        "card_data": card_data.to_yaml(),
        "mark": GENERATED_MARK,
        "inputs_comment": _json_comment(embedded),
        "family": family,
        "family_title": family_title(family),
        "description": family_description(family),
        "vllm": vllm_card_facts(family, k, repo_id),
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
        "k": k,
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
