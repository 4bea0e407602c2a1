"""`speculators-hf data` and `speculators-hf train`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
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
    gather_regenerated,
    import_speculators,
    load_blocks,
    load_records,
    pack_blocks,
    part_of,
    regen_file,
    regen_settings,
    regenerate_responses,
    save_blocks,
    tokenize_records,
    verifier_parts,
    write_feature_shards,
)


def _load_verifier(name: str, dtype: str, device_map: str | None = None) -> Any:
    """The whole verifier: on the GPU when there is one, or spread by accelerate's `device_map` (e.g. "auto":
    over every GPU, then the CPU) when it does not fit one."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    verifier = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    if device_map is None and torch.cuda.is_available():
        verifier.to("cuda")
    return verifier


def cmd_data(args: argparse.Namespace) -> int:
    from ..loading import load_tokenizer

    if args.from_speculators:
        return _import_speculators(args)
    tokenizer = load_tokenizer(args.tokenizer or args.verifier)
    records = load_records(args.input, limit=args.limit)
    verifier: Any = None
    server = None
    if args.engine == "vllm":
        from ..engines.vllm_engine import VllmServer

        if not args.endpoint:
            raise SystemExit("--engine vllm needs --endpoint URL (the one `speculators-hf serve-features` prints)")
        # the config, generation config and final norm (vLLM's last layer id is pre-norm); never the decoder
        verifier = verifier_parts(args.verifier, args.dtype)
        server = VllmServer(args.endpoint, timeout=args.timeout, concurrency=args.concurrency)
    elif args.regenerate or args.cache_features:
        verifier = _load_verifier(args.verifier, args.dtype, args.device_map)
    parts = args.world_size
    if args.regenerate:
        args.output.mkdir(parents=True, exist_ok=True)
        mine = part_of(len(records), parts, args.rank)
        replier = None
        if server is not None:

            def replier(prompts: list[list[int]], eos_ids: Any) -> list[list[int]]:
                return server.replies(prompts, args.max_new_tokens, eos_ids)

        regenerated = regenerate_responses(
            verifier,
            tokenizer,
            records[mine.start : mine.stop],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.concurrency if server is not None else args.regen_batch_size,
            progress_file=args.output / regen_file(parts, args.rank),
            replier=replier,
            engine=args.engine if server is not None else None,
        )
        if parts == 1:
            records = regenerated
        else:
            settings = regen_settings(verifier, tokenizer, args.max_new_tokens, engine=args.engine if server else None)
            records, missing = gather_regenerated(args.output, records, settings, parts)
            if missing:
                print(
                    f"part {args.rank + 1} of {parts} regenerated; {missing} chats of the other parts are not yet: rerun "
                    "this command (any --rank) once every part is done, to pack the blocks and cache the features"
                )
                return 0
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
        dtype = getattr(torch, args.cache_dtype)
        if server is None:
            if parts > 1:
                raise SystemExit("--world-size: only --engine vllm splits the feature cache between processes")
            cache_features(verifier, input_ids, layer_ids, args.output, dtype=dtype)
        else:
            from ..engines.vllm_engine import block_features

            def compute(blocks: torch.Tensor, first: int) -> list[torch.Tensor]:
                return block_features(server, verifier, blocks, layer_ids, first)

            hidden = verifier.config.get_text_config().hidden_size
            write_feature_shards(
                input_ids, layer_ids, args.output, hidden, compute, dtype=dtype, world_size=parts, rank=args.rank
            )
    return 0


def _import_speculators(args: argparse.Namespace) -> int:
    """`data --from-speculators`: the library's files -> blocks and feature shards (only the verifier's config
    and final norm are read)."""
    if args.regenerate or args.engine != "transformers" or args.world_size > 1:
        raise SystemExit("--from-speculators imports finished data: drop --regenerate, --engine and --world-size")
    layer_ids = [int(x) for x in args.layers.split(",")] if args.layers else None
    out = import_speculators(
        args.from_speculators,
        verifier_parts(args.verifier, args.dtype),
        args.output,
        args.seq_len,
        args.hidden_states,
        layer_ids,
        getattr(torch, args.cache_dtype),
    )
    print(f"train with: speculators-hf train --verifier {args.verifier} --data {args.output} --features {out} ...")
    return 0


def cmd_serve_features(args: argparse.Namespace) -> int:
    import subprocess

    from ..engines.vllm_engine import serve_command, shell_line

    layer_ids = (
        [int(x) for x in args.layers.split(",")]
        if args.layers
        else _family_layer_ids(args.family, verifier_parts(args.verifier))
    )
    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    argv, env = serve_command(args.verifier, layer_ids, args.storage, args.vllm_python, extra)
    if args.print_only:
        print(shell_line(argv, env))
        return 0
    port = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--port"), "8000")
    host = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--host"), "localhost")
    args.storage.mkdir(parents=True, exist_ok=True)
    print(f"hidden states {sorted(set(layer_ids))} of {args.verifier} to {args.storage.resolve()}")
    print(f"endpoint: http://{host}:{port}  (speculators-hf data ... --engine vllm --endpoint http://{host}:{port})")
    print(shell_line(argv, env), flush=True)
    return subprocess.call(argv, env={**os.environ, **env})


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
    import sys

    from ..loading import load_draft
    from .data import DraftDataset
    from .trainer import TrainConfig, plan_evaluation, train

    input_ids, loss_mask = load_blocks(args.data)
    n_blocks, seq_len = input_ids.shape
    n_eval, prompt_len, notes = plan_evaluation(n_blocks, seq_len, args.eval_blocks, args.eval_prompt_len)
    eval_verifier = None
    if args.features:  # the verifier's decoder is never loaded: only the tensors the draft borrows
        verifier = verifier_parts(args.verifier, args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        if n_eval and args.eval_verifier:
            eval_verifier = _load_verifier(args.eval_verifier, args.dtype, args.device_map)
        elif n_eval:
            notes.append(
                f"evaluation: skipped: with --features the verifier's decoder is not loaded (the {n_eval} held-out "
                "blocks stay out of training); pass --eval-verifier (the verifier, if it fits) to measure tau"
            )
    else:
        verifier = _load_verifier(args.verifier, args.dtype, args.device_map)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        print("\n".join(notes), file=sys.stderr)
    n_train = len(input_ids) - n_eval
    eval_prompts = [input_ids[i : i + 1, :prompt_len] for i in range(len(input_ids) - n_eval, len(input_ids))]
    if args.features and eval_verifier is None:
        eval_prompts = []
    if args.draft:
        draft = load_draft(args.draft).to(verifier.device).bind_verifier(verifier)
    else:
        torch.manual_seed(args.seed if args.seed is not None else 0)  # the same new draft in every process and run
        draft = _new_draft(
            args.family, verifier, args.draft_vocab_size, args.speculative_tokens, dict(args.draft_args or [])
        )
    # the feature cache covers every block; training sees all but the held-out ones
    features = DraftDataset(input_ids, loss_mask, args.features, draft.verifier_layer_ids() if args.features else None)
    dataset = torch.utils.data.Subset(features, range(n_train))
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    config = TrainConfig(output_dir=str(args.output), **fields)
    result = train(
        draft,
        verifier,
        dataset,
        config,
        eval_prompts=eval_prompts,
        resume=not args.no_resume,
        eval_verifier=eval_verifier,
    )
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


DEVICE_MAP_HELP = (
    "spread the verifier over several devices with accelerate (e.g. auto: every GPU, then the CPU), for a verifier "
    "that does not fit one GPU; default: the whole verifier on the GPU (or the CPU)"
)


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
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=existing_file, help="jsonl file")
    source.add_argument(
        "--from-speculators",
        type=existing_dir,
        metavar="PREPARED",
        help="import the `speculators` library's offline data instead: the folder its prepare-data wrote (token ids, "
        "loss masks) with the hs_{i}.safetensors of its generate-offline-data (in PREPARED/hidden_states unless "
        "--hidden-states); writes the blocks and feature shards `train --features` reads (--layers: the files' ids)",
    )
    data.add_argument(
        "--hidden-states", type=existing_dir, help="--from-speculators: the folder of hs_{i}.safetensors files"
    )
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
    data.add_argument(
        "--layers",
        help="explicit hidden-state ids to cache, e.g. 2,16,29; with --from-speculators the ids of the files' layers "
        "in file order, vLLM's numbering (default for 4-layer files 2,N//2,N-3,N, N = the pre-norm last layer)",
    )
    data.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    data.add_argument("--dtype", default="auto", help="verifier dtype")
    data.add_argument("--device-map", help=DEVICE_MAP_HELP)
    data.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="who regenerates replies and computes hidden states: transformers in this process (default), or a vLLM "
        "server started with `speculators-hf serve-features` (tensor/data parallel, any size; --endpoint)",
    )
    data.add_argument("--endpoint", help="--engine vllm: the server's URL, e.g. http://localhost:8000")
    data.add_argument(
        "--concurrency", type=positive_int, default=32, help="--engine vllm: requests in flight (default 32)"
    )
    data.add_argument(
        "--timeout", type=positive_float, default=600.0, help="--engine vllm: seconds one request may take"
    )
    data.add_argument(
        "--world-size",
        type=positive_int,
        default=1,
        help="the number of processes (nodes) sharing the work; each takes a contiguous part of the records (and, "
        "with --engine vllm, of the feature shards) and resumes on its own; the blocks are packed once every part "
        "is regenerated",
    )
    data.add_argument("--rank", type=non_negative_int, default=0, help="this process's part: 0..world-size-1")
    data.set_defaults(func=cmd_data)

    serve = sub.add_parser(
        "serve-features",
        help="start a vLLM server that writes the verifier hidden states a draft family trains on",
        description="Start `vllm serve VERIFIER` (from --vllm-python's environment) with vLLM's extract_hidden_states "
        "method and this package's KV connector, for `speculators-hf data --engine vllm --endpoint URL`. Arguments "
        "after `--` go to vllm serve (e.g. -- --tensor-parallel-size 8 --data-parallel-size 2). With --print, "
        "print the command (for a cluster scheduler) instead of running it.",
    )
    serve.add_argument("--verifier", required=True, type=model_ref, help="verifier model id or path")
    serve.add_argument(
        "--family", default="eagle3", choices=sorted(FAMILIES), help="draft family whose hidden states to write"
    )
    serve.add_argument("--layers", help="explicit hidden-state ids instead of the family's, e.g. 2,16,29")
    serve.add_argument(
        "--storage",
        type=Path,
        default=Path("hidden_states"),
        help="folder the server writes hidden states to; must be visible to `data` at the same path (shared "
        "filesystem across nodes)",
    )
    serve.add_argument(
        "--vllm-python",
        default=os.environ.get("SPECULATORS_HF_VLLM_PYTHON", "python"),
        help="the python of the environment where vLLM is installed (default: $SPECULATORS_HF_VLLM_PYTHON or python)",
    )
    serve.add_argument("--print", dest="print_only", action="store_true", help="print the command, do not run it")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then arguments of vllm serve")
    serve.set_defaults(func=cmd_serve_features)

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
        "block_size=8 or num_layers=2 (DFlash, DSpark, DFlash2), markov_head_type=gated (DSpark), selector_top_k=16 "
        "(DFlash2), medusa_num_heads=4 (Medusa)",
    )
    tr.add_argument(
        "--features",
        type=existing_dir,
        help="feature cache folder (default: computed on the fly). The verifier's decoder layers are then never "
        "loaded (nor need to exist): only its config, tokenizer and the tensors the draft borrows (embedding, "
        "final norm, lm_head), read by name from its safetensors",
    )
    tr.add_argument(
        "--eval-verifier",
        type=model_ref,
        help="with --features: the whole verifier (id or path, usually --verifier's) loaded to measure tau on the "
        "held-out blocks; without it the evaluation is skipped",
    )
    tr.add_argument("--device-map", help=DEVICE_MAP_HELP)
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
