"""Draft training on accelerate: one CPU or GPU, several GPUs (DDP), DeepSpeed ZeRO or FSDP.

The scale-out is accelerate's, configured with `accelerate launch --config_file examples/...yaml`; this
module never does its own distribution. bf16 mixed precision on GPU, fp32 on CPU; gradient
accumulation; checkpoints of the full training state (weights, optimizer, scheduler, RNG) every
`save_every` steps, from which `resume=True` continues with the same result as an uninterrupted run
(the data order is a pure function of the seed and the step); evaluation of the acceptance length
through the real `verifier.generate(..., assistant_model=draft)` path.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt
from tqdm.auto import tqdm

from ..generation.capture import verifier_hidden_states
from ..generation.stats import GenerationStats
from .data import DraftDataset
from .losses import loss_for

STATE_FILE = "trainer_state.json"
LOG_FILE = "training_log.jsonl"


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
    ttt_steps: PositiveInt = Field(default=7, description="EAGLE-3 training-time-test steps (loss weight 0.8^j)")
    seed: int = 0
    save_every: PositiveInt = 200
    keep_checkpoints: PositiveInt = 2
    eval_every: NonNegativeInt = Field(default=0, description="0: evaluate only at the end")
    eval_max_new_tokens: PositiveInt = 48
    log_every: PositiveInt = 10
    mixed_precision: str = Field(default="auto", description="auto (bf16 on GPU, fp32 on CPU), no, bf16, fp16")


class _TrainingModule(torch.nn.Module):
    """Routes the family loss through `forward`, so DDP/FSDP wrappers see every training computation."""

    def __init__(self, draft: Any, loss_fn: Any, loss_kwargs: dict[str, Any]):
        super().__init__()
        self.draft, self.loss_fn, self.loss_kwargs = draft, loss_fn, loss_kwargs

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, features: list[torch.Tensor]) -> Any:
        return self.loss_fn(self.draft, input_ids, loss_mask, features, **self.loss_kwargs)


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


def _latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = sorted(output_dir.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [c for c in checkpoints if (c / STATE_FILE).exists()]
    return complete[-1] if complete else None


def train(
    draft: Any,
    verifier: Any,
    dataset: DraftDataset | torch.utils.data.Subset,
    config: TrainConfig,
    eval_prompts: list[torch.Tensor] | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Train `draft` (bound to `verifier`) on `dataset`; save checkpoints and the final draft (our format,
    with remote code) to `config.output_dir`. Returns {"history": [...], "evals": [...], "final_dir": ...}."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=mixed)
    set_seed(config.seed)
    family = draft.config.speculators_model_type
    loss_kwargs = {"steps": config.ttt_steps} if family == "eagle3" else {}
    module = _TrainingModule(draft, loss_for(family), loss_kwargs)
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    # The scheduler stays ours (stepped once per optimizer step, checkpointed with the state): accelerate's
    # wrapper would step it once per process, so the schedule would depend on the number of processes.
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    verifier.eval().requires_grad_(False)
    layer_ids = draft.verifier_layer_ids()

    start, history, evals = 0, [], []
    checkpoint = _latest_checkpoint(output) if resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        start, history, evals = state["step"], state["history"], state["evals"]
        accelerator.print(f"resuming from {checkpoint} (step {start})")
    if accelerator.is_main_process:
        (output / "train_config.json").write_text(config.model_dump_json(indent=2))

    def evaluate(step: int) -> None:
        if eval_prompts:
            stats = measure_acceptance(
                verifier, accelerator.unwrap_model(module).draft, eval_prompts, config.eval_max_new_tokens
            )
            evals.append({"step": step, "tau": stats.tau, "acceptance_rate": stats.acceptance_rate})
            accelerator.print(f"step {step}: acceptance length tau={stats.tau:.3f}")

    n = len(dataset)
    # disable=None: a live bar on terminals, silent in logs; the log file and `history` keep the numbers
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=f"training {family} draft",
        unit="step",
        disable=None if accelerator.is_main_process else True,
    )
    t0 = time.perf_counter()
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
                with torch.no_grad():
                    features = verifier_hidden_states(verifier, input_ids, layer_ids)
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
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics.get('acc_0', 0):.2f}")
        bar.update(1)
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            evaluate(done)
        if done % config.save_every == 0 or done == config.steps:
            _save_checkpoint(accelerator, output, done, history, evals, config.keep_checkpoints)
    bar.close()
    evaluate(config.steps)
    final = accelerator.unwrap_model(module).draft
    if accelerator.is_main_process:
        final.save_pretrained(output / "final")
        (output / "final" / "training_summary.json").write_text(
            json.dumps({"history": history, "evals": evals, "config": config.model_dump()}, indent=2)
        )
    # every process waits for the final save, then the process group is torn down here rather than at
    # interpreter exit (where gloo's threads can abort a process that has already finished its work)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"history": history, "evals": evals, "final_dir": str(output / "final")}


def _save_checkpoint(accelerator: Any, output: Path, step: int, history: list, evals: list, keep: int) -> None:
    path = output / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # the state file is written last: a checkpoint without it is incomplete and never resumed from
        (path / STATE_FILE).write_text(json.dumps({"step": step, "history": history, "evals": evals}))
        old = sorted(output.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for stale in old:
            shutil.rmtree(stale, ignore_errors=True)
