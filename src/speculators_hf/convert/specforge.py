"""SpecForge / SGLang EAGLE-3 drafts (`LlamaForCausalLMEagle3`) -> ours.

Same maths as research EAGLE-3; what differs is declared in `specs/specforge.yaml`: the config may set
`head_dim`, `rope_theta`/`rope_scaling`, `fc_norm` and `eagle_config.eagle_aux_hidden_state_layer_ids`
(SGLang numbering: id i is the OUTPUT of layer i, so ours is i + 1), `norm_output` must be true (its
default), and `embed_tokens` is present in SpecForge's HF export but dropped by its SGLang export.
"""

from __future__ import annotations

from typing import Any

from ..models.eagle3 import Eagle3Speculator
from . import eagle3
from .formats import FormatSpec
from .sources import Source


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> Eagle3Speculator:
    return eagle3.import_checkpoint(source, spec, ctx)
