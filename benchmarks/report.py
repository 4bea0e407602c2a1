"""BENCHMARKS.md from the stored results: every table is generated from a results file in the repo.

    python benchmarks/report.py            # rewrite the generated blocks of BENCHMARKS.md
    python benchmarks/report.py --check    # exit 1 if BENCHMARKS.md differs from what the results give

A generated block is delimited in BENCHMARKS.md by

    <!-- generated: KIND PATH -->
    ...
    <!-- end generated -->

where KIND says how to render the results file(s) at PATH (a glob for `ab`): `bench` (`speculators-hf bench`'s
results.json: the run's command and machine, then its table and the verifier's pass cost by width), `ab`
(`benchmarks/ab_checkouts.py`), `regen` (`benchmarks/regen_throughput.py`), `vocab` (`benchmarks/draft_vocab.py`).
The prose around the blocks may only quote figures that appear in a block (`figures_without_a_source`;
tests/unit/test_benchmarks_doc.py checks both rules).
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
    parser.add_argument("--check", action="store_true", help="only check that BENCHMARKS.md is up to date")
    args = parser.parse_args()
    current = DOC.read_text()
    fresh = render(current)
    orphans = figures_without_a_source(fresh)
    if orphans:
        print(f"BENCHMARKS.md quotes figures that no generated table holds: {orphans}", file=sys.stderr)
    if args.check:
        if fresh != current:
            print("BENCHMARKS.md differs from its results: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 1 if orphans else 0
    DOC.write_text(fresh)
    return 1 if orphans else 0


if __name__ == "__main__":
    sys.exit(main())
