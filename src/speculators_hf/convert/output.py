"""What every converter does with its result: `--set` overrides, the verifier reference, the model built (its
tensors compared with the ones the config implies, on the meta device, before anything is allocated, so a
small file claiming a huge model fails at once), DST written atomically (a temporary sibling that replaces it
in one step, shared with `save_pretrained`: a failure or a kill leaves no DST, an existing DST untouched), and
the native exports read back and compared."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import SpeculatorConfigError
from ..models.checkpoint import (
    TensorInfo,
    dtype_kind,
    meta_model,
    replacing_folder,
    save_target,
    tensor_infos,
    weight_problems,
)
from .errors import ConversionError
from .formats import FormatSpec
from .sources import Source

logger = logging.getLogger("speculators_hf.convert")


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def check_destination(source_root: Path | None, dst: Path, overwrite: bool) -> None:
    dst = dst.expanduser().resolve()
    if source_root is not None:
        src = source_root.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise ConversionError(f"destination {dst} overlaps the source {src}; the source is never written to")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"destination {dst} exists and is not empty; pass overwrite=True (--overwrite)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a directory")


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """Yield an empty folder beside `dst`; on success it replaces `dst` in one atomic step, on failure (or a
    kill) it is removed and `dst` is left as it was (`models.checkpoint.replacing_folder`, which
    `save_pretrained` uses too)."""
    with replacing_folder(save_target(dst)) as tmp:
        yield tmp
        if not any(tmp.iterdir()):
            raise ConversionError("the converter wrote nothing")


# --------------------------------------------------------------------------------------------------
# shared by the converters of the non-EAGLE-3 families
# --------------------------------------------------------------------------------------------------
def apply_overrides(config: Any, overrides: dict[str, Any], label: str, settable: Collection[str] = ()) -> None:
    """`--set KEY=VALUE` on a converted config: `speculative_tokens` always, and the flat fields `settable`
    (those that do not change tensor shapes); each value is validated by the config's own field annotations,
    and an error names the key, the value and what is expected."""
    allowed = {"speculative_tokens", *settable}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConversionError(f"{label}: cannot set {unknown}; settable here: {sorted(allowed)}")
    try:
        for key, value in overrides.items():
            if key == "speculative_tokens":
                config.speculative_tokens = value
            else:
                setattr(config, key, value)
        config.validate_speculator()
    except SpeculatorConfigError as err:
        raise ConversionError(f"{label}: invalid value after --set: {err}") from err


def bind_reference(
    config: Any, ctx: Any, label: str, vocab_size: int | None, hidden_size: int | None, what: str = "draft"
) -> None:
    """Record what the draft requires of its verifier (`vocab_size`, `hidden_size`), then, with
    `--verifier`, check the verifier against it (and against the fingerprint the source names) and
    fill the reference. Errors list every field that differs."""
    known = config.verifier
    if ctx.verifier is not None:
        ref = ctx.verifier.reference()
        problems = []
        if vocab_size is not None and ref["vocab_size"] is not None and ref["vocab_size"] != vocab_size:
            problems.append(
                f"vocab_size: the {what} was made for a vocabulary of {vocab_size} tokens, the verifier has "
                f"{ref['vocab_size']}"
            )
        if hidden_size is not None and ref["hidden_size"] is not None and ref["hidden_size"] != hidden_size:
            problems.append(
                f"hidden_size: the {what} reads verifier hidden states of width {hidden_size}, the verifier's are "
                f"{ref['hidden_size']}"
            )
        for name in ("num_hidden_layers", "bos_token_id", "eos_token_id", "pad_token_id"):
            if known.get(name) is not None and ref.get(name) is not None and known[name] != ref[name]:
                problems.append(f"{name}: the source names {known[name]!r}, the verifier has {ref[name]!r}")
        if problems:
            raise ConversionError(
                f"{label}: verifier {ctx.verifier.name_or_path or '(loaded model)'} does not match the {what}:\n  "
                + "\n  ".join(problems)
            )
        previous = known.get("name_or_path")
        if previous and ref["name_or_path"] and previous != ref["name_or_path"]:
            ctx.log(f"verifier: {previous} (from the source) replaced by {ref['name_or_path']}")
        known.update({k: v for k, v in ref.items() if v is not None})
    if known.get("vocab_size") is None:
        known["vocab_size"] = vocab_size
    if known.get("hidden_size") is None:
        known["hidden_size"] = hidden_size


def build_model(
    model_class: Any,
    config: Any,
    tensors: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    dtype: torch.dtype,
    label: str,
) -> Any:
    """`model_class(config)` in `dtype` holding exactly `tensors` (every missing, unexpected or misshapen
    tensor is listed in the error, by its source name)."""
    from transformers.initialization import no_init_weights

    try:
        config.validate_speculator()
        # the tensors the config implies, from a model on the meta device: compared before anything is allocated
        expected = tensor_infos(meta_model(model_class, config))
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{label}: the converted config is invalid: {err}") from err
    found = {
        name: TensorInfo(tuple(t.shape), dtype_kind(t.dtype), str(t.dtype).removeprefix("torch."))
        for name, t in tensors.items()
    }
    lines = weight_problems(expected, found, owner="converted config", names=origin)
    if lines:
        raise ConversionError(f"{label}: the tensors do not match the converted config:\n" + "\n".join(lines))
    with no_init_weights():
        model = model_class(config)
    model.to(dtype)
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=True)
    problems = model.weight_value_problems()
    if problems:
        raise ConversionError(f"{label}: invalid tensor values:\n" + "\n".join(problems))
    return model.eval()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        b.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
    )


def write_native(folder: Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace everything in `folder` by `config.json` and `model.safetensors` (a foreign layout)."""
    from safetensors.torch import save_file

    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )


def check_reimport(folder: Path, model: Any, spec: FormatSpec, module: Any, target: str) -> None:
    """Import the written export again with `module` and compare it with `model`, tensor by tensor and
    config field by config field (the export must be lossless)."""
    from types import SimpleNamespace

    config = json.loads((folder / "config.json").read_text())
    source = Source(root=folder, label=f"export to {target}", config=config)
    ctx = SimpleNamespace(verifier=None, overrides={}, log=lambda message: None, hub_kwargs={})
    back = module.import_checkpoint(source, spec, ctx)
    ours, theirs = model.state_dict(), back.state_dict()
    if set(ours) != set(theirs):
        raise ConversionError(
            f"export to {target}: reading the export back gives other tensors: extra {sorted(set(theirs) - set(ours))}, "
            f"missing {sorted(set(ours) - set(theirs))}"
        )
    for name, tensor in ours.items():
        if not same_bits(tensor, theirs[name]):
            raise ConversionError(f"export to {target}: the written tensor for {name} differs from the draft's")
    schema = type(model.config).fields_schema()
    for key in schema.model_fields if schema is not None else ():
        want, got = getattr(model.config, key), getattr(back.config, key)
        if key == "transformer_layer_config":
            want, got = _layer_view(want), _layer_view(got)
        if want != got:
            raise ConversionError(f"export to {target}: config field {key} reads back as {got!r}, not {want!r}")


def _layer_view(layer: Any) -> dict[str, Any]:
    ignore = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "_attn_implementation"}
    data = layer.to_dict() if hasattr(layer, "to_dict") else dict(layer)
    return {k: v for k, v in data.items() if k not in ignore}
