"""`speculators-hf bench`: acceptance length and wall-clock speedup against the alternatives.

In one run, on the same prompts, greedy: the verifier alone, transformers' assisted generation with
a small LM, prompt-lookup decoding, and each of our drafts at several draft lengths k. For every
method it reports tau (tokens per verifier forward pass), tokens/s, the speedup over the verifier
alone, whether the output is identical to it, and for our drafts the measured draft/verifier cost
ratio c and the speedup an ideal implementation would reach with the measured tau:
tau / (1 + k c), the formula (1 - a^(k+1)) / ((1 - a)(1 + k c)) with tau = (1 - a^(k+1)) / (1 - a).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generation.stats import GenerationStats


@dataclass
class BenchResult:
    method: str
    k: int | None
    tau: float
    tokens: int
    seconds: float
    tokens_per_s: float
    speedup: float = 1.0
    exact: bool = True
    cost_ratio: float | None = None
    ideal_speedup: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _DraftTimer:
    """Wall time spent inside a draft's `propose` (the draft's share of a round)."""

    def __init__(self, draft: Any):
        self.draft, self.seconds, self.original = draft, 0.0, draft.propose

    def __enter__(self) -> _DraftTimer:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        self.draft.propose = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.draft.propose  # back to the class method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _run(
    verifier: Any, prompts: list[torch.Tensor], max_new_tokens: int, **kwargs: Any
) -> tuple[list[torch.Tensor], float]:
    outputs, total = [], 0.0
    for prompt in prompts:
        _sync(verifier.device)
        start = time.perf_counter()
        out = verifier.generate(prompt.to(verifier.device), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        _sync(verifier.device)
        total += time.perf_counter() - start
        outputs.append(out.cpu())
    return outputs, total


def run_bench(
    verifier: Any,
    prompts: list[torch.Tensor],
    drafts: dict[str, Any],
    k_values: list[int],
    max_new_tokens: int = 128,
    assistant_lm: Any = None,
    prompt_lookup: bool = True,
    warmup: bool = True,
    trees: list[str] | None = None,
    batch_size: int = 1,
) -> list[BenchResult]:
    """Benchmark every method on `prompts` (list of [1, n] id tensors). `drafts` maps a name to a bound draft.
    `trees`: tree specs (see `TreeSpec.parse`) to also run every draft with in the package's own loop.
    `batch_size` > 1: also the verifier alone and every draft (with each tree, or a chain of the middle k)
    on left-padded batches of that many prompts; their speedup is throughput over the verifier alone at
    batch 1, and "identical" compares every row with the verifier alone run on that prompt by itself."""
    if warmup:  # first calls pay for allocations and lazy initialisation
        _run(verifier, prompts[:1], 8)
    reference, base_s = _run(verifier, prompts, max_new_tokens)
    tokens = sum(o.shape[1] - p.shape[1] for o, p in zip(reference, prompts))
    forward_s = base_s / tokens  # one verifier forward pass per token when decoding alone
    results = [BenchResult("verifier alone", None, 1.0, tokens, base_s, tokens / base_s)]

    def add(
        method: str, k: int | None, outputs: list[torch.Tensor], seconds: float, tau: float, **extra: Any
    ) -> BenchResult:
        n = sum(o.shape[1] - p.shape[1] for o, p in zip(outputs, prompts))
        exact = all(torch.equal(a, b) for a, b in zip(outputs, reference))
        result = BenchResult(method, k, tau, n, seconds, n / seconds, base_s / seconds, exact, **extra)
        results.append(result)
        return result

    for k in k_values:
        if assistant_lm is not None:
            assistant_lm.generation_config.num_assistant_tokens = k
            assistant_lm.generation_config.num_assistant_tokens_schedule = "constant"
            if warmup:
                _run(verifier, prompts[:1], 8, assistant_model=assistant_lm)
            outputs, seconds = _run(verifier, prompts, max_new_tokens, assistant_model=assistant_lm)
            add("transformers assisted (small LM)", k, outputs, seconds, float("nan"))
        if prompt_lookup:
            outputs, seconds = _run(verifier, prompts, max_new_tokens, prompt_lookup_num_tokens=k)
            add("prompt lookup", k, outputs, seconds, float("nan"))
        for name, draft in drafts.items():
            if warmup:
                _run(verifier, prompts[:1], 8, assistant_model=draft, num_assistant_tokens=k)
            stats = GenerationStats()
            outputs, seconds = [], 0.0
            with _DraftTimer(draft) as timer:
                for prompt in prompts:
                    out, s = _run(verifier, [prompt], max_new_tokens, assistant_model=draft, num_assistant_tokens=k)
                    outputs += out
                    seconds += s
                    stats = stats + draft.generation_stats
            cost_ratio = (timer.seconds / max(stats.drafted_tokens, 1)) / forward_s
            add(name, k, outputs, seconds, stats.tau, cost_ratio=cost_ratio, ideal_speedup=stats.tau / (1 + k * cost_ratio),
                extra={"acceptance_rate": stats.acceptance_rate, "draft_seconds": timer.seconds})  # fmt: skip
    for tree in trees or []:
        for name, draft in drafts.items():
            add(*_tree_run(verifier, draft, prompts, tree, max_new_tokens, warmup, name))
    if batch_size > 1:
        batch_trees = trees or [f"chain:{k_values[len(k_values) // 2]}"]
        runs: list[tuple[str, Any, str | None]] = [(f"verifier alone (batch {batch_size})", None, None)]
        runs += [(f"{name} (batch {batch_size}, tree {t})", d, t) for t in batch_trees for name, d in drafts.items()]
        for method, draft, batch_tree in runs:
            outputs, seconds, stats = _batched_run(
                verifier, draft, prompts, batch_size, batch_tree, max_new_tokens, warmup
            )
            depth = None if batch_tree is None else _tree_depth(batch_tree)
            add(method, depth, outputs, seconds, float("nan") if draft is None else stats.tau)
    return results


def _tree_depth(tree: str) -> int:
    from .generation.tree import TreeSpec

    return TreeSpec.parse(tree).depth


def _batched_run(
    verifier: Any,
    draft: Any,
    prompts: list[torch.Tensor],
    batch_size: int,
    tree: str | None,
    max_new_tokens: int,
    warmup: bool,
) -> tuple[list[torch.Tensor], float, GenerationStats]:
    """Left-padded batches of `batch_size` prompts through the verifier alone (draft None) or the package's
    loop; returns each row as prompt + its new tokens up to its eos (padding removed), seconds, stats."""
    from .generation.loop import eos_token_ids, generate

    pad = verifier.generation_config.pad_token_id
    pad = 0 if pad is None else int(pad)
    eos_ids = eos_token_ids(verifier.generation_config)
    outputs, seconds, stats = [], 0.0, GenerationStats()
    starts = [-1] * warmup + list(range(0, len(prompts), batch_size))  # -1: a short warm-up batch
    for start in starts:
        group = prompts[max(start, 0) : max(start, 0) + batch_size]
        width = max(p.shape[1] for p in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(group):
            ids[row, width - prompt.shape[1] :] = prompt[0]
            mask[row, width - prompt.shape[1] :] = 1
        ids, mask = ids.to(verifier.device), mask.to(verifier.device)
        new_tokens = 8 if start < 0 else max_new_tokens
        _sync(verifier.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if draft is None:
                out = verifier.generate(
                    ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
                )
            else:
                out = generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=new_tokens, do_sample=False)
        _sync(verifier.device)
        if start < 0:
            continue
        seconds += time.perf_counter() - t0
        if draft is not None:
            stats = stats + draft.generation_stats
        for row, prompt in enumerate(group):
            new = out[row, width:].cpu().tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
            outputs.append(torch.cat([prompt, torch.tensor([new[:end]], dtype=prompt.dtype)], dim=1))
    return outputs, seconds, stats


def _tree_run(
    verifier: Any, draft: Any, prompts: list[torch.Tensor], tree: str, max_new_tokens: int, warmup: bool, name: str
) -> tuple[str, int, list[torch.Tensor], float, float]:
    """`speculators_hf.generate` with `tree`, one prompt at a time: (method, depth, outputs, seconds, tau)."""
    from .generation.loop import generate
    from .generation.tree import TreeSpec

    if warmup:
        generate(verifier, draft, prompts[0].to(verifier.device), tree=tree, max_new_tokens=8, do_sample=False)
    outputs, seconds, stats = [], 0.0, GenerationStats()
    for prompt in prompts:
        _sync(verifier.device)
        start = time.perf_counter()
        out: Any = generate(
            verifier, draft, prompt.to(verifier.device), tree=tree, max_new_tokens=max_new_tokens, do_sample=False
        )
        _sync(verifier.device)
        seconds += time.perf_counter() - start
        outputs.append(out.cpu())
        stats = stats + draft.generation_stats
    return f"{name} (tree {tree})", TreeSpec.parse(tree).depth, outputs, seconds, stats.tau


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown_table(results: list[BenchResult]) -> str:
    head = "| method | k | tau | tokens/s | speedup | identical | cost ratio c | ideal speedup | measured/ideal |\n|---|---|---|---|---|---|---|---|---|\n"
    rows = []
    for r in results:
        ratio = f"{r.speedup / r.ideal_speedup:.0%}" if r.ideal_speedup else ""
        rows.append(
            f"| {r.method} | {r.k or ''} | {'' if r.tau != r.tau else f'{r.tau:.2f}'} | {r.tokens_per_s:.1f} | {r.speedup:.2f}x | "
            f"{'yes' if r.exact else 'NO'} | {'' if r.cost_ratio is None else f'{r.cost_ratio:.3f}'} | "
            f"{'' if r.ideal_speedup is None else f'{r.ideal_speedup:.2f}x'} | {ratio} |"
        )
    return head + "\n".join(rows) + "\n"


def write_report(results: list[BenchResult], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """results.json, results.md and speedup.png (if matplotlib is installed) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    table = markdown_table(results)
    (out / "results.md").write_text(f"Machine: {meta.get('machine')}\n\nCommand: `{meta.get('command')}`\n\n{table}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r.method for r in results if r.k):
        rs = [r for r in results if r.method == method]
        ax1.plot([r.k for r in rs], [r.speedup for r in rs], marker="o", label=method)
        if all(r.tau == r.tau for r in rs):
            ax2.plot([r.k for r in rs], [r.tau for r in rs], marker="o", label=method)
    ax1.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax1.set(xlabel="draft length k", ylabel="speedup over verifier alone", title="wall-clock speedup")
    ax2.set(xlabel="draft length k", ylabel="tau (tokens per verifier pass)", title="acceptance length")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(meta.get("machine", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    plt.close(fig)
    return out
