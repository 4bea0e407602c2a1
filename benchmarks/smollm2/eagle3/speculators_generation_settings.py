# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.settings. Do not edit.
"""Generation settings of the package's own loop (`speculators_hf.generate`, `speculators-hf generate`, the
`custom_generate` hook): every field of a transformers `GenerationConfig` is applied exactly as
transformers applies it, or refused up front with an error that names it.

- Logits processors and warpers (repetition penalty, no-repeat n-grams, bad words, sequence bias, min
  length / min new tokens, forced bos/eos, suppressed tokens, temperature, top-k, top-p, min-p, typical-p,
  epsilon/eta cutoffs, top-h, renormalisation, ...) are the very objects transformers builds for the
  verifier (`GenerationMixin._get_logits_processor`), one list per batch row, built for that row's prompt
  length as if the row were generated alone. The loop runs them on the sequence each scored position really
  has: the row's prompt, its emitted tokens and, inside a draft tree, the path from the root to the node
  (`Sampler` in `acceptance.py`). Processors that only look at the scores (temperature, top-k, ...) are run
  once over a whole batch.
- Stopping: eos (every id of `eos_token_id`), `max_new_tokens` / `max_length` (each row as if alone,
  including transformers' default of 20 new tokens clipped to `max_position_embeddings`);
  `num_return_sequences` with sampling repeats each prompt, as transformers does.
- transformers' settings for an assistant model set the draft length (`policy.draft_length`):
  `num_assistant_tokens` (a length, or "auto") where the call names no `tree`; the others are refused or
  have no effect, by name.
- Settings that cannot change the tokens (caching, compilation, beam-search knobs while `num_beams` is 1)
  are accepted and have no effect.
- Anything else (beam search, guidance, watermarking, stop strings, a time limit, extra outputs, custom
  processors or stopping criteria, ...) is refused unless it is at its neutral value.

Values out of range (top_p outside (0, 1], a temperature <= 0, ...) are errors, whether sampling or not.

Each row of a batch is generated exactly as the verifier would generate that row's prompt by itself (its
padding removed): what `verifier.generate(prompt, **settings)` returns for it, token for token when greedy.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers import generation as hf_generation

# Applied through the processors transformers builds from the config (`_get_logits_processor`).
PROCESSOR_SETTINGS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "renormalize_logits",
)
# Applied by the loop itself.
LOOP_SETTINGS = (
    "max_length",
    "max_new_tokens",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "num_return_sequences",
    "return_dict_in_generate",
)
# transformers' settings for an assistant model (GenerationConfig, "assistant generation"): they set the draft
# length, are refused, or have no effect, as `policy.draft_length` says for both loops.
ASSISTANT_SETTINGS = (
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
)
# Accepted and without effect on the generated tokens (the reason is part of the documentation).
NO_EFFECT_SETTINGS = {
    "use_cache": "the loop always keeps its own KV caches",
    "cache_implementation": "the loop keeps its own KV caches",
    "cache_config": "the loop keeps its own KV caches",
    "max_cache_len": "the loop keeps its own KV caches",
    "compile_config": "compilation does not change the tokens",
    "disable_compile": "compilation does not change the tokens",
    "prefill_chunk_size": "chunking the prefill does not change the tokens",
    "low_memory": "a memory/speed trade-off of transformers' own loops",
    "continuous_batching_config": "used by transformers' continuous batching only",
    "is_assistant": "set by transformers on a draft's own config",
    "decoder_start_token_id": "encoder-decoder models only",
    "early_stopping": "a beam-search setting: no effect with num_beams=1, as in transformers",
    "length_penalty": "a beam-search setting: no effect with num_beams=1, as in transformers",
    "num_beam_groups": "a beam-search setting: no effect with num_beams=1, as in transformers",
    "diversity_penalty": "a beam-search setting: no effect with num_beams=1, as in transformers",
    "transformers_version": "metadata",
    "_from_model_config": "metadata",
}
# Refused unless neutral, with the reason (any field of GenerationConfig not named above is refused too).
REFUSED_SETTINGS = {
    "num_beams": "beam search is not speculative decoding; use verifier.generate(num_beams=...) without a draft",
    "penalty_alpha": "contrastive search is another decoding method",
    "dola_layers": "DoLa decoding is another decoding method",
    "constraints": "constrained beam search is another decoding method",
    "force_words_ids": "constrained beam search is another decoding method",
    "guidance_scale": "classifier-free guidance needs a second, unconditional verifier pass",
    "watermarking_config": "watermark processors keep state across calls",
    "stop_strings": "stop strings need the tokenizer; use verifier.generate(..., assistant_model=draft, stop_strings=...)",
    "max_time": "a time limit makes the output depend on the machine",
    "token_healing": "token healing rewrites the prompt with the tokenizer",
    "output_scores": "the loop returns sequences and acceptance statistics, not per-step scores",
    "output_logits": "the loop returns sequences and acceptance statistics, not per-step logits",
    "output_attentions": "the loop returns sequences and acceptance statistics, not attentions",
    "output_hidden_states": "the loop returns sequences and acceptance statistics, not hidden states",
    "encoder_repetition_penalty": "encoder-decoder models only",
    "encoder_no_repeat_ngram_size": "encoder-decoder models only",
    "prompt_lookup_num_tokens": "selects transformers' prompt lookup instead of the draft",
    "max_matching_ngram_size": "a prompt-lookup setting",
    "assistant_early_exit": "selects transformers' self-speculation instead of the draft",
    "assistant_ensemble_weight": "configures another drafting method of transformers",
    "speculation_type": "selects another drafting method of transformers",
    "use_mtp": "selects the verifier's own multi-token prediction instead of the draft",
}

# Processors whose result depends on the scores only (not on the token sequence), so one call covers a batch.
POSITION_FREE_PROCESSORS = tuple(
    getattr(hf_generation, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "TopHLogitsWarper",
        "SuppressTokensLogitsProcessor",
        "InfNanRemoveLogitsProcessor",
        "LogitNormalization",
    )
    if hasattr(hf_generation, name)
)


def _in_unit(low_open: bool) -> Any:
    return lambda v: (0 < v <= 1) if low_open else (0 <= v <= 1)


# (check, what a valid value is) for settings with a range; checked whether sampling or not.
RANGES = {
    "temperature": (lambda v: v > 0, "> 0 (use do_sample=False for greedy decoding)"),
    "top_p": (_in_unit(True), "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 disables it)"),
    "min_p": (_in_unit(False), "in [0, 1]"),
    "typical_p": (_in_unit(True), "in (0, 1]"),
    "top_h": (_in_unit(True), "in (0, 1]"),
    "epsilon_cutoff": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eta_cutoff": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1.0 disables it)"),
    "no_repeat_ngram_size": (lambda v: v >= 0, ">= 0"),
    "min_length": (lambda v: v >= 0, ">= 0"),
    "min_new_tokens": (lambda v: v >= 0, ">= 0"),
    "max_new_tokens": (lambda v: v >= 0, ">= 0"),
    "max_length": (lambda v: v >= 0, ">= 0"),
    "num_return_sequences": (lambda v: v >= 1, ">= 1"),
}


class GenerationSettingError(ValueError):
    """A generation setting the package's own loop cannot apply exactly, or a value out of range."""


def neutral_settings() -> dict[str, Any]:
    """What every GenerationConfig field is when nothing sets it: transformers' global defaults, else None."""
    config = GenerationConfig()
    neutral = {name: None for name in config.to_dict()}
    neutral.update(config._get_default_generation_params())
    neutral["transformers_version"] = config.transformers_version
    return neutral


# values that mean "off" besides the neutral one (transformers applies guidance only when the scale is not 1)
OFF_VALUES = {"guidance_scale": 1}


def _is_set(name: str, value: Any, neutral: Any) -> bool:
    if value is None or value == neutral or (name in OFF_VALUES and value == OFF_VALUES[name]):
        return False
    return not (neutral is None and value is False)  # a flag whose default is "unset" (None) is off when False


def check_settings(config: GenerationConfig) -> None:
    """Raise `GenerationSettingError` naming every setting of `config` that the loop cannot apply exactly,
    or whose value is out of range."""
    neutral = neutral_settings()
    values = config.to_dict()
    problems = []
    allowed = {*PROCESSOR_SETTINGS, *LOOP_SETTINGS, *NO_EFFECT_SETTINGS, *ASSISTANT_SETTINGS}
    for name, value in sorted(values.items()):
        if name in allowed or not _is_set(name, value, neutral.get(name)):
            continue
        reason = REFUSED_SETTINGS.get(name, "speculators_hf does not know this setting")
        problems.append(f"  {name}={value!r}: {reason}")
    for name, (valid, expected) in RANGES.items():
        value = values.get(name)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)) or not valid(value):
            problems.append(f"  {name}={value!r}: must be {expected}")
    if not values.get("do_sample") and (values.get("num_return_sequences") or 1) > 1:
        problems.append(
            f"  num_return_sequences={values['num_return_sequences']}: greedy decoding gives one sequence per prompt "
            "(as in transformers); set do_sample=True for several samples"
        )
    if problems:
        raise GenerationSettingError(
            "speculators_hf.generate cannot apply these generation settings exactly:\n"
            + "\n".join(problems)
            + "\nUnset them, or generate with verifier.generate(**inputs, assistant_model=draft) (transformers' "
            "assisted loop), which takes every setting transformers supports."
        )


def prepare_config(
    verifier: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, bool, bool]:
    """The generation config transformers' `generate()` would use for `verifier` with these arguments
    (`generation_config` or the verifier's, updated with `kwargs`), checked by `check_settings`. Returns
    (config, has_default_max_length, has_default_min_length), the last two as transformers computes them."""
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and verifier.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and verifier.generation_config.min_length is None
    )
    config, unused = verifier._prepare_generation_config(copy.deepcopy(generation_config), **kwargs)
    unused = {k: v for k, v in unused.items() if v is not None}
    if unused:
        raise TypeError(f"speculators_hf.generate got unexpected arguments {sorted(unused)}")
    check_settings(config)
    return config, has_default_max_length, has_default_min_length


@dataclass
class RowDecoding:
    """How one batch row is decoded: its logits processors and how many new tokens it may take."""

    processors: list[Any]
    max_new_tokens: int


def _call(method: Any, **kwargs: Any) -> Any:
    """Call a private transformers method with the keyword arguments its installed version accepts."""
    accepted = inspect.signature(method).parameters
    return method(**{k: v for k, v in kwargs.items() if k in accepted})


def row_decodings(
    verifier: Any,
    config: GenerationConfig,
    prompts: list[torch.Tensor],
    has_default_max_length: bool,
    has_default_min_length: bool,
) -> list[RowDecoding]:
    """One `RowDecoding` per prompt (1D id tensors, padding removed): the processors and length transformers'
    `generate()` would use for that prompt alone."""
    config = copy.deepcopy(config)
    device = prompts[0].device
    _call(verifier._prepare_special_tokens, generation_config=config, kwargs_has_attention_mask=None, device=device)
    rows = []
    for prompt in prompts:
        row_config = copy.deepcopy(config)
        _call(
            verifier._prepare_generated_length,
            generation_config=row_config,
            has_default_max_length=has_default_max_length,
            has_default_min_length=has_default_min_length,
            model_input_name="input_ids",
            input_ids_length=prompt.shape[0],
            inputs_tensor=prompt[None],
        )
        if prompt.shape[0] >= row_config.max_length:
            raise GenerationSettingError(
                f"a prompt of {prompt.shape[0]} tokens leaves no room under max_length={row_config.max_length}; "
                "set max_new_tokens (or a larger max_length)"
            )
        processors = _call(
            verifier._get_logits_processor,
            generation_config=row_config,
            input_ids_seq_length=prompt.shape[0],
            encoder_input_ids=None,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(),
            device=device,
            model_kwargs={},
            negative_prompt_ids=None,
            negative_prompt_attention_mask=None,
        )
        rows.append(RowDecoding(list(processors), int(row_config.max_length) - prompt.shape[0]))
    return rows


def eos_token_ids(config: GenerationConfig) -> set[int]:
    """The eos ids of a generation config, as a set (empty when it has none)."""
    eos = config.eos_token_id
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def is_position_free(processor: Any) -> bool:
    """True for processors whose output depends on the scores alone (one call may cover any rows)."""
    return isinstance(processor, POSITION_FREE_PROCESSORS)
