"""Flat-config block drafters -> ours: z-lab DFlash (`DFlashDraftModel`, e.g. z-lab/Qwen3-8B-DFlash-b16,
`specs/dflash_zlab.yaml`) and DSpark for dense targets as deepseek-ai publishes it and vLLM loads it
(`DSparkDraftModel` / `Qwen3DSparkModel`, e.g. deepseek-ai/dspark_qwen3_8b_block7, `specs/dspark_dense.yaml`).

The facts live in the specs: config.json IS the draft layers' Qwen3 config (so it becomes
`transformer_layer_config`, less the drafter's keys), the spec's `section_first` keys are read from `dflash_config`
first, else from the top level (one set in both places with different values is refused), `target_layer_ids` name
the verifier's `hidden_states[i + 1]` (ours: i + 1; z-lab concatenates them in their listed order, so `fc.weight`'s
column blocks are reordered with the ids), and the embedding and a full-size vocabulary's lm_head are the
verifier's. The spec's family picks the model (DFlash or DSpark). The rest is the shared assembly
(`eagle3.finish`). The `speculators` 0.9 formats (`specs/speculators_dflash.yaml`, `speculators_dspark.yaml`) are
read and written by `speculators.py`.
"""

from __future__ import annotations

from typing import Any

from ..models.dflash import DFlashSpeculator
from ..models.dspark import DSparkSpeculatorConfig
from . import eagle3
from .formats import FormatSpec
from .sources import Source

CONFIDENCE = "confidence_head."


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> DFlashSpeculator:
    source.preferred_files = spec.weight_files
    config, aux = eagle3.config_from_spec(source, spec, ctx.overrides)
    config.speculative_tokens = config.tokens_per_block  # what a block proposes, as speculators' converter writes
    config.sliding_window_non_causal = source.config.get("is_causal") is False  # every layer bidirectional
    layer = config.transformer_layer_config
    if "sliding_attention" in (getattr(layer, "layer_types", None) or []):
        ctx.log(
            f"warning: {source.label} has sliding_attention layers: {spec.title} limits each block slot's context to "
            f"the sliding_window ({layer.sliding_window}) positions before that slot, DFlash in speculators and here "
            f"to those before the block, so the drafts agree while the context holds at most "
            f"{max(0, layer.sliding_window - config.block_size)} tokens"
        )
    tensors = source.tensors()
    if isinstance(config, DSparkSpeculatorConfig):
        tensors = confidence_head_as_served(config, tensors, source.label, ctx.log)
    return eagle3.finish(config, tensors, spec, ctx, source.label, aux_from_source=aux)


def confidence_head_as_served(
    config: DSparkSpeculatorConfig, tensors: dict[str, Any], label: str, log: Any
) -> dict[str, Any]:
    """DSpark's confidence head as vLLM's dense loader keeps it (qwen3_dspark.py `load_weights`): only when
    `enable_confidence_head` is set AND the file holds its tensors; otherwise the head is off and any of its
    tensors are dropped, each case said."""
    stored = sorted(name for name in tensors if name.startswith(CONFIDENCE))
    if config.enable_confidence_head and not stored:
        config.enable_confidence_head = False
        log(f"{label}: enable_confidence_head is true but the file holds no {CONFIDENCE}* tensors: no confidence head")
    elif stored and not config.enable_confidence_head:
        log(f"dropping {', '.join(stored)} (enable_confidence_head is false or absent: the head is off)")
        tensors = {name: tensor for name, tensor in tensors.items() if not name.startswith(CONFIDENCE)}
    return tensors
