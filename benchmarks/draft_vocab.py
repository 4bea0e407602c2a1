"""EAGLE-3 draft vocabulary size: acceptance (tau) and target coverage at fractions of the verifier's vocabulary.

    nice -n 10 python benchmarks/draft_vocab.py --threads 1 [--fractions 0.125,0.25,0.5] [--steps 300] [--batch-size 4] \
        [--work /tmp/speculators-hf-vocab] [--out benchmarks/results/vocab/results.json]

On the benchmark zoo's verifier (6144 tokens, `speculators_hf.zoo`):
1. data, with the pipeline of `speculators-hf data --regenerate`: user-only prompts cut from the standard
   library source (benchmarks/stdlib_prompts.py; held-out prompts from other files), each answered
   greedily by the verifier (`regenerate_responses`, resumable under --work), tokenized with
   `tokenize_records` and packed into blocks; the verifier's hidden states are cached once;
2. one EAGLE-3 draft per fraction of the vocabulary, all with the same seed, data and short recipe
   (`speculators_hf.training.train`), the draft vocabulary chosen by `select_draft_vocab` (the most frequent
   targets), as `speculators-hf train` does;
3. per draft: tau (tokens per verifier pass, greedy, through the real generate() path) on the held-out chat
   prompts and on the zoo's held-out code prompts, and the coverage of the verifier's targets (the share of
   reply tokens inside the draft vocabulary) on the training data and on the held-out replies.
tau and coverage are deterministic (the machine's load does not change them); the seconds are not.
Results are printed and written as JSON; each trained draft stays under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from stdlib_prompts import prompt_records

import speculators_hf as sh
from speculators_hf.bench import cpu_model
from speculators_hf.training import DraftDataset, TrainConfig, cache_features, measure_acceptance, select_draft_vocab
from speculators_hf.training import train as train_draft
from speculators_hf.training.data import (
    chat_ids,
    load_blocks,
    pack_blocks,
    regenerate_responses,
    save_blocks,
    tokenize_records,
)
from speculators_hf.zoo import load_zoo_draft, zoo_prompts, zoo_tokenizer


def regenerated(verifier, tokenizer, records, work: Path, name: str, max_new_tokens: int):
    """The records with the verifier's greedy replies (resumable: saved under `work` as they are made)."""
    work.mkdir(parents=True, exist_ok=True)
    return regenerate_responses(
        verifier, tokenizer, records, max_new_tokens=max_new_tokens, progress_file=work / f"{name}.regenerated.jsonl"
    )


def coverage(ids: torch.Tensor, mask: torch.Tensor, vocab: torch.Tensor | None) -> float:
    """Share of the trained (reply) tokens that lie in the draft vocabulary `vocab` (None: the full one)."""
    targets = ids[mask.bool()]
    return 1.0 if vocab is None else float(torch.isin(targets, vocab).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="0.125,0.25,0.5")
    parser.add_argument("--train-records", type=int, default=400)
    parser.add_argument("--heldout-records", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "speculators-hf-vocab")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vocab/results.json"))
    parser.add_argument("--note", default="", help="e.g. 'shared machine' (stored with the figures)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    verifier, tokenizer = load_zoo_draft("eagle3").verifier, zoo_tokenizer()
    vocab_size = verifier.config.vocab_size

    # 1. data
    reused = (args.work / "train.regenerated.jsonl").exists()
    train_records = regenerated(
        verifier, tokenizer, prompt_records(args.train_records, "train"), args.work, "train", args.max_new_tokens
    )
    heldout_sources = prompt_records(args.heldout_records, "heldout")
    heldout_records = regenerated(verifier, tokenizer, heldout_sources, args.work, "heldout", args.max_new_tokens)
    data_dir = args.work / f"data-{args.train_records}-{args.max_new_tokens}-{args.seq_len}"
    if not (data_dir / "blocks.safetensors").exists():
        sequences, counts = tokenize_records(tokenizer, train_records)
        ids, mask = pack_blocks(sequences, args.seq_len)
        save_blocks(data_dir, ids, mask, {"verifier": "speculators-hf/zoo-verifier", **counts})
    ids, mask = load_blocks(data_dir)
    heldout_seqs, _ = tokenize_records(tokenizer, heldout_records)
    heldout_ids = torch.tensor([t for seq, _ in heldout_seqs for t in seq])
    heldout_mask = torch.tensor([m for _, seq_mask in heldout_seqs for m in seq_mask])
    chat_prompts = [
        torch.tensor([chat_ids(tokenizer, r["messages"], add_generation_prompt=True)]) for r in heldout_sources
    ]
    code_prompts = zoo_prompts()[:8]
    layer_ids = sh.Eagle3Speculator.config_from_verifier(verifier.config).eagle_aux_hidden_state_layer_ids
    features = cache_features(verifier, ids, layer_ids, data_dir, shard_blocks=128)
    data_seconds = time.perf_counter() - start
    print(f"data: {ids.shape[0]} blocks of {args.seq_len} ({int(mask.sum())} trained tokens), {data_seconds:.0f}s")

    # 2.-3. one draft per fraction
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        draft_vocab = round(vocab_size * fraction)
        out = args.work / f"draft-{draft_vocab}-{args.steps}x{args.batch_size}"
        if (out / "final" / "config.json").exists():  # trained by an earlier run of this script
            draft = sh.load_draft(out / "final").bind_verifier(verifier)
        else:
            torch.manual_seed(0)
            draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=draft_vocab)
            if draft.d2t is not None:
                select_draft_vocab(draft, ids, mask)
                draft.init_from_verifier(verifier)
            config = TrainConfig(
                output_dir=str(out),
                steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=2e-3,
                ttt_steps=3,
                warmup_steps=30,
                save_every=args.steps,
                log_every=25,
                eval_max_new_tokens=64,
            )
            train_draft(draft, verifier, DraftDataset(ids, mask, features), config)
        vocab = None if draft.d2t is None else (torch.arange(draft_vocab) + draft.d2t.cpu())
        history = json.loads((out / "final" / "training_summary.json").read_text())["history"]
        chat = measure_acceptance(verifier, draft, chat_prompts, 64)
        code = measure_acceptance(verifier, draft, code_prompts, 64)
        row = {
            "fraction": fraction,
            "draft_vocab_size": draft_vocab,
            "draft_parameters": sum(p.numel() for n, p in draft.named_parameters() if not n.startswith("embed")),
            "lm_head_parameters": draft.lm_head.weight.numel(),
            "tau_heldout_chat": round(chat.tau, 3),
            "tau_zoo_code_prompts": round(code.tau, 3),
            "acceptance_rate_heldout_chat": round(chat.acceptance_rate, 4),
            "coverage_train_targets": round(coverage(ids, mask, vocab), 4),
            "coverage_heldout_targets": round(coverage(heldout_ids, heldout_mask, vocab), 4),
            "final_loss": round(history[-1]["loss"], 4),
            "train_seconds": history[-1]["seconds"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "command": "nice -n 10 python benchmarks/draft_vocab.py "
        + f"--threads {args.threads} --fractions {args.fractions} --steps {args.steps} --batch-size {args.batch_size} "
        + f"--train-records {args.train_records} --max-new-tokens {args.max_new_tokens} --seq-len {args.seq_len}",
        "verifier": "speculators-hf/zoo-verifier (benchmarks/zoo), vocabulary 6144",
        "recipe": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": 2e-3,
            "ttt_steps": 3,
            "warmup_steps": 30,
        },
        "data": {
            "train_records": args.train_records,
            "blocks": ids.shape[0],
            "seq_len": args.seq_len,
            "trained_tokens": int(mask.sum()),
            "distinct_target_tokens": int(ids[mask.bool()].unique().numel()),
            "distinct_heldout_target_tokens": int(heldout_ids[heldout_mask.bool()].unique().numel()),
            "heldout_records": args.heldout_records,
            "max_new_tokens": args.max_new_tokens,
            "seconds": round(data_seconds, 1),
            "reused_from_an_earlier_run": reused,
        },
        "tau": "tokens per verifier forward pass, greedy, draft length 5, 64 new tokens per prompt",
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "note": args.note,
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    print(f"{'fraction':>8} {'vocab':>6} {'tau chat':>9} {'tau code':>9} {'cover':>6} {'cover held':>10} {'loss':>7}")
    for r in rows:
        print(
            f"{r['fraction']:>8} {r['draft_vocab_size']:>6} {r['tau_heldout_chat']:>9} {r['tau_zoo_code_prompts']:>9} "
            f"{r['coverage_train_targets']:>6} {r['coverage_heldout_targets']:>10} {r['final_loss']:>7}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
