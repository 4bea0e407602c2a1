"""The package's own speculative decoding loop: token trees and batches, for any bound draft.

One round, for every unfinished row at once:
1. the draft grows a tree after the row's newest token (the root), from what `tree_extend` returned
   (`tree.build_tree`: chain, EAGLE-2 dynamic tree or static tree);
2. the verifier runs ONCE on [root, tree nodes] with explicit positions (root position + depth) and a
   4D mask: the row's alive context plus the tree's ancestor-or-self mask;
3. each row walks its tree (`acceptance`), greedily or by recursive rejection sampling, and emits its
   accepted tokens plus one token of the verifier's own;
4. the verifier's cache keeps the root and the accepted nodes and drops the rest of the block; the
   draft's cache drops the whole tree (its entries were computed from the draft's guesses) and takes
   the newly final tokens with the verifier's hidden states at the accepted path (`tree_extend`).

Rows finish on eos or when `max_new_tokens` is reached and leave the batch. Caches are append-only with
a per-row alive mask (`kvcache.MaskedCache`), compacted when dead entries exceed `compact_threshold`.
The verifier's pass is `lean.LeanPass` where the verifier supports it (its own modules called without
transformers' per-call plumbing, bitwise the stock forward; checked once per binding), which also returns the
hidden states the draft reads; elsewhere it is `verifier(...)`, and they come from the hooks `bind_verifier`
installs (`VerifierTap`), during the verifier's own forward pass.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig

from .acceptance import accept_greedy, accept_sampling
from .capture import VerifierBindingError
from .kvcache import MaskedCache, cache_kwargs, causal_block
from .lean import lean_pass_for
from .policy import Round, drafting_for, sync
from .sampling import Sampler
from .settings import _call, eos_token_ids, prepare_config, row_decodings
from .stats import GenerationStats
from .tree import build_tree


@dataclass
class SpeculativeOutput:
    """What `generate(..., return_dict_in_generate=True)` returns."""

    sequences: torch.Tensor  # [B, prompt + new], the prompt as given, new tokens padded with pad_token_id
    stats: GenerationStats  # summed over rows
    row_stats: list[GenerationStats] = field(default_factory=list)  # one per row (tau per row)


def _check_verifier(verifier: Any) -> None:
    text = verifier.config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types) or (
        getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    )
    if sliding:
        raise VerifierBindingError(
            f"{type(verifier).__name__} uses sliding-window (or other non-full) attention layers, which the tree "
            "loop's append-only cache does not model; use verifier.generate(..., assistant_model=draft) instead"
        )


class InputError(ValueError, RuntimeError, IndexError):
    """`input_ids` / `attention_mask` that `generate` refuses. A ValueError; also a RuntimeError and an IndexError,
    the types `verifier.generate` raises (from inside torch) for such inputs, so that code catching those still
    catches it."""


def check_inputs(verifier: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Raise `InputError` for what `verifier.generate` cannot generate from: ids that are not [batch, length]
    (length >= 1) integer token ids of the verifier's vocabulary, or a mask that is not a 0/1 tensor of the ids'
    shape with at least one token per row. (`verifier.generate` fails inside torch on most of these; on a mask
    longer than the ids, one with other values than 0/1 or an all-padding row it returns tokens that depend on
    those values or on the attention kernel.)"""
    shape = list(input_ids.shape)
    if input_ids.dim() != 2:
        hint = "; for one prompt, pass input_ids[None]" if input_ids.dim() == 1 else ""
        raise InputError(f"input_ids must be 2-D [batch, length], as for verifier.generate; got shape {shape}{hint}")
    if input_ids.dtype not in (torch.long, torch.int):
        raise InputError(f"input_ids must hold token ids (torch.long or torch.int), got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise InputError(f"input_ids is empty (shape {shape}): every prompt needs at least one token")
    vocab = verifier.get_input_embeddings().weight.shape[0]
    outside = (input_ids < 0) | (input_ids >= vocab)
    if outside.any():
        row, col = outside.nonzero()[0].tolist()
        raise InputError(
            f"input_ids[{row}, {col}] = {input_ids[row, col].item()} is not a token id of the verifier, whose "
            f"vocabulary has {vocab} ids (0 to {vocab - 1}); were the ids made by the verifier's tokenizer?"
        )
    if attention_mask is None:
        return
    if list(attention_mask.shape) != shape:
        raise InputError(
            f"attention_mask has shape {list(attention_mask.shape)} but input_ids has shape {shape}; they must "
            "match (one 0/1 entry per token)"
        )
    not_binary = (attention_mask != 0) & (attention_mask != 1)
    if not_binary.any():
        row, col = not_binary.nonzero()[0].tolist()
        raise InputError(
            f"attention_mask[{row}, {col}] = {attention_mask[row, col].item()}: the mask must hold 1 for a token "
            "and 0 for padding"
        )
    empty = (attention_mask == 0).all(dim=1).nonzero().squeeze(1).tolist()
    if empty:
        raise InputError(
            f"attention_mask is all zeros in row(s) {empty}: every prompt needs at least one token (drop those "
            "rows; verifier.generate's output for them depends on the attention kernel)"
        )


def _left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows re-packed to left padding (any padding pattern is accepted)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
    return input_ids.gather(1, order), valid.gather(1, order)


def generate(
    verifier: Any,
    draft: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tree: Any = None,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    return_dict_in_generate: bool = False,
    compact_threshold: float = 0.5,
    lean_verifier: bool = True,
    **kwargs: Any,
) -> torch.Tensor | SpeculativeOutput:
    """Speculative generation with `draft` for `verifier`, for a batch, with chains or token trees.

    `input_ids` [B, n] (any padding, given by a 0/1 `attention_mask` of the same shape; anything else is an
    `InputError`, see `check_inputs`). `tree`: a `TreeSpec`, "chain[:depth[:stop_below]]",
    "dynamic[:depth[:top_k[:total_tokens[:beam]]]]", a list of rank paths (static tree), "auto[:max_depth]"
    (each round's draft chosen for speed on this device, see `speculators_hf.generation.policy`), or None
    for the length the settings ask for (`num_assistant_tokens`, else the draft's `speculative_tokens`: see
    `policy.draft_length`). Generation settings (`generation_config` and/or keyword
    arguments, defaulting to the verifier's generation config) are applied exactly as `verifier.generate`
    applies them, or refused with an error naming them (see `speculators_hf.generation.settings`). Each row
    is generated as the verifier generates its prompt alone: greedy output equals it token for token, sampled
    output follows its distribution. The draft never drafts past the tokens a row may still emit.
    Returns the sequences [B * num_return_sequences, n + new] (torch.long: the prompt as given, then the new
    tokens, padded as transformers pads: with pad_token_id, else the first eos id), or a `SpeculativeOutput`
    with per-row stats. `draft.generation_stats` holds the summed stats. `lean_verifier=False` runs the
    verifier's passes through `verifier(...)` instead of `lean.LeanPass` (the same logits, bit for bit)."""
    config, default_max_length, default_min_length = prepare_config(verifier, generation_config, kwargs)
    _check_verifier(verifier)
    check_inputs(verifier, input_ids, attention_mask)
    if getattr(draft, "verifier", None) is not verifier:
        draft.bind_verifier(verifier)
    tap = draft._binding["tap"]
    lean = lean_pass_for(draft, verifier, tap) if lean_verifier else None
    keeps_logits = "logits_to_keep" in inspect.signature(verifier.forward).parameters
    device = verifier.device
    # the special tokens as transformers resolves them, with its warnings (the pad id: pad_token_id, else the first
    # eos id); `generation_config` gets their tensor forms, as in transformers' generate()
    _call(
        verifier._prepare_special_tokens,
        generation_config=config,
        kwargs_has_attention_mask=attention_mask is not None,
        device=device,
        batch_size=input_ids.shape[0],
    )
    pad = 0 if config._pad_token_tensor is None else int(config._pad_token_tensor)
    original_ids = input_ids.long()  # what is returned starts with the prompt as a torch.long tensor (as transformers)
    ids, valid = _left_pad(input_ids.to(device), None if attention_mask is None else attention_mask.to(device))
    copies = int(config.num_return_sequences or 1)
    if copies > 1:  # several samples per prompt, each prompt's copies next to each other (as transformers)
        original_ids, ids, valid = (t.repeat_interleave(copies, dim=0) for t in (original_ids, ids, valid))
    batch = ids.shape[0]
    prompts = [row[keep] for row, keep in zip(ids, valid)]
    decodings = row_decodings(verifier, config, prompts, default_max_length, default_min_length)
    max_new = [d.max_new_tokens for d in decodings]
    eos = eos_token_ids(config)
    sampler = Sampler(bool(config.do_sample), generator, [d.processors for d in decodings])
    dtype = verifier.dtype
    # before the tap is armed: an adaptive policy's calibration passes are not this generation's
    drafting = drafting_for(verifier, draft, tree, batch, generation_config, kwargs)
    last_round: Round | None = None  # what the policy observes once it is over

    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    row_stats = [GenerationStats() for _ in range(batch)]
    rows = torch.arange(batch, device=device)  # original index of each row still in the batch

    def contexts() -> list[torch.Tensor] | None:
        """Each current row's sequence up to its newest token, when the processors read sequences."""
        if sampler.position_free:
            return None
        return [
            torch.cat([prompts[r], torch.tensor(new_tokens[r], dtype=torch.long, device=device)]) for r in rows.tolist()
        ]

    def verify(tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, last_only: bool = False):
        """One verifier pass over `tokens` [B, q]: logits (the last position only if `last_only`) and the hidden
        states the draft reads."""
        if lean is not None:
            return lean(tokens, positions, mask, vcache.cache, tap.layer_ids, 1 if last_only else 0)
        keep = {"logits_to_keep": 1} if last_only and keeps_logits else {}
        out = verifier(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=mask,
            **cache_kwargs(vcache.cache),
            use_cache=True,
            **keep,
        )
        return out.logits, [tap.states[i] for i in tap.layer_ids]

    def emit(row_tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append emitted tokens per row (cut at eos / the row's max new tokens); returns which rows finished."""
        done = torch.zeros(rows.shape[0], dtype=torch.bool)
        for i, (row, count) in enumerate(zip(rows.tolist(), counts.tolist())):
            out = new_tokens[row]
            for token in row_tokens[i, :count].tolist():
                if len(out) >= max_new[row]:
                    break
                out.append(token)
                if token in eos:
                    break
            row_stats[row].emitted_tokens = len(out)
            done[i] = len(out) >= max_new[row] or (bool(out) and out[-1] in eos)
        return done

    # The rounds run in inference mode (no autograd bookkeeping: a few % per round on CPU). What is returned
    # is built after it from Python lists, so callers get ordinary tensors they may modify in place.
    with torch.inference_mode():
        vcache = MaskedCache(batch, device)
        state = draft.new_tree_state(batch, device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        tap.arm()
        try:
            if max(max_new) > 0:
                # prefill: the prompt, then the first token of the verifier's own
                logits, features = verify(ids, positions, vcache.mask(causal_block(valid), dtype), last_only=True)
                logits = logits[:, -1]
                vcache.commit(valid)
                sampler.begin_round(rows.tolist(), contexts())
                root, _ = sampler.pick(logits)
                for s in row_stats:
                    s.verifier_forwards = 1
                done = emit(root[:, None], torch.ones(batch, dtype=torch.long))
                root_positions = valid.sum(1)
                root_logits, root_handle = draft.tree_extend(
                    state,
                    torch.cat([ids, root[:, None]], dim=1),
                    torch.cat([positions, root_positions[:, None]], dim=1),
                    torch.cat([valid, valid.new_ones(batch, 1)], dim=1),
                    [torch.nn.functional.pad(f, (0, 0, 1, 0)) for f in features],  # the feature BEFORE each token
                )
            else:
                done = torch.ones(batch, dtype=torch.bool)
            while True:
                if done.any():  # finished rows leave the batch
                    keep = (~done).nonzero().squeeze(1).to(device)
                    rows, root, root_positions = rows[keep], root[keep], root_positions[keep]
                    root_logits, root_handle = root_logits[keep], root_handle[keep]
                    vcache.select(keep)
                    state.select(keep)
                if rows.numel() == 0:
                    break
                sampler.begin_round(rows.tolist(), contexts())
                # never draft past what a row may still emit: a round emits the accepted nodes plus one token
                room = max(max_new[r] - len(new_tokens[r]) for r in rows.tolist())
                round_start = time.perf_counter()
                if last_round is not None:  # a round lasts from one draft to the next
                    drafting.observe(last_round, round_start)
                round_spec = drafting.spec(max(room - 1, 1))
                drafted = build_tree(draft, state, round_spec, sampler, root_logits, root_handle, root_positions)
                if drafting.timed:
                    sync(device)
                draft_seconds = time.perf_counter() - round_start
                if state.cache is not None:
                    state.cache.truncate()
                block_tokens = torch.cat([root[:, None], drafted.tokens], dim=1)
                block_positions = root_positions[:, None] + torch.cat(
                    [torch.zeros_like(drafted.depths[:, :1]), drafted.depths], dim=1
                )
                logits, features = verify(block_tokens, block_positions, vcache.mask(drafted.block_ancestors, dtype))
                if sampler.do_sample:
                    path, emitted, counts = accept_sampling(logits, drafted, root, sampler)
                else:
                    path, emitted, counts = accept_greedy(logits, drafted, root, sampler)
                # the longest row's path is all that is needed; a shorter row's spare columns point at the
                # block entry of their own index (dead: only so that a chain's path is the block's prefix)
                columns = torch.arange(int(counts.max()), device=device)
                path_valid = columns[None] < counts[:, None]
                path = torch.where(path_valid, path[:, : columns.numel()], columns)
                emitted = emitted[:, : columns.numel()]
                vcache.keep(path, path_valid)
                for row in rows.tolist():
                    row_stats[row].verifier_forwards += 1
                    row_stats[row].draft_rounds += 1
                    row_stats[row].drafted_tokens += drafted.size
                if drafting.timed:
                    last_round = Round.of(drafted, round_start, draft_seconds, counts)
                done = emit(emitted, counts)
                if done.all():
                    break
                path_features = [f.gather(1, path[:, :, None].expand(-1, -1, f.shape[-1])) for f in features]
                root_logits, root_handle = draft.tree_extend(
                    state, emitted, root_positions[:, None] + 1 + columns, path_valid, path_features
                )
                root = emitted.gather(1, (counts - 1)[:, None]).squeeze(1)
                root_positions = root_positions + counts
                vcache.maybe_compact(compact_threshold)
                if state.cache is not None:
                    state.cache.maybe_compact(compact_threshold)
        finally:
            tap.disarm()

    longest = max((len(t) for t in new_tokens), default=0)
    generated = torch.full((batch, longest), pad, dtype=torch.long)
    for row, tokens in enumerate(new_tokens):
        generated[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    sequences = torch.cat([original_ids, generated.to(original_ids.device)], dim=1)
    total = GenerationStats()
    for s in row_stats:
        total = total + s
    draft._last_stats = total
    if return_dict_in_generate:
        return SpeculativeOutput(sequences=sequences, stats=total, row_stats=row_stats)
    return sequences
