"""`speculators-hf bench`: acceptance length and wall-clock speedup against the alternatives.

In one run, on the same prompts, greedy: the verifier alone, transformers' assisted generation with
a small LM, prompt-lookup decoding, and each of our drafts at several draft lengths k. For every
method it reports tau (tokens per verifier forward pass), tokens/s, the speedup over the verifier
alone, whether the output is identical to it (every run of every prompt, token for token; see `identity` for
half precision, where a pass over k + 1 tokens may round a near-tie the other way than one-token decoding),
and for our drafts the tokens actually drafted per round
(k_d: fewer than k where a draft cannot predict k ahead, and in the last rounds), the measured
draft/verifier cost ratio c and the speedup an ideal implementation would reach with the measured tau:
tau / (1 + k_d c), the formula (1 - a^(k+1)) / ((1 - a)(1 + k c)) with tau = (1 - a^(k+1)) / (1 - a);
and the same with the verification width charged, tau / (v(k_d + 1) + k_d c), where v(n) is what one
verifier pass over n tokens costs in passes over one token on this machine (`verification_costs`).
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .generation.policy import interpolate
from .generation.policy import sync as _sync
from .generation.stats import GenerationStats
from .progress import Progress

HALF_PRECISION = ("float16", "bfloat16")


@dataclass
class BenchResult:
    method: str
    k: int | None
    tau: float | None  # None where the method reports no acceptance statistics
    tokens: int
    seconds: float
    tokens_per_s: float
    speedup: float = 1.0
    exact: bool = True  # every run of every prompt equals the verifier alone, token for token
    cost_ratio: float | None = None
    ideal_speedup: float | None = None
    drafted_per_round: float | None = None  # k_d: draft tokens actually drafted per round
    ideal_speedup_width_charged: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # the verifier's
    prompts: int = 0
    prompts_differing: int = 0
    # half precision, prompts that differ run again under `VerifierPasses`: True when every token was the
    # verifier's argmax in the pass that verified it; None where not checked (batched rows)
    verified_in_pass: bool | None = None

    @property
    def half_precision(self) -> bool:
        return self.dtype in HALF_PRECISION

    @property
    def failed(self) -> bool:
        """A row that breaks the guarantee: any difference in float32 (and wider); in half precision a token that
        was not the verifier's argmax in the pass that verified it."""
        return not self.exact and (not self.half_precision or self.verified_in_pass is False)

    @property
    def measured_over_ideal(self) -> float | None:
        """speedup / the width-charged ideal (or the plain ideal where the width cost is unknown)."""
        ideal = self.ideal_speedup_width_charged or self.ideal_speedup
        return self.speedup / ideal if ideal else None


class _DraftTimer:
    """Wall time spent inside a draft's forward passes (`tree_extend` and `tree_expand`: the draft's share of
    a round, in transformers' loop and the package's own alike)."""

    METHODS = ("tree_extend", "tree_expand")

    def __init__(self, draft: Any):
        self.draft, self.seconds = draft, 0.0

    def __enter__(self) -> _DraftTimer:
        for name in self.METHODS:
            original = getattr(self.draft, name)

            def timed(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(self.draft, name, timed)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.METHODS:
            delattr(self.draft, name)  # back to the class methods


@dataclass
class _Pass:
    """One verifier forward pass: the tokens it read, their positions, which of them each may attend to
    (ancestor-or-self, [q, q]) and the verifier's greedy choice (argmax of its logits) after each (-1: no logits)."""

    tokens: list[int]
    positions: list[int]
    ancestors: torch.Tensor
    choices: list[int]


class VerifierPasses:
    """Records every forward pass of `verifier` (batch 1) while entered, to check the defining property of
    greedy speculative decoding: every emitted token is the verifier's argmax in the forward pass that
    verified it (`mismatches`). That holds in any dtype; in half precision it is all that holds, since a pass
    over k + 1 tokens does not round like k + 1 one-token passes. Tree passes are read from the 4D mask the
    package's loop passes (its last q columns are the block); a 2D mask means a causal block (chains).
    Assumes greedy decoding whose logits processors do not move the argmax (transformers' defaults)."""

    def __init__(self, verifier: Any):
        self.verifier = verifier
        self.passes: list[_Pass] = []

    def __enter__(self) -> VerifierPasses:
        self._handle = self.verifier.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[0] != 1:
            shape = None if ids is None else list(ids.shape)
            raise ValueError(
                f"VerifierPasses checks one sequence at a time (input_ids of shape [1, n]); the verifier was called "
                f"with input_ids of shape {shape}: generate one prompt per call while it records"
            )
        q = ids.shape[1]
        positions = kwargs.get("position_ids")
        if positions is None:  # transformers' loops pass them; else the cache, already extended by this pass
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            start = cache.get_seq_length() - q if cache is not None else 0
            positions = torch.arange(start, start + q)[None]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            block = mask[0, 0, :, -q:]
            ancestors = block == 0 if block.is_floating_point() else block.bool()
        else:
            ancestors = torch.ones(q, q, dtype=torch.bool).tril()
        logits = output.logits[0]  # [L, V]: the last L entries (logits_to_keep)
        choices = [-1] * (q - logits.shape[0]) + logits.argmax(dim=-1).tolist()
        self.passes.append(_Pass(ids[0].tolist(), positions[0].tolist(), ancestors.cpu(), choices))

    def mismatches(self, prompt_length: int, sequence: torch.Tensor) -> list[str]:
        """Each token of `sequence` [n] past the prompt that is not the argmax of the recorded pass that verified
        it, or that no pass verified. An entry of a pass is on the sequence when the pass's context (every
        position before its first entry) was fed the sequence's tokens by entries of earlier passes that were on
        it, and the entry and its ancestors in the pass are the sequence's tokens at their positions; such an
        entry verifies the token after it."""
        seq = sequence.tolist()
        problems, verified, fed, prefix = [], set(), set(), 0  # prefix: positions 0.. fed on the sequence
        for number, p in enumerate(self.passes):
            if min(p.positions) > prefix:  # its context holds a token the sequence does not
                continue
            matches = [pos < len(seq) and tok == seq[pos] for tok, pos in zip(p.tokens, p.positions)]
            for i, (pos, choice) in enumerate(zip(p.positions, p.choices)):
                if not all(matches[j] for j in p.ancestors[i].nonzero().flatten().tolist()):
                    continue
                fed.add(pos)
                target = pos + 1
                if target < prompt_length or target >= len(seq) or choice < 0:
                    continue
                verified.add(target)
                if choice != seq[target]:
                    problems.append(
                        f"token {target - prompt_length} ({seq[target]}) is not the verifier's argmax ({choice}) "
                        f"in pass {number}"
                    )
            while prefix in fed:
                prefix += 1
        problems += [
            f"token {t - prompt_length} ({seq[t]}) was verified by no pass"
            for t in range(prompt_length, len(seq))
            if t not in verified
        ]
        return problems


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


@dataclass
class _Measured:
    """One timed run of a method over every prompt."""

    outputs: list[torch.Tensor]
    seconds: float
    stats: GenerationStats | None = None  # for our drafts
    draft_seconds: float = 0.0  # time inside the draft's propose() (transformers-integrated rows)

    def add(self, other: _Measured) -> None:
        """Append a run over further prompts."""
        self.outputs += other.outputs
        self.seconds += other.seconds
        self.draft_seconds += other.draft_seconds
        if other.stats is not None:
            self.stats = (GenerationStats() if self.stats is None else self.stats) + other.stats  # a new object


@dataclass
class _Method:
    name: str
    k: int | None
    measure: Callable[[list[torch.Tensor], bool], _Measured]  # measure(prompts, warmup)
    batched: bool = False


def run_bench(
    verifier: Any,
    prompts: list[torch.Tensor],
    drafts: dict[str, Any],
    k_values: list[int | str],
    max_new_tokens: int = 128,
    assistant_lm: Any = None,
    prompt_lookup: bool = True,
    warmup: bool = True,
    trees: list[str] | None = None,
    batch_size: int = 1,
    repeats: int = 1,
    verification_cost: dict[int, float] | None = None,
    progress: bool = True,
    peers: Callable[[list[torch.Tensor], float], list[BenchResult]] | None = None,
) -> list[BenchResult]:
    """Benchmark every method on `prompts` (list of [1, n] id tensors). `drafts` maps a name to a bound draft.
    `k_values`: draft lengths, and "auto[:max]" for a row per draft with `num_assistant_tokens="auto"` (a draft
    that can also stop on its own acceptance head, DSpark's confidence head, gets a row per other signal,
    "(k auto, confidence stop)").
    `trees`: tree specs (see `TreeSpec.parse`, and "auto[:max]") to also run every draft with in the package's
    own loop.
    `batch_size` > 1: also the verifier alone and every draft (with each tree, or a chain of the middle k)
    on left-padded batches of that many prompts; their speedup is throughput over the verifier alone at
    batch 1, and "identical" compares every row with the verifier alone run on that prompt by itself.
    The methods take turns prompt by prompt (batch by batch), so that a slow spell of a shared machine
    falls on all of them alike. `repeats` > 1: every method is run over all prompts that many times and
    each row reports its median run. `verification_cost` (from `verification_costs`, widths k + 1) adds the
    width-charged ideal speedup. `progress`: a bar on a terminal, a line every 30 s otherwise. `peers`: another
    engine's rows, from the verifier alone's outputs and seconds (`engines.vllm_bench.vllm_peer_rows`), appended.
    In half precision a row whose output differs on some prompts runs those prompts again (batch 1 rows)
    under `VerifierPasses` (see `BenchResult.verified_in_pass`)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    methods = [_Method("verifier alone", None, lambda chunk, warm: _Measured(*_run(verifier, chunk, max_new_tokens)))]

    def transformers_method(name: str, k: int, **kwargs: Any) -> _Method:
        def measure(chunk: list[torch.Tensor], warm: bool) -> _Measured:
            lm = kwargs.get("assistant_model")
            if lm is not None:  # a small LM's draft length lives in its generation config
                lm.generation_config.num_assistant_tokens = k
                lm.generation_config.num_assistant_tokens_schedule = "constant"
            if warm:
                _run(verifier, chunk[:1], 8, **kwargs)
            return _Measured(*_run(verifier, chunk, max_new_tokens, **kwargs))

        return _Method(name, k, measure)

    def draft_method(name: str, draft: Any, k: int | str, signal: str | None = None) -> _Method:
        def measure(chunk: list[torch.Tensor], warm: bool) -> _Measured:
            default, draft.acceptance_signal = draft.acceptance_signal, signal or draft.acceptance_signal
            try:
                if warm:
                    _run(verifier, chunk[:1], 8, assistant_model=draft, num_assistant_tokens=k)
                run = _Measured([], 0.0)
                with _DraftTimer(draft) as timer:
                    for prompt in chunk:  # one call per prompt: the stats are per generate() call
                        out, seconds = _run(
                            verifier, [prompt], max_new_tokens, assistant_model=draft, num_assistant_tokens=k
                        )
                        run.add(_Measured(out, seconds, draft.generation_stats))
            finally:
                draft.acceptance_signal = default
            run.draft_seconds = timer.seconds
            return run

        return _Method(name, k if isinstance(k, int) else None, measure)

    for k in k_values:
        if isinstance(k, str):  # "auto[:max]": our drafts only, the length chosen round by round
            methods += [draft_method(f"{name} (k {k})", draft, k) for name, draft in drafts.items()]
            # a draft that can also stop on its own acceptance head (DSpark's confidence): a row per other signal
            methods += [
                draft_method(f"{name} (k {k}, {signal} stop)", draft, k, signal=signal)
                for name, draft in drafts.items()
                for signal in getattr(draft, "acceptance_signals", ())
                if signal != draft.acceptance_signal
            ]
            continue
        if assistant_lm is not None:
            methods.append(transformers_method("transformers assisted (small LM)", k, assistant_model=assistant_lm))
        if prompt_lookup:
            methods.append(transformers_method("prompt lookup", k, prompt_lookup_num_tokens=k))
        methods += [draft_method(name, draft, k) for name, draft in drafts.items()]
    for tree in trees or []:
        for name, draft in drafts.items():
            if not _can_draft(draft, tree):
                print(f"note: {name} drafts a chain in one pass and defines no trees; skipping tree {tree}")
                continue
            methods.append(
                _Method(f"{name} (tree {tree})", _tree_depth(tree), partial(_tree_run, verifier, draft, tree, max_new_tokens))
            )  # fmt: skip
    if batch_size > 1:
        fixed = [k for k in k_values if isinstance(k, int)] or [5]
        batch_trees = trees or [f"chain:{fixed[len(fixed) // 2]}"]
        runs: list[tuple[str, Any, str | None]] = [(f"verifier alone (batch {batch_size})", None, None)]
        runs += [
            (f"{name} (batch {batch_size}, tree {t})", d, t)
            for t in batch_trees
            for name, d in drafts.items()
            if _can_draft(d, t)
        ]
        for label, draft, batch_tree in runs:
            measure = partial(_batched_run, verifier, draft, batch_size, batch_tree, max_new_tokens)
            depth = None if batch_tree is None else _tree_depth(batch_tree)
            methods.append(_Method(label, depth, measure, batched=True))

    if warmup:  # first calls pay for allocations and lazy initialisation
        _run(verifier, prompts[:1], 8)
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    measured: list[list[_Measured]] = [[] for _ in methods]
    bar = Progress(repeats * len(chunks) * len(methods), "bench", unit="run", enabled=progress)
    for repeat in range(repeats):
        this_repeat = [_Measured([], 0.0) for _ in methods]
        for c, chunk in enumerate(chunks):
            for method, run in zip(methods, this_repeat):
                run.add(method.measure(chunk, warmup and repeat == 0 and c == 0))
                bar.update(1, f"repeat {repeat + 1}/{repeats}, prompts {c * batch_size + len(chunk)}/{len(prompts)}")
        for runs_of_method, run in zip(measured, this_repeat):
            runs_of_method.append(run)
    bar.close()
    reference = measured[0][0].outputs
    base_s = _median_run(measured[0]).seconds
    tokens = sum(o.shape[1] - p.shape[1] for o, p in zip(reference, prompts))
    forward_s = base_s / tokens  # one verifier forward pass per token when decoding alone

    dtype = str(verifier.dtype).removeprefix("torch.")
    results = []
    for method, runs_of_method in zip(methods, measured):
        run = _median_run(runs_of_method)
        n = sum(o.shape[1] - p.shape[1] for o, p in zip(run.outputs, prompts))
        differing = [
            i for i, ref in enumerate(reference) if any(not torch.equal(r.outputs[i], ref) for r in runs_of_method)
        ]
        result = BenchResult(
            method.name, method.k, None, n, run.seconds, n / run.seconds, base_s / run.seconds, not differing,
            dtype=dtype, prompts=len(prompts), prompts_differing=len(differing),
        )  # fmt: skip
        if differing and result.half_precision and not method.batched:
            problems = _verify_in_pass(verifier, method, [prompts[i] for i in differing])
            result.verified_in_pass = not problems
            if problems:
                result.extra["not_verified"] = problems[:5]
        if method is methods[0]:  # the verifier alone: one token per forward pass
            result.tau = 1.0
        if run.stats is not None:
            result.tau = run.stats.tau
            result.extra["acceptance_rate"] = run.stats.acceptance_rate
            if run.stats.draft_rounds:
                result.drafted_per_round = run.stats.drafted_tokens / run.stats.draft_rounds
        if run.draft_seconds and run.stats is not None and result.drafted_per_round:
            k_d = result.drafted_per_round
            result.cost_ratio = (run.draft_seconds / max(run.stats.drafted_tokens, 1)) / forward_s
            result.ideal_speedup = run.stats.tau / (1 + k_d * result.cost_ratio)
            if verification_cost:
                width = interpolate(verification_cost, k_d + 1)
                result.ideal_speedup_width_charged = run.stats.tau / (width + k_d * result.cost_ratio)
            result.extra["draft_seconds"] = run.draft_seconds
        if repeats > 1:
            result.extra["seconds_of_each_run"] = [r.seconds for r in runs_of_method]
        results.append(result)
    if peers is not None:
        results += peers(reference, base_s)
    return results


def _verify_in_pass(verifier: Any, method: _Method, prompts: list[torch.Tensor]) -> list[str]:
    """`method` run again on `prompts`, one at a time, under `VerifierPasses`: its tokens that were not the
    verifier's argmax in the pass that verified them."""
    problems = []
    for prompt in prompts:
        with VerifierPasses(verifier) as passes:
            output = method.measure([prompt], False).outputs[0]
        problems += passes.mismatches(prompt.shape[1], output[0])
    return problems


def _median_run(runs: list[_Measured]) -> _Measured:
    return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def _can_draft(draft: Any, tree: str) -> bool:
    """False for a tree (not a chain or "auto") given to a draft that drafts chains only (`drafts_trees` False:
    P-EAGLE, DFlash)."""
    from .generation.policy import auto_depth
    from .generation.tree import TreeSpec

    if getattr(draft, "drafts_trees", True) or auto_depth(tree) is not None:
        return True
    return TreeSpec.parse(tree).kind == "chain"


def _tree_depth(tree: str) -> int | None:
    from .generation.policy import auto_depth
    from .generation.tree import TreeSpec

    return None if auto_depth(tree) is not None else TreeSpec.parse(tree).depth


def _batched_run(
    verifier: Any,
    draft: Any,
    batch_size: int,
    tree: str | None,
    max_new_tokens: int,
    prompts: list[torch.Tensor],
    warmup: bool,
) -> _Measured:
    """Left-padded batches of `batch_size` prompts through the verifier alone (draft None) or the package's
    loop; outputs are each row as prompt + its new tokens up to its eos (padding removed)."""
    from .generation.loop import generate
    from .generation.settings import eos_token_ids

    pad = verifier.generation_config.pad_token_id
    pad = 0 if pad is None else int(pad)
    eos_ids = eos_token_ids(verifier.generation_config)
    run = _Measured([], 0.0)
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
        seconds = time.perf_counter() - t0
        rows = []
        for row, prompt in enumerate(group):
            new = out[row, width:].cpu().tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
            rows.append(torch.cat([prompt, torch.tensor([new[:end]], dtype=prompt.dtype)], dim=1))
        run.add(_Measured(rows, seconds, None if draft is None else draft.generation_stats))
    return run


def _tree_run(
    verifier: Any, draft: Any, tree: str, max_new_tokens: int, prompts: list[torch.Tensor], warmup: bool
) -> _Measured:
    """`speculators_hf.generate` with `tree`, one prompt at a time."""
    from .generation.loop import generate

    if warmup:
        generate(verifier, draft, prompts[0].to(verifier.device), tree=tree, max_new_tokens=8, do_sample=False)
    run = _Measured([], 0.0)
    for prompt in prompts:
        _sync(verifier.device)
        start = time.perf_counter()
        out: Any = generate(
            verifier, draft, prompt.to(verifier.device), tree=tree, max_new_tokens=max_new_tokens, do_sample=False
        )
        _sync(verifier.device)
        run.add(_Measured([out.cpu()], time.perf_counter() - start, draft.generation_stats))
    return run


def load_pair(
    verifier_dir: str | Path,
    draft_dir: str | Path,
    prompts_file: str | Path,
    num_prompts: int,
    cpu_kernels: str = "auto",
) -> tuple[Any, Any, list[torch.Tensor]]:
    """For benchmark scripts: the verifier (float32) from its folder, the draft bound to it, the linears packed as
    `cpu_kernels` says (`cpu_kernels.use_cpu_kernels`), and the first `num_prompts` prompts of a JSON list (token
    ids as they are; text through the verifier's tokenizer and chat template, `prompts.prompt_tensors`)."""
    from transformers import AutoModelForCausalLM

    from .cpu_kernels import use_cpu_kernels
    from .loading import load_draft, load_tokenizer
    from .prompts import prompt_tensors

    verifier = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32).eval()
    texts = json.loads(Path(prompts_file).read_text())[:num_prompts]
    tokenizer = load_tokenizer(verifier_dir) if any(isinstance(t, str) for t in texts) else None
    draft = load_draft(draft_dir).bind_verifier(verifier, tokenizer=tokenizer)
    use_cpu_kernels(cpu_kernels, verifier, draft)
    return verifier, draft, prompt_tensors(texts, tokenizer)


def cpu_model() -> str:
    """The CPU's model name as `lscpu` prints it (from /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """What the figures were measured on: the GPU, or the CPU model, its cores and torch's threads."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    import os

    return (
        f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, transformers {_transformers_version()}"
    )


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _number(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def identity(result: BenchResult) -> str:
    """The "identical" column: "yes", "NO" (the guarantee is broken), or in half precision, where the verifier's
    multi-token passes decide (as in every speculative decoder), how many prompts differ and whether each of
    their tokens was re-checked to be the verifier's argmax in the pass that verified it."""
    if result.exact:
        return "yes"
    if result.failed:
        return "NO"
    checked = "each token the verifier's argmax in its pass" if result.verified_in_pass else "batch rows not re-checked"
    return (
        f"differs at {result.prompts_differing} of {result.prompts} prompts ({result.dtype}: expected at near-ties; "
        f"{checked})"
    )


def markdown_table(results: list[BenchResult]) -> str:
    """One row per method and k: the table `speculators-hf bench` prints and BENCHMARKS.md quotes."""
    head = (
        "| method | k | drafted/round | tau | tokens/s | speedup | identical | cost ratio c | ideal speedup "
        "| ideal, width charged | measured/ideal |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        ratio = r.measured_over_ideal
        rows.append(
            f"| {r.method} | {r.k or ''} | {_number(r.drafted_per_round, '.2f')} | {_number(r.tau, '.2f')} | "
            f"{r.tokens_per_s:.1f} | {r.speedup:.2f}x | {identity(r)} | {_number(r.cost_ratio, '.3f')} | "
            f"{_number(r.ideal_speedup, '.2f')}{'x' if r.ideal_speedup else ''} | "
            f"{_number(r.ideal_speedup_width_charged, '.2f')}{'x' if r.ideal_speedup_width_charged else ''} | "
            f"{'' if ratio is None else f'{ratio:.0%}'} |"
        )
    return head + "\n".join(rows) + "\n"


def verification_table(costs: dict[int, float]) -> str:
    """Markdown table of `verification_costs`."""
    head = "| tokens verified in one pass | cost (passes over one token) |\n|---|---|\n"
    return head + "\n".join(f"| {n} | {cost:.2f} |" for n, cost in sorted(costs.items())) + "\n"


def _strict(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (strict JSON has neither)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_report(results: list[BenchResult], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """results.json (strict JSON), results.md and speedup.png (if matplotlib is installed) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _strict({"meta": meta, "results": [asdict(r) for r in results]})
    (out / "results.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    table = markdown_table(results)
    if meta.get("verification_cost"):
        table += "\nVerifier pass cost by width (`verification_costs`):\n\n" + verification_table(
            meta["verification_cost"]
        )
    (out / "results.md").write_text(f"Machine: {meta.get('machine')}\n\nCommand: `{meta.get('command')}`\n\n{table}")
    plot_results(results, meta, out / "speedup.png")
    return out


def _base_name(method: str) -> str:
    """The batch-1 row of a batched method: "eagle3 (batch 4, tree chain:5)" -> "eagle3 (tree chain:5)",
    "verifier alone (batch 4)" -> "verifier alone"."""
    return re.sub(r"batch \d+, ", "", re.sub(r" \(batch \d+\)", "", method))


def plot_results(results: list[BenchResult], meta: dict[str, Any], path: Path) -> Path | None:
    """One question per panel: which method is fastest (speedup at its best k, batch 1), how acceptance grows
    with k (tau by k, drafts in transformers' loop), and what batching adds (tokens/s at batch 1 and in
    batches). Legends sit outside the data; the machine is in the title. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    single = [r for r in results if "batch" not in r.method]
    batched = [r for r in results if "batch" in r.method]
    best: dict[str, BenchResult] = {}
    for r in single:
        if r.method not in best or r.speedup > best[r.method].speedup:
            best[r.method] = r
    panels = 3 if batched else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 5.2))
    ax = axes[0]
    order = sorted(best.values(), key=lambda r: r.speedup)
    colors = ["tab:red" if r.failed else "tab:green" for r in order]
    ax.barh([r.method for r in order], [r.speedup for r in order], color=colors)
    for i, r in enumerate(order):
        ax.text(r.speedup, i, f" {r.speedup:.2f}x" + (f" (k={r.k})" if r.k else ""), va="center", fontsize=7)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="speedup over the verifier alone (batch 1)", title="Speedup at each method's best k")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlim(0, max(r.speedup for r in order) * 1.3)
    ax = axes[1]
    for method in dict.fromkeys(r.method for r in single if r.k and r.tau is not None and "tree" not in r.method):
        rows = sorted((r for r in single if r.method == method), key=lambda r: r.k or 0)
        if len(rows) > 1:
            ax.plot([r.k for r in rows], [r.tau for r in rows], marker="o", label=method)
    ax.set(xlabel="draft length k", ylabel="tau (tokens per verifier pass)", title="Acceptance length by k")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if batched:
        ax = axes[2]
        size = batched[0].method.split("batch ")[1].split(")")[0].split(",")[0]
        pairs = []
        for r in batched:
            alone = next((s for s in single if s.method == _base_name(r.method)), None)
            pairs.append((_base_name(r.method), alone.tokens_per_s if alone else 0.0, r.tokens_per_s))
        ys = range(len(pairs))
        ax.barh([y + 0.2 for y in ys], [p[1] for p in pairs], height=0.4, label="batch 1")
        ax.barh([y - 0.2 for y in ys], [p[2] for p in pairs], height=0.4, label=f"batch {size}")
        ax.set_yticks(list(ys), [p[0] for p in pairs], fontsize=7)
        ax.set(xlabel="tokens per second", title=f"Throughput: batch 1 and batch {size} (own loop)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{meta.get('machine', '')} | {meta.get('command', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
