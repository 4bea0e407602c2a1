"""What transformers' per-call plumbing costs a verifier pass, and what the own loop gains without it.

    OMP_NUM_THREADS=1 python benchmarks/lean_pass.py --verifier build/smollm2 --draft benchmarks/smollm2/eagle3 \
        --prompts benchmarks/smollm2/heldout_prompts.json [--tree chain:3] [--out benchmarks/results/lean-pass]

1. One verifier pass over `width` tokens after `--context` cached ones, through `verifier(...)` and through
   `speculators_hf.generation.lean.LeanPass` (the same modules called in a plain loop): milliseconds, the median
   of `--repeats` interleaved timings of `--calls` passes each, and whether the logits are bitwise equal.
2. The package's own loop (`speculators_hf.generate`, greedy, `--tree`) on the prompts with `lean_verifier` True
   and False, taking turns: tokens/s (the median run) and whether both give the same tokens.
Both with packed oneDNN linears (`--cpu-kernels onednn`, the bench's default on CPU) or torch's (`torch`).
Writes results.json (with the CPU model); `benchmarks/report.py` renders it in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from speculators_hf.bench import load_pair, machine_description
from speculators_hf.generation.kvcache import additive_mask, cache_kwargs, causal_block
from speculators_hf.generation.lean import LeanPass
from speculators_hf.generation.loop import generate

ROOT = Path(__file__).resolve().parents[1]


def one_width(verifier: Any, lean: LeanPass, width: int, context: int, calls: int, repeats: int) -> dict[str, Any]:
    """Stock and lean milliseconds per pass over `width` tokens after `context`, and whether the logits agree."""
    vocab = verifier.config.vocab_size
    ids = torch.arange(context + width)[None] * 7919 % vocab
    prefix, block = ids[:, :context], ids[:, context:]
    positions = torch.arange(context, context + width)[None]
    allowed = torch.ones(1, width, context + width, dtype=torch.bool)
    allowed[..., context:] = causal_block(torch.ones(1, width, dtype=torch.bool))
    mask = additive_mask(allowed, verifier.dtype)
    stock_cache, lean_cache = DynamicCache(), DynamicCache()
    for cache in (stock_cache, lean_cache):
        verifier(input_ids=prefix, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)

    def stock() -> torch.Tensor:
        kwargs = cache_kwargs(stock_cache)
        out = verifier(input_ids=block, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs)
        stock_cache.crop(-width)
        return out.logits

    def fast() -> torch.Tensor:
        out = lean(block, positions, mask, lean_cache, [])[0]
        lean_cache.crop(-width)
        return out

    equal = torch.equal(stock(), fast())
    times: dict[str, list[float]] = {"stock": [], "lean": []}
    for _ in range(repeats):
        for name, run in (("stock", stock), ("lean", fast)):
            run()
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    row = {"width": width, "equal": equal, **{f"{k}_ms": statistics.median(v) for k, v in times.items()}}
    print(f"width {width}: stock {row['stock_ms']:.2f} ms, lean {row['lean_ms']:.2f} ms, equal {equal}", flush=True)
    return row


def loop_runs(
    verifier: Any, draft: Any, prompts: list[torch.Tensor], tree: str, max_new: int, repeats: int
) -> dict[str, Any]:
    """Own-loop tokens/s with and without the lean pass (median run), and whether their tokens agree."""
    generate(verifier, draft, prompts[0], tree=tree, max_new_tokens=8, do_sample=False)  # warm-up
    seconds: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[list[int]]] = {}
    for _ in range(repeats):
        for lean in (True, False):
            total, tokens, outs = 0.0, 0, []
            for prompt in prompts:
                start = time.perf_counter()
                out = generate(
                    verifier, draft, prompt, tree=tree, max_new_tokens=max_new, do_sample=False, lean_verifier=lean
                )
                total += time.perf_counter() - start
                outs.append(out[0, prompt.shape[1] :].tolist())
                tokens += len(outs[-1])
            seconds[lean].append(total)
            outputs[lean] = outs
    tokens = sum(len(o) for o in outputs[True])
    result = {
        "tree": tree,
        "tokens": tokens,
        "lean_tokens_per_s": tokens / statistics.median(seconds[True]),
        "stock_tokens_per_s": tokens / statistics.median(seconds[False]),
        "identical": outputs[True] == outputs[False],
    }
    print(
        f"own loop ({tree}): lean {result['lean_tokens_per_s']:.1f} tok/s, stock {result['stock_tokens_per_s']:.1f}"
        f" tok/s, identical {result['identical']}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verifier", default=str(ROOT / "build/smollm2"))
    parser.add_argument("--draft", default=str(ROOT / "benchmarks/smollm2/eagle3"))
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks/smollm2/heldout_prompts.json"))
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--tree", default="chain:3")
    parser.add_argument("--widths", default="1,4,8")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=2)
    parser.add_argument("--cpu-kernels", choices=["onednn", "torch"], default="onednn")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lean-pass")
    args = parser.parse_args()
    verifier, draft, prompts = load_pair(args.verifier, args.draft, args.prompts, args.num_prompts, args.cpu_kernels)
    widths = [int(w) for w in args.widths.split(",")]
    lean = LeanPass.of(verifier, [0], draft._binding["tap"].hook_ids)
    if lean is None:
        raise SystemExit(f"{type(verifier).__name__}: no lean pass (not a supported layout, or not bitwise equal)")
    with torch.inference_mode():
        passes = [one_width(verifier, lean, w, args.context, args.calls, args.repeats) for w in widths]
    loop = loop_runs(verifier, draft, prompts, args.tree, args.max_new_tokens, args.loop_repeats)
    meta = {
        "machine": machine_description(),
        "threads": torch.get_num_threads(),
        "cpu_kernels": args.cpu_kernels,
        "context": args.context,
        "repeats": args.repeats,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/lean_pass.py", *sys.argv[1:]]),
    }
    data = {"meta": meta, "passes": passes, "loop": loop}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}/results.json (BENCHMARKS.md renders it: benchmarks/report.py)")


if __name__ == "__main__":
    main()
