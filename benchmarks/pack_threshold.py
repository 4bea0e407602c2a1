"""Which linears to prepack for oneDNN: the own loop and the verifier alone with the packing threshold at each value.

    OMP_NUM_THREADS=1 python benchmarks/pack_threshold.py [--thresholds 200000,40000,1] [--repeats 6] \
        [--out benchmarks/results/pack-threshold-zoo]

`prepack_linears(..., min_elements=T)` packs the float32 linears of at least T weights. For each T, in an order
rotated every repeat (so that no threshold always runs first on a VM whose speed drifts): the package's own loop
(a chain of `--k`, the zoo's EAGLE-3 draft) and the verifier alone (`verifier.generate`) on the zoo's first
`--num-prompts` prompts, greedy; tokens/s per repeat and their median, and whether every threshold gives the
tokens of the first. Writes results.json (with the CPU model).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from speculators_hf import generate
from speculators_hf.bench import machine_description
from speculators_hf.cpu_kernels import prepack_linears
from speculators_hf.zoo import load_zoo_draft, zoo_prompts

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", default="200000,40000,1")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pack-threshold-zoo")
    args = parser.parse_args()
    draft = load_zoo_draft("eagle3")  # float32, bound to the zoo verifier (upcast)
    verifier = draft.verifier
    prompts = zoo_prompts()[: args.num_prompts]
    thresholds = [int(t) for t in args.thresholds.split(",")]
    runs = {
        "own loop": lambda p: generate(verifier, draft, p, tree=f"chain:{args.k}", max_new_tokens=args.max_new_tokens,
                                       do_sample=False),
        "verifier alone": lambda p: verifier.generate(p, max_new_tokens=args.max_new_tokens, do_sample=False),
    }  # fmt: skip
    speeds: dict[str, dict[int, list[float]]] = {name: {t: [] for t in thresholds} for name in runs}
    outputs: dict[str, dict[int, list[list[int]]]] = {name: {} for name in runs}
    for repeat in range(args.repeats):
        for threshold in thresholds[repeat % len(thresholds) :] + thresholds[: repeat % len(thresholds)]:
            with prepack_linears(verifier, draft, min_elements=threshold), torch.inference_mode():
                for name, run in runs.items():
                    run(prompts[0][:, :8])  # warm-up
                    start, tokens = time.perf_counter(), []
                    for prompt in prompts:
                        tokens.append(run(prompt)[0, prompt.shape[1] :].tolist())
                    seconds = time.perf_counter() - start
                    speeds[name][threshold].append(sum(map(len, tokens)) / seconds)
                    outputs[name][threshold] = tokens
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    results = []
    for threshold in thresholds:
        row = {"min_elements": threshold}
        for name in runs:
            row[name] = {
                "tokens_per_s": speeds[name][threshold],
                "median": statistics.median(speeds[name][threshold]),
                "same_tokens": outputs[name][threshold] == outputs[name][thresholds[0]],
            }
        results.append(row)
        print(threshold, {name: round(row[name]["median"], 1) for name in runs})
    meta = {
        "machine": machine_description(),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "repeats": args.repeats,
        "command": "python " + shlex.join(["benchmarks/pack_threshold.py", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
