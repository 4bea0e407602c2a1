"""IBM MLP speculators (fms-extras; vLLM `mlp_speculator`) -> ours, and `--to vllm`.

The facts live in `specs/mlp_speculator.yaml`. Import: the `speculator.` prefix of the published
tensors is stripped, the config fields map one to one (vocab_size becomes the verifier fingerprint),
and with `tie_weights` every tied copy must equal the first (fms-extras shares one parameter, so a
file whose copies differ was not written by it: an error naming the tensor). Export: the published
layout again (prefix and all copies), which both vLLM and fms-extras' HF class read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..config import SpeculatorConfigError
from ..models.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig
from .errors import ConversionError
from .expressions import map_fields, source_environment
from .formats import FormatSpec
from .output import (
    apply_overrides,
    bind_reference,
    build_model,
    check_reimport,
    same_bits,
    write_native,
)
from .sources import Source
from .tensors import check_tensors, expand_layout, rename_tensors


def tied_groups(n_predict: int) -> list[list[str]]:
    """The tensors fms-extras ties under `tie_weights` (each group is one parameter)."""
    return [
        [f"emb.{i}.weight" for i in range(n_predict)],
        [f"head.{i}.weight" for i in range(n_predict)],
        [f"ln.{i}.weight" for i in range(n_predict)],
        [f"ln.{i}.bias" for i in range(n_predict)],
        [f"proj.{i}.weight" for i in range(1, n_predict)],
    ]


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> MLPSpeculator:
    source.preferred_files = spec.weight_files
    env = source_environment(spec.config, source.config, source.label)
    fields = map_fields(spec.config.fields, env, f"{source.label}: config")
    if fields["top_k_tokens_per_head"] is None:
        del fields["top_k_tokens_per_head"]
    try:
        fingerprint: dict[str, Any] = {"vocab_size": env["vocab_size"]}  # the verifier's vocabulary
        config = MLPSpeculatorConfig(**fields, **fingerprint)
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{source.label}: the converted config is invalid: {err}") from err
    apply_overrides(config, ctx.overrides, source.label)
    bind_reference(config, ctx, source.label, env["vocab_size"], config.emb_dim, "MLP speculator")

    shape_env = {**env, "inner": config.inner_size, "n_predict": config.n_predict}
    layout = expand_layout(spec.tensors, shape_env, source.label)
    tensors, origin = rename_tensors(source.tensors(), layout, source.label, ctx.log)
    dtype = check_tensors(tensors, origin, layout, shape_env, source.label)
    if config.tie_weights:
        for group in tied_groups(config.n_predict):
            first = tensors[group[0]]
            for name in group[1:]:
                if not same_bits(tensors[name], first):
                    raise ConversionError(
                        f"{source.label}: tie_weights is true but tensor {origin[name]!r} differs from {origin[group[0]]!r} "
                        "(fms-extras shares one parameter for them); the checkpoint is inconsistent with its config"
                    )
        ctx.log("tie_weights: every tied copy equals the first (checked)")
    return build_model(MLPSpeculator, config, tensors, origin, dtype, source.label)


def native_config(model: MLPSpeculator) -> dict[str, Any]:
    config = model.config
    return {
        "architectures": ["MLPSpeculatorPreTrainedModel"],
        "model_type": "mlp_speculator",
        "vocab_size": config.vocab_size,
        "emb_dim": config.emb_dim,
        "inner_dim": config.inner_dim,
        "n_predict": config.n_predict,
        "top_k_tokens_per_head": list(config.top_k_tokens_per_head or []),
        "n_candidates": config.n_candidates,
        "tie_weights": config.tie_weights,
        "scale_input": config.scale_input,
        "torch_dtype": str(model.dtype).removeprefix("torch."),
    }


def export_checkpoint(folder: Path, model: MLPSpeculator, spec: FormatSpec, ctx: Any) -> None:
    tensors: dict[str, torch.Tensor] = {
        f"speculator.{name}": tensor.detach().clone() for name, tensor in model.state_dict().items()
    }
    if model.config.speculative_tokens != model.config.n_predict:
        ctx.log(
            f"note: speculative_tokens {model.config.speculative_tokens} is not written (the mlp_speculator config has "
            f"no such field): vLLM drafts up to n_predict = {model.config.n_predict} tokens; choose the length with "
            "num_speculative_tokens"
        )
    write_native(folder, native_config(model), tensors)
    check_reimport(folder, model, spec, sys.modules[__name__], "vllm")
