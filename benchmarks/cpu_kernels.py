"""Why a speculative round's verifier pass is expensive on a CPU, and what oneDNN prepacking does about it.

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py [--rows 1,2,4,6,8,16] [--out benchmarks/results/cpu-kernels]

For the linear shapes of the zoo verifier (hidden 384, MLP 1024, vocab 6144) and SmolLM2-135M (hidden 576, MLP 1536,
vocab 49152): microseconds per product of `rows` float32 rows with torch's stock `linear` (MKL) and with the
weight prepacked for oneDNN (`speculators_hf.cpu_kernels`), the median of repeated timings, and the cost of `rows`
rows relative to one row under each kernel (the width cost of verifying rows - 1 draft tokens). Writes
results.json (with the CPU model) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from speculators_hf.bench import machine_description
from speculators_hf.cpu_kernels import prepack_linears

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # (out, in) of each distinct linear
    "zoo q_proj / o_proj": (384, 384),
    "zoo k/v_proj": (128, 384),
    "zoo gate/up_proj": (1024, 384),
    "zoo down_proj": (384, 1024),
    "zoo lm_head": (6144, 384),
    "SmolLM2 q/o_proj": (576, 576),
    "SmolLM2 k/v_proj": (192, 576),
    "SmolLM2 gate/up_proj": (1536, 576),
    "SmolLM2 down_proj": (576, 1536),
    "SmolLM2 lm_head": (49152, 576),
}


def time_us(linear: nn.Module, x: torch.Tensor, seconds: float = 0.3) -> float:
    """Median microseconds of one call, over batches of calls filling about `seconds`."""
    with torch.no_grad():
        for _ in range(5):
            linear(x)
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < 0.05:
            linear(x)
            calls += 1
        per_batch = max(1, calls)
        samples = []
        for _ in range(max(3, int(seconds / 0.05))):
            start = time.perf_counter()
            for _ in range(per_batch):
                linear(x)
            samples.append((time.perf_counter() - start) / per_batch * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,6,8,16")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-kernels")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    results = []
    for name, (out_features, in_features) in SHAPES.items():
        linear = nn.Linear(in_features, out_features, bias=False)
        xs = {r: torch.randn(1, r, in_features) for r in rows}
        stock = {r: time_us(linear, xs[r]) for r in rows}
        with prepack_linears(linear):
            packed = {r: time_us(linear, xs[r]) for r in rows}
        results.append({"linear": name, "shape": [out_features, in_features], "torch_us": stock, "onednn_us": packed})
        cells = "  ".join(f"{r}: {stock[r]:7.1f} / {packed[r]:7.1f}" for r in rows)
        print(f"{name:22s} {cells}", flush=True)
    meta = {"machine": machine_description(), "threads": torch.get_num_threads(), "rows": rows,
            "command": "python benchmarks/cpu_kernels.py --rows " + args.rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"{meta['machine']}; microseconds, torch / onednn; written to {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
