"""z-lab DFlash drafts (`DFlashDraftModel`, e.g. z-lab/Qwen3-8B-DFlash-b16) -> ours.

The facts live in `specs/dflash_zlab.yaml`: config.json IS the draft layers' Qwen3 config (so it becomes
`transformer_layer_config`, less the DFlash keys), the DFlash keys are read from `dflash_config` first, else from
the top level (as z-lab's code; `block_size` sits at the top level in older files), and one set in both places
with different values is refused; `dflash_config.target_layer_ids` name the verifier's `hidden_states[i + 1]`
(ours: i + 1), concatenated in their listed order where ours are in layer order (so `fc.weight`'s column blocks
are reordered with the ids), and the tensors are the draft body only (the embedding and lm_head are the verifier's: a
full-size draft vocabulary). The rest is the shared assembly (`eagle3.finish`). The `speculators` 0.9 DFlash
format (`specs/speculators_dflash.yaml`) is read and written by `speculators.py`.
"""

from __future__ import annotations

from typing import Any

from ..models.dflash import DFlashSpeculator
from . import eagle3
from .formats import FormatSpec
from .sources import Source


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> DFlashSpeculator:
    source.preferred_files = spec.weight_files
    config, aux = eagle3.config_from_spec(source, spec, ctx.overrides)
    config.speculative_tokens = config.tokens_per_block  # what a block proposes, as speculators' converter writes
    config.sliding_window_non_causal = source.config.get("is_causal") is False  # z-lab: every layer bidirectional
    layer = config.transformer_layer_config
    if "sliding_attention" in (getattr(layer, "layer_types", None) or []):
        ctx.log(
            f"warning: {source.label} has sliding_attention layers: z-lab limits each block slot's context to the "
            f"sliding_window ({layer.sliding_window}) positions before that slot, DFlash in speculators and here to "
            f"those before the block, so the drafts agree while the context holds at most "
            f"{max(0, layer.sliding_window - config.block_size)} tokens"
        )
    return eagle3.finish(config, source.tensors(), spec, ctx, source.label, aux_from_source=aux)
