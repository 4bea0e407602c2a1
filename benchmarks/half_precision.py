"""Greedy output with a draft in float32, bfloat16 and float16: how often it differs from the verifier alone, for
our drafts and loops, transformers' assisted generation with a small LM and prompt lookup.

    nice -n 10 python benchmarks/half_precision.py [--dtypes float32,bfloat16,float16] [--k 5] \
        [--zoo-prompts 24] [--zoo-tokens 64] [--families eagle3,dflash,peagle] [--tree dynamic:7:4:15:2] \
        [--smollm2 /work/smollm2] [--smollm2-prompts 16] [--smollm2-tokens 48] \
        [--cpu-kernels torch|onednn] [--out benchmarks/results/half-precision/results.json] [--note "shared machine"]

Two verifiers: the benchmark zoo (`benchmarks/zoo/hub`, offline, its prompts; each zoo family's draft in
transformers' loop and in the package's own loop, EAGLE-3 also with a tree; transformers' assisted generation
with the zoo's independent small LM; prompt lookup) and SmolLM2-135M-Instruct from a local folder (skipped with a
message when absent; the chat prompts of benchmarks/walkthrough_prompts.jsonl in its chat template; no trained
draft of ours exists for it, so the drafts are exact copies of the verifier, the worst case: transformers'
assisted generation with the copy as its assistant, the copy as our independent draft in the own loop, and
prompt lookup). Every run is greedy, in the same dtype as its reference, the verifier alone.

Per verifier, dtype and method: the prompts whose output differs from the verifier alone, the new tokens from the
first difference on (a share of all new tokens), tau (new tokens per verifier forward pass, counted by a hook on
the verifier), and the tokens that are not the verifier's argmax in the forward pass that verified them
(`speculators_hf.bench.VerifierPasses`; 0 for a correct speculative decoder in every dtype). Also: the prompts
whose output from the verifier alone changes between float32 and each half precision. `--cpu-kernels onednn`:
the methods run with oneDNN prepacked linears (`speculators_hf.cpu_kernels`), compared with the verifier alone
with torch's stock kernels (results-onednn.json).

The file is rewritten after each method, and a rerun with the same settings resumes from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import speculators_hf as sh
from speculators_hf.bench import VerifierPasses, cpu_model
from speculators_hf.prompts import chat_ids
from speculators_hf.cpu_kernels import CHOICES, use_cpu_kernels
from speculators_hf.zoo import load_zoo_draft, zoo_dir, zoo_prompts

ROOT = Path(__file__).resolve().parent.parent
Method = Callable[[torch.Tensor], torch.Tensor]  # prompt [1, n] -> prompt + new tokens [1, n + m]


def first_difference(new: list[int], reference: list[int]) -> int | None:
    """Index of the first new token that differs from the reference's (a shorter or longer output differs where
    the shorter ends); None when they are equal."""
    for i, (a, b) in enumerate(zip(new, reference)):
        if a != b:
            return i
    return None if len(new) == len(reference) else min(len(new), len(reference))


@torch.inference_mode()
def measure(verifier: Any, run: Method, prompts: list[torch.Tensor], references: list[list[int]]) -> dict[str, Any]:
    """Run `run` on every prompt and compare each output with the verifier alone's new tokens `references`."""
    differing, tokens, after, passes, not_argmax, start = [], 0, 0, 0, 0, time.perf_counter()
    for index, (prompt, reference) in enumerate(zip(prompts, references)):
        with VerifierPasses(verifier) as recorded:
            out = run(prompt)[0].cpu()
        new = out[prompt.shape[1] :].tolist()
        tokens, passes = tokens + len(new), passes + len(recorded.passes)
        not_argmax += len(recorded.mismatches(prompt.shape[1], out))
        at = first_difference(new, reference)
        if at is not None:
            differing.append({"prompt": index, "first_difference": at, "new_tokens": len(new)})
            after += len(new) - at
    return {
        "prompts": len(prompts),
        "prompts_differing": len(differing),
        "new_tokens": tokens,
        "tokens_from_first_difference": after,
        "tau": tokens / passes,
        "tokens_not_argmax_of_their_pass": not_argmax,
        "differing": differing,
        "seconds": time.perf_counter() - start,
    }


def greedy(verifier: Any, max_new_tokens: int, **kwargs: Any) -> Method:
    return lambda prompt: verifier.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def own_loop(verifier: Any, draft: Any, tree: str, max_new_tokens: int) -> Method:
    return lambda prompt: sh.generate(
        verifier, draft, prompt, tree=tree, max_new_tokens=max_new_tokens, do_sample=False
    )


def small_lm(lm: Any, k: int) -> Any:
    """`lm` drafting a constant k tokens a round in transformers' assisted generation."""
    lm.generation_config.num_assistant_tokens = k
    lm.generation_config.num_assistant_tokens_schedule = "constant"
    return lm


Setup = tuple[Any, list[torch.Tensor], dict[str, Method], list[Any]]  # verifier, prompts, methods, drafts/LMs


def zoo_setup(dtype: torch.dtype, args: argparse.Namespace) -> Setup:
    drafts: dict[str, Any] = {}
    verifier = None
    for family in args.families:
        drafts[family] = load_zoo_draft(family, dtype=dtype, verifier=verifier)
        verifier = drafts[family].verifier
    lm = small_lm(load_zoo_draft("independent", dtype=dtype, verifier=verifier).model, args.k)
    k, n = args.k, args.zoo_tokens
    methods: dict[str, Method] = {}
    for family, draft in drafts.items():
        methods[f"{family}, transformers' loop, k={k}"] = greedy(
            verifier, n, assistant_model=draft, num_assistant_tokens=k
        )
        methods[f"{family}, own loop, chain:{k}"] = own_loop(verifier, draft, f"chain:{k}", n)
    if args.tree and "eagle3" in drafts:
        methods[f"eagle3, own loop, tree {args.tree}"] = own_loop(verifier, drafts["eagle3"], args.tree, n)
    methods[f"transformers assisted, zoo small LM, k={k}"] = greedy(verifier, n, assistant_model=lm)
    methods[f"prompt lookup, k={k}"] = greedy(verifier, n, prompt_lookup_num_tokens=k)
    return verifier, zoo_prompts()[: args.zoo_prompts], methods, [*drafts.values(), lm]


def smollm2_setup(dtype: torch.dtype, args: argparse.Namespace) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verifier = AutoModelForCausalLM.from_pretrained(args.smollm2, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    lines = (ROOT / "benchmarks" / "walkthrough_prompts.jsonl").read_text().splitlines()
    prompts = [
        torch.tensor([chat_ids(tokenizer, json.loads(line)["messages"], add_generation_prompt=True)])
        for line in lines[: args.smollm2_prompts]
    ]
    copy_lm = small_lm(copy.deepcopy(verifier), args.k)
    ours = sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier, tokenizer=tokenizer)
    k, n = args.k, args.smollm2_tokens
    methods: dict[str, Method] = {
        f"transformers assisted, copy of the verifier, k={k}": greedy(verifier, n, assistant_model=copy_lm),
        f"independent draft = copy of the verifier, own loop, chain:{k}": own_loop(verifier, ours, f"chain:{k}", n),
        f"prompt lookup, k={k}": greedy(verifier, n, prompt_lookup_num_tokens=k),
    }
    return verifier, prompts, methods, [copy_lm, ours]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--zoo-prompts", type=int, default=24)
    parser.add_argument("--zoo-tokens", type=int, default=64)
    parser.add_argument("--families", default="eagle3,dflash,peagle")
    parser.add_argument("--tree", default="dynamic:7:4:15:2", help="a tree for the zoo's EAGLE-3 ('' for none)")
    parser.add_argument("--smollm2", type=Path, default=Path("/work/smollm2"))
    parser.add_argument("--smollm2-prompts", type=int, default=16)
    parser.add_argument("--smollm2-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--cpu-kernels", choices=CHOICES, default="torch", help="the methods' linears (speculators_hf.cpu_kernels); "
        "the reference is always the verifier alone with torch's stock kernels",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/half-precision/results.json")
    parser.add_argument("--note", default="", help="e.g. 'shared machine' (stored with the figures)")
    args = parser.parse_args()
    args.families = args.families.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "note")}
    command = "python benchmarks/half_precision.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k != "families"
    ) + f" --families {','.join(args.families)}"  # fmt: skip
    results: dict[str, Any] = {}
    if args.out.exists():  # resume a run with the same settings
        results = json.loads(args.out.read_text())
        if results.get("settings") != settings:
            results = {}
    results.update(
        settings=settings,
        command=command,
        note=args.note,
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        k=args.k,
    )
    results.setdefault("verifiers", {})
    results["complete"] = False
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    setups = []
    if zoo_dir() is not None:
        setups.append(("zoo", f"benchmark zoo ({args.zoo_prompts} prompts x {args.zoo_tokens} new tokens)", zoo_setup))
    else:
        print("the benchmark zoo is not in this checkout: skipping it")
    if (args.smollm2 / "config.json").exists():
        label = f"SmolLM2-135M-Instruct ({args.smollm2_prompts} chat prompts x {args.smollm2_tokens} new tokens)"
        setups.append(("smollm2", label, smollm2_setup))
    else:
        print(f"no SmolLM2 folder at {args.smollm2}: skipping it")
    for name, label, setup in setups:
        entry = results["verifiers"].setdefault(name, {"label": label, "dtypes": {}})
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            verifier, prompts, methods, drafts = setup(dtype, args)
            done = entry["dtypes"].setdefault(dtype_name, {"methods": {}})
            if "reference" not in done:
                alone = greedy(verifier, args.zoo_tokens if name == "zoo" else args.smollm2_tokens)
                with torch.inference_mode():
                    done["reference"] = [alone(p)[0, p.shape[1] :].tolist() for p in prompts]
                save()
            use_cpu_kernels(args.cpu_kernels, verifier, *drafts)  # after the reference: it stays stock
            for method, run in methods.items():
                if method in done["methods"]:
                    continue
                row = measure(verifier, run, prompts, done["reference"])
                done["methods"][method] = row
                save()
                print(
                    f"{name} {dtype_name} {method}: {row['prompts_differing']}/{row['prompts']} prompts differ, "
                    f"{row['tokens_from_first_difference']}/{row['new_tokens']} tokens from the first difference, "
                    f"tau {row['tau']:.2f}, not argmax {row['tokens_not_argmax_of_their_pass']}, {row['seconds']:.0f} s",
                    flush=True,
                )
        float32 = entry["dtypes"].get("float32", {}).get("reference")
        for dtype_name, done in entry["dtypes"].items():  # the verifier alone against itself in float32
            if float32 is not None and dtype_name != "float32":
                done["alone_differs_from_float32"] = sum(
                    first_difference(a, b) is not None for a, b in zip(done["reference"], float32)
                )
    results["complete"] = True
    save()
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
