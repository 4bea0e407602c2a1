"""Command-line argument types shared by every `speculators-hf` subcommand: a bad value is refused by argparse
with one line naming the argument, the value and what is expected (exit code 2), before anything is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr: `speculators-hf bench: error: ... (see ... --help)`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def key_value(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with the value read as YAML (`3`, `true`, `[2, 6, 9]`, `name`)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({err})") from None


def config_override(text: str) -> tuple[str, Any]:
    """`--set KEY=VALUE` on a draft config: `key_value`, the value checked against the annotation of KEY in every
    family that declares it (and `speculative_tokens`), and refused when none accepts it. Keys no family declares
    are left to the command, which names the keys it can set."""
    from pydantic import TypeAdapter, ValidationError

    from .config import SpeculativeTokens, format_validation_error
    from .models import FAMILIES

    key, value = key_value(text)
    problems: dict[str, list[str]] = {}  # what is wrong -> the drafts whose field says so
    for model_class in FAMILIES.values():
        schema = model_class.config_class.fields_schema()
        if schema is None or key not in schema.model_fields:
            continue
        try:
            schema.model_validate({key: value})
            return key, value
        except ValidationError as err:
            problems.setdefault(format_validation_error(err).strip(), []).append(model_class.title)
    if key == "speculative_tokens":
        try:
            return key, TypeAdapter(SpeculativeTokens, config={"strict": True}).validate_python(value)
        except ValidationError as err:
            problems[format_validation_error(err, key).strip()] = []
    if problems:
        raise argparse.ArgumentTypeError(
            f"{text!r}: " + "; ".join(f"{p} (in {', '.join(t)} drafts)" if t else p for p, t in problems.items())
        )
    return key, value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int_list(text: str) -> list[int]:
    """`3,5,7` -> [3, 5, 7]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,5,7, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def model_ref(text: str) -> str:
    """A Hub id (`org/name`), or a local folder that exists: a missing local path is named as such rather than
    looked up on the Hub (where the error would be about the network)."""
    from .loading import looks_like_local_path

    if looks_like_local_path(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise argparse.ArgumentTypeError(
                f"{text}: no such folder (give an existing folder, or a Hub id such as org/name)"
            )
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file: give the folder that holds config.json")
        return str(path)
    return text


def existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return path


def new_dir(text: str) -> Path:
    """An output folder: may exist (as a folder), must not be a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: give a folder to write into")
    return path


def draft_lengths(text: str) -> list[int | str]:
    """`3,5,7,auto` -> [3, 5, 7, "auto"]: draft lengths, and "auto[:max]" for the adaptive policy."""
    from .generation.policy import auto_depth

    values: list[int | str] = []
    for part in text.split(","):
        try:
            values.append(part if auto_depth(part) is not None else int(part))
        except ValueError:
            values.append(0)
        if isinstance(values[-1], int) and values[-1] < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated draft lengths >= 1 and 'auto' or 'auto:<max>', such as 3,5,7,auto; got {text!r}"
            )
    return values


def tree_spec(text: str) -> str:
    """A draft tree (`chain:5`, `chain:10:0.4`, `dynamic:6:8:48[:beam]`, a JSON list of rank paths, or `auto[:max]`),
    checked now."""
    from .generation.policy import auto_depth
    from .generation.tree import TreeSpec

    try:
        if auto_depth(text) is None:
            TreeSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
