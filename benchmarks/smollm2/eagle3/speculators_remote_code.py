# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.remote_code. Do not edit.
"""Write the flat `trust_remote_code` files that let a checkpoint load without speculators_hf installed.

The files are this package's own modules, copied verbatim except for their relative imports, which
are rewritten to the flat names (`models/eagle3.py` -> `speculators_models_eagle3.py`, imported as
`from .speculators_models_eagle3 import ...`). Only the modules a family's model class reaches through
relative imports are written, so the bundle holds configs, models and generation code, never the
converters, trainer or CLI. transformers scans every import line of remote code, so these modules
import third-party packages only, never `speculators_hf`.

Saving from a class that was itself loaded as remote code rewrites nothing (the names are already
flat), so a draft round-trips through any number of save/load cycles.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Any

PREFIX = "speculators_"
PACKAGE = "speculators_hf"


def _flat_name(module: str, root: str) -> str:
    rel = module[len(root) + 1 :] if module.startswith(root + ".") else module
    name = rel.replace(".", "_")
    return name if name.startswith(PREFIX) else PREFIX + name


def _root_of(module: str) -> str:
    return PACKAGE if module == PACKAGE or module.startswith(PACKAGE + ".") else module.rpartition(".")[0]


def _rewrite(module: str, root: str) -> tuple[str, list[str]]:
    """Source of `module` with relative imports made flat, and the modules it imports relatively."""
    path = Path(sys.modules[module].__file__ or "")
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    package = module.rpartition(".")[0]
    deps: list[str] = []
    for node in sorted(ast.walk(ast.parse(source)), key=lambda n: -getattr(n, "lineno", 0)):
        if not (isinstance(node, ast.ImportFrom) and node.level > 0):
            continue
        target = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        if node.module is None or target == root:
            raise ValueError(
                f"{path}:{node.lineno}: remote-code modules must import names from a module (`from .x import Y`)"
            )
        deps.append(target)
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        indent = lines[node.lineno - 1][: node.col_offset]
        lines[node.lineno - 1 : node.end_lineno] = [f"{indent}from .{_flat_name(target, root)} import {names}\n"]
    header = f"# Remote code of {PACKAGE} (https://pypi.org/project/speculators-hf/), from {module}. Do not edit.\n"
    body = "".join(lines)
    return (body if body.startswith("# Remote code of") else header + body), deps


def write_remote_code(model_class: Any, directory: str | Path) -> dict[str, str]:
    """Write the remote-code files of `model_class` (and its config class) into `directory`;
    return the `auto_map` for config.json."""
    directory = Path(directory)
    root = _root_of(model_class.__module__)
    config_class = model_class.config_class
    todo, done = [model_class.__module__, config_class.__module__], set()
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        if module not in sys.modules:
            __import__(module)
        text, deps = _rewrite(module, root)
        (directory / f"{_flat_name(module, root)}.py").write_text(text)
        todo.extend(deps)
    model_ref = f"{_flat_name(model_class.__module__, root)}.{model_class.__name__}"
    return {
        "AutoConfig": f"{_flat_name(config_class.__module__, root)}.{config_class.__name__}",
        "AutoModel": model_ref,
        "AutoModelForCausalLM": model_ref,
    }
