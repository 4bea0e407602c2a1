"""The `speculators-hf` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .arguments import (
    Parser,
    draft_lengths,
    existing_dir,
    existing_file,
    model_ref,
    new_dir,
    non_negative_int,
    positive_int,
    tree_spec,
)
from .cpu_kernels import CHOICES as CPU_KERNEL_CHOICES
from .cpu_kernels import use_cpu_kernels
from .prompts import prompt_ids, prompt_tensors, use_chat

CPU_KERNELS_HELP = (
    "linear kernels on the CPU: onednn = float32 weights prepacked for oneDNN, as vLLM's CPU backend runs them "
    "(a k-token verifier pass costs far less; the packed copy takes the weights' memory once more), torch = "
    "PyTorch's stock linear, auto (default) = onednn where this torch build has it"
)
CODE_DEMO_PROMPT = "import os\nimport sys\n\ndef main(argv):\n    "  # the zoo's domain: Python's stdlib and docs
CHAT_DEMO_PROMPT = "Explain in a few sentences how a compiler turns source code into a program."


def left_padded(rows: list[list[int]], device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as one left-padded batch (pad id 0, masked out) and its attention mask."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _use_cpu_kernels(args: argparse.Namespace, *models: Any, announce: bool = True) -> str:
    """--cpu-kernels, for the rest of the process (see `speculators_hf.cpu_kernels`); returns the kernels that run
    ("onednn" or "torch") for the results' metadata. `announce`: say so on stdout (demo and bench, whose output
    is a report; not generate, whose stdout may be JSON and whose errors are one line on stderr)."""
    packed = use_cpu_kernels(args.cpu_kernels, *models)
    if packed is None or not packed.count:
        return "torch"
    if announce:
        print(f"cpu kernels: oneDNN, {packed.count} linears prepacked ({packed.packed_bytes / 2**20:.0f} MiB)")
    return "onednn"


def _builtin_pair(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """A small random Llama verifier and an untrained EAGLE-3 draft, built here (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import Eagle3Speculator

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=12, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, initializer_range=0.1,
    )  # fmt: skip
    verifier = LlamaForCausalLM(config).eval()
    draft = Eagle3Speculator.from_verifier(verifier, draft_vocab_size=1024, speculative_tokens=args.num_draft_tokens)
    return verifier, draft, None


def _hub_pair(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from .config import SpeculatorConfig
    from .loading import AutoSpeculatorForCausalLM, load_tokenizer

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    # the verifier's tokenizer is loaded first, so that binding checks the draft's recorded tokenizer_hash
    name = args.verifier or SpeculatorConfig.from_pretrained(args.draft).verifier.get("name_or_path")
    tokenizer = load_tokenizer(name) if name else None  # no name: the next line says what to pass
    draft = AutoSpeculatorForCausalLM.from_pretrained(
        args.draft, verifier=args.verifier, dtype=dtype, tokenizer=tokenizer
    )
    verifier: Any = draft.verifier
    if args.device:
        verifier.to(args.device)
        draft.to(args.device)
    return verifier.eval(), draft.eval(), tokenizer


def _zoo_pair(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The embedded zoo: a verifier and an EAGLE-3 draft trained on this kind of machine."""
    from .zoo import load_zoo_draft, zoo_tokenizer

    draft = load_zoo_draft("eagle3")
    draft.config.speculative_tokens = args.num_draft_tokens
    return draft.verifier, draft, zoo_tokenizer()


def cmd_demo(args: argparse.Namespace) -> int:
    from .zoo import zoo_dir

    builtin = args.draft is None and zoo_dir() is None
    if args.draft is not None:
        verifier, draft, tokenizer = _hub_pair(args)
    else:
        verifier, draft, tokenizer = _builtin_pair(args) if builtin else _zoo_pair(args)
    if tokenizer is not None:
        chat = use_chat(tokenizer, args.chat)
        prompt = args.prompt or (CHAT_DEMO_PROMPT if chat else CODE_DEMO_PROMPT)
        input_ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)], device=verifier.device)
        print(f"prompt:   {prompt!r}" + (" (in the verifier's chat template)" if chat else ""))
    else:
        input_ids = torch.arange(3, 3 + 16)[None]
    family = draft.config.speculators_model_type
    print(f"verifier: {draft.config.verifier.get('name_or_path') or type(verifier).__name__}"
          f" ({sum(p.numel() for p in verifier.parameters()) / 1e6:.1f}M parameters)")  # fmt: skip
    print(f"draft:    {family}, {sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M parameters, "
          f"k={draft.config.speculative_tokens} tokens per round")  # fmt: skip
    from .bench import identity, machine_description, run_bench

    _use_cpu_kernels(args, verifier, draft)
    k = int(draft.config.speculative_tokens)
    # the bench's machinery: a warm-up, then the two methods take turns `repeats` times; median run of each,
    # and "identical" compares every run's output with the verifier alone, token for token
    plain, assisted = run_bench(
        verifier, [input_ids], {family: draft}, [k], args.max_new_tokens, prompt_lookup=False, repeats=args.repeats,
        progress=False,
    )  # fmt: skip
    with torch.inference_mode():
        output = verifier.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    new = output[0, input_ids.shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else str(new.tolist())
    print(f"\noutput ({len(new)} tokens): {text}\n")
    print(f"identical to the verifier alone: {identity(assisted)} (all {args.repeats} runs)")
    print(
        f"acceptance: tau {assisted.tau:.2f} tokens per verifier pass, "
        f"{assisted.extra.get('acceptance_rate', 0.0):.0%} of the drafted tokens accepted"
    )
    print(
        f"time (median of {args.repeats} runs, taking turns): verifier alone {plain.seconds:.3f}s, with the draft "
        f"{assisted.seconds:.3f}s -> speedup {assisted.speedup:.2f}x"
    )
    print(f"machine: {machine_description()}")
    if builtin:
        print(
            "\nThe benchmark zoo is not in this checkout, so this was a random verifier with an UNTRAINED draft: "
            "few draft tokens are accepted (tau near 1) and there is no speedup; it shows the exactness guarantee. "
            "Pass --verifier/--draft with Hub ids (e.g. --draft org/llama-eagle3) to see a trained draft at work."
        )
    return 1 if assisted.failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import (
        machine_description,
        markdown_table,
        run_bench,
        verification_table,
        write_report,
    )
    from .generation.policy import CALIBRATION_WIDTHS, auto_depth, verification_costs
    from .generation.tree import TreeSpec
    from .loading import load_draft
    from .zoo import load_zoo_draft, zoo_families, zoo_prompts

    k_values = args.k
    dtype = getattr(torch, args.dtype)
    if args.verifier is None:  # the embedded zoo
        families = args.families.split(",") if args.families else zoo_families()
        verifier: Any = None
        drafts, assistant_lm = {}, None
        for family in families:
            drafts[family] = load_zoo_draft(family, dtype=dtype, verifier=verifier)
            verifier = drafts[family].verifier
        if "independent" in drafts:  # its LM is also the baseline for transformers' own assisted generation
            assistant_lm = drafts["independent"].model
        prompts = zoo_prompts()
    else:
        from transformers import AutoModelForCausalLM

        from .loading import load_tokenizer

        verifier = AutoModelForCausalLM.from_pretrained(args.verifier, dtype=dtype).eval()
        tokenizer = load_tokenizer(args.verifier)
        drafts = {}
        for spec in args.draft or []:
            name, _, path = spec.rpartition("=")
            drafts[name or path] = load_draft(model_ref(path), dtype=dtype).bind_verifier(verifier, tokenizer=tokenizer)
        assistant_lm = (
            AutoModelForCausalLM.from_pretrained(args.assistant_lm, dtype=dtype).eval() if args.assistant_lm else None
        )
        texts = json.loads(Path(args.prompts).read_text()) if args.prompts else ["def main():\n"]
        prompts = prompt_tensors(texts, tokenizer, args.chat)
    if args.device:
        verifier.to(args.device)
        for draft in drafts.values():
            draft.to(args.device)
    prompts = prompts[: args.num_prompts]
    adaptive = [t for t in [*k_values, *(args.tree or [])] if isinstance(t, str) and auto_depth(t) is not None]
    widths = [k + 1 for k in k_values if isinstance(k, int)]
    widths += [TreeSpec.parse(t).num_nodes + 1 for t in args.tree or [] if auto_depth(t) is None]
    widths += list(CALIBRATION_WIDTHS) if adaptive else []  # auto rows draft any length
    kernels = _use_cpu_kernels(args, verifier, assistant_lm, *drafts.values())
    costs = verification_costs(verifier, widths)  # first: it also warms the verifier up
    peers = _vllm_peers(args, drafts, prompts, [k for k in k_values if isinstance(k, int)] or [5])
    results = run_bench(
        verifier, prompts, drafts, k_values, args.max_new_tokens, assistant_lm, not args.no_prompt_lookup,
        trees=args.tree,
        batch_size=args.batch_size,
        repeats=args.repeats,
        verification_cost=costs,
        peers=peers,
    )  # fmt: skip
    meta = {
        "machine": machine_description(),
        "command": "speculators-hf " + " ".join(sys.argv[1:]),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "verification_cost": costs,
        "cpu_kernels": kernels,
    }
    out = write_report(results, args.out, meta)
    print(markdown_table(results))
    print(verification_table(meta["verification_cost"]))
    print(f"written to {out}")
    # a peer engine's rows say whether its output is the verifier's, but only ours are held to it
    different = [f"{r.method} (k={r.k})" if r.k else r.method for r in results if r.failed and "engine" not in r.extra]
    if different:
        print(f"NOT identical to the verifier alone: {', '.join(different)}", file=sys.stderr)
        return 1
    return 0


def _vllm_peers(args: argparse.Namespace, drafts: dict[str, Any], prompts: list[torch.Tensor], fixed: list[int]) -> Any:
    """--vllm-python (or $SPECULATORS_HF_VLLM_PYTHON): vLLM-CPU's rows for the bench, the middle fixed k."""
    from functools import partial

    from .engines.vllm_bench import vllm_peer_rows, vllm_python_from_env

    python = args.vllm_python or vllm_python_from_env()
    if python is None:
        return None
    from .zoo import zoo_verifier_dir

    verifier_dir = args.verifier if args.verifier is not None else zoo_verifier_dir()
    k = fixed[len(fixed) // 2]
    return partial(vllm_peer_rows, python, verifier_dir, drafts, k, prompts, args.max_new_tokens, dtype=args.dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    """The package's own loop (token trees, a batch of prompts); --check compares with the verifier alone."""
    from .generation.loop import generate

    verifier, draft, tokenizer = _hub_pair(args) if args.draft is not None else _builtin_pair(args)
    if tokenizer is not None:
        chat = use_chat(tokenizer, args.chat)
        texts = args.prompt or [CHAT_DEMO_PROMPT if chat else "def fibonacci(n):\n    "]
        id_rows = [prompt_ids(tokenizer, text, chat) for text in texts]
    else:  # the built-in pair has no tokenizer: one row of ids per prompt, 3 + its length
        texts = args.prompt or ["def fibonacci(n):\n    "]
        id_rows = [list(range(3, 3 + 8 + len(t) % 8)) for t in texts]
    input_ids, attention_mask = left_padded(id_rows, verifier.device)
    _use_cpu_kernels(args, verifier, draft, announce=False)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = {"do_sample": args.do_sample}
    if args.do_sample:
        sampling.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    start = time.perf_counter()
    out: Any = generate(
        verifier, draft, input_ids, attention_mask, tree=args.tree, max_new_tokens=args.max_new_tokens,
        return_dict_in_generate=True, **sampling,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    identical = None
    if args.check and not args.do_sample:
        reference = verifier.generate(input_ids, attention_mask=attention_mask, max_new_tokens=args.max_new_tokens,
                                      do_sample=False)  # fmt: skip
        width = input_ids.shape[1]
        identical = all(
            torch.equal(out.sequences[i, width : width + len(ref)], ref) for i, ref in enumerate(reference[:, width:])
        )
    rows = []
    for i, sequence in enumerate(out.sequences[:, input_ids.shape[1] :]):
        count = out.row_stats[i].emitted_tokens
        new = sequence[:count]
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else str(new.tolist())
        rows.append({"prompt": texts[i], "output": text, **out.row_stats[i].to_dict()})
    summary = {"tree": str(args.tree), "seconds": seconds, "stats": out.stats.to_dict(), "identical": identical}
    if args.json:
        print(json.dumps({"rows": rows, **summary}, indent=2, default=str))
    else:
        for row in rows:
            print(f"[tau {row['tau']:.2f}] {row['prompt']!r} -> {row['output']!r}")
        print(f"\ntree {summary['tree']}: {out.stats} in {seconds:.3f}s")
        if identical is not None:
            print(f"identical to the verifier alone: {'yes' if identical else 'NO'}")
    return 0 if identical is not False else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from .hub import tensor_table
    from .loading import load_draft

    draft = load_draft(args.path)
    config = draft.config
    tensors = tensor_table(draft)
    info = {
        "family": config.speculators_model_type,
        "class": type(draft).__name__,
        "verifier": config.verifier,
        "speculative_tokens": config.speculative_tokens,
        "parameters": sum(p.numel() for p in draft.parameters()),
        "tensors": {t["name"]: t["shape"] for t in tensors},
        "vllm_tensor_names": {t["name"]: t["vllm_name"] for t in tensors},
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    verifier = dict(config.verifier)
    name = verifier.pop("name_or_path", None) or "(not set)"
    revision = verifier.pop("revision", None)
    architectures = ", ".join(verifier.pop("architectures", None) or []) or "-"
    fingerprint = " ".join(f"{k}={v}" for k, v in verifier.items() if v is not None) or "-"
    print(f"family:        {info['family']} ({info['class']})")
    print(f"verifier:      {name}" + (f" @ {revision}" if revision else ""))
    print(f"architectures: {architectures}")
    print(f"fingerprint:   {fingerprint}")
    print(f"draft length:  {info['speculative_tokens']} tokens per round")
    print(f"parameters:    {info['parameters']:,}")
    print()
    rows = [
        (
            t["name"],
            "[" + ", ".join(map(str, t["shape"])) + "]",
            t["dtype"],
            "same" if t["vllm_name"] == t["name"] else t["vllm_name"],
        )
        for t in tensors
    ]
    header = ("tensor", "shape", "dtype", "vLLM / speculators name")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    return 0


def _json_arg(value: str | None) -> Any:
    """A JSON value given inline or as the path of a JSON file."""
    if value is None:
        return None
    path = Path(value)
    return json.loads(path.read_text() if path.is_file() else value)


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    card_inputs = dict(_json_arg(args.card_info) or {})
    if args.license:
        card_inputs["license"] = args.license
    results = _json_arg(args.results)
    if results is not None:
        card_inputs["results"] = results
    info = push_to_hub(
        args.path,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
        endpoint=args.endpoint,
        check_verifier=not args.no_check_verifier,
        verifier=args.verifier,
        **card_inputs,
    )
    print(
        f"pushed {args.path} to {args.repo_id}"
        + (f" ({args.revision})" if args.revision else "")
        + f": {info.commit_url}"
    )
    return 0


CHAT_HELP = (
    "prompt through the verifier's chat template, as a user turn followed by the assistant's header (default: "
    "whenever the tokenizer has a chat template; --no-chat: plain text)"
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="speculators-hf", description="Speculative-decoding drafts as native Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="generate with and without a draft; show identical output, tau and speedup",
        description="Generate greedily with the verifier alone and with a draft, check that the outputs are "
        "identical, and print the acceptance length (tau) and the speedup measured in this run. Without "
        "--draft: the benchmark zoo's verifier and EAGLE-3 draft (benchmarks/zoo), or, where the zoo is "
        "absent, a random verifier with an untrained draft built locally (no download).",
    )
    demo.add_argument("--draft", type=model_ref, help="draft checkpoint (Hub id or path); default: built-in pair")
    demo.add_argument(
        "--verifier", type=model_ref, help="verifier (Hub id or path); default: the one named by the draft"
    )
    demo.add_argument(
        "--prompt", help="prompt text (default: a question for a chat model, Python code for the zoo's verifier)"
    )
    demo.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help=CHAT_HELP)
    demo.add_argument("--max-new-tokens", type=positive_int, default=128)
    demo.add_argument("--num-draft-tokens", type=positive_int, default=5, help="draft length k (built-in pair)")
    demo.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed runs of each method, taking turns (the median is reported)",
    )
    demo.add_argument("--dtype", default="auto", help="torch dtype for Hub models (auto, float32, bfloat16, ...)")
    demo.add_argument("--device", default=None, help="device for Hub models (cpu, cuda, ...)")
    demo.add_argument("--cpu-kernels", choices=CPU_KERNEL_CHOICES, default="auto", help=CPU_KERNELS_HELP)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="measure tau and speedup against the verifier alone, transformers assisted generation and prompt lookup",
        description="Greedy generation on held-out prompts with every method, in one run; writes results.json, "
        "results.md and speedup.png to --out. Without --verifier: the embedded benchmark zoo.",
    )
    bench.add_argument("--verifier", type=model_ref, help="verifier id or path (default: the benchmark zoo)")
    bench.add_argument("--draft", action="append", help="NAME=PATH of a draft (repeatable)")
    bench.add_argument("--assistant-lm", type=model_ref, help="small LM for transformers' own assisted generation")
    bench.add_argument("--families", help="zoo drafts to run (default: all)")
    bench.add_argument("--prompts", type=existing_file, help="JSON list of prompt strings (or token id lists)")
    bench.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help=CHAT_HELP)
    bench.add_argument("--num-prompts", type=positive_int, default=12)
    bench.add_argument(
        "--k", type=draft_lengths, default=[3, 5, 7], help="draft lengths, e.g. 3,5,7; 'auto' (or auto:<max>) adds a row "
        "per draft with the length chosen round by round for speed on this machine (num_assistant_tokens='auto'; a "
        "DSpark draft, which can also stop on its confidence head, gets a second row stopping on it)",
    )  # fmt: skip
    bench.add_argument("--max-new-tokens", type=positive_int, default=96)
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--device", default=None)
    bench.add_argument("--no-prompt-lookup", action="store_true")
    bench.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="also measure throughput on batches of this many prompts (own loop)",
    )
    bench.add_argument(
        "--repeats", type=positive_int, default=1, help="run every method this many times over all prompts and report each "
        "method's median run; the methods always take turns prompt by prompt (for machines shared with other work)",
    )  # fmt: skip
    bench.add_argument("--out", type=new_dir, default="bench_results", help="output folder")
    bench.add_argument(
        "--tree", action="append", type=tree_spec, help="also run each draft in the package's own loop with this tree "
        "(chain:5, chain:10:0.4 = stop where the draft's probability of the chain falls below 0.4, dynamic:6:8:48 = "
        "depth:top_k:total_tokens[:beam], a JSON list of rank paths, or auto[:max] = chosen round by round for speed "
        "on this machine); repeatable",
    )  # fmt: skip
    bench.add_argument(
        "--vllm-python", help="the python of a vLLM environment (default: $SPECULATORS_HF_VLLM_PYTHON): adds vLLM-CPU's "
        "rows (the verifier alone and each draft vLLM serves, the middle k, one engine process each; "
        "engines/vllm_bench.py)",
    )  # fmt: skip
    bench.add_argument("--cpu-kernels", choices=CPU_KERNEL_CHOICES, default="auto", help=CPU_KERNELS_HELP)
    bench.set_defaults(func=cmd_bench)

    gen = sub.add_parser(
        "generate",
        help="speculative generation with token trees and batches (the package's own loop)",
        description="Generate for one or more prompts (one batch) with a draft in speculators_hf's own loop: "
        "chains, EAGLE-2 dynamic trees or static trees, greedy or sampled. Prints each output with its tau. "
        "Without --draft: a random verifier with an untrained EAGLE-3 draft built locally (no download).",
    )
    gen.add_argument("--draft", type=model_ref, help="draft checkpoint (Hub id or path); default: built-in pair")
    gen.add_argument(
        "--verifier", type=model_ref, help="verifier (Hub id or path); default: the one named by the draft"
    )
    gen.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help=CHAT_HELP)
    gen.add_argument("--tree", default=None, type=tree_spec, help="chain[:depth[:stop_below]], dynamic[:depth[:top_k[:total_tokens[:beam]]]], a "
                     "JSON list of rank paths (static tree) or auto[:max] (chosen round by round for speed on this "
                     "machine); default: a chain of the draft's length")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--num-draft-tokens", type=positive_int, default=5, help="draft length k (built-in pair)")
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=non_negative_int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--check", action="store_true", help="greedy: also generate with the verifier alone and compare")
    gen.add_argument("--json", action="store_true", help="print JSON")
    gen.add_argument("--dtype", default="auto", help="torch dtype for Hub models (auto, float32, bfloat16, ...)")
    gen.add_argument("--device", default=None, help="device for Hub models (cpu, cuda, ...)")
    gen.add_argument("--cpu-kernels", choices=CPU_KERNEL_CHOICES, default="auto", help=CPU_KERNELS_HELP)
    gen.set_defaults(func=cmd_generate)

    inspect = sub.add_parser(
        "inspect",
        help="print a draft's family, verifier, fingerprint, draft length, size and tensors",
        description="Print a draft's family, verifier reference and fingerprint, draft length, parameter count, "
        "and every tensor with its shape, dtype and its name in the checkpoint vLLM/speculators reads "
        "('same' when identical).",
    )
    inspect.add_argument("path", type=model_ref, help="draft checkpoint (Hub id or path)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(func=cmd_inspect)

    push = sub.add_parser(
        "push",
        help="upload a saved draft and its model card to the Hub in one commit",
        description="Upload the checkpoint files of a draft folder (written by save_pretrained) plus its model card to "
        "a Hub repo in one commit: config.json, generation_config.json, the safetensors weights and their index, the "
        "speculators_*.py remote code, README.md, custom_generate/, tokenizer files, training_summary.json and a "
        "LICENSE/NOTICE. Only regular files inside the folder are uploaded: never a dotfile or dot-folder (.env, "
        ".git), a symbolic link or a special file; every file left out is named in a warning. The verifier "
        "reference must be a Hub id that exists (checked first). A README.md written by a person (in the folder or "
        "already in the repo) is kept.",
    )
    push.add_argument("path", type=existing_dir, help="draft folder written by save_pretrained")
    push.add_argument("repo_id", help="target repo, e.g. org/llama-eagle3")
    push.add_argument("--private", action="store_true", help="create the repo private (a new repo only)")
    push.add_argument("--revision", help="branch to commit to (created if missing); default main")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--commit-message", help="commit summary")
    push.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    push.add_argument("--verifier", help="verifier Hub id to record in the uploaded config.json")
    push.add_argument("--no-check-verifier", action="store_true", help="do not look the verifier up on the Hub")
    push.add_argument("--license", help="license id for the card (default: the verifier's)")
    push.add_argument(
        "--results", help="measured results for the card: JSON or a JSON file ({tau, speedup, command, device})"
    )
    push.add_argument(
        "--card-info", help="more card inputs (training, datasets, tags, notes, ...): JSON or a JSON file"
    )
    push.set_defaults(func=cmd_push)

    from .training.cli import add_parsers as add_training_parsers

    add_training_parsers(sub)
    from .convert.cli import add_parsers as add_convert_parsers

    add_convert_parsers(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--debug", action="store_true", help="show the full traceback of an error (also: SPECULATORS_HF_DEBUG=1)"
        )
    return parser


def one_line(err: BaseException) -> str:
    """An exception's message on one line (our errors list one problem per line: they are joined with "; ")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand. A failure prints ONE line on stderr (`speculators-hf CMD: error: ...`) and exits 1;
    bad arguments exit 2; `--debug` (or SPECULATORS_HF_DEBUG=1) shows the traceback instead."""
    args = build_parser().parse_args(argv)
    if args.debug or os.environ.get("SPECULATORS_HF_DEBUG"):
        return int(args.func(args))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"speculators-hf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure, expected or not, is one line; --debug shows where it came from
        print(
            f"speculators-hf {args.command}: error: {one_line(err)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
