"""Draft training on accelerate: one CPU or GPU, several GPUs (DDP), DeepSpeed ZeRO or FSDP.

The scale-out is accelerate's, configured with `accelerate launch --config_file examples/...yaml`; this
module never does its own distribution. bf16 mixed precision on GPU, fp32 on CPU; gradient
accumulation; evaluation of the acceptance length through the real `verifier.generate(...,
assistant_model=draft)` path. Progress: a tqdm bar on a terminal, one plain line every `log_every`
steps (step, loss, steps/s, ETA) when stderr is a log file.

Checkpoints and resume. Every `save_every` steps the full training state goes to
`output_dir/checkpoints/step-N/` in formats that cannot run code when read: the draft's weights, the
optimizer's tensors and the torch RNG states as safetensors; the optimizer's other values, the LR
scheduler, the grad scaler and the Python/NumPy RNG states as JSON; `trainer_state.json`, written last,
holds the step, the history, the settings of the run and a manifest (bytes and sha256 of every other
file). accelerate's `save_state`/`load_state` (1.16) are NOT used: they write the optimizer, the
scheduler and the RNG states as pickles and read registered objects (our scheduler,
`custom_checkpoint_0.pkl`) with `weights_only=False`, so a planted file ran its code on resume (the
others go through torch's restricted unpickler with an allow-list of NumPy globals). A checkpoint is written into a `.tmp-` sibling folder and renamed into place, so a killed run
leaves either a complete checkpoint or a temporary folder, which the next start deletes.

`resume=True` continues from the newest checkpoint whose files match its manifest, with the same result
as an uninterrupted run (the data order is a pure function of the seed and the step) and the log cut
back to that step. A damaged or incomplete checkpoint is reported in one line naming the file and the
previous one is used; with none usable the run stops and says how to start over. A resume must keep
everything that changes the result (the `TrainConfig` fields outside `FREE_ON_RESUME`, the draft's
config, the number of processes, the training blocks): otherwise it is refused, naming each change.
`--steps` is among them because the cosine schedule spans it: to train a finished draft further, start
a new run from it (`--draft <output>/final --output <new folder>`).

Resume works with one process and with DDP (each process saves its own RNG state). Under DeepSpeed and
FSDP the engine shards the optimizer state, and gathering and restoring it without pickles is not
implemented: there no mid-run checkpoints are written (the final draft is), and a run that finds
checkpoints in its output folder refuses to resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
)
from safetensors.torch import load_file, save_file

from ..generation.capture import verifier_hidden_states
from ..generation.stats import GenerationStats
from ..progress import Progress
from .data import DraftDataset

STATE_FILE = "trainer_state.json"
LOG_FILE = "training_log.jsonl"
CONFIG_FILE = "train_config.json"
STATE_FORMAT = "speculators-hf-training-state/1"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
TMP_PREFIX = ".tmp-"
# Settings that do not change the trained draft: a resumed run may change them.
FREE_ON_RESUME = frozenset(
    {"output_dir", "save_every", "keep_checkpoints", "eval_every", "eval_max_new_tokens", "log_every"}
)
# Draft-config keys that name or describe a checkpoint rather than the draft trained from it.
_DRAFT_KEYS_IGNORED = frozenset(
    {"_name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"}
)
FAMILY_KEY = "draft.speculators_model_type"  # in the run fingerprint (`_run_fingerprint`)
_SHARDED = frozenset({"DEEPSPEED", "FSDP", "MEGATRON_LM"})  # accelerate DistributedType values
_STEP_DIR = re.compile(r"step-(\d+)")


class TrainConfig(BaseModel):
    """Hyper-parameters of a training run (validated; saved next to the checkpoints)."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str
    steps: PositiveInt = 1000
    batch_size: PositiveInt = Field(default=8, description="blocks per process and micro-step")
    grad_accum: PositiveInt = 1
    learning_rate: float = Field(default=3e-4, gt=0)
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 50
    min_lr_ratio: NonNegativeFloat = 0.1
    max_grad_norm: NonNegativeFloat = 1.0
    ttt_steps: PositiveInt | None = Field(
        default=None,
        description="unrolled draft steps of the loss (EAGLE-3's training-time test, HASS); None: the family's "
        "default (`default_train_steps`); only for families whose loss unrolls",
    )
    seed: int = 0
    save_every: PositiveInt = 200
    keep_checkpoints: PositiveInt = 2
    eval_every: NonNegativeInt = Field(default=0, description="0: evaluate only at the end")
    eval_max_new_tokens: PositiveInt = 48
    log_every: PositiveInt = 10
    mixed_precision: str = Field(default="auto", description="auto (bf16 on GPU, fp32 on CPU), no, bf16, fp16")


class ResumeError(RuntimeError):
    """A run cannot continue from the checkpoints in its output folder; the message says why and what to do."""


class _TrainingModule(torch.nn.Module):
    """Routes the family's `training_loss` through `forward`, so DDP/FSDP wrappers see every training computation."""

    def __init__(self, draft: Any, steps: int | None):
        super().__init__()
        self.draft, self.steps = draft, steps

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor]) -> Any:
        return self.draft.training_loss(input_ids, loss_mask, features, steps=self.steps)


def _blocks(dataset: DraftDataset | torch.utils.data.Subset) -> tuple[torch.Tensor, torch.Tensor]:
    """The (input_ids, loss_mask) blocks a dataset trains on."""
    if isinstance(dataset, torch.utils.data.Subset):
        base, index = dataset.dataset, torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return base.input_ids[index], base.loss_mask[index]  # type: ignore[attr-defined]
    return dataset.input_ids, dataset.loss_mask


def _sample_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Block indices of micro-batch `micro_step`: a fresh permutation per epoch, fixed by the seed."""
    out = []
    for s in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        out.append(int(_sample_order(n, seed, s // n)[s % n]))
    return out


@torch.no_grad()
def measure_acceptance(
    verifier: Any, draft: Any, prompts: list[torch.Tensor], max_new_tokens: int = 48
) -> GenerationStats:
    """Greedy generation with the draft on `prompts` through the real generate() path; summed stats."""
    total = GenerationStats()
    was_training = draft.training
    draft.eval()
    for prompt in prompts:
        verifier.generate(
            prompt.to(verifier.device), max_new_tokens=max_new_tokens, do_sample=False, assistant_model=draft
        )
        total = total + draft.generation_stats
    draft.train(was_training)
    return total


def plan_evaluation(n_blocks: int, seq_len: int, eval_blocks: int, prompt_len: int) -> tuple[int, int, list[str]]:
    """How many of the data's last blocks the acceptance evaluation holds out (at most a tenth: training keeps
    the rest) and how many prompt tokens it takes from each. Returns (blocks, prompt tokens, notices to print:
    what is used and, when it is less than asked, why); raises ValueError, naming the fix, when the data leaves
    no block to evaluate on or none to train on."""
    if eval_blocks < 0 or prompt_len < 1:
        raise ValueError(f"--eval-blocks must be >= 0 and --eval-prompt-len >= 1 (got {eval_blocks}, {prompt_len})")
    n_eval = min(eval_blocks, n_blocks // 10)
    if eval_blocks and not n_eval:
        raise ValueError(
            f"--eval-blocks {eval_blocks}: the data has {n_blocks} blocks and the evaluation holds out at most a tenth "
            "of them, so none is left to evaluate on. Give more data (10 blocks or more), or skip the evaluation "
            "with --eval-blocks 0."
        )
    if n_blocks - n_eval < 1:
        raise ValueError(f"the data has {n_blocks} blocks: none is left for training. Give more data.")
    if not n_eval:
        return 0, 0, ["evaluation: off (--eval-blocks 0)"]
    tokens = min(prompt_len, seq_len)
    notes = [
        f"evaluation: {n_eval} held-out blocks (the last of {n_blocks}; training uses the other {n_blocks - n_eval}), "
        f"{tokens} prompt tokens each"
    ]
    if n_eval < eval_blocks:
        notes.append(
            f"warning: --eval-blocks {eval_blocks} asked for more, but at most a tenth of the {n_blocks} blocks is held "
            f"out; tau from {n_eval} prompt(s) is noisy: give more data for a steadier figure"
        )
    if tokens < prompt_len:
        notes.append(
            f"warning: --eval-prompt-len {prompt_len} is longer than a block ({seq_len} tokens): prompts have {tokens}"
        )
    return n_eval, tokens, notes


@dataclass
class _Parts:
    """What a checkpoint saves and restores (the optimizer may be accelerate's wrapper; its state is the inner one's)."""

    draft: Any
    optimizer: Any
    scheduler: Any
    scaler: Any


def train(
    draft: Any,
    verifier: Any,
    dataset: DraftDataset | torch.utils.data.Subset,
    config: TrainConfig,
    eval_prompts: list[torch.Tensor] | None = None,
    resume: bool = True,
    eval_verifier: Any = None,
) -> dict[str, Any]:
    """Train `draft` (bound to `verifier`) on `dataset`; save checkpoints and the final draft (our format,
    with remote code) to `config.output_dir`. Returns {"history": [...], "evals": [...], "final_dir": ...}.

    `verifier` may be `data.verifier_parts` (no decoder layers) when `dataset` holds cached features; tau on
    `eval_prompts` is then measured with `eval_verifier` (the whole verifier; the draft is bound to it for
    the evaluation and back to `verifier` after), or not at all when it is None.

    `resume=True` continues from the newest usable checkpoint in `output_dir` (raises `ResumeError` when the
    settings differ or none is usable); `resume=False` starts over and deletes the checkpoints there."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=mixed)
    sharded = accelerator.distributed_type.value in _SHARDED
    if accelerator.is_main_process:
        _remove_temporaries(output)
        if not resume:
            _discard_checkpoints(accelerator, output)
    accelerator.wait_for_everyone()
    if sharded:
        engine = str(accelerator.distributed_type.value)
        if resume and _checkpoints(output):
            raise ResumeError(
                f"cannot resume {output} under {engine}: the training state is saved and restored only with one "
                "process or DDP (the engine shards the optimizer state, and accelerate's own checkpoints of it "
                "are pickles, which are never loaded). Start over with --no-resume (deletes the checkpoints), or "
                "run under DDP (examples/accelerate/ddp.yaml)."
            )
        _say(
            accelerator, f"note: under {engine} no mid-run checkpoints are written; the final draft is saved at the end"
        )

    set_seed(config.seed)
    family = draft.config.speculators_model_type
    if config.ttt_steps is not None and draft.default_train_steps is None:
        raise ValueError(
            f"ttt_steps={config.ttt_steps}: the {draft.title or family} loss has no unrolled steps; leave it unset"
        )
    draft.prepare_training(*_blocks(dataset), verifier)  # e.g. a new EAGLE-3 draft picks its vocabulary
    module = _TrainingModule(draft, config.ttt_steps)
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    # The scheduler stays ours (stepped once per optimizer step, saved in our checkpoints): accelerate's
    # wrapper would step it once per process, so the schedule would depend on the number of processes.
    module, optimizer = accelerator.prepare(module, optimizer)
    parts = _Parts(accelerator.unwrap_model(module).draft, optimizer, scheduler, accelerator.scaler)
    verifier.eval().requires_grad_(False)
    layer_ids = draft.verifier_layer_ids()

    run = _run_fingerprint(config, draft, dataset, accelerator.num_processes)
    start, history, evals, elapsed = 0, [], [], 0.0
    state = _resume(accelerator, output, run, parts) if resume else None
    if state is not None:
        start, history, evals, elapsed = state.step, state.history, state.evals, state.seconds
        accelerator.step = start * config.grad_accum  # accelerate's micro-step counter, as in the first run
    if accelerator.is_main_process:
        # the log restarts from what the checkpoint holds: steps done after it by a killed run are dropped
        _write_atomic(output / LOG_FILE, "".join(json.dumps(r) + "\n" for r in history).encode())
        _write_atomic(output / CONFIG_FILE, config.model_dump_json(indent=2).encode())

    def evaluate(step: int) -> None:
        if eval_prompts:
            judge = verifier if eval_verifier is None else eval_verifier
            if judge is not verifier:
                parts.draft.bind_verifier(judge)
            try:
                stats = measure_acceptance(judge, parts.draft, eval_prompts, config.eval_max_new_tokens)
            finally:
                if judge is not verifier:
                    parts.draft.bind_verifier(verifier)
            evals.append({"step": step, "tau": stats.tau, "acceptance_rate": stats.acceptance_rate})
            accelerator.print(f"step {step}: acceptance length tau={stats.tau:.3f}")

    n = len(dataset)
    progress = Progress(
        config.steps, f"training {family} draft", "step", enabled=accelerator.is_main_process, initial=start
    )
    t0 = time.perf_counter() - elapsed  # `seconds` counts the training time of earlier runs too
    for step in range(start, config.steps):
        for micro in range(config.grad_accum):
            # process r of w takes micro-batch (global index) * w + r of one sample stream: w processes with
            # batch b see what one process with batch w * b sees, whatever the number of processes
            micro_index = (step * config.grad_accum + micro) * accelerator.num_processes + accelerator.process_index
            items = [dataset[i] for i in batch_indices(n, config.batch_size, micro_index, config.seed)]
            input_ids = torch.stack([it["input_ids"] for it in items]).to(accelerator.device)
            loss_mask = torch.stack([it["loss_mask"] for it in items]).to(accelerator.device)
            if "features" in items[0]:
                features = [
                    torch.stack([it["features"][k] for it in items]).to(accelerator.device, torch.float32)
                    for k in range(len(layer_ids))
                ]
            else:
                with torch.no_grad():  # a verifier spread over devices (device_map) returns them where computed
                    features = [
                        f.to(accelerator.device) for f in verifier_hidden_states(verifier, input_ids, layer_ids)
                    ]
            with accelerator.accumulate(module):
                loss, metrics = module(input_ids, loss_mask, features)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            record = {
                "step": done,
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - t0, 2),
                **metrics,
            }
            history.append(record)
            if accelerator.is_main_process:
                with open(output / LOG_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
        progress.update(
            1,
            f"loss {metrics['loss']:.4f}, acc {metrics.get('acc_0', 0):.2f}",
            line=done % config.log_every == 0 or done == config.steps,
        )
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            evaluate(done)
        if not sharded and (done % config.save_every == 0 or done == config.steps):
            run_state = {
                "format": STATE_FORMAT,
                "step": done,
                "seconds": round(time.perf_counter() - t0, 2),
                "history": history,
                "evals": evals,
                "run": run,
            }
            _save_checkpoint(accelerator, output, run_state, parts, config.keep_checkpoints)
    progress.close()
    evaluate(config.steps)
    if accelerator.is_main_process:
        parts.draft.save_pretrained(output / "final")
        summary = {"history": history, "evals": evals, "config": config.model_dump()}
        _write_atomic(output / "final" / "training_summary.json", json.dumps(summary, indent=2).encode())
    # every process waits for the final save, then the process group is torn down here rather than at
    # interpreter exit (where gloo's threads can abort a process that has already finished its work)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"history": history, "evals": evals, "final_dir": str(output / "final")}


# --------------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------------
def _say(accelerator: Any, message: str) -> None:
    """A notice about the run, once (main process), on stderr: stdout stays for results."""
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# files: atomic writes, checkpoint folders, temporaries
# --------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary sibling, flush it to disk and rename it over `path`: readers see the old file or
    the new one, never a part (a killed run leaves the `.tmp-` file, removed by the next start)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step-N` folder, oldest first."""
    found = []
    for path in (output / "checkpoints").glob("step-*"):
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _remove_temporaries(output: Path) -> None:
    """Delete what a killed run left half-written: this module's `.tmp-*` files and folders, and the
    `.final.*` folders of an interrupted `save_pretrained` (models/base.py names its temporaries so)."""
    folders = (output, output / "checkpoints", output / "final")
    stale = [*(p for folder in folders for p in folder.glob(f"{TMP_PREFIX}*")), *output.glob(".final.*")]
    for path in stale:
        _remove(path)


def _delete_checkpoint(path: Path) -> None:
    """Renamed to a temporary first: a kill while deleting leaves a `.tmp-` folder, not half a checkpoint."""
    doomed = path.with_name(f"{TMP_PREFIX}{path.name}-old")
    _remove(doomed)
    path.rename(doomed)
    _remove(doomed)


def _discard_checkpoints(accelerator: Any, output: Path) -> None:
    """Starting over: the old run's checkpoints go, or a later resume (and the pruning by step number)
    would mix the two runs."""
    old = _checkpoints(output)
    for _, path in old:
        _delete_checkpoint(path)
    if old:
        _say(accelerator, f"starting over (resume off): deleted {len(old)} checkpoints in {output / 'checkpoints'}")


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _rng_files(rank: int) -> tuple[str, str]:
    return f"rng-{rank}.safetensors", f"rng-{rank}.json"


def _required_files(processes: int, scaler: bool) -> list[str]:
    names = [MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_FILE]
    names += [name for rank in range(processes) for name in _rng_files(rank)]
    return [*names, SCALER_FILE] if scaler else names


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------
def _save_checkpoint(accelerator: Any, output: Path, run_state: dict[str, Any], parts: _Parts, keep: int) -> None:
    """Every process writes its part into `checkpoints/.tmp-step-N`; the main process then writes the
    manifest (trainer_state.json, last), renames the folder to `step-N` and deletes the oldest ones."""
    checkpoints = output / "checkpoints"
    target = checkpoints / f"step-{run_state['step']}"
    tmp = checkpoints / f"{TMP_PREFIX}{target.name}"
    if accelerator.is_main_process:
        _remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(_plain_tensors(parts.draft.state_dict()), tmp / MODEL_FILE, metadata={"format": "pt"})
        tensors, rest = _split_optimizer_state(parts.optimizer.state_dict())
        save_file(tensors, tmp / OPTIMIZER_TENSORS)
        (tmp / OPTIMIZER_JSON).write_text(json.dumps(rest))
        (tmp / SCHEDULER_FILE).write_text(json.dumps(parts.scheduler.state_dict()))
        if parts.scaler is not None:
            (tmp / SCALER_FILE).write_text(json.dumps(parts.scaler.state_dict()))
    _write_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
            for p in sorted(tmp.iterdir())
            if p.name != STATE_FILE
        }
        missing = set(_required_files(accelerator.num_processes, parts.scaler is not None)) - set(files)
        if missing:
            raise RuntimeError(f"checkpoint {target}: {sorted(missing)} were not written (a process failed to save)")
        (tmp / STATE_FILE).write_text(json.dumps({**run_state, "files": files}))
        with open(tmp / STATE_FILE, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _commit(tmp, target)
        for _, stale in _checkpoints(output)[:-keep]:
            _delete_checkpoint(stale)
    accelerator.wait_for_everyone()


def _commit(tmp: Path, target: Path) -> None:
    """Rename the finished folder into place (atomic). A folder already there (the same step, redone after
    a fallback) is renamed away first and deleted after."""
    old = target.with_name(f"{TMP_PREFIX}{target.name}-old")
    if target.exists():
        _remove(old)
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    _remove(old)


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors safetensors can write (tensors sharing memory, like tied weights, are copied apart)."""
    out, seen = {}, set()
    for name, tensor in state.items():
        plain = tensor.detach().to("cpu").contiguous()
        if plain.numel() and plain.untyped_storage().data_ptr() in seen:
            plain = plain.clone()
        seen.add(plain.untyped_storage().data_ptr())
        out[name] = plain
    return out


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as safetensors (every tensor, named `<param index>.<name>`) plus JSON (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                rest["state"].setdefault(str(index), {})[name] = value
    return tensors, rest


def _write_rng(folder: Path, rank: int) -> None:
    tensor_file, json_file = _rng_files(rank)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, folder / tensor_file)
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    (folder / json_file).write_text(json.dumps(states))


# --------------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------------
class _Unusable(Exception):
    """A checkpoint that cannot be resumed from: incomplete, damaged, or not in the safe format."""


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: NonNegativeInt
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _SavedState(BaseModel):
    """trainer_state.json: where the run was, its settings, and the manifest of the checkpoint's files."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["speculators-hf-training-state/1"]
    step: NonNegativeInt
    seconds: NonNegativeFloat
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    run: dict[str, Any]
    files: dict[str, _FileEntry]


@dataclass
class _Loaded:
    """A checkpoint read and checked against this run's objects, not yet applied to them."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


def _resume(accelerator: Any, output: Path, run: dict[str, Any], parts: _Parts) -> _SavedState | None:
    """Restore the newest usable checkpoint into `parts` and return its state; None when there is none.
    Unusable ones are reported and skipped (and deleted once an older one is restored: the run redoes their
    steps); a change of settings raises ResumeError, since an older checkpoint has the same settings."""
    found = _checkpoints(output)
    if not found:
        return None
    problems: list[str] = []
    for step, path in reversed(found):
        reason = None
        try:
            state = _read_state(path, step)
            _check_same_run(path, state.run, run)
            _verify_files(path, state, _required_files(accelerator.num_processes, parts.scaler is not None))
            loaded = _read_checkpoint(path, accelerator.process_index, parts)
        except _Unusable as err:
            reason = str(err)
        # every process must restore the same checkpoint (each reads its own RNG file)
        agreed = accelerator.gather(torch.tensor([int(reason is None)], device=accelerator.device)).min().item()
        if reason is None and not agreed:
            reason = "another process could not read its part"
        if reason is not None:
            problems.append(f"{path.name}: {reason}")
            _say(accelerator, f"checkpoint {path} is unusable: {reason}")
            continue
        _apply(loaded, parts)
        if problems:
            _say(accelerator, f"resuming from the previous checkpoint {path} (step {step}); the newer ones are deleted")
            if accelerator.is_main_process:
                for newer_step, newer in found:
                    if newer_step > step:
                        _delete_checkpoint(newer)
            accelerator.wait_for_everyone()
        else:
            _say(accelerator, f"resuming from {path} (step {step})")
        return state
    raise ResumeError(
        f"cannot resume: no usable checkpoint in {output / 'checkpoints'} ({'; '.join(problems)}). To start over, "
        "run again with --no-resume (train(..., resume=False)), which deletes them, or write to a new --output."
    )


def _read_state(path: Path, step: int) -> _SavedState:
    state_file = path / STATE_FILE
    if state_file.is_symlink() or not state_file.is_file():
        raise _Unusable(f"{STATE_FILE} is missing (an incomplete checkpoint)")
    try:
        raw = json.loads(state_file.read_bytes())
    except (ValueError, RecursionError) as err:
        raise _Unusable(f"{STATE_FILE} is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".pkl", ".bin", ".pt", ".pth"})
        if pickles:
            raise _Unusable(
                f"written by an older speculators-hf in accelerate's pickle format ({', '.join(pickles)}), "
                "which is never loaded because unpickling can run code"
            )
        raise _Unusable(f"{STATE_FILE} is not a training state of format {STATE_FORMAT!r}")
    try:
        state = _SavedState.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise _Unusable(f"{STATE_FILE}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if state.step != step:
        raise _Unusable(f"{STATE_FILE} says step {state.step}, the folder step {step}")
    return state


def _check_same_run(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose settings differ: another draft family in one sentence (then every draft field
    differs), other changes one line each, long values cut."""
    family = [run.get(FAMILY_KEY) for run in (saved, current)]
    if family[0] != family[1]:
        raise ResumeError(
            f"cannot resume from {path}: family {family[0]} -> {family[1]}. The output folder {path.parent.parent} "
            f"holds a run of family {family[0]}: write the {family[1]} run to a new --output, or delete that folder "
            "(or start over in it with --no-resume, which deletes its checkpoints)."
        )
    absent = object()
    changes = [
        f"{key}: {_shown(saved.get(key, absent))} -> {_shown(current.get(key, absent))}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key, absent) != current.get(key, absent)
    ]
    if changes:
        free = ", ".join(sorted(FREE_ON_RESUME - {"output_dir"}))
        raise ResumeError(
            f"cannot resume from {path}: these settings differ from the run that wrote it, and they change the "
            "trained draft:\n  " + "\n  ".join(changes) + "\nResume with the same values, write to a new --output, "
            f"or start over in this one with --no-resume (deletes its checkpoints). Free to change on resume: {free}."
        )


def _shown(value: Any, limit: int = 80) -> str:
    if not isinstance(value, (str, int, float, bool, list, dict, type(None))):
        return "(absent)"
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _verify_files(path: Path, state: _SavedState, names: list[str]) -> None:
    """Every file the resume reads must be a plain file with the manifest's size and sha256."""
    for name in names:
        file = path / name
        if name not in state.files:
            raise _Unusable(f"the manifest in {STATE_FILE} lists no {name}")
        if file.is_symlink() or not file.is_file():
            raise _Unusable(f"{name} is missing")
        size, entry = file.stat().st_size, state.files[name]
        if size != entry.bytes:
            raise _Unusable(f"{name} has {size} bytes where the manifest says {entry.bytes} (cut short or replaced)")
        if _sha256(file) != entry.sha256:
            raise _Unusable(f"{name} does not match the sha256 in the manifest (damaged or replaced)")


def _read_checkpoint(path: Path, rank: int, parts: _Parts) -> _Loaded:
    """Parse every file and check it against this run's objects; nothing is changed yet."""
    model = _read_tensors(path, MODEL_FILE)
    current = parts.draft.state_dict()
    if set(model) != set(current):
        raise _Unusable(
            f"{MODEL_FILE} holds other tensors than the draft (missing {sorted(set(current) - set(model))[:3]}, "
            f"unexpected {sorted(set(model) - set(current))[:3]})"
        )
    for name, tensor in model.items():
        if tensor.shape != current[name].shape or tensor.dtype != current[name].dtype:
            raise _Unusable(
                f"{MODEL_FILE}: {name} is {tensor.dtype} {list(tensor.shape)}, "
                f"the draft's {current[name].dtype} {list(current[name].shape)}"
            )
    scaler = None
    if parts.scaler is not None:
        scaler = _like(_read_json(path, SCALER_FILE), parts.scaler.state_dict(), SCALER_FILE)
    tensor_file, json_file = _rng_files(rank)
    return _Loaded(
        model=model,
        optimizer=_optimizer_state(_read_tensors(path, OPTIMIZER_TENSORS), _read_json(path, OPTIMIZER_JSON), parts),
        scheduler=_like(_read_json(path, SCHEDULER_FILE), parts.scheduler.state_dict(), SCHEDULER_FILE),
        scaler=scaler,
        rng=_rng_state(_read_tensors(path, tensor_file), _read_json(path, json_file), tensor_file, json_file),
    )


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / name)
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise _Unusable(f"{name} is not a readable safetensors file ({err})") from None


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_bytes())
    except (ValueError, RecursionError) as err:
        raise _Unusable(f"{name} is not valid JSON ({err})") from None


def _like(saved: Any, current: Any, where: str) -> Any:
    """`saved` (read from JSON) in the structure and types of `current` (this run's own state dict), or
    _Unusable: a state file can only set the values this run's objects already have, never new attributes."""
    if current is None or isinstance(current, (bool, str)):
        if type(saved) is not type(current):
            raise _Unusable(f"{where}: expected {type(current).__name__}, found {type(saved).__name__}")
        return saved
    if isinstance(current, (int, float)):
        if (
            isinstance(saved, bool)
            or not isinstance(saved, (int, float))
            or (isinstance(current, int) and isinstance(saved, float))
        ):
            raise _Unusable(f"{where}: expected {type(current).__name__}, found {type(saved).__name__}")
        return type(current)(saved)
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            raise _Unusable(f"{where}: expected a list of {len(current)} values")
        return type(current)(_like(s, c, f"{where}[{i}]") for i, (s, c) in enumerate(zip(saved, current)))
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(saved) != {str(k) for k in current}:
            raise _Unusable(f"{where}: expected the keys {sorted(map(str, current))}")
        return {k: _like(saved[str(k)], v, f"{where}.{k}") for k, v in current.items()}
    raise _Unusable(f"{where}: a {type(current).__name__} cannot be restored from JSON")


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: Any, parts: _Parts) -> dict[str, Any]:
    current = parts.optimizer.state_dict()
    if not isinstance(rest, dict) or set(rest) != {"param_groups", "state"} or not isinstance(rest["state"], dict):
        raise _Unusable(f"{OPTIMIZER_JSON}: expected the keys ['param_groups', 'state']")
    groups = _like(rest["param_groups"], current["param_groups"], f"{OPTIMIZER_JSON}: param_groups")
    if [g["params"] for g in groups] != [g["params"] for g in current["param_groups"]]:
        raise _Unusable(f"{OPTIMIZER_JSON}: the parameter groups hold other parameters than this run's")
    params = [p for group in parts.optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not name:
            raise _Unusable(f"{OPTIMIZER_TENSORS}: unexpected tensor {key!r}")
        if tensor.dim() and tensor.shape != params[int(index)].shape:
            raise _Unusable(
                f"{OPTIMIZER_TENSORS}: {key} is {list(tensor.shape)}, its parameter {list(params[int(index)].shape)}"
            )
        state.setdefault(int(index), {})[name] = tensor
    for index, entry in rest["state"].items():
        if not index.isdigit() or int(index) >= len(params) or not isinstance(entry, dict):
            raise _Unusable(f"{OPTIMIZER_JSON}: unexpected state entry {index!r}")
        for name, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _Unusable(f"{OPTIMIZER_JSON}: state {index}.{name} is not a number")
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def _rng_state(tensors: dict[str, torch.Tensor], saved: Any, tensor_file: str, json_file: str) -> dict[str, Any]:
    """Check each RNG state by setting it on a scratch generator (the real ones are set by _apply)."""
    try:
        torch.Generator().set_state(tensors["torch"])
        cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
        if any(s.dtype != torch.uint8 or s.dim() != 1 for s in cuda):
            raise TypeError("a CUDA state is not a 1-d uint8 tensor")
    except (KeyError, RuntimeError, TypeError) as err:
        raise _Unusable(f"{tensor_file}: not a torch RNG state ({err})") from None
    try:
        version, internal, gauss = saved["python"]
        python = (version, tuple(internal), gauss)
        random.Random().setstate(python)
        name, keys, pos, has_gauss, cached = saved["numpy"]
        numpy = (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
        np.random.RandomState().set_state(numpy)
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise _Unusable(f"{json_file}: not a Python/NumPy RNG state ({err})") from None
    return {"torch": tensors["torch"], "cuda": cuda, "python": python, "numpy": numpy}


def _apply(loaded: _Loaded, parts: _Parts) -> None:
    parts.draft.load_state_dict(loaded.model)
    parts.optimizer.load_state_dict(loaded.optimizer)
    parts.scheduler.load_state_dict(loaded.scheduler)
    if parts.scaler is not None and loaded.scaler is not None:
        parts.scaler.load_state_dict(loaded.scaler)
    torch.set_rng_state(loaded.rng["torch"])
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(loaded.rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)
    random.setstate(loaded.rng["python"])
    np.random.set_state(loaded.rng["numpy"])


# --------------------------------------------------------------------------------------------------
# what a resumed run must keep
# --------------------------------------------------------------------------------------------------
def _run_fingerprint(config: TrainConfig, draft: Any, dataset: Any, processes: int) -> dict[str, Any]:
    """Everything that decides the trained draft, flat (`name: value`), as saved with each checkpoint."""
    run = {k: v for k, v in config.model_dump(mode="json").items() if k not in FREE_ON_RESUME}
    run.update(_flatten(json.loads(draft.config.to_json_string(use_diff=False)), "draft."))
    run["processes"] = processes
    digest = hashlib.sha256()
    cached = False
    for i in range(len(dataset)):
        item = dataset[i]
        for key in ("input_ids", "loss_mask"):
            digest.update(item[key].detach().to("cpu").contiguous().numpy().tobytes())
        cached = "features" in item
    run.update({"data.blocks": len(dataset), "data.sha256": digest.hexdigest(), "data.cached_features": cached})
    return run


def _flatten(config: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in _DRAFT_KEYS_IGNORED:
            continue
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
