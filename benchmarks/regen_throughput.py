"""Regeneration throughput of `speculators-hf data --regenerate`: batched against one record at a time.

    nice -n 10 python benchmarks/regen_throughput.py --threads 1 [--records 32] [--max-new-tokens 64] \
        [--batch-sizes 1,4,8,16,32] [--out benchmarks/results/regen/results.json] [--note "shared machine"]

Runs `speculators_hf.training.data.regenerate_responses` (the path of the command) on user-only prompts
cut from the standard library source (benchmarks/stdlib_prompts.py) with the zoo verifier
(`load_zoo_draft("eagle3").verifier`, `zoo_tokenizer()`), once per batch size, counting the reply
tokens that `generate_replies` returns. Prints tokens/s per batch size and the speedup over batch 1,
checks that every batch size gives the same records as batch 1 (greedy), and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from stdlib_prompts import prompt_records

import speculators_hf.training.data as data
from speculators_hf.bench import cpu_model
from speculators_hf.zoo import load_zoo_draft, zoo_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/regen/results.json"))
    parser.add_argument("--note", default="", help="e.g. 'shared machine' (stored with the figures)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    verifier, tokenizer = load_zoo_draft("eagle3").verifier, zoo_tokenizer()
    records = prompt_records(args.records, "train", seed=1)

    generated = {"tokens": 0}
    original = data.generate_replies

    def counting(*a, **k):
        replies = original(*a, **k)
        generated["tokens"] += sum(len(r) for r in replies)
        return replies

    data.generate_replies = counting
    rows, reference = [], None
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        generated["tokens"] = 0
        start = time.perf_counter()
        out = data.regenerate_responses(
            verifier, tokenizer, records, max_new_tokens=args.max_new_tokens, batch_size=batch_size
        )
        seconds = time.perf_counter() - start
        reference = out if reference is None else reference
        row = {
            "batch_size": batch_size,
            "seconds": round(seconds, 2),
            "tokens": generated["tokens"],
            "tokens_per_s": round(generated["tokens"] / seconds, 1),
            "records_differing_from_first": sum(a != b for a, b in zip(out, reference)),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / base, 2)
    result = {
        "command": "nice -n 10 python benchmarks/regen_throughput.py "
        + f"--threads {args.threads} --records {args.records} --max-new-tokens {args.max_new_tokens} "
        + f"--batch-sizes {args.batch_sizes}",
        "verifier": "speculators-hf/zoo-verifier (benchmarks/zoo)",
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
        },
        "note": args.note,
        "rows": rows,
    }
    print(f"{'batch':>6} {'tokens/s':>9} {'speedup':>8} {'differing':>9}")
    for row in rows:
        print(
            f"{row['batch_size']:>6} {row['tokens_per_s']:>9} {row['speedup']:>7}x {row['records_differing_from_first']:>9}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
