"""Medusa heads -> ours: Medusa-1 (`medusa_lm_head.pt`), Medusa-2 (`medusa_head.*` inside a fine-tuned
model) and vLLM's native Medusa layout; and `--to vllm`.

The facts live in `specs/medusa.yaml`, `specs/medusa2.yaml` and `specs/medusa_vllm.yaml`. What this
module adds to them:

- the number of heads is counted from the tensors (the published Vicuna configs say 2 heads over files
  holding 5; the original loader hard-codes 5): a difference with the config is reported, never fatal;
- `{i}.{n}.weight` must be head i's lm_head, i.e. n = medusa_num_layers (anything else is an error
  naming the tensor);
- with more than one layer per head the original code repeats ONE ResBlock, so its files hold equal
  copies: they are compared and the result reported (copies that differ cannot come from that code; they
  are converted layer by layer, as vLLM reads them, with a warning);
- hidden size and vocabulary come from the lm_head shapes (Medusa-1 configs have neither), and are
  checked against `--verifier`; the verifier reference is `base_model_name_or_path` (Medusa-1) or the
  source itself (Medusa-2, whose fine-tuned model is the verifier);
- vLLM's layout without `medusa_fc_bias: true` means no biases (vLLM drops them): they are read as
  zeros, with a warning when the file holds non-zero ones.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import FINGERPRINT_FIELDS, SpeculatorConfigError
from ..models.medusa import MedusaSpeculator, MedusaSpeculatorConfig
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
from .tensors import check_tensors, expand_layout, our_name, rename_tensors

HEAD = re.compile(r"(?:blocks|lm_heads)\.(\d+)\.")


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> MedusaSpeculator:
    source.preferred_files = spec.weight_files
    env = source_environment(spec.config, source.config, source.label)
    fields = map_fields(spec.config.fields, env, f"{source.label}: config")
    layers = int(fields["medusa_num_layers"])
    raw = source.tensors(spec.tensors.keep_prefixes)
    if not raw:
        raise ConversionError(
            f"{source.label}: no Medusa head tensors found (looked for {spec.tensors.keep_prefixes or 'all'})"
        )

    # heads: counted from the tensors; hidden size and vocabulary from head 0's lm_head
    renamed = {our_name(name, spec.tensors): name for name in raw}
    heads = len({int(m.group(1)) for name in renamed if (m := HEAD.match(name))})
    head0 = renamed.get("lm_heads.0.weight")
    if head0 is None:
        raise ConversionError(f"{source.label}: no lm_head for head 0 (expected {spec.name} name of lm_heads.0.weight)")
    vocab, hidden = (int(n) for n in raw[head0].shape)
    if spec.name == "medusa_vllm":
        vocab, hidden, heads = (
            int(env["vocab_size"]),
            int(env["hidden_size"]),
            _check_vllm_config(env, heads, source.label),
        )
    declared = env.get("medusa_num_heads")
    if declared is not None and declared != heads:
        ctx.log(
            f"warning: config.json says medusa_num_heads={declared} but the checkpoint holds {heads} heads; using "
            f"{heads} (the published Vicuna configs say 2 over 5 heads, and the original loader hard-codes 5)"
        )
    for ours, name in renamed.items():
        if ours.startswith("lm_heads.") and spec.tensors.patterns and not name.endswith(f".{layers}.weight"):
            raise ConversionError(
                f"{source.label}: tensor {name!r} is read as {ours}, but head lm_heads are {{i}}.{layers}.weight with "
                f"medusa_num_layers={layers}: the checkpoint does not match its config"
            )

    shape_env = {"heads": heads, "layers": layers, "hidden": hidden, "vocab": vocab}
    layout = expand_layout(spec.tensors, shape_env, source.label)
    tensors, origin = rename_tensors(raw, layout, source.label, ctx.log)
    dtype = check_tensors(tensors, origin, layout, shape_env, source.label)
    if spec.name == "medusa_vllm":
        _vllm_biases(tensors, env, heads, layers, hidden, dtype, ctx.log)
    if layers > 1:
        _shared_resblock(tensors, origin, heads, layers, ctx.log)

    fingerprint: dict[str, Any] = {"vocab_size": vocab}  # the verifier's vocabulary
    try:
        config = MedusaSpeculatorConfig(
            hidden_size=hidden, medusa_num_heads=heads, medusa_num_layers=layers, **fingerprint
        )
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{source.label}: the converted config is invalid: {err}") from err
    apply_overrides(config, ctx.overrides, source.label)
    _source_reference(config, spec, source, env)
    bind_reference(config, ctx, source.label, vocab, hidden, "Medusa heads")
    return build_model(MedusaSpeculator, config, tensors, origin, dtype, source.label)


def _check_vllm_config(env: dict[str, Any], counted: int, label: str) -> int:
    if env["truncated_vocab_size"] != env["vocab_size"]:
        raise ConversionError(
            f"{label}: truncated_vocab_size {env['truncated_vocab_size']} < vocab_size {env['vocab_size']} (a token_map "
            "draft vocabulary) has no equivalent in this format"
        )
    if int(env["num_heads"]) != counted:
        raise ConversionError(f"{label}: config num_heads={env['num_heads']} but the checkpoint holds {counted} heads")
    return counted


def _vllm_biases(
    tensors: dict[str, torch.Tensor], env: dict[str, Any], heads: int, layers: int, hidden: int, dtype: Any, log: Any
) -> None:
    names = [f"blocks.{i}.layers.{j}.bias" for i in range(heads) for j in range(layers)]
    if env["medusa_fc_bias"]:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ConversionError(f"medusa_fc_bias is true but the checkpoint lacks {missing}")
        return
    if any(bool(tensors[n].any()) for n in names if n in tensors):
        log(
            "warning: the checkpoint holds non-zero residual-layer biases but medusa_fc_bias is not true, so vLLM "
            "builds the layers without a bias and ignores them; converted as vLLM runs it (zero biases)"
        )
    for name in names:
        tensors[name] = torch.zeros(hidden, dtype=dtype)


def _shared_resblock(
    tensors: dict[str, torch.Tensor], origin: dict[str, str], heads: int, layers: int, log: Any
) -> None:
    differ = []
    for i in range(heads):
        for j in range(1, layers):
            for part in ("weight", "bias"):
                first, other = f"blocks.{i}.layers.0.{part}", f"blocks.{i}.layers.{j}.{part}"
                if not same_bits(tensors[first], tensors[other]):
                    differ.append(origin.get(other, other))
    if differ:
        log(
            f"warning: the original Medusa code repeats ONE ResBlock per head ([ResBlock] * n), so its layers are equal, "
            f"but {differ} differ from layer 0; converted layer by layer (as vLLM reads them)"
        )
    else:
        log(
            f"the {layers} layers of each head are equal copies (the original code shares one ResBlock); kept as copies"
        )


def _source_reference(config: MedusaSpeculatorConfig, spec: FormatSpec, source: Source, env: dict[str, Any]) -> None:
    """The verifier named by the source itself: Medusa-1's base_model_name_or_path; Medusa-2's own model."""
    verifier = config.verifier
    if spec.name == "medusa" and env.get("base_model_name_or_path"):
        verifier["name_or_path"] = env["base_model_name_or_path"]
    elif spec.name == "medusa2":
        verifier["name_or_path"] = source.label
        verifier["architectures"] = list(source.config.get("architectures") or [])
        for field in FINGERPRINT_FIELDS:
            if source.config.get(field) is not None:
                verifier[field] = source.config[field]


# --------------------------------------------------------------------------------------------------
# --to vllm
# --------------------------------------------------------------------------------------------------
def native_config(model: MedusaSpeculator) -> dict[str, Any]:
    config = model.config
    return {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_heads": config.medusa_num_heads,
        "num_hidden_layers": config.medusa_num_layers,
        "max_paths": 64,
        "topk": 10,
        "truncated_vocab_size": config.vocab_size,
        "medusa_fc_bias": True,  # vLLM's default (false) would drop the residual-layer biases
        "torch_dtype": str(model.dtype).removeprefix("torch."),
    }


def export_checkpoint(folder: Path, model: MedusaSpeculator, spec: FormatSpec, ctx: Any) -> None:
    tensors = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    write_native(folder, native_config(model), tensors)
    check_reimport(folder, model, spec, sys.modules[__name__], "vllm")
