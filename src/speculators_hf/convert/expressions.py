"""The tiny expression language of the specs (`=hidden_size // num_attention_heads`), and the environment a
source's config gives it."""

from __future__ import annotations

import ast
import json
import logging
import operator
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .errors import ConversionError
from .formats import ConfigSpec

logger = logging.getLogger("speculators_hf.convert")

MISSING: Any = object()


# --------------------------------------------------------------------------------------------------
# the spec expression language
# --------------------------------------------------------------------------------------------------
_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


def get_path(mapping: Mapping[str, Any], dotted: str) -> Any:
    """`mapping["a"]["b"]` for `"a.b"`, or MISSING."""
    value: Any = mapping
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def set_path(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        nested = mapping.get(part)
        if not isinstance(nested, dict):
            nested = mapping[part] = {}
        mapping = nested
    mapping[parts[-1]] = value


def evaluate(expression: str, env: Mapping[str, Any], where: str, missing: Any = MISSING) -> Any:
    """Evaluate a spec expression: names (dotted allowed) looked up in `env`, integers, + - * //, `or`.
    A name absent from `env` is an error, or gives `missing` when that is passed."""

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            dotted = ast.unparse(node)
            value = get_path(env, dotted)
            if value is MISSING and missing is not MISSING:
                return missing
            if value is MISSING:
                raise ConversionError(f"{where}: the config has no {dotted!r} (needed by {expression!r})")
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                raise ConversionError(f"{where}: {expression!r} reads a null value")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):  # `a or b`: the first true value, as Python
            value = None
            for operand in node.values:
                value = walk(operand)
                if value:
                    break
            return value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ConversionError(f"{where}: unsupported expression {expression!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ConversionError(f"{where}: cannot parse expression {expression!r}") from err
    return walk(tree)


def resolve_value(value: Any, env: Mapping[str, Any], where: str) -> Any:
    """A spec value: `=expr` is evaluated over `env`, anything else is a literal."""
    if isinstance(value, str) and value.startswith("="):
        return evaluate(value[1:], env, where)
    return value


def section_first(sections: Mapping[str, Collection[str]], config: Mapping[str, Any], label: str) -> dict[str, Any]:
    """A deep, plain copy of `config` where each key `sections` names for a section (`{dflash_config: [block_size,
    ...]}`) sits in that section: the original code reads it there first, else at the top level. A key set in both
    places with different values (any key of the section, named or not) is an error naming both."""
    env: dict[str, Any] = json.loads(json.dumps(dict(config)))
    for section, keys in sections.items():
        nested = env.get(section)
        nested = nested if isinstance(nested, dict) else {}
        conflicts = [
            f"{section}.{key} = {nested[key]!r} but the top-level {key} = {env[key]!r}"
            for key in nested
            if key in env and env[key] != nested[key]
        ]
        if conflicts:
            raise ConversionError(
                f"{label}: config.json sets {'; '.join(conflicts)}. The original code reads {section} first, other "
                f"converters the top level, so which value the draft was made with is unclear: remove one of the two "
                "keys, or make them equal"
            )
        moved = {key: env.pop(key) for key in keys if key in env}
        if moved or section in env:
            env[section] = {**moved, **nested}
    return env


def source_environment(
    spec: ConfigSpec, config: Mapping[str, Any], label: str, provided: Collection[str] = ()
) -> dict[str, Any]:
    """The source config with `spec.section_first` keys moved into their section and `spec.defaults` filled in for
    absent keys, checked against `required` (unless `provided` by the caller, e.g. `--set`) and `accept`."""
    env = section_first(spec.section_first, config, label)  # a deep, plain copy
    for key, why in spec.required.items():
        if get_path(env, key) is MISSING and key not in provided:
            raise ConversionError(f"{label}: config.json has no {key!r}. {why}")
    for key, default in spec.defaults.items():
        # absent, or null where the original code then falls back to its default (as HF configs do)
        current = get_path(env, key)
        if current is MISSING or (current is None and default is not None):
            set_path(env, key, resolve_value(default, env, f"{label}: default of {key}"))
    for key, rule in spec.accept.items():
        value = get_path(env, key)
        value = None if value is MISSING else value
        if value not in rule.values:
            raise ConversionError(
                f"{label}: config field {key!r} is {value!r}; this converter handles only {rule.values}. {rule.why}"
            )
    return env


def map_fields(mapping: Mapping[str, Any], env: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {key: resolve_value(value, env, f"{where}.{key}") for key, value in mapping.items()}
