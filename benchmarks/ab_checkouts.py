"""A/B two checkouts of speculators-hf on the benchmark zoo, taking turns prompt by prompt.

    python benchmarks/ab_checkouts.py --a /path/to/old/src --b src --family eagle3 --k 5 --repeats 5 \
        --out benchmarks/results/ab/results.json

Each checkout runs in its own worker process (its `src` first on sys.path) that loads the zoo verifier and
draft once; the parent hands every prompt to A, then to B, then the next prompt, `repeats` times, so a slow
spell of a shared machine falls on both alike. Both run greedy generation through transformers'
`verifier.generate(..., assistant_model=draft)` (or `--own-loop` for `speculators_hf.generate`); the
script prints the median over repeats of each side's total seconds, B/A, and whether every output of both
sides equals the verifier alone (run in the worker of B). Used to check that a refactor keeps the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import speculators_hf
from speculators_hf.zoo import load_zoo_draft, zoo_prompts
torch.set_num_threads(int(sys.argv[5]))
draft = load_zoo_draft(sys.argv[2]); verifier = draft.verifier
k, own = int(sys.argv[3]), sys.argv[4] == "1"
prompts = zoo_prompts()
def run(i, new, alone=False):
    p = prompts[i]
    with torch.inference_mode():
        start = time.perf_counter()
        if alone:
            out = verifier.generate(p, max_new_tokens=new, do_sample=False)
        elif own:
            out = speculators_hf.generate(verifier, draft, p, tree=f"chain:{k}", max_new_tokens=new)
        else:
            out = verifier.generate(p, max_new_tokens=new, do_sample=False, assistant_model=draft, num_assistant_tokens=k)
        return time.perf_counter() - start, out[0, p.shape[1]:].tolist()
run(0, 8); run(0, 8, alone=True)  # warm-up
print(json.dumps({"ready": speculators_hf.__file__}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    seconds, tokens = run(cmd["prompt"], cmd["new"], cmd.get("alone", False))
    print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="the src folder of checkout A (e.g. a git worktree's src)")
    parser.add_argument("--b", required=True, help="the src folder of checkout B")
    parser.add_argument("--family", default="eagle3")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--own-loop", action="store_true")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    workers = {}
    for side, src in (("A", args.a), ("B", args.b)):
        argv = [sys.executable, "-c", WORKER, str(Path(src).resolve()), args.family, str(args.k),
                "1" if args.own_loop else "0", str(args.threads)]  # fmt: skip
        workers[side] = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        print(f"{side}: {json.loads(workers[side].stdout.readline())['ready']}", file=sys.stderr)

    def ask(side: str, **cmd: object) -> dict:
        worker = workers[side]
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(json.dumps(cmd) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    reference = [ask("B", prompt=i, new=args.max_new_tokens, alone=True)["tokens"] for i in range(args.num_prompts)]
    totals: dict[str, list[float]] = {"A": [], "B": []}
    exact = True
    for repeat in range(args.repeats):
        seconds = {"A": 0.0, "B": 0.0}
        for i in range(args.num_prompts):
            for side in ("A", "B"):
                reply = ask(side, prompt=i, new=args.max_new_tokens)
                seconds[side] += reply["seconds"]
                exact &= reply["tokens"] == reference[i]
        for side in seconds:
            totals[side].append(seconds[side])
        print(f"repeat {repeat + 1}: A {seconds['A']:.3f}s, B {seconds['B']:.3f}s", file=sys.stderr)
    for worker in workers.values():
        worker.terminate()
    median = {side: statistics.median(t) for side, t in totals.items()}
    from speculators_hf.bench import machine_description

    def commit(src: str) -> str:
        """The checkout's commit, with "+changes" when its work tree differs from it."""
        git = ["git", "-C", str(Path(src).resolve().parent)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
        return head + ("+changes" if dirty.strip() else "")

    result = {
        "machine": machine_description(),
        "a_commit": commit(args.a),
        "b_commit": commit(args.b),
        "a": args.a, "b": args.b, "family": args.family, "k": args.k, "own_loop": args.own_loop,
        "prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "seconds_a": totals["A"], "seconds_b": totals["B"], "median_a": median["A"], "median_b": median["B"],
        "b_over_a": median["B"] / median["A"], "identical_to_verifier_alone": exact,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
