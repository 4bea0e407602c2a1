"""EAGLE-1 / EAGLE-2 / HASS research drafts (SafeAILab/EAGLE `cnets1.py`) -> ours, and `--to vllm`.

The facts live in `specs/eagle.yaml`; this module applies them:

- import: the llama-style config.json (with the research code's defaults) becomes our
  `EagleSpeculatorConfig`; `fc_bias` follows the config's `bias` (default true). The tensors keep
  their names (our `eagle` family uses the research layout). As the research loader does, a missing
  `embed_tokens` is the verifier's (`--verifier` required), and a `fc.bias` under `bias: false` is
  ignored (reported). A `fc.bias` missing under `bias: true` is an error: the research code would run
  with a randomly initialised bias.
- export (`--to vllm`): vLLM's native EAGLE-1 layout IS the research layout, so the export writes the
  research config.json + model.safetensors. vLLM drops `fc.bias` silently; the export keeps it in the
  file (lossless for the research code and for importing again) and warns when it is non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..config import SpeculatorConfigError, default_speculators_config
from ..models.eagle import EagleSpeculator, EagleSpeculatorConfig
from . import eagle3
from .errors import ConversionError
from .expressions import map_fields, source_environment
from .formats import FormatSpec
from .output import apply_overrides, bind_reference, build_model, check_reimport, write_native
from .sources import Source
from .tensors import check_tensors, rename_tensors

EMBED = "embed_tokens.weight"


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> EagleSpeculator:
    source.preferred_files = spec.weight_files
    env = source_environment(spec.config, source.config, source.label)
    layer = map_fields(spec.config.layer, env, f"{source.label}: transformer_layer_config")
    fields = map_fields(spec.config.fields, env, f"{source.label}: config")
    try:
        config = EagleSpeculatorConfig(
            transformer_layer_config=layer, speculators_config=default_speculators_config("eagle"), **fields
        )
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{source.label}: the converted config is invalid: {err}") from err
    apply_overrides(config, ctx.overrides, source.label)

    tensors, origin = rename_tensors(source.tensors(), spec.tensors, source.label, ctx.log)
    if "fc.bias" in tensors and not config.fc_bias:
        ctx.log(
            "dropping fc.bias: config.json says bias=false, and the research loader (load_state_dict(strict=False)) "
            "ignores it then; the draft is converted as the research code runs it"
        )
        del tensors["fc.bias"]
    if "fc.bias" not in tensors and config.fc_bias:
        raise ConversionError(
            f"{source.label}: config.json says bias=true (or has no 'bias', whose research default is true) but the "
            "checkpoint has no fc.bias; the research code would run with a randomly initialised bias. If the draft "
            'was trained without one, set "bias": false in its config.json.'
        )
    layer_config = config.transformer_layer_config
    bind_reference(config, ctx, source.label, layer_config.vocab_size, layer_config.hidden_size, "EAGLE draft")
    shape_env = dict(layer_config.to_dict())
    dtype = check_tensors(tensors, origin, spec.tensors, shape_env, source.label)
    if EMBED not in tensors:
        add_verifier_embedding(config, tensors, spec, ctx, dtype, source.label)
    return build_model(EagleSpeculator, config, tensors, origin, dtype, source.label)


def add_verifier_embedding(
    config: EagleSpeculatorConfig, tensors: dict[str, torch.Tensor], spec: FormatSpec, ctx: Any, dtype: Any, label: str
) -> None:
    if ctx.verifier is None:
        raise ConversionError(
            f"{label}: the checkpoint has no {EMBED} ({spec.embedding.why}); pass --verifier ID_OR_PATH so that the "
            "verifier's input embedding can be copied into the draft"
        )
    eagle3.add_embedding(config, tensors, spec, ctx, dtype, label)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# --to vllm: the research layout, which vLLM reads natively
# --------------------------------------------------------------------------------------------------
def native_config(model: EagleSpeculator) -> dict[str, Any]:
    """config.json of the research / vLLM EAGLE-1 layout: a llama config of the one draft layer."""
    layer = model.config.transformer_layer_config
    if layer.model_type != "llama":
        raise ConversionError(
            f"export to vllm: the draft layer is {layer.model_type!r}; vLLM's EAGLE-1 reader "
            "(EagleLlamaForCausalLM) and the research code build llama layers only"
        )
    if layer.head_dim != layer.hidden_size // layer.num_attention_heads:
        raise ConversionError(
            f"export to vllm: head_dim {layer.head_dim} differs from hidden_size // num_attention_heads; the research "
            "EAGLE code ignores head_dim, so this draft has no research layout"
        )
    rope = dict(layer.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"export to vllm: RoPE scaling {rope} has no research EAGLE-1 equivalent")
    verifier = model.config.verifier
    # `bias` means the fc bias to the research code (absent = true) but attention biases to vLLM's llama
    # layer (absent = false): an explicit `"bias": true` gives vLLM's draft uninitialised (NaN) q/k/v/o
    # biases (seen in vLLM 0.32, conversion/check_vllm_native.py). So the key is written only when false.
    fc_bias = {} if model.config.fc_bias else {"bias": False}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **fc_bias,
        "hidden_act": layer.hidden_act,
        "hidden_size": layer.hidden_size,
        "head_dim": layer.head_dim,
        "intermediate_size": layer.intermediate_size,
        "max_position_embeddings": layer.max_position_embeddings,
        "num_attention_heads": layer.num_attention_heads,
        "num_key_value_heads": layer.num_key_value_heads,
        "num_hidden_layers": 1,
        "rms_norm_eps": layer.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": layer.vocab_size,
        "bos_token_id": verifier.get("bos_token_id"),
        "eos_token_id": verifier.get("eos_token_id"),
        "pad_token_id": verifier.get("pad_token_id"),
        "torch_dtype": str(model.dtype).removeprefix("torch."),
    }


def export_checkpoint(folder: Path, model: EagleSpeculator, spec: FormatSpec, ctx: Any) -> None:
    config = native_config(model)
    tensors = dict(model.state_dict())
    bias = tensors.get("fc.bias")
    if bias is not None and bool(bias.any()):
        ctx.log(
            "WARNING: this draft's fc has a non-zero bias (max |b| = "
            f"{float(bias.abs().max()):.3g}). vLLM's EAGLE-1 reader builds fc without a bias and DROPS fc.bias "
            "silently, so vLLM will propose different (worse) tokens than this draft. The bias stays in the file "
            "(the research code and speculators-hf read it)."
        )
    write_native(folder, config, tensors)
    check_reimport(folder, model, spec, sys.modules[__name__], "vllm")
