"""What drafting a chain of k tokens costs: EAGLE-3 (one draft step per token) against P-EAGLE (one pass over
the k-1 mask entries), on the zoo verifier, as c(k) = the draft's seconds for one round / the verifier's
seconds for one single-token pass.

    python benchmarks/parallel_cost.py --out benchmarks/results/parallel_cost/results.json

The P-EAGLE draft is `PEagleSpeculator.from_verifier` of the zoo verifier with the zoo EAGLE-3 draft's sizes
(2048-token draft vocabulary); its weights are untrained (no zoo P-EAGLE draft exists yet), which does not
change what a pass costs: the shapes do. One round here is what the package's loop runs: feed the newest
token (`tree_extend`), draft a chain of k (`build_tree`), drop the drafted entries, on a 128-token context.
Each figure is the median of 60 rounds, the two drafts taking turns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import speculators_hf as sh
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
    args = parser.parse_args()
    eagle3 = load_zoo_draft("eagle3")
    verifier = eagle3.verifier
    peagle = sh.PEagleSpeculator.from_verifier(verifier, draft_vocab_size=eagle3.config.draft_vocab_size).eval()
    peagle.bind_verifier(verifier)
    one_pass = verification_seconds(verifier, [1], context=128, samples=60)[1]
    rows = []
    for k in range(1, args.max_k + 1):
        times: dict[str, list[float]] = {"eagle3": [], "peagle": []}
        for _ in range(args.rounds):
            for name, draft in (("eagle3", eagle3), ("peagle", peagle)):
                times[name].append(round_seconds(draft, verifier, k))
        row = {"k": k}
        for name, values in times.items():
            row[f"{name}_ms"] = 1e3 * statistics.median(values)
            row[f"{name}_c"] = statistics.median(values) / one_pass
        rows.append(row)
        print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/parallel_cost.py --out " + str(args.out),
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
