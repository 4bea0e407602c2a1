"""Zoo step 1: an offline corpus, a BPE tokenizer and a Llama-style verifier trained on this machine.

    python benchmarks/zoo/build_verifier.py --out benchmarks/zoo/work [--minutes 60]

Corpus: the Python standard library's source (this interpreter's, tests excluded) and the
reStructuredText sources of the Python documentation (Debian's python3.11-doc:
`apt-get install python3.11-doc`). Tokenizer: byte-level BPE (6144 tokens, `tokenizers`).
Verifier: 12 layers, hidden 384 (about 24M parameters), trained for a time budget with AdamW and a
cosine schedule; every stage resumes from what is already on disk, and the training log is written
to `<out>/verifier/training_log.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
VOCAB = 6144
SEQ_LEN = 256


def build_corpus(out: Path, max_mb: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """Write train.txt and heldout.txt (documents separated by a blank line and an end marker)."""
    train_path, held_path = out / "corpus" / "train.txt", out / "corpus" / "heldout.txt"
    if train_path.exists() and held_path.exists():
        return train_path, held_path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in stdlib.rglob("*.py") if not ({"test", "tests", "site-packages", "idlelib", "lib2to3"} & set(p.parts))
    ]
    if DOCS.exists():
        files += sorted(DOCS.rglob("*.txt"))
    else:
        print(f"note: {DOCS} not found (apt-get install python3.11-doc); using the stdlib source only")
    files.sort()
    random.Random(seed).shuffle(files)
    docs, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        docs.append(text)
        size += len(text)
        if size > max_mb * 2**20:
            break
    held = docs[: max(20, len(docs) // 50)]
    train = docs[len(held) :]
    train_path.parent.mkdir(parents=True, exist_ok=True)
    train_path.write_text("\n<|endoftext|>\n".join(train))
    held_path.write_text("\n<|endoftext|>\n".join(held))
    print(f"corpus: {len(train)} train documents ({sum(map(len, train)) / 2**20:.1f} MiB), {len(held)} held out")
    return train_path, held_path


def build_tokenizer(out: Path, train_path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = out / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(train_path)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(folder)
    return fast


def encode(tokenizer, path: Path, cache: Path) -> torch.Tensor:
    if cache.exists():
        return torch.load(cache)
    ids = []
    for doc in path.read_text().split("\n<|endoftext|>\n"):
        ids += [*tokenizer(doc).input_ids, tokenizer.eos_token_id]
    tensor = torch.tensor(ids, dtype=torch.int32)
    torch.save(tensor, cache)
    return tensor


def verifier_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, initializer_range=0.02,
    )  # fmt: skip


def train_verifier(
    out: Path, tokenizer, ids: torch.Tensor, minutes: float, batch: int = 8, lr: float = 1.5e-3, seed: int = 0
):
    from transformers import LlamaForCausalLM

    folder = out / "verifier"
    state_path = folder / "train_state.pt"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(verifier_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    tokens_per_step = batch * SEQ_LEN
    est_steps = int(minutes * 60 * 900 / tokens_per_step)  # ~900 tokens/s on 2 cores; the cosine runs to here
    step, elapsed = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, est_steps = state["step"], state["elapsed"], state["est_steps"]
        print(f"resuming verifier training at step {step} ({elapsed / 60:.1f} min done)")
    folder.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"verifier: {n_params / 1e6:.1f}M parameters, {tokens_per_step} tokens/step, about {est_steps} steps")
    model.train()
    t0 = time.perf_counter() - elapsed

    def save_state() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        torch.save({**state, "elapsed": time.perf_counter() - t0, "est_steps": est_steps}, state_path)

    while time.perf_counter() - t0 < minutes * 60:
        warm = 200
        scale = (
            (step + 1) / warm
            if step < warm
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, est_steps - warm))))
        )
        for g in optimizer.param_groups:
            g["lr"] = lr * scale
        starts = torch.randint(
            0, len(ids) - SEQ_LEN - 1, (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step)
        )
        x = torch.stack([ids[s : s + SEQ_LEN].long() for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step % 25 == 0:
            rec = {
                "step": step,
                "loss": round(loss.item(), 4),
                "lr": lr * scale,
                "minutes": round((time.perf_counter() - t0) / 60, 2),
            }
            with open(folder / "training_log.jsonl", "a") as log:
                log.write(json.dumps(rec) + "\n")
            print(rec, flush=True)
        if step % 200 == 0:
            save_state()
    save_state()
    model.eval()
    model.save_pretrained(folder / "final")
    tokenizer.save_pretrained(folder / "final")
    print(f"verifier saved to {folder / 'final'} after {step} steps")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/zoo/work"))
    parser.add_argument("--minutes", type=float, default=60.0, help="verifier training time budget")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_path, _ = build_corpus(args.out)
    tokenizer = build_tokenizer(args.out, train_path)
    ids = encode(tokenizer, train_path, args.out / "corpus" / "train_ids.pt")
    print(f"{len(ids) / 1e6:.1f}M training tokens")
    train_verifier(args.out, tokenizer, ids, args.minutes)


if __name__ == "__main__":
    main()
