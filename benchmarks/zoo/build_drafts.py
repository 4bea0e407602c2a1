"""Zoo step 2: drafts for the zoo verifier, trained on text the verifier itself generates.

    python benchmarks/zoo/build_drafts.py --work benchmarks/zoo/work [--families eagle3,eagle,medusa,...]

1. Prompts: random windows of the training corpus; the verifier continues each greedily (batched),
   which is the text the drafts must learn to predict. Held-out prompts (from held-out documents)
   are written to `<work>/prompts.json` for the benchmark.
2. The verifier's hidden states are cached once (bf16 shards) for the EAGLE-style families.
3. Each family is trained with `speculators_hf.training.train`; the small independent LM doubles as
   the baseline for transformers' own assisted generation.
4. `--publish` writes the verifier, its tokenizer and every trained draft in fp16, in Hub layout, to
   `benchmarks/zoo/hub` (repo ids `speculators-hf/zoo-verifier`, `speculators-hf/zoo-<family>`), and
   the held-out prompts to `benchmarks/zoo/prompts.json`: what `make demo` and `speculators-hf bench` load.
`--continue-steps N` trains the PUBLISHED drafts N more steps (`continued/`; `--publish` then takes those).
Every stage keeps what is on disk, so the script resumes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import speculators_hf as sh
from speculators_hf.loading import save_to_hub_cache
from speculators_hf.training import (
    DraftDataset,
    TrainConfig,
    cache_features,
    measure_acceptance,
    select_draft_vocab,
    train,
)
from speculators_hf.training.data import load_blocks, save_blocks

PROMPT_LEN = 48
ZOO = Path(__file__).resolve().parent
VERIFIER_ID = "speculators-hf/zoo-verifier"
EVAL_PROMPTS = 24

# family -> (constructor keyword arguments, training settings); sized for about an hour on 2 CPU cores
RECIPES = {
    "eagle3": ({"draft_vocab_size": 2048}, {"steps": 1200, "batch_size": 8, "learning_rate": 2e-3, "ttt_steps": 3}),
    # P-EAGLE: ttt_steps is the number of parallel depths trained; mask token 1 is the verifier's pad token
    # (`<|pad|>`), which never occurs in the corpus or the verifier's output. 5 depths cost 1.86 s/step on one
    # thread (6: 2.32 s), so 1200 + 300 steps would not fit 45 minutes: the first stage has 1000
    "peagle": (
        {"draft_vocab_size": 2048, "mask_token_id": 1},
        {"steps": 1000, "batch_size": 8, "learning_rate": 2e-3, "ttt_steps": 5},
    ),
    # DFlash: 2 Qwen3 layers, blocks of 8 (7 tokens a round), 64 random anchors per sequence a step; mask token 0
    # (`<|endoftext|>`): the pad token's embedding row is all zeros (padding_idx) and DFlash borrows the
    # verifier's embedding frozen. 2.0 s/step on one thread; every token reaches a slot only through attention,
    # which starts uniform, hence a larger step size than EAGLE-3's; 900 + 300 steps fit the session (EAGLE-3: 1200 + 300)
    "dflash": (
        {"draft_vocab_size": 2048, "block_size": 8, "num_layers": 2, "mask_token_id": 0},
        {"steps": 900, "batch_size": 8, "learning_rate": 3e-3},
    ),
    # DSpark and DFlash2: DFlash's draft (same layers, blocks, mask token) and DFlash's budget, so the three compare
    # on the zoo. DSpark with the vanilla Markov head (the one vLLM serves; rank 256) and the confidence head;
    # DFlash2 drafts over the whole vocabulary (its selector scores verifier ids) with the library's conv/selector
    "dspark": (
        {"draft_vocab_size": 2048, "block_size": 8, "num_layers": 2, "mask_token_id": 0, "markov_head_type": "vanilla"},
        {"steps": 900, "batch_size": 8, "learning_rate": 3e-3},
    ),
    "dflash2": (
        {"draft_vocab_size": 6144, "block_size": 8, "num_layers": 2, "mask_token_id": 0},
        {"steps": 900, "batch_size": 8, "learning_rate": 3e-3},
    ),
    "eagle": ({}, {"steps": 600, "batch_size": 8, "learning_rate": 2e-3}),
    "medusa": ({"medusa_num_heads": 4}, {"steps": 500, "batch_size": 8, "learning_rate": 2e-3}),
    "mlp_speculator": ({"n_predict": 3}, {"steps": 300, "batch_size": 8, "learning_rate": 2e-3}),
    "independent": ({}, {"steps": 1000, "batch_size": 8, "learning_rate": 2e-3}),
}
# further stages, continuing from the previous stage's draft (written to drafts/<family>/stage<N>/)
FOLLOW_UPS = {
    # the first stage unrolls 3 steps (cheap); drafting runs 5, so the deeper steps are trained here
    "eagle3": [{"steps": 300, "batch_size": 8, "learning_rate": 1e-3, "ttt_steps": 5, "warmup_steps": 20}],
    # the first stage trains 5 parallel depths (chains of 5); this one 6, as the benchmark drafts chains of 3-7
    "peagle": [{"steps": 300, "batch_size": 8, "learning_rate": 1e-3, "ttt_steps": 6, "warmup_steps": 20}],
    "dflash": [{"steps": 300, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 20}],
    "dspark": [{"steps": 300, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 20}],
    "dflash2": [{"steps": 300, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 20}],
}


def final_dir(out: Path, family: str) -> Path:
    """Where the last stage of `family`'s recipe writes its draft (`continued/` once `--continue-steps` ran)."""
    if (out / "continued" / "final" / "config.json").exists():
        return out / "continued" / "final"
    stages = FOLLOW_UPS.get(family, [])
    return out / (f"stage{len(stages) + 1}" if stages else "") / "final"


def windows(tokenizer, text: str, n: int, length: int, seed: int) -> list[list[int]]:
    docs = [d for d in text.split("\n<|endoftext|>\n") if len(d) > 400]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ids = tokenizer(rng.choice(docs)).input_ids
        if len(ids) > length + 8:
            start = rng.randrange(0, len(ids) - length)
            out.append(ids[start : start + length])
    return out


@torch.inference_mode()
def generate_corpus(
    verifier, tokenizer, prompts: list[list[int]], new_tokens: int, batch: int = 32
) -> list[tuple[list[int], list[int]]]:
    """Greedy continuations, batched (all prompts have the same length, so no padding is needed)."""
    seqs = []
    for i in range(0, len(prompts), batch):
        x = torch.tensor(prompts[i : i + batch])
        out = verifier.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        for row in out.tolist():
            seqs.append((row, [0] * x.shape[1] + [1] * (len(row) - x.shape[1])))
        print(f"  generated {len(seqs)}/{len(prompts)}", flush=True)
    return seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/zoo/work"))
    parser.add_argument("--families", default=",".join(RECIPES))
    parser.add_argument("--sequences", type=int, default=1200)
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps")
    parser.add_argument("--publish", action="store_true", help="only publish what is trained to benchmarks/zoo")
    parser.add_argument(
        "--continue-steps",
        type=int,
        default=0,
        help="train each family's PUBLISHED zoo draft this many more steps (the last stage's settings, lr 1e-3), "
        "evaluated on the held-out prompts every quarter, into <work>/drafts/<family>/continued/",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.publish:
        publish(args.work, args.families.split(","))
        return
    work = args.work
    verifier = AutoModelForCausalLM.from_pretrained(work / "verifier" / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(work / "verifier" / "final")

    prompts_path = work / "prompts.json"
    if not prompts_path.exists():
        held = windows(tokenizer, (work / "corpus" / "heldout.txt").read_text(), EVAL_PROMPTS, PROMPT_LEN, seed=1)
        prompts_path.write_text(json.dumps(held))

    data_dir = work / "draft_data"
    if not (data_dir / "blocks.safetensors").exists():
        prompts = windows(tokenizer, (work / "corpus" / "train.txt").read_text(), args.sequences, 32, seed=0)
        seqs = generate_corpus(verifier, tokenizer, prompts, args.new_tokens)
        ids = torch.tensor([s for s, _ in seqs])
        mask = torch.tensor([m for _, m in seqs], dtype=torch.uint8)
        save_blocks(
            data_dir, ids, mask, {"verifier": str(work / "verifier" / "final"), "regenerated": True, "greedy": True}
        )
    input_ids, loss_mask = load_blocks(data_dir)
    eval_prompts = [torch.tensor([p]) for p in json.loads(prompts_path.read_text())[:8]]

    if args.continue_steps:
        for family in args.families.split(","):
            continue_published(
                family, work, verifier, input_ids, loss_mask, data_dir, eval_prompts, args.continue_steps
            )
        return
    for family in args.families.split(","):
        out = work / "drafts" / family
        if (final_dir(out, family) / "config.json").exists():
            print(f"{family}: already trained")
            continue
        if not (out / "final" / "config.json").exists():
            train_first_stage(family, out, verifier, input_ids, loss_mask, data_dir, eval_prompts, args.steps_scale)
        follow_ups = FOLLOW_UPS.get(family, [])
        if follow_ups:
            draft = sh.load_draft(out / "final").bind_verifier(verifier)
            features = draft_features(draft, verifier, input_ids, data_dir)
            for n, stage in enumerate(follow_ups, start=2):
                config = TrainConfig(
                    output_dir=str(out / f"stage{n}"), save_every=500, log_every=50, eval_max_new_tokens=64, **stage
                )
                dataset = DraftDataset(input_ids, loss_mask, features)
                result = train(draft, verifier, dataset, config, eval_prompts=eval_prompts)
                print(f"{family} stage {n}: {result['evals']}")


def draft_features(draft, verifier, input_ids, data_dir: Path):
    """The verifier's hidden states `draft` reads, cached once per layer set under `data_dir`; None for drafts that
    read only tokens."""
    if not draft.verifier_layer_ids():
        return None
    return cache_features(verifier, input_ids, draft.verifier_layer_ids(), data_dir, shard_blocks=128)


def train_first_stage(
    family: str, out: Path, verifier, input_ids, loss_mask, data_dir: Path, eval_prompts, steps_scale: float
) -> None:
    """A new draft of `family` trained with its recipe to `out/final`."""
    ctor, settings = RECIPES[family]
    draft_class = sh.models.FAMILIES[family]  # the registry: speculators_model_type -> model class
    draft = draft_class.from_verifier(verifier, **ctor)
    if getattr(draft, "d2t", None) is not None:
        select_draft_vocab(draft, input_ids, loss_mask)
        draft.init_from_verifier(verifier)
    features = draft_features(draft, verifier, input_ids, data_dir)
    print(f"{family}: untrained {measure_acceptance(verifier, draft, eval_prompts, 64)}")
    settings = {**settings, "steps": int(settings["steps"] * steps_scale)}
    config = TrainConfig(
        output_dir=str(out), save_every=500, log_every=50, warmup_steps=100, eval_max_new_tokens=64, **settings
    )
    result = train(draft, verifier, DraftDataset(input_ids, loss_mask, features), config, eval_prompts=eval_prompts)
    print(f"{family}: {result['evals']}")


def continue_published(
    family: str, work: Path, verifier, input_ids, loss_mask, data_dir: Path, eval_prompts, steps: int
) -> None:
    """The published zoo draft of `family` (upcast to fp32) trained `steps` more steps with its recipe's last
    stage's settings at lr 1e-3, to `<work>/drafts/<family>/continued`: whether its held-out tau still improves."""
    from speculators_hf.zoo import load_zoo_draft

    out = work / "drafts" / family / "continued"
    if (out / "final" / "config.json").exists():
        print(f"{family}: already continued in {out}")
        return
    draft = load_zoo_draft(family, verifier=verifier)
    features = draft_features(draft, verifier, input_ids, data_dir)
    last = (FOLLOW_UPS.get(family) or [RECIPES[family][1]])[-1]
    settings = {**last, "steps": steps, "learning_rate": 1e-3, "warmup_steps": 20}
    config = TrainConfig(
        output_dir=str(out), save_every=100, log_every=50, eval_every=max(1, steps // 4), eval_max_new_tokens=64,
        **settings,
    )  # fmt: skip
    print(f"{family} published: {measure_acceptance(verifier, draft, eval_prompts, 64)}")
    result = train(draft, verifier, DraftDataset(input_ids, loss_mask, features), config, eval_prompts=eval_prompts)
    print(f"{family} continued: {result['evals']}")


def publish(work: Path, families: list[str]) -> None:
    """fp16 copies in Hub layout under benchmarks/zoo/hub, with the drafts pointing at VERIFIER_ID.

    Only the families asked for are written. The verifier (with its tokenizer), `prompts.json` and
    `verifier_training_log.jsonl` are written only when the zoo does not hold them yet (a first build):
    re-saving them would add new blobs to the repository's history for nothing, and a verifier rebuilt from
    a work dir (e.g. the published fp16 one upcast) must not replace the one every draft was trained for."""
    import tempfile

    hub = ZOO / "hub"
    verifier_repo = hub / f"models--{VERIFIER_ID.replace('/', '--')}"
    with tempfile.TemporaryDirectory() as tmp:
        if not verifier_repo.exists():
            verifier = AutoModelForCausalLM.from_pretrained(work / "verifier" / "final", dtype=torch.float16)
            verifier.save_pretrained(Path(tmp) / "verifier")
            AutoTokenizer.from_pretrained(work / "verifier" / "final").save_pretrained(Path(tmp) / "verifier")
            save_to_hub_cache(Path(tmp) / "verifier", VERIFIER_ID, hub)
        else:
            print(f"{VERIFIER_ID}: already in {hub}, left as it is")
        for family in families:
            final = final_dir(work / "drafts" / family, family)
            if not (final / "config.json").exists():
                print(f"{family}: not trained in {work}, skipped")
                continue
            draft = sh.load_draft(final, dtype=torch.float16)
            draft.config.verifier["name_or_path"] = VERIFIER_ID
            draft.save_pretrained(Path(tmp) / family)
            save_to_hub_cache(Path(tmp) / family, f"speculators-hf/zoo-{family}", hub)
            summary = (
                json.loads((ZOO / f"training_{family}.json").read_text()) if final.parent.name == "continued" else []
            )
            stages = [work / "drafts" / family / "final", *sorted((work / "drafts" / family).glob("stage*/final"))]
            if final.parent.name == "continued":  # the earlier stages' summaries are the published ones
                stages = [final]
            summary += [json.loads((f / "training_summary.json").read_text()) for f in stages]
            (ZOO / f"training_{family}.json").write_text(json.dumps(summary, indent=1))
            print(f"speculators-hf/zoo-{family}: published")
    if not (ZOO / "prompts.json").exists():
        (ZOO / "prompts.json").write_text((work / "prompts.json").read_text())
    for log in ("training_log.jsonl",):
        source, target = work / "verifier" / log, ZOO / f"verifier_{log}"
        if not target.exists() and source.exists():
            target.write_text(source.read_text())
    print(f"published to {hub}")


if __name__ == "__main__":
    main()
