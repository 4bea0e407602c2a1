"""`speculators-hf data` and `speculators-hf train`."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..arguments import (
    existing_dir,
    existing_file,
    key_value,
    model_ref,
    new_dir,
    non_negative_int,
    positive_float,
    positive_int,
)
from .data import (
    REGEN_BATCH_SIZE,
    REGEN_FILE,
    DataError,
    cache_features,
    load_blocks,
    load_records,
    pack_blocks,
    regenerate_responses,
    save_blocks,
    tokenize_records,
)


def _load_verifier(name: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    verifier = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    if torch.cuda.is_available():
        verifier.to("cuda")
    return verifier


def cmd_data(args: argparse.Namespace) -> int:
    from ..loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.verifier)
    records = load_records(args.input, limit=args.limit)
    verifier = None
    if args.regenerate or args.cache_features:
        verifier = _load_verifier(args.verifier, args.dtype)
    if args.regenerate:
        args.output.mkdir(parents=True, exist_ok=True)
        records = regenerate_responses(
            verifier,
            tokenizer,
            records,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.regen_batch_size,
            progress_file=args.output / REGEN_FILE,
        )
    sequences, counts = tokenize_records(tokenizer, records)
    if counts["records_without_assistant_tokens"]:
        message = (
            f"{counts['records_without_assistant_tokens']} of {counts['records']} records have no assistant tokens "
            "(a chat whose turns are all the user's or the system's): nothing in them is trained on. Pass "
            "--regenerate to have the verifier write their replies."
        )
        if not counts["trained_tokens"]:
            raise DataError(f"no tokens to train on: {message}")
        print(f"warning: {message}")
    input_ids, loss_mask = pack_blocks(sequences, args.seq_len)
    info = {
        "verifier": args.verifier,
        "source": str(args.input),
        "regenerated": args.regenerate,
        **counts,
        "trained_tokens": int(loss_mask.sum()),  # in the blocks (the tail that fills no block is dropped)
    }
    save_blocks(args.output, input_ids, loss_mask, info)
    print(
        f"wrote {input_ids.shape[0]} blocks of {args.seq_len} tokens ({int(loss_mask.sum())} trained tokens) to {args.output}"
    )
    if args.cache_features:
        layer_ids = (
            [int(x) for x in args.layers.split(",")] if args.layers else _family_layer_ids(args.family, verifier)
        )
        cache_features(verifier, input_ids, layer_ids, args.output, dtype=getattr(torch, args.cache_dtype))
    return 0


def _family_layer_ids(family: str, verifier: Any) -> list[int]:
    return _new_draft(family, verifier, None).verifier_layer_ids()


def _new_draft(
    family: str,
    verifier: Any,
    draft_vocab_size: int | None,
    speculative_tokens: int | None = None,
    draft_args: dict[str, Any] | None = None,
) -> Any:
    """A new `family` draft for `verifier` with `speculative_tokens`, `draft_vocab_size` for the families
    that have a draft vocabulary (else their default, e.g. a quarter of the verifier's for EAGLE-3) and the
    family's own `from_verifier` arguments `draft_args` (a wrong one is refused naming the family)."""
    from ..models import FAMILIES

    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    model_class = FAMILIES[family]
    kwargs: dict[str, Any] = {} if speculative_tokens is None else {"speculative_tokens": speculative_tokens}
    if draft_vocab_size:
        schema = model_class.config_class.fields_schema()
        if schema is None or "draft_vocab_size" not in schema.model_fields:
            raise SystemExit(f"--draft-vocab-size: a {family} draft has no draft vocabulary of its own")
        kwargs["draft_vocab_size"] = draft_vocab_size
    try:
        return model_class.from_verifier(verifier, **kwargs, **(draft_args or {}))
    except (TypeError, ValueError) as err:
        if not draft_args:
            raise
        raise SystemExit(f"--draft-arg {draft_args}: not accepted by a new {family} draft: {err}") from None


def cmd_train(args: argparse.Namespace) -> int:
    import os
    import sys

    from ..loading import load_draft
    from .data import DraftDataset
    from .trainer import TrainConfig, plan_evaluation, train

    input_ids, loss_mask = load_blocks(args.data)
    n_blocks, seq_len = input_ids.shape
    n_eval, prompt_len, notes = plan_evaluation(n_blocks, seq_len, args.eval_blocks, args.eval_prompt_len)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        print("\n".join(notes), file=sys.stderr)
    verifier = _load_verifier(args.verifier, args.dtype)
    n_train = len(input_ids) - n_eval
    eval_prompts = [input_ids[i : i + 1, :prompt_len] for i in range(len(input_ids) - n_eval, len(input_ids))]
    if args.draft:
        draft = load_draft(args.draft).to(verifier.device).bind_verifier(verifier)
    else:
        torch.manual_seed(args.seed if args.seed is not None else 0)  # the same new draft in every process and run
        draft = _new_draft(
            args.family, verifier, args.draft_vocab_size, args.speculative_tokens, dict(args.draft_args or [])
        )
    # the feature cache covers every block; training sees all but the held-out ones
    dataset = torch.utils.data.Subset(DraftDataset(input_ids, loss_mask, args.features), range(n_train))
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    config = TrainConfig(output_dir=str(args.output), **fields)
    result = train(draft, verifier, dataset, config, eval_prompts=eval_prompts, resume=not args.no_resume)
    print(
        json.dumps(
            {
                "final_dir": result["final_dir"],
                "last": result["history"][-1] if result["history"] else None,
                "evals": result["evals"],
            },
            indent=2,
        )
    )
    return 0


def add_parsers(sub: Any) -> None:
    from ..models import FAMILIES

    data = sub.add_parser(
        "data",
        help="build training data: tokens, loss mask and (optionally cached) verifier hidden states",
        description="Tokenize a jsonl dataset ({'text'} | {'messages'} | {'prompt'[,'response']} records) with the "
        "verifier's chat template, mark assistant tokens for the loss, pack fixed-length blocks, and optionally "
        "regenerate the responses with the verifier itself (user-only chats get a reply) and cache its hidden "
        "states (resumable shards). Without --regenerate, chats without an assistant turn are reported: they "
        "add nothing to train on.",
    )
    data.add_argument("--verifier", required=True, type=model_ref, help="verifier model id or path")
    data.add_argument("--tokenizer", type=model_ref, help="tokenizer id or path (default: the verifier's)")
    data.add_argument("--input", required=True, type=existing_file, help="jsonl file")
    data.add_argument("--output", required=True, type=new_dir, help="output folder")
    data.add_argument("--limit", type=positive_int, help="use the first N records")
    data.add_argument("--seq-len", type=positive_int, default=512, help="tokens per training block")
    data.add_argument(
        "--regenerate",
        action="store_true",
        help="replace assistant replies by the verifier's own (greedy), and add one to chats that end without "
        f"one (user-only prompts); done in batches, saved as it goes to OUTPUT/{REGEN_FILE}, so rerunning the "
        "same command resumes",
    )
    data.add_argument("--max-new-tokens", type=positive_int, default=256, help="length of regenerated replies")
    data.add_argument(
        "--regen-batch-size",
        type=positive_int,
        default=REGEN_BATCH_SIZE,
        help=f"records per generate() call when regenerating (default {REGEN_BATCH_SIZE}, sized for a CPU; "
        "a GPU takes 64 or more)",
    )
    data.add_argument("--cache-features", action="store_true", help="compute and store verifier hidden states now")
    data.add_argument(
        "--family", default="eagle3", choices=sorted(FAMILIES), help="draft family whose hidden states to cache"
    )
    data.add_argument("--layers", help="explicit hidden-state ids to cache, e.g. 2,16,29")
    data.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    data.add_argument("--dtype", default="auto", help="verifier dtype")
    data.set_defaults(func=cmd_data)

    tr = sub.add_parser(
        "train",
        help="train a draft for a verifier (accelerate: CPU, GPU, DDP, DeepSpeed, FSDP)",
        description="Train a draft on data from `speculators-hf data`. Run under `accelerate launch "
        "--config_file examples/accelerate/<setup>.yaml -m speculators_hf.cli train ...` to scale out. "
        "Resumes from the last checkpoint in --output unless --no-resume.",
    )
    tr.add_argument("--verifier", required=True, type=model_ref, help="verifier model id or path")
    tr.add_argument("--data", required=True, type=existing_dir, help="folder written by `speculators-hf data`")
    tr.add_argument("--output", required=True, type=new_dir, help="output folder (checkpoints/, final/)")
    tr.add_argument(
        "--family", default="eagle3", choices=sorted(FAMILIES), help="the family of a new draft (default eagle3)"
    )
    tr.add_argument("--draft", type=model_ref, help="continue from an existing draft checkpoint instead of a new one")
    tr.add_argument(
        "--draft-vocab-size",
        type=positive_int,
        help="EAGLE-3 draft vocabulary: the N most frequent targets of the data (default: a quarter of the "
        "verifier's vocabulary, rounded up to a multiple of 64, e.g. 32064 of Llama 3's 128256; measured in "
        "benchmarks/draft_vocab.py)",
    )
    tr.add_argument(
        "--speculative-tokens",
        type=positive_int,
        help="default draft length saved in the config (default: the family's, 5 for most, a whole block for DFlash)",
    )
    tr.add_argument(
        "--draft-arg",
        dest="draft_args",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="an argument of a new draft's `from_verifier` (repeatable), e.g. mask_token_id=0 (P-EAGLE, DFlash), "
        "block_size=8 or num_layers=2 (DFlash, DSpark), markov_head_type=gated (DSpark), medusa_num_heads=4 (Medusa)",
    )
    tr.add_argument("--features", type=existing_dir, help="feature cache folder (default: computed on the fly)")
    tr.add_argument("--steps", type=positive_int)
    tr.add_argument("--batch-size", dest="batch_size", type=positive_int)
    tr.add_argument("--grad-accum", dest="grad_accum", type=positive_int)
    tr.add_argument("--lr", dest="learning_rate", type=positive_float)
    tr.add_argument("--warmup-steps", dest="warmup_steps", type=non_negative_int)
    tr.add_argument(
        "--ttt-steps",
        dest="ttt_steps",
        type=positive_int,
        help="unrolled draft steps of the training loss, for the families that unroll: EAGLE-3's training-time "
        "test (default 7), EAGLE's HASS (default 1 = EAGLE-1/2; more = HASS)",
    )
    tr.add_argument("--save-every", dest="save_every", type=positive_int)
    tr.add_argument("--log-every", dest="log_every", type=positive_int, help="steps between log lines (default 10)")
    tr.add_argument("--eval-every", dest="eval_every", type=non_negative_int)
    tr.add_argument(
        "--eval-blocks",
        type=non_negative_int,
        default=16,
        help="held-out blocks for the acceptance evaluation (at most a tenth of the data; 0: none)",
    )
    tr.add_argument(
        "--eval-prompt-len", type=positive_int, default=32, help="prompt tokens taken from each held-out block"
    )
    tr.add_argument("--seed", type=int)
    tr.add_argument("--dtype", default="auto", help="verifier dtype")
    tr.add_argument(
        "--no-resume", action="store_true", help="start over even if checkpoints exist (deletes them from --output)"
    )
    tr.set_defaults(func=cmd_train)
