"""SGLang's own layouts (0.5.23), which SGLang reads in place of the speculators format it has no reader for:
EAGLE-3 drafts as `LlamaForCausalLMEagle3` (`specs/sglang.yaml`: import, and `--to sglang`) and DFlash drafts as
`DFlashDraftModel`, z-lab's layout (`--to sglang`, read back by `specs/dflash_zlab.yaml`). The specs list what SGLang
reads, key by key, and where; this module writes it:

- EAGLE-3: config.json is the draft layer's Llama config plus `architectures`, `draft_vocab_size`,
  `target_hidden_size`, `eagle_config` {`eagle_aux_hidden_state_layer_ids` (ours - 1: SGLang numbers layer
  outputs), `use_aux_hidden_state`, `norm_before_fc`}, `fc_norm`, `norm_output`; tensors as ours with `layers.0.*`
  named `midlayer.*`; `d2t` / `t2d` exactly when the draft vocabulary is smaller (SGLang reads `d2t` as offsets).
- DFlash: config.json is the draft layers' Qwen3 config plus `architectures`, `dflash_config` {`block_size`,
  `mask_token_id`, `target_layer_ids` (ours - 1)}, `block_size` again at the top level (what llama.cpp's converter
  reads), `num_target_layers`, `is_causal: false` when every layer is bidirectional; the tensors are ours.

What SGLang cannot run as this package does is refused, naming the field; what it runs differently is warned. The
export is then read back with its import spec and compared tensor by tensor and field by field.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from . import eagle3
from .errors import ConversionError
from .formats import FormatSpec
from .output import check_reimport, write_native
from .sources import Source

IGNORED_LAYER_KEYS = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> Any:
    """An EAGLE-3 draft in SGLang's layout -> our model (the spec's facts, the shared assembly)."""
    return eagle3.import_checkpoint(source, spec, ctx)


def export_checkpoint(folder: Path, model: Any, spec: FormatSpec, ctx: Any) -> None:
    """Replace our freshly saved checkpoint in `folder` by SGLang's layout of the draft's family, then read it back
    with `spec` (the import spec of that layout) and compare."""
    config, tensors = (_eagle3 if model.config.speculators_model_type == "eagle3" else _dflash)(model, ctx)
    write_native(folder, config, tensors)
    check_reimport(folder, model, spec, importlib.import_module(f"{__package__}.{spec.module}"), "sglang")


def _refuse(problems: list[str], title: str) -> None:
    if problems:
        raise ConversionError(
            f"export to sglang: SGLang 0.5.23 cannot run this {title} draft as it is: " + "; ".join(problems)
        )


def _layer(model: Any) -> dict[str, Any]:
    """The draft layer config as config.json keys, with the legacy rope keys readers on transformers 4.x use."""
    layer = {k: v for k, v in model.config.transformer_layer_config.to_dict().items() if k not in IGNORED_LAYER_KEYS}
    rope = layer.get("rope_parameters") or {}
    if "rope_theta" in rope:
        layer["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        layer["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return layer


def _sglang_layer_ids(model: Any, field: str, log: Any) -> tuple[list[int], list[str]]:
    """SGLang's layer ids (ours - 1) of the verifier states the draft reads, and the problems: SGLang captures the
    inputs of layers 1..L-1 only (its id -1 is refused by its DFlash reader, id L - 1 is never captured)."""
    ids = sorted(model.config.aux_layer_ids)
    layers = model.config.verifier.get("num_hidden_layers")
    if layers is None:
        log(
            f"warning: the verifier's layer count L is not recorded, so {field} {ids} were not checked against L - 1, "
            "the last that SGLang reads (pass --verifier to check)"
        )
    top = layers - 1 if layers is not None else max(ids)
    bad = [i for i in ids if not 1 <= i <= top]
    why = (
        f"{field}: {bad} of {ids} have no SGLang id: SGLang reads the output of layer i - 1 as hidden_states[i] only "
        f"for i in 1..L-1 (hidden_states[0] is the embedding, hidden_states[L] the last layer's output after the final "
        f"norm; L = {layers})"
    )
    return [i - 1 for i in ids], [why] if bad else []


def _eagle3(model: Any, ctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    config = model.config
    layer = _layer(model)
    ids, problems = _sglang_layer_ids(model, "eagle_aux_hidden_state_layer_ids", ctx.log)
    if layer.get("model_type") != "llama":
        problems.append(
            f"transformer_layer_config.model_type: {layer.get('model_type')!r}; SGLang's LlamaForCausalLMEagle3 runs a "
            "llama layer (no q/k norms)"
        )
    if config.norm_before_residual:
        problems.append("norm_before_residual: true; SGLang adds the fc output before hidden_norm as the residual")
    for key in ("attention_bias", "mlp_bias"):
        if layer.get(key):
            problems.append(f"transformer_layer_config.{key}: true; SGLang's EAGLE-3 layer has no such biases")
    if layer.get("hidden_act", "silu") != "silu":
        problems.append(
            f"transformer_layer_config.hidden_act: {layer.get('hidden_act')!r}; SGLang's LlamaMLP runs silu only"
        )
    _refuse(problems, "EAGLE-3")
    if config.embed_requires_grad:
        ctx.log(
            "warning: embed_requires_grad is true (the draft trained its own embedding), but SGLang replaces the draft's "
            "embed_tokens by the verifier's when target_hidden_size equals hidden_size: its proposals then differ "
            "from this draft's (the output stays the verifier's, acceptance may drop)"
        )
    out = {
        **layer,
        "architectures": ["LlamaForCausalLMEagle3"],
        "tie_word_embeddings": False,
        "draft_vocab_size": config.draft_vocab_size,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": ids,
            "use_aux_hidden_state": True,
            "norm_before_fc": config.norm_before_fc,
        },
        "fc_norm": config.fc_norm,
        "norm_output": config.norm_output,
        "embed_requires_grad": config.embed_requires_grad,
        "torch_dtype": str(model.dtype).removeprefix("torch."),
    }
    if config.target_hidden_size is not None:
        out["target_hidden_size"] = config.target_hidden_size
    tensors = {
        ("midlayer." + k[len("layers.0.") :] if k.startswith("layers.0.") else k): v
        for k, v in model.state_dict().items()
    }
    return out, tensors


def _dflash(model: Any, ctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    config = model.config
    layer = _layer(model)
    ids, problems = _sglang_layer_ids(model, "aux_hidden_state_layer_ids", ctx.log)
    vocab = layer.get("vocab_size")
    if config.draft_vocab_size != vocab:
        problems.append(
            f"draft_vocab_size: {config.draft_vocab_size} < the verifier's {vocab}; SGLang's DFlash has no lm_head of its "
            "own (it uses the verifier's and ignores lm_head and d2t without a word)"
        )
    if config.sample_from_anchor:
        problems.append("sample_from_anchor: true; SGLang's DFlash proposes block positions 1..block_size-1 only")
    if config.target_hidden_size not in (None, layer.get("hidden_size")):
        problems.append(
            f"target_hidden_size: {config.target_hidden_size}; SGLang sizes fc from the draft's hidden_size "
            f"({layer.get('hidden_size')})"
        )
    if layer.get("model_type") != "qwen3":
        problems.append(
            f"transformer_layer_config.model_type: {layer.get('model_type')!r}; the layout is a Qwen3 config"
        )
    _refuse(problems, "DFlash")
    if "sliding_attention" in (layer.get("layer_types") or []):
        ctx.log(
            "warning: the draft has sliding_attention layers: SGLang limits each block slot's context to the "
            f"sliding_window ({layer.get('sliding_window')}) positions before that slot, this package to those before "
            "the block, so they agree while the context holds at most sliding_window - block_size tokens"
        )
    out = {
        **layer,
        "architectures": ["DFlashDraftModel"],
        "block_size": config.block_size,
        "dflash_config": {
            "block_size": config.block_size,
            "mask_token_id": config.mask_token_id,
            "target_layer_ids": ids,
        },
        "num_target_layers": config.verifier.get("num_hidden_layers"),
        "torch_dtype": str(model.dtype).removeprefix("torch."),
    }
    if config.target_hidden_size is not None:
        out["target_hidden_size"] = config.target_hidden_size
    if config.sliding_window_non_causal:
        out["is_causal"] = False  # every layer bidirectional within the block (SGLang: ENCODER_ONLY attention)
    return out, dict(model.state_dict())
