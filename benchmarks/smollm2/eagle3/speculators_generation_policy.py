# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.policy. Do not edit.
"""Adaptive drafting ("auto"): how much to draft each round, from what drafting and verifying cost on this
device and how well the draft is doing in this generation.

A round that drafts n tokens costs n draft steps plus one verifier pass over n + 1 tokens, and emits the
accepted tokens plus one of the verifier's own. Drafting one more token adds the draft step c and the
verification slope s_d (the verifier's pass is one token wider; taken at that width, as a pass's cost is
flat, then steeper), and adds to the expected emitted tokens the chance that every token up to the new one is
accepted: the draft's probability of the whole chain so far, times k_d, the rows accepting at that depth d per probability the draft gave it (`DraftingCosts.calibration`,
learned per depth: a draft grows overconfident with depth, e.g. past the steps it was trained to unroll). With
the rounds emitting R tokens per second, the extra token raises the rate exactly when

    k_d * p(chain) > R * (c + s_d)

(a round's fixed costs, the rest of the verifier's pass and the loop's own work, are in R but do not grow
with the draft). So the chain is drafted up to a maximum depth and stopped at the first depth d where the
draft's probability of it falls below R * (c + s_d) / k_d: EAGLE-2's observation that the draft's confidence
predicts acceptance, turned into a stopping rule with the machine's costs in it. The rule reads only the
draft's probabilities, the costs and the acceptance counts of past rounds: which tokens are emitted, and
their distribution when sampling, stay exactly the verifier's.

The costs: the verifier's pass over each width is measured once per (verifier, device, dtype, batch size)
and kept on disk (`drafting_costs`, `calibration_dir`), so that a new process reuses it; c, R and k are
learned from the rounds as generation goes and kept for the next generation of the process. Since they
follow measured timings, which chains are drafted varies from run to run, and so do sampled outputs for
one seed (their distribution stays the verifier's). `SPECULATORS_HF_AUTO_FROZEN=1` freezes the policy:
the threshold then comes from the saved pass costs alone (c and R at the values a fresh policy starts
from, k = 1) and nothing is learned, so one seed gives one output. Where a wide verifier pass costs about
what a narrow one does (a GPU), the own loop verifies an EAGLE-2 dynamic tree as wide as stays nearly free
instead of a chain (transformers' assisted loop takes chains only).

Which length a generation asks for, from transformers' settings for an assistant model and the draft's
config, is `draft_length`'s business; `drafting_for` turns it (or the own loop's `tree`) into a policy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import numbers
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .speculators_generation_settings import ASSISTANT_SETTINGS, GenerationSettingError
from .speculators_generation_tree import DraftTree, TreeSpec

# Widths at which the verifier's pass is timed; between them the cost is interpolated linearly.
CALIBRATION_WIDTHS = (1, 2, 3, 4, 6, 8, 11, 16, 24, 32, 48, 64)
# A verifier pass this much dearer than a one-token pass still counts as "nearly free" (wide trees).
FREE_WIDTH_COST = 1.25
# Where the calibration is kept (default: $HF_HOME/speculators_hf/calibration), and the switch of frozen "auto".
CALIBRATION_DIR_ENV = "SPECULATORS_HF_CALIBRATION_DIR"
FROZEN_ENV = "SPECULATORS_HF_AUTO_FROZEN"
CALIBRATION_FORMAT = 1
MAX_CALIBRATION_BYTES = 64 * 1024  # a calibration file is ~1 KB: anything larger is not ours
MAX_PASS_SECONDS = 3600.0  # a saved pass time beyond this is not a measurement


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def interpolate(costs: dict[int, float], width: float) -> float:
    """The verifier's cost of a pass over `width` tokens (possibly fractional: the mean width of a run's
    rounds), linear between the measured widths, constant beyond them."""
    points = sorted((int(n), float(c)) for n, c in costs.items())
    if width <= points[0][0]:
        return points[0][1]
    for (n0, c0), (n1, c1) in itertools.pairwise(points):
        if width <= n1:
            return c0 + (c1 - c0) * (width - n0) / (n1 - n0)
    return points[-1][1]


@torch.inference_mode()
def verification_seconds(
    verifier: Any, widths: Any, context: int = 128, samples: int = 30, batch_size: int = 1
) -> dict[int, float]:
    """The median seconds of a verifier pass over n new tokens after `context` cached ones, for each n in
    `widths` (and 1), as the package's loop runs it: explicit positions, a 4D mask, a `MaskedCache`."""
    from .speculators_generation_kvcache import MaskedCache, cache_kwargs, causal_block

    vocab = verifier.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    cache = MaskedCache(batch_size, verifier.device)
    ids = torch.randint(vocab, (batch_size, context), generator=generator).to(verifier.device)
    valid = torch.ones_like(ids, dtype=torch.bool)

    def forward(block: torch.Tensor, start: int) -> None:
        width = block.shape[1]
        verifier(
            input_ids=block,
            position_ids=torch.arange(start, start + width, device=block.device)[None].expand(batch_size, width),
            attention_mask=cache.mask(causal_block(torch.ones_like(block, dtype=torch.bool)), verifier.dtype),
            **cache_kwargs(cache.cache),
            use_cache=True,
        )

    forward(ids, 0)
    cache.commit(valid)
    seconds = {}
    for n in sorted({1, *widths}):
        block = torch.randint(vocab, (batch_size, n), generator=generator).to(verifier.device)
        times = []
        for i in range(samples + 3):  # 3 warm-up passes
            sync(verifier.device)
            start = time.perf_counter()
            forward(block, context)
            sync(verifier.device)
            cache.truncate()
            if i >= 3:
                times.append(time.perf_counter() - start)
        seconds[n] = statistics.median(times)
    return seconds


def verification_costs(verifier: Any, widths: list[int], context: int = 128, samples: int = 30) -> dict[int, float]:
    """What verifying n tokens at once costs, in passes over one token (`verification_seconds` divided by
    the one-token pass). This is what decides between chains and trees on a machine: a tree pays when its
    extra tau outweighs the extra cost of its width."""
    seconds = verification_seconds(verifier, widths, context, samples)
    return {n: t / seconds[1] for n, t in seconds.items()}


@dataclass(frozen=True)
class Round:
    """What one round did, for the policy to learn from once it is over."""

    started: float  # time.perf_counter() when the draft began
    steps: int  # draft forward steps after the root (a chain's tokens less one)
    draft_seconds: float  # their time
    emitted: float  # tokens emitted: the accepted draft tokens plus the verifier's own (per row, on average)
    # chains stopped on confidence, per depth d = 1, 2, ...: the draft's probability of the chain up to d (row mean),
    # and the share of rows that accepted d tokens or more; None: no confidence (a tree, a fixed chain)
    expected: list[float] | None = None
    accepted: list[float] | None = None

    @classmethod
    def of(cls, tree: DraftTree, started: float, draft_seconds: float, emitted: float | torch.Tensor) -> Round:
        """`emitted`: the tokens each row emitted this round ([B]), or their mean."""
        per_row = torch.as_tensor(emitted, dtype=torch.float32).reshape(-1).cpu()
        expected = accepted = None
        if tree.confidence is not None:
            expected = tree.confidence.float().mean(0).tolist()
            depths = torch.arange(1, len(expected) + 1, dtype=torch.float32)
            accepted = ((per_row[:, None] - 1) >= depths).float().mean(0).tolist()
        return cls(started, tree.max_depth - 1, draft_seconds, per_row.mean().item(), expected, accepted)


@dataclass
class DraftingCosts:
    """What rounds cost and bring for one draft with one verifier on one device, in seconds: `verify` maps
    a width to the seconds of a verifier pass over that many tokens (measured once, shared by the drafts of
    that verifier). Learned as generation goes, and kept for the next generation: `draft_step` (seconds
    per draft step) and the running means of tokens emitted per round, of a round's wall time, and, per depth of
    the chain, of the rows' acceptance and the draft's probability of the chain there (how well calibrated the
    draft's probabilities are at that depth: drafts grow overconfident with depth)."""

    verify: dict[int, float]
    draft_step: float | None = None
    emitted: float | None = None
    round_seconds: float | None = None
    accepted: list[float] = field(default_factory=list)  # per depth (index 0: depth 1)
    expected: list[float] = field(default_factory=list)
    smoothing: float = 0.05  # weight of the newest round in the running means

    def verify_seconds(self, width: float) -> float:
        return interpolate(self.verify, width)

    def slope(self, max_depth: int, width: int | None = None) -> float:
        """Extra seconds of the verifier's pass per token: the least-squares slope over the measured widths
        up to max_depth + 1 (robust to one noisy width); with `width`, over the measured widths within
        max(2, width // 2) of it (a pass's cost is flat, then steeper: the slope where the chain is)."""
        points = [(n, t) for n, t in self.verify.items() if n <= max_depth + 1] or list(self.verify.items())
        if width is not None:
            near = [(n, t) for n, t in points if abs(n - width) <= max(2, width // 2)]
            points = near if len(near) >= 3 else points
        mean_n = sum(n for n, _ in points) / len(points)
        mean_t = sum(t for _, t in points) / len(points)
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        return max(sum((n - mean_n) * (t - mean_t) for n, t in points) / spread, 0.0) if spread else 0.0

    def free_width(self) -> int:
        """The widest measured pass costing at most `FREE_WIDTH_COST` one-token passes."""
        base = self.verify_seconds(1)
        return max(n for n, t in self.verify.items() if t <= FREE_WIDTH_COST * base or n == 1)

    @property
    def rate(self) -> float:
        """Tokens per second the rounds are emitting (before any round: decoding alone, one per pass)."""
        if self.emitted is None or self.round_seconds is None:
            return 1.0 / self.verify_seconds(1)
        return self.emitted / self.round_seconds

    def calibration(self, depth: int | None = None) -> tuple[float, ...]:
        """Per depth 1, 2, ... (up to `depth`, else as far as observed): the share of rows accepting there per
        chain probability the draft gave it (1: calibrated, below 1: overconfident), kept within [0.25, 2];
        depths not observed yet take the deepest observed one's; () before any chain was observed."""
        ratios = [min(max(a / e, 0.25), 2.0) if e > 0 else 1.0 for a, e in zip(self.accepted, self.expected)]
        if ratios and depth is not None:
            ratios = (ratios + ratios[-1:] * depth)[:depth]
        return tuple(ratios)

    def observe(self, done: Round, seconds: float) -> None:
        """A round that took `seconds` in all."""

        def mean(old: float | None, new: float) -> float:
            return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

        if done.steps > 0:
            self.draft_step = mean(self.draft_step, done.draft_seconds / done.steps)
        self.emitted = mean(self.emitted, done.emitted)
        self.round_seconds = mean(self.round_seconds, seconds)
        if done.expected is not None and done.accepted is not None:
            for d, (accepted, expected) in enumerate(zip(done.accepted, done.expected)):
                if d < len(self.expected):
                    self.accepted[d] = mean(self.accepted[d], accepted)
                    self.expected[d] = mean(self.expected[d], expected)
                else:  # a depth reached for the first time
                    self.accepted.append(accepted)
                    self.expected.append(expected)


_VERIFY: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, int, str], dict[int, float]]] = weakref.WeakKeyDictionary()
_LEARNED: weakref.WeakKeyDictionary[Any, dict[tuple[int, str, str, int, str, tuple[str, str]], DraftingCosts]] = (
    weakref.WeakKeyDictionary()
)


def calibration_dir() -> Path:
    """Where calibrations are kept: `$SPECULATORS_HF_CALIBRATION_DIR`, else `$HF_HOME/speculators_hf/calibration`
    (HF_HOME defaulting to ~/.cache/huggingface, as in huggingface_hub)."""
    if os.environ.get(CALIBRATION_DIR_ENV):
        return Path(os.environ[CALIBRATION_DIR_ENV]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "speculators_hf" / "calibration"


def linear_kernels(model: Any) -> str:
    """Which kernels run `model`'s linears: "stock", or the linears whose forward an instance attribute replaces
    (`speculators_hf.cpu_kernels.prepack_linears`, or any other patch) by kind and count: their passes cost
    something else, so a calibration made before is not theirs."""
    replaced: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "forward" in vars(module):
            kind = type(vars(module)["forward"]).__qualname__
            replaced[kind] = replaced.get(kind, 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(replaced.items())) or "stock"


def calibration_key(verifier: Any, batch_size: int) -> dict[str, Any]:
    """What a calibration depends on: the verifier's shapes (its config), the device (and its model), the
    dtype, the batch size, the kernels of its linears, and the software and threads that run the passes."""
    device = verifier.device
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = (
            f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores {torch.get_num_threads()} threads"
        )
    config = verifier.config.to_json_string(use_diff=False)
    return {
        "verifier": str(getattr(verifier, "name_or_path", "") or ""),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "device": str(device),
        "hardware": hardware,
        "dtype": str(verifier.dtype),
        "batch_size": int(batch_size),
        "linear_kernels": linear_kernels(verifier),
        "torch": torch.__version__,
        "widths": list(CALIBRATION_WIDTHS),
    }


def calibration_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return calibration_dir() / f"{digest}.json"


def read_calibration(path: Path, key: dict[str, Any]) -> dict[int, float] | None:
    """The pass seconds by width saved at `path` for `key`; None when there is no file. A file that is not a
    calibration for exactly this key (damaged, edited, another format, out-of-range values) is reported with
    a warning and ignored: its values are never used."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        if path.stat().st_size > MAX_CALIBRATION_BYTES:
            raise ValueError(f"larger than {MAX_CALIBRATION_BYTES} bytes")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or data.get("key") != key:
            raise ValueError("not a calibration of this verifier, device, dtype and batch size")
        saved = data.get("seconds")
        widths = [str(n) for n in CALIBRATION_WIDTHS]
        if not isinstance(saved, dict) or set(saved) != set(widths):
            raise ValueError(f"'seconds' must map exactly the widths {', '.join(widths)} to seconds")
        seconds = {}
        for width, value in saved.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_PASS_SECONDS:
                raise ValueError(f"seconds[{width!r}]={value!r} is not a pass time in (0, {MAX_PASS_SECONDS:g}] s")
            seconds[int(width)] = float(value)
        return seconds
    except (OSError, ValueError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"ignoring the calibration file {path} ({err}); measuring again", stacklevel=3)
        return None


def write_calibration(path: Path, key: dict[str, Any], seconds: dict[int, float]) -> None:
    """Save a calibration atomically (a temporary file renamed over `path`); a failure only warns."""
    text = json.dumps(
        {"format": CALIBRATION_FORMAT, "key": key, "seconds": {str(n): seconds[n] for n in sorted(seconds)}}
    )
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False) as f:
            tmp = f.name
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not save the calibration to {path} ({err}); it will be measured again", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def verifier_calibration(verifier: Any, batch_size: int = 1) -> dict[int, float]:
    """The seconds of the verifier's pass at each of `CALIBRATION_WIDTHS`, on its device and dtype at
    `batch_size`: from this process's cache, else from the saved calibration (`calibration_dir`), else measured
    (13 passes at each of 12 widths: 1.6 s for the zoo's verifier on this project's CPU, a few seconds for a 7B
    model on a GPU) and saved."""
    cached = _VERIFY.setdefault(verifier, {})
    process_key = (str(verifier.device), str(verifier.dtype), batch_size, linear_kernels(verifier))
    if process_key not in cached:
        key = calibration_key(verifier, batch_size)
        path = calibration_path(key)
        seconds = read_calibration(path, key)
        if seconds is None:
            seconds = verification_seconds(verifier, CALIBRATION_WIDTHS, samples=10, batch_size=batch_size)
            write_calibration(path, key, seconds)
        cached[process_key] = seconds
    return cached[process_key]


def drafting_costs(verifier: Any, draft: Any, batch_size: int = 1, loop: str = "own") -> DraftingCosts:
    """The costs of `draft` with `verifier` on its device and dtype at `batch_size` in `loop` ("own" or
    "transformers": their rounds' overheads differ): the verifier's pass by width (`verifier_calibration`) and
    what the draft learned so far in this process (kept for the next generation)."""
    measured = verifier_calibration(verifier, batch_size)
    learned = _LEARNED.setdefault(draft, {})
    kernels = (linear_kernels(verifier), linear_kernels(draft))
    return learned.setdefault(
        (id(verifier), str(verifier.device), str(verifier.dtype), batch_size, loop, kernels), DraftingCosts(measured)
    )


def frozen() -> bool:
    """Whether `SPECULATORS_HF_AUTO_FROZEN` asks for frozen adaptive drafting ("1"/"true"/"yes"; "0"/"false"/"no"/unset:
    learning)."""
    value = os.environ.get(FROZEN_ENV, "").strip().lower()
    if value not in ("", "0", "false", "no", "1", "true", "yes"):
        raise ValueError(f"{FROZEN_ENV}={os.environ[FROZEN_ENV]!r}: use 1 (frozen: reproducible) or 0 (learning)")
    return value in ("1", "true", "yes")


AUTO = re.compile(r"auto(?::([0-9]+))?")


def auto_depth(value: Any, field: str = "draft length") -> int | None:
    """The maximum depth of an "auto" (0: the policy's default) or "auto:D" (D >= 1) setting, None when `value`
    is not one (a setting whose text before any ':' is not exactly "auto"). `field` names the setting in the
    error for a malformed one."""
    if not isinstance(value, str) or value.split(":")[0] != "auto":
        return None
    match = AUTO.fullmatch(value)
    if match is None or (match.group(1) is not None and int(match.group(1)) < 1):
        raise ValueError(
            f"{field}={value!r}: use 'auto' or 'auto:<maximum draft length>' with a maximum >= 1, e.g. 'auto:10'"
        )
    return int(match.group(1) or 0)


@dataclass
class AdaptiveDrafting:
    """One generation's policy: `spec()` before each round, `observe()` after it. `frozen`: learns nothing
    (`observe` does nothing), so its choices read only `costs` as given and the draft's probabilities."""

    costs: DraftingCosts
    max_depth: int = 10
    trees: bool = True  # may verify a dynamic tree where width is nearly free (the own loop)
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise ValueError(f"the maximum draft length must be >= 1, got {self.max_depth}")

    @property
    def timed(self) -> bool:
        """Whether the loop should time the draft for `observe`."""
        return not self.frozen

    def threshold(self, depth: int | None = None) -> float:
        """The calibrated probability of the chain (`DraftingCosts.calibration` times the draft's) below which one
        more draft token costs more than it brings; after `depth` tokens, with the verification slope at the pass
        width one more token makes (depth + 2), else over the whole pass."""
        costs = self.costs
        step = costs.draft_step if costs.draft_step is not None else 0.1 * costs.verify_seconds(1)
        slope = costs.slope(self.max_depth, None if depth is None else depth + 2)
        return min(costs.rate * (step + slope), 0.99)

    def chain(self, depth: int) -> TreeSpec:
        """A chain of at most `depth` tokens stopped where, at that depth, the calibrated probability falls below
        that depth's threshold (`threshold(d)`; expressed as one threshold and a scale per depth)."""
        base = self.threshold()
        calibration = self.costs.calibration(depth) or (1.0,) * depth
        scale = tuple(k * base / max(self.threshold(d), 1e-12) for d, k in enumerate(calibration, start=1))
        return TreeSpec.chain(depth, stop_below=base, stop_scale=scale)

    def spec(self, max_depth: int | None = None) -> TreeSpec:
        """The tree of the next round, at most `max_depth` deep (a draft's limit, or the room left)."""
        depth = min(self.max_depth, max_depth or self.max_depth)
        width = self.costs.free_width() - 1
        if self.trees and depth > 1 and width >= 4 * depth:  # wide passes nearly free: verify a tree
            top_k = min(8, width // depth)
            return TreeSpec.dynamic(depth, top_k=top_k, total_tokens=width)
        return self.chain(depth)

    def observe(self, done: Round, ended: float) -> None:
        """After round `done`, which ended (the next round's draft began) at `ended` (time.perf_counter())."""
        if not self.frozen:
            self.costs.observe(done, ended - done.started)


@dataclass
class FixedDrafting:
    """The same tree every round (the interface of `AdaptiveDrafting`, with nothing to learn)."""

    tree: TreeSpec
    timed = False  # whether the loop should time the draft for `observe`

    def spec(self, max_depth: int | None = None) -> TreeSpec:
        return self.tree.clamped(max_depth)

    def observe(self, done: Round, ended: float) -> None:
        pass


def adaptive_drafting(
    verifier: Any, draft: Any, max_depth: int = 0, batch_size: int = 1, trees: bool = True
) -> AdaptiveDrafting:
    """The policy for one generation with `draft` for `verifier`. `max_depth` 0: twice the draft's
    `speculative_tokens`, at least 8; always cut to what the draft can predict (`max_tree_depth`).
    `trees` False: chains only (transformers' assisted loop). Frozen (`frozen()`): fresh costs from the saved
    calibration, never updated, instead of what the draft learned."""
    depth = max_depth or max(2 * int(draft.config.speculative_tokens or 5), 8)
    limit = draft.max_tree_depth()
    depth = depth if limit is None else min(depth, limit)
    trees = trees and getattr(draft, "drafts_trees", True)  # P-EAGLE and DFlash draft chains only
    if frozen():
        return AdaptiveDrafting(DraftingCosts(verifier_calibration(verifier, batch_size)), depth, trees, frozen=True)
    costs = drafting_costs(verifier, draft, batch_size, loop="own" if trees else "transformers")
    return AdaptiveDrafting(costs, max_depth=depth, trees=trees)


# -- the draft length a call asks for -------------------------------------------------------------------------

# transformers' schedules for `num_assistant_tokens` (GenerationConfig), run by its assisted loop
SCHEDULES = ("constant", "heuristic", "heuristic_transient")
# the places of `draft_length` that belong to the call itself
CALL_PLACES = ("keyword argument", "generation_config")
LENGTH_HELP = "must be an integer >= 1, 'auto' or 'auto:<maximum draft length>' (e.g. 'auto:12')"
LOOKBEHIND_HELP = "must be an integer >= 0 (it has no effect: a draft uses its verifier's tokenizer)"


@dataclass(frozen=True)
class DraftLength:
    """The draft length one generation asks for (`draft_length`)."""

    tokens: int | str  # a chain length (where a heuristic schedule starts), or "auto" / "auto:<maximum>"
    schedule: str = "constant"  # num_assistant_tokens_schedule
    sources: dict[str, str] = field(default_factory=dict)  # where each setting that was set came from

    @property
    def max_depth(self) -> int | None:
        """The maximum depth of "auto[:D]" (0: the policy's default), None for a fixed length."""
        return auto_depth(self.tokens)

    def named(self, name: str) -> str:
        """`name=value (where it came from)`, for messages."""
        value = self.tokens if name == "num_assistant_tokens" else self.schedule
        return f"{name}={value!r} ({self.sources.get(name, 'default')})"

    @property
    def from_call(self) -> list[str]:
        """The length settings the call itself made (a keyword or its generation_config), as `named` gives them
        (a "constant" schedule changes nothing)."""
        made = [
            name
            for name in ("num_assistant_tokens", "num_assistant_tokens_schedule")
            if self.sources.get(name) in CALL_PLACES
        ]
        return [self.named(name) for name in made if name == "num_assistant_tokens" or self.schedule != "constant"]


def _is_int(value: Any, minimum: int) -> bool:
    """An integer (not a bool, a float or a numeric string) of at least `minimum`."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and int(value) >= minimum


def _length_problem(value: Any) -> str | None:
    if isinstance(value, str):
        try:
            return None if auto_depth(value) is not None else LENGTH_HELP
        except ValueError:
            return LENGTH_HELP
    return None if _is_int(value, 1) else LENGTH_HELP


def _confidence_problem(value: Any) -> str | None:
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0:
        return None  # 0: off, as in transformers
    return (
        "speculators_hf's drafts do not stop a chain on one token's probability; num_assistant_tokens='auto' stops "
        "it where the chain's probability no longer pays for another token (from measured costs), and in the own "
        "loop tree='chain:<k>:<p>' stops it below probability p. Set it to None or 0"
    )


def _lookbehind_problem(value: Any) -> str | None:
    return None if _is_int(value, 0) else LOOKBEHIND_HELP


def _schedule_problem(value: Any) -> str | None:
    return None if value in SCHEDULES else "must be one of " + ", ".join(repr(s) for s in SCHEDULES)


# each of transformers' settings for an assistant model (`settings.ASSISTANT_SETTINGS`) with its check: why its
# value is refused, or None
ASSISTANT_CHECKS = {
    "num_assistant_tokens": _length_problem,
    "num_assistant_tokens_schedule": _schedule_problem,
    "assistant_confidence_threshold": _confidence_problem,
    "assistant_lookbehind": _lookbehind_problem,
    "target_lookbehind": _lookbehind_problem,
}


def draft_length(
    draft: Any, verifier: Any, generation_config: Any = None, kwargs: dict[str, Any] | None = None
) -> DraftLength:
    """The draft length transformers' settings for an assistant model ask for, in a generate() call of `verifier`
    with `draft` (`generation_config` and `kwargs`: the call's). Each setting is taken from the first place that
    sets it (not None): a keyword argument, the call's `generation_config`, the verifier's `generation_config` (the
    order transformers gives any generation setting), the draft's `generation_config` (the only place transformers
    itself reads these: `AssistedCandidateGenerator` copies `assistant_model.generation_config`). A length set
    nowhere is "auto" with `draft.config.adaptive_drafting`, else `draft.config.speculative_tokens`.

    Raises `GenerationSettingError` naming each setting, its value and where it came from, when the value is
    invalid or asks for what a draft does not do: a confidence threshold, or a heuristic schedule of "auto"
    (both choose the length). `assistant_lookbehind` / `target_lookbehind` are checked and have no effect
    (transformers reads them for an assistant with another tokenizer only)."""
    places = [("keyword argument", kwargs or {}), ("generation_config", generation_config)]
    places += [
        ("verifier.generation_config", verifier.generation_config),
        ("draft.generation_config", draft.generation_config),
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems = []
    for name in ASSISTANT_SETTINGS:
        problem = ASSISTANT_CHECKS[name]
        for where, place in places:
            value = place.get(name) if isinstance(place, dict) else getattr(place, name, None)
            if value is not None:
                values[name], sources[name] = value, where
                reason = problem(value)
                if reason is not None:
                    problems.append(f"  {name}={value!r} ({where}): {reason}")
                break
    if problems:
        raise GenerationSettingError("cannot draft with these settings:\n" + "\n".join(problems))
    tokens = values.get("num_assistant_tokens")
    if tokens is None:  # the draft's default
        adaptive = draft.config.adaptive_drafting
        tokens = "auto" if adaptive else draft.config.speculative_tokens
        sources["num_assistant_tokens"] = f"draft.config.{'adaptive_drafting' if adaptive else 'speculative_tokens'}"
    schedule = values.get("num_assistant_tokens_schedule", "constant")
    length = DraftLength(tokens if isinstance(tokens, str) else int(tokens), schedule, sources)
    if length.schedule != "constant" and length.max_depth is not None:
        raise GenerationSettingError(
            f"{length.named('num_assistant_tokens_schedule')} adapts a fixed num_assistant_tokens, while "
            f"{length.named('num_assistant_tokens')} chooses each round's length itself: use one of them"
        )
    return length


def drafting_for(
    verifier: Any,
    draft: Any,
    tree: Any,
    batch_size: int = 1,
    generation_config: Any = None,
    kwargs: dict[str, Any] | None = None,
) -> FixedDrafting | AdaptiveDrafting:
    """What decides each round's draft in the own loop: the call's `tree` ("auto[:max_depth]": an
    `adaptive_drafting`, anything else a `FixedDrafting` of `TreeSpec.parse(tree)`), or where the call names no
    tree, the length `draft_length` reads from the call's settings (`generation_config`, `kwargs`): a chain of
    `num_assistant_tokens`, or "auto". transformers' heuristic schedules are refused: they belong to its
    assisted loop, and "auto" is this loop's way to adapt the length."""
    length = draft_length(draft, verifier, generation_config, kwargs)
    if tree is not None:
        if length.from_call:
            raise GenerationSettingError(
                f"tree={tree!r} and {', '.join(length.from_call)} both set the draft: pass one of them"
            )
        max_depth = auto_depth(tree, "tree")
        if max_depth is None:
            return FixedDrafting(TreeSpec.parse(tree, default_depth=int(draft.config.speculative_tokens or 5)))
    else:
        if length.schedule != "constant":
            raise GenerationSettingError(
                f"{length.named('num_assistant_tokens_schedule')}: transformers' assisted loop runs this schedule "
                "(verifier.generate(..., assistant_model=draft)); this loop adapts the length with tree='auto' or "
                "num_assistant_tokens='auto'. Set it to 'constant' or None here"
            )
        max_depth = length.max_depth
        if max_depth is None:
            return FixedDrafting(TreeSpec.chain(int(length.tokens)))
    return adaptive_drafting(verifier, draft, max_depth, batch_size)
