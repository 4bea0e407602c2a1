"""A source's tensors in our layout: renamed by a spec, repeated layouts expanded (index ranges bounded by
`config.MAX_DRAFT_HEADS` / `MAX_LAYERS_PER_HEAD`), shapes, dtypes and values checked."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import MAX_DRAFT_HEADS, MAX_LAYERS_PER_HEAD
from ..models.checkpoint import dtype_kind, non_finite_tensors
from .errors import ConversionError
from .expressions import evaluate
from .formats import TensorSpec

logger = logging.getLogger("speculators_hf.convert")


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------
def our_name(name: str, spec: TensorSpec) -> str:
    """A source tensor name in our layout: the first matching prefix rename, else the first matching
    pattern, else unchanged."""
    for old, new in spec.renames:
        if name.startswith(old):
            return new + name[len(old) :]
    for pattern, replacement in spec.patterns:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(replacement)
    return name


def index_ranges(spec: TensorSpec, env: Mapping[str, Any], label: str) -> dict[str, range]:
    """The range of each index variable (heads, stages, layers per head), bounded: a small file whose config
    claims 10^8 layers must not make a layout of 10^8 names."""
    limit = max(MAX_DRAFT_HEADS, MAX_LAYERS_PER_HEAD)
    ranges = {}
    for var, (start, stop) in spec.indexed.items():
        lo = evaluate(str(start), env, f"{label}: range of {{{var}}}")
        hi = evaluate(str(stop), env, f"{label}: range of {{{var}}}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)) or not 0 <= lo <= hi <= lo + limit:
            raise ConversionError(
                f"{label}: the config implies {{{var}}} in range({lo!r}, {hi!r}) ({spec.indexed[var][1]}); at most "
                f"{limit} heads, stages or layers per head are supported (speculators_hf.config.MAX_DRAFT_HEADS, "
                "MAX_LAYERS_PER_HEAD). The config.json is corrupt or crafted: fix the count."
            )
        ranges[var] = range(lo, hi)
    return ranges


def expand_layout(spec: TensorSpec, env: Mapping[str, Any], label: str) -> TensorSpec:
    """The spec with every `{i}` name of `layout`/`optional` expanded over its `indexed` range."""
    if not spec.indexed:
        return spec
    ranges = index_ranges(spec, env, label)

    def expand(name: str) -> list[str]:
        names = [name]
        for var, values in ranges.items():
            token = "{" + var + "}"
            names = (
                [n.replace(token, str(v)) for n in names for v in values] if any(token in n for n in names) else names
            )
        return names

    layout = {concrete: shape for name, shape in spec.layout.items() for concrete in expand(name)}
    optional = [concrete for name in spec.optional for concrete in expand(name)]
    return spec.model_copy(update={"layout": layout, "optional": optional, "indexed": {}})


def rename_tensors(
    tensors: Mapping[str, torch.Tensor], spec: TensorSpec, label: str, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply the spec's renames, patterns and drops. Returns (our name -> tensor, our name -> source
    name). A tensor outside the layout (expanded first, see `expand_layout`) is an error naming it."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in tensors.items():
        ours = our_name(name, spec)
        if ours in spec.drop or name in spec.drop:
            log(f"dropping {name} {tuple(tensor.shape)} (not the draft's own: the verifier's, or for training only)")
            continue
        if ours not in spec.layout:
            raise ConversionError(
                f"{label}: unexpected tensor {name!r} {tuple(tensor.shape)} (read as {ours!r}); this format's "
                f"tensors are {sorted(spec.layout)}. A quantized or otherwise modified checkpoint cannot be "
                "converted exactly."
            )
        if ours in out:
            raise ConversionError(f"{label}: tensors {origin[ours]!r} and {name!r} both map to {ours!r}")
        out[ours], origin[ours] = tensor, name
    return out, origin


def source_name(ours: str, spec: TensorSpec) -> str:
    """The name a tensor of ours has in the source format (the first rename that produces it; names made
    by `patterns` are reported as ours)."""
    for old, new in spec.renames:
        if ours.startswith(new):
            return old + ours[len(new) :]
    return ours


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    spec: TensorSpec,
    env: Mapping[str, Any],
    label: str,
) -> torch.dtype:
    """Shapes (from the spec's expressions over `env`) and dtypes; returns the floating dtype shared by
    every float tensor. Errors name the tensor and both shapes / dtypes."""
    absent = [name for name in spec.layout if name not in tensors and name not in spec.optional]
    if absent:
        raise ConversionError(
            f"{label}: the checkpoint lacks {[source_name(name, spec) for name in absent]}, which this format always has"
        )
    float_dtype: torch.dtype | None = None
    float_first = ""
    for name, tensor in tensors.items():
        src_name = origin.get(name, name)
        shape_exprs = spec.layout.get(name)
        if shape_exprs is not None:
            want = tuple(int(evaluate(e, env, f"{label}: shape of {name}")) for e in shape_exprs)
            if tuple(tensor.shape) != want:
                raise ConversionError(
                    f"{label}: tensor {src_name!r} has shape {tuple(tensor.shape)}, the config implies {want} "
                    f"({' x '.join(shape_exprs)})"
                )
        kind = spec.dtypes.get(name, "float")
        if dtype_kind(tensor.dtype) != kind:
            wanted = {"float": "a float dtype", "integer": "an integer dtype", "bool": "torch.bool"}[kind]
            raise ConversionError(f"{label}: tensor {src_name!r} has dtype {tensor.dtype}, expected {wanted}")
        if kind == "float":
            if float_dtype is None:
                float_dtype, float_first = tensor.dtype, src_name
            elif tensor.dtype != float_dtype:
                raise ConversionError(
                    f"{label}: tensor {src_name!r} has dtype {tensor.dtype} but {float_first!r} has {float_dtype}; "
                    "a checkpoint with mixed float dtypes cannot be converted without loss (cast it first)"
                )
    refuse_non_finite(tensors, origin, label)
    return float_dtype or torch.float32


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], origin: Mapping[str, str], label: str) -> None:
    """NaN or inf in a weight is an error naming the source tensors (a draft loaded from such a file is
    refused too: `SpeculatorModel.from_pretrained`)."""
    broken = sorted(origin.get(n, n) for n in non_finite_tensors(tensors.items()))
    if broken:
        raise ConversionError(
            f"{label}: tensors {broken} hold NaN or inf values; the checkpoint is corrupt (a diverged training run or a "
            "damaged download): re-download it or take an earlier checkpoint"
        )
