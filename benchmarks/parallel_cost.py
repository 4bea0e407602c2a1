"""What drafting a chain of k tokens costs: EAGLE-3 (one draft step per token) against the parallel drafters,
P-EAGLE (one pass over the k-1 mask entries) and DFlash (one pass over a block of 8, whatever k), on the zoo
verifier, as c(k) = the draft's seconds for one round / the verifier's seconds for one single-token pass.

    python benchmarks/parallel_cost.py --families eagle3,peagle,dflash --out benchmarks/results/parallel_cost/results.json

The drafts are the zoo's (`speculators_hf.zoo.load_zoo_draft`). One round here is what the package's loop runs:
feed the newest token (`tree_extend`), draft a chain of k (`build_tree`), drop the drafted entries, on a
128-token context. Each figure is the median of 60 rounds, the drafts taking turns; k beyond what a draft can
propose (DFlash: block_size - 1) is left empty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from speculators_hf.bench import machine_description
from speculators_hf.generation.policy import verification_seconds
from speculators_hf.generation.sampling import Sampler
from speculators_hf.generation.tree import TreeSpec, build_tree
from speculators_hf.zoo import load_zoo_draft


def round_seconds(draft, verifier, k: int, context: int = 128) -> float:
    """One round's draft time after `context` tokens: feed one token, draft a chain of k."""
    vocab = verifier.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, context + 1), generator=generator)
    layers = draft.verifier_layer_ids()
    with torch.inference_mode():
        out = verifier(ids, output_hidden_states=True)
        features = [torch.nn.functional.pad(out.hidden_states[i], (0, 0, 1, 0))[:, :-1] for i in layers]
        state = draft.new_tree_state(1)
        positions = torch.arange(context + 1)[None]
        valid = torch.ones_like(ids, dtype=torch.bool)
        draft.tree_extend(
            state, ids[:, :context], positions[:, :context], valid[:, :context], [f[:, :context] for f in features]
        )
        sampler = Sampler(do_sample=False)
        sampler.begin_round([0], None)
        start = time.perf_counter()
        logits, handle = draft.tree_extend(
            state, ids[:, context:], positions[:, context:], valid[:, context:], [f[:, context:] for f in features]
        )
        build_tree(draft, state, TreeSpec.chain(k), sampler, logits, handle, positions[:, -1])
        seconds = time.perf_counter() - start
        state.cache.truncate()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--max-k", type=int, default=10)
    parser.add_argument("--families", default="eagle3,peagle,dflash", help="zoo drafts to compare")
    args = parser.parse_args()
    families = args.families.split(",")
    first = load_zoo_draft(families[0])
    verifier = first.verifier
    drafts = {name: first if i == 0 else load_zoo_draft(name, verifier=verifier) for i, name in enumerate(families)}
    one_pass = verification_seconds(verifier, [1], context=128, samples=60)[1]
    rows = []
    for k in range(1, args.max_k + 1):
        able = {n: d for n, d in drafts.items() if (d.max_tree_depth() or k) >= k}
        times: dict[str, list[float]] = {name: [] for name in able}
        for _ in range(args.rounds):
            for name, draft in able.items():
                times[name].append(round_seconds(draft, verifier, k))
        row: dict[str, float | None] = {"k": k}
        for name in families:
            median = statistics.median(times[name]) if name in times else None
            row[f"{name}_ms"] = None if median is None else 1e3 * median
            row[f"{name}_c"] = None if median is None else median / one_pass
        rows.append(row)
        print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/parallel_cost.py --families {args.families} --out {args.out}",
                "families": families,
                "machine": machine_description(),
                "verifier_pass_ms": 1e3 * one_pass,
                "rounds": args.rounds,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
