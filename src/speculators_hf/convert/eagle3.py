"""Research EAGLE-3 (SafeAILab/EAGLE) -> ours, and the assembly every importer of a draft that reads verifier
hidden states by layer id shares (EAGLE-3, P-EAGLE, DFlash: `convert/dflash.py`).

The facts (tensor names and shapes, config defaults of the original code, which verifier layers are
read) live in `specs/eagle3.yaml`; this module only applies them:

1. `config_from_spec`: the source config.json, with the spec's defaults, becomes the config of the
   spec's family (transformer_layer_config + flat fields + aux layer ids).
2. `finish`: the tensors renamed (repeated `layers.{i}` expanded over the draft's layers), overrides
   (`--set`), the verifier (fingerprint filled from `--verifier`, vocab / hidden size / layer count
   checked), the aux layer ids (default 2, L//2, L-3 of the verifier, made distinct; checked by the rule
   loading applies; fc's column blocks put in layer order for a source that lists them otherwise), tensor shapes and
   dtypes (errors name the tensor and both shapes), the draft vocabulary mapping (`d2t` kept exactly
   when the draft vocabulary is smaller; a full-size one's lm_head dropped where the spec says the
   draft uses the verifier's), the embedding (the verifier's when the source has none and the format
   stores one), and finally a model whose state dict is exactly the source's tensors.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..config import SpeculatorConfigError
from ..models import FAMILIES
from ..models.draft_vocab import vocab_map_problems
from ..models.eagle3 import Eagle3Speculator, aux_layer_problems, default_aux_layer_ids
from . import output
from .errors import ConversionError
from .expressions import evaluate, map_fields, source_environment
from .formats import FormatSpec
from .output import apply_overrides, bind_reference
from .sources import Source
from .tensors import check_tensors, expand_layout, rename_tensors

EMBED = "embed_tokens.weight"
HEAD = "lm_head.weight"
AUX_FIELDS = ("eagle_aux_hidden_state_layer_ids", "aux_hidden_state_layer_ids")


def import_checkpoint(source: Source, spec: FormatSpec, ctx: Any) -> Eagle3Speculator:
    """A llama-style EAGLE-3 checkpoint (research or SpecForge) -> our model, following `spec`."""
    source.preferred_files = spec.weight_files
    config, aux = config_from_spec(source, spec)
    return finish(config, source.tensors(), spec, ctx, source.label, aux_from_source=aux)


def aux_field(config: Any) -> str:
    """Our config field naming the verifier hidden states the draft reads (`eagle_aux_hidden_state_layer_ids`
    for EAGLE-3 and P-EAGLE, `aux_hidden_state_layer_ids` for DFlash)."""
    fields = config.fields_schema().model_fields
    return next(name for name in AUX_FIELDS if name in fields)


def config_from_spec(source: Source, spec: FormatSpec, overrides: Collection[str] = ()) -> tuple[Any, list[int] | None]:
    """The config of the spec's family. A `required` source key counts as given when `overrides` (`--set`)
    names the field the spec reads from it."""
    fields_from = {key: value[1:] for key, value in spec.config.fields.items() if str(value).startswith("=")}
    provided = {*overrides, *(fields_from[key] for key in overrides if key in fields_from)}
    env = source_environment(spec.config, source.config, source.label, provided)
    base = spec.config.layer_from_source_except
    layer = {k: v for k, v in env.items() if k not in base} if base is not None else {}
    layer.update(map_fields(spec.config.layer, env, f"{source.label}: transformer_layer_config"))
    fields = map_fields(spec.config.fields, env, f"{source.label}: config")
    aux: list[int] | None = None
    if spec.aux_layers is not None and spec.aux_layers.source is not None:
        expression = spec.aux_layers.source.removeprefix("=")
        ids = evaluate(expression, env, f"{source.label}: aux layers", missing=None)
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise ConversionError(f"{source.label}: {expression} must be a list of layer ids, got {ids!r}")
            aux = [i + spec.aux_layers.offset for i in ids]
    config_class = FAMILIES[spec.family].config_class
    try:
        config = config_class(
            transformer_layer_config=layer,
            **{aux_field(config_class): aux},
            **fields,
        )
    except (SpeculatorConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{source.label}: the converted config is invalid: {err}") from err
    return config, aux


# --------------------------------------------------------------------------------------------------
# the shared assembly
# --------------------------------------------------------------------------------------------------
def resolve_aux_layers(config: Any, spec: FormatSpec, label: str, log: Any) -> None:
    """The aux layer ids, by the rule loading applies (`aux_layer_problems`: distinct, 0..L, L the post-norm last
    state), or the verifier's default; stored ascending, the order the draft concatenates the states in."""
    field = aux_field(config)
    layers = config.verifier.get("num_hidden_layers")
    ids = getattr(config, field)
    if ids is None:
        if layers is None:
            raise ConversionError(
                f"{label}: the verifier layers this draft reads are not recorded "
                f"({spec.aux_layers.why if spec.aux_layers else 'no aux layer ids'}); pass --verifier so that the "
                "default 2, L//2, L-3 of its L layers can be recorded"
            )
        ids = default_aux_layer_ids(layers)
        log(f"aux layers: verifier hidden_states {ids} (default 2, L//2, L-3 of L={layers}, made distinct)")
    problems = aux_layer_problems(field, ids, layers)
    if problems:
        raise ConversionError(f"{label}: " + "; ".join(line.strip() for line in problems))
    setattr(config, field, sorted(ids))


FEATURE_TENSORS = ("fc.weight", "mask_hidden")  # [..., n_aux * feature_size]: one block per verifier state read


def reorder_features(
    tensors: dict[str, torch.Tensor], listed: list[int], width: int, origin: Mapping[str, str], log: Any
) -> None:
    """For a source that concatenates the verifier states in its listed order (`aux_layers.order: listed`), put
    the `width`-wide blocks of the tensors that read them in ascending layer order, the draft's, so that the
    draft computes exactly what the source did."""
    order = sorted(range(len(listed)), key=listed.__getitem__)
    if order == list(range(len(listed))):
        return
    for name in FEATURE_TENSORS:
        if name in tensors:
            blocks = tensors[name].split(width, dim=-1)
            tensors[name] = torch.cat([blocks[i] for i in order], dim=-1)
            log(
                f"{origin.get(name, name)}: column blocks reordered from the listed verifier states {listed} to "
                f"layer order {sorted(listed)}, the order the draft concatenates them in"
            )


def shape_environment(config: Any) -> dict[str, Any]:
    env = dict(config.transformer_layer_config.to_dict())
    if env.get("head_dim") is None:
        env["head_dim"] = env["hidden_size"] // env["num_attention_heads"]
    if env.get("num_key_value_heads") is None:
        env["num_key_value_heads"] = env["num_attention_heads"]
    schema = type(config).fields_schema()
    flat = {name: getattr(config, name) for name in (schema.model_fields if schema else ())}
    env.update({name: value for name, value in flat.items() if isinstance(value, int)})  # e.g. DSpark's markov_rank
    env.update(
        draft_vocab_size=config.draft_vocab_size,
        target_hidden_size=config.feature_size,
        n_aux=len(getattr(config, aux_field(config)) or [0, 1, 2]),
    )
    return env


def map_vocab(
    config: Any,
    tensors: dict[str, torch.Tensor],
    origin: dict[str, str],
    label: str,
    log: Any,
    policy: str = "drop_if_identity",
    full_vocab_head: str = "own",
) -> None:
    """Keep `d2t`/`t2d` exactly when the draft vocabulary is smaller than the verifier's; with a
    full-size draft vocabulary, identity mappings are dropped (`policy` from the spec's
    `vocab.full_vocab_mapping`; anything else refuses them), and so is lm_head when the draft then uses
    its verifier's (`full_vocab_head: verifier`)."""
    vd, v = config.draft_vocab_size, config.transformer_layer_config.vocab_size
    d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
    if vd == v and (d2t is not None or t2d is not None) and policy != "drop_if_identity":
        raise ConversionError(f"{label}: d2t/t2d present although the draft vocabulary is full-size ({vd})")
    if vd == v:
        if d2t is not None and bool(d2t.any()):
            raise ConversionError(
                f"{label}: {origin['d2t']!r} maps a full-size draft vocabulary ({vd}) to other ids; this permutation "
                "cannot be expressed in the speculators layout (d2t is allowed only for a smaller draft vocabulary)"
            )
        if t2d is not None and not bool(t2d.all()):
            raise ConversionError(
                f"{label}: {origin['t2d']!r} excludes tokens although the draft vocabulary is full-size"
            )
        for name in ("d2t", "t2d"):
            if name in tensors:
                del tensors[name]
                log(f"dropping {origin[name]} (identity mapping: the draft vocabulary is the verifier's)")
        if full_vocab_head == "verifier" and HEAD in tensors:
            del tensors[HEAD]
            log(f"dropping {origin[HEAD]} (a full-size draft vocabulary uses the verifier's lm_head)")
        return
    if d2t is None:
        raise ConversionError(
            f"{label}: the draft vocabulary ({vd}) is smaller than the verifier's ({v}) but there is no d2t tensor, "
            "so draft ids cannot be mapped to verifier ids"
        )
    d2t = d2t.to(torch.long)
    problems = vocab_map_problems(d2t, t2d, vd, v)
    if problems:
        names = f"{origin['d2t']!r}" + (f", {origin['t2d']!r}" if t2d is not None else "")
        raise ConversionError(f"{label}: invalid vocabulary map ({names}):\n" + "\n".join(problems))
    if t2d is None:
        log("t2d derived from d2t")
    derived = torch.zeros(v, dtype=torch.bool)
    derived[torch.arange(vd) + d2t] = True
    tensors["d2t"], tensors["t2d"] = d2t, derived


def add_embedding(
    config: Any,
    tensors: dict[str, torch.Tensor],
    spec: FormatSpec,
    ctx: Any,
    dtype: torch.dtype,
    label: str,
) -> None:
    if EMBED in tensors or EMBED not in spec.tensors.layout:  # DFlash always uses the verifier's
        return
    if spec.embedding.when_missing != "verifier":
        raise ConversionError(f"{label}: no {EMBED} in the checkpoint")
    if ctx.verifier is None:
        raise ConversionError(
            f"{label}: the checkpoint has no {EMBED} ({spec.embedding.why}); pass --verifier ID_OR_PATH so that the "
            "verifier's input embedding can be copied into the draft"
        )
    embedding = ctx.verifier.input_embedding(spec.embedding.verifier_keys)
    layer = config.transformer_layer_config
    want = (layer.vocab_size, layer.hidden_size)
    if tuple(embedding.shape) != want:
        raise ConversionError(
            f"{label}: the verifier's input embedding has shape {tuple(embedding.shape)}, the draft needs {EMBED} of "
            f"shape {want}"
        )
    name = f" {ctx.verifier.name_or_path}" if ctx.verifier.name_or_path else ""
    cast = f" (cast from {embedding.dtype} to the draft's {dtype})" if embedding.dtype != dtype else ""
    ctx.log(f"{EMBED} copied from the verifier{name}{cast}")
    tensors[EMBED] = embedding.to(dtype)


def finish(
    config: Any,
    source_tensors: Mapping[str, torch.Tensor],
    spec: FormatSpec,
    ctx: Any,
    label: str,
    aux_from_source: list[int] | None = None,
) -> Any:
    """Everything after the config mapping; see the module docstring."""
    layout = expand_layout(spec.tensors, config.transformer_layer_config.to_dict(), label)
    tensors, origin = rename_tensors(source_tensors, layout, label, ctx.log)
    if EMBED not in tensors and spec.embedding.when_missing == "verifier" and ctx.verifier is None:
        raise ConversionError(
            f"{label}: the checkpoint has no {EMBED} ({spec.embedding.why}); pass --verifier ID_OR_PATH so that the "
            "verifier's input embedding can be copied into the draft"
        )
    schema = type(config).fields_schema()
    settable = set(schema.model_fields if schema else ()) - {"transformer_layer_config"}
    apply_overrides(config, ctx.overrides, label, settable)
    layer = config.transformer_layer_config
    model_class = FAMILIES[config.family]
    bind_reference(config, ctx, label, layer.vocab_size, config.feature_size, f"{model_class.title} draft")
    listed = getattr(config, aux_field(config))
    resolve_aux_layers(config, spec, label, ctx.log)
    if aux_from_source is not None and spec.aux_layers is not None and spec.aux_layers.offset:
        ctx.log(
            f"aux layers: source ids {[i - spec.aux_layers.offset for i in aux_from_source]} -> verifier hidden_states "
            f"{getattr(config, aux_field(config))} ({spec.aux_layers.why})"
        )
    dtype = check_tensors(tensors, origin, layout, shape_environment(config), label)
    if listed is not None and spec.aux_layers is not None and spec.aux_layers.order == "listed":
        reorder_features(tensors, listed, config.feature_size, origin, ctx.log)
    vocab = spec.vocab
    map_vocab(
        config,
        tensors,
        origin,
        label,
        ctx.log,
        vocab.get("full_vocab_mapping", "error"),
        vocab.get("full_vocab_head", "own"),
    )
    add_embedding(config, tensors, spec, ctx, dtype, label)
    try:
        config.validate_speculator()
    except SpeculatorConfigError as err:
        raise ConversionError(f"{label}: the converted config is invalid: {err}") from err
    return output.build_model(model_class, config, tensors, origin, dtype, label)
