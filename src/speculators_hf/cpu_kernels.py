"""oneDNN prepacked linears for CPU generation: the kernel vLLM's CPU backend runs, for transformers models.

PyTorch's CPU `linear` hands the weight, as stored, to MKL's sgemm. For the few rows of a speculative round
(k + 1 tokens) that costs far more than one row: on this project's 2-core AMD EPYC (one thread,
benchmarks/results/cpu-kernels) the zoo verifier's 6144x384 lm_head took 233 us for 1 row and 867 us for 6,
SmolLM2's 49152x576 lm_head 9960 us and 19170 us. Reordered once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, called through `torch.ops.mkldnn._linear_pointwise`), the same
products took 174/303 us and 7912/6297 us (`python benchmarks/cpu_kernels.py` measures the machine it runs on).
What a round pays to verify k tokens at once (the "width cost") is mostly this, and it is why vLLM-CPU ran the
zoo's EAGLE-3 draft faster than transformers: vLLM prepacks its linears for oneDNN (`dispatch_cpu_unquantized_gemm`
in vllm/model_executor/layers/utils.py, 0.32: `create_onednn_mm(weight.t(), 32)`).

`prepack_linears(verifier, draft)` gives every float32 `nn.Linear` of the models on the CPU (of at least
`MIN_PACKED_ELEMENTS` weights) a packed copy of its weight and a forward that uses it; the parameters,
`state_dict()` and saving are untouched, so the packed copy costs the linears' memory once more (SmolLM2-135M:
525 MiB). It speeds up both loops (`verifier.generate(..., assistant_model=draft)` and `speculators_hf.generate`)
and the verifier alone. A linear falls back to `torch.nn.functional.linear` where the packed kernel does not
apply: autograd recording (training), another dtype or device; a weight changed since it was packed (in place, or
replaced: `load_state_dict`, `weight.data = ...`) is packed again on the next call. `restore()` (or leaving the
`with` block) puts the stock forwards back.

Exactness: the packed kernel sums in another order than MKL's, so its logits differ from the stock ones in the
last bits (about 1e-6 relative), as a k-token pass already differs from k one-token passes. Greedy output is
identical wherever the verifier's top two logits are not tied to that precision; `benchmarks/half_precision.py
--cpu-kernels onednn` measures it (float32: identical on every prompt measured, see BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# the number of rows oneDNN's blocked layout is tuned for: a round verifies k + 1 = 4..8 tokens; a hint of 8 kept
# products of 1 and 64 rows about as fast as the best hint for each, where a hint of 1 made 6 rows several times
# slower (checked once on the zoo's lm_head shape)
ROWS_HINT = 8
# smaller weights stay on torch's kernel: oneDNN's call costs about 20 us more, which a small product does not win
# back (`benchmarks/cpu_kernels.py`, AMD EPYC, one thread: a 128x384 k_proj took 17 us for 6 rows with torch,
# 29 packed; a 1024x384 up_proj 113 and 75; vLLM's CPU backend also keeps small weights off oneDNN)
MIN_PACKED_ELEMENTS = 200_000


class CpuKernelError(RuntimeError):
    """The oneDNN linear is unavailable or disagrees with torch's on this machine."""


def onednn_linear_available() -> bool:
    """Whether this torch build has the oneDNN (mkldnn) linear `prepack_linears` needs."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's blocked layout for products of about `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


class _PackedForward:
    """The forward of one packed `nn.Linear` (held by the module as `forward`, so it is not a submodule)."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.stock = module.forward
        self.pack()

    def pack(self) -> None:
        self.packed = _reorder(self.module.weight.detach(), ROWS_HINT)
        self.version = self._version()

    def _version(self) -> tuple[int, int]:
        """Changes when the weight does: an in-place edit moves its version counter, a new tensor its address."""
        weight = self.module.weight
        return weight._version, weight.data_ptr()

    def usable(self, x: torch.Tensor) -> bool:
        weight = self.module.weight
        if x.dtype != torch.float32 or weight.dtype != torch.float32:
            return False
        if x.device.type != "cpu" or weight.device.type != "cpu":
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(x):
            return self.stock(x)
        if self._version() != self.version:
            self.pack()
        bias = self.module.bias
        return torch.ops.mkldnn._linear_pointwise(
            x, self.packed, None if bias is None else bias.detach(), "none", [], ""
        )


class PackedLinears:
    """The linears `prepack_linears` packed: `restore()` gives them their stock forward back; a context manager."""

    def __init__(self, forwards: list[_PackedForward]):
        self._forwards = forwards

    @property
    def count(self) -> int:
        return len(self._forwards)

    @property
    def packed_bytes(self) -> int:
        """The memory the packed copies take."""
        return sum(f.module.weight.numel() * f.module.weight.element_size() for f in self._forwards)

    def restore(self) -> None:
        for f in self._forwards:
            if f.module.__dict__.get("forward") is f:
                del f.module.forward
        self._forwards = []

    def __enter__(self) -> PackedLinears:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"PackedLinears({self.count} linears, {self.packed_bytes / 2**20:.1f} MiB packed)"


def _check(forward: _PackedForward) -> None:
    """One product through the packed kernel against torch's: a torch build whose private op changed fails
    here, before any token is generated with it."""
    weight = forward.module.weight.detach()
    x = torch.linspace(-1, 1, 3 * weight.shape[1], dtype=weight.dtype).reshape(3, -1)
    with torch.no_grad():
        got, want = forward(x), forward.stock(x)
    scale = want.abs().max().item() or 1.0
    if got.shape != want.shape or (got - want).abs().max().item() > 1e-4 * scale:
        raise CpuKernelError(
            f"oneDNN's packed linear disagrees with torch's on this machine (torch {torch.__version__}); "
            "run without prepack_linears (--cpu-kernels torch)"
        )


def prepack_linears(*models: nn.Module, min_elements: int = MIN_PACKED_ELEMENTS) -> PackedLinears:
    """Pack every float32 `nn.Linear` on the CPU in `models` (shared modules once) whose weight has at least
    `min_elements` elements for oneDNN; see the module docstring. Modules on another device or in another dtype
    are left alone. Raises `CpuKernelError` where the torch build has no oneDNN linear or it gives other products
    than torch's."""
    if not onednn_linear_available():
        raise CpuKernelError(
            f"this torch build ({torch.__version__}) has no oneDNN linear (torch.backends.mkldnn); "
            "run without prepack_linears (--cpu-kernels torch)"
        )
    forwards: list[_PackedForward] = []
    seen: set[int] = set()
    try:
        for model in models:
            for module in model.modules():
                if not isinstance(module, nn.Linear) or id(module) in seen or "forward" in module.__dict__:
                    continue  # not a linear, already seen, or its forward already replaced (by us or a hook)
                seen.add(id(module))
                weight = module.weight
                if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.is_meta:
                    continue
                if weight.numel() < min_elements:
                    continue
                forward = _PackedForward(module)
                _check(forward)
                vars(module)["forward"] = forward  # an instance attribute: nn.Module.__call__ finds it first
                forwards.append(forward)
    except BaseException:
        PackedLinears(forwards).restore()
        raise
    return PackedLinears(forwards)


CHOICES = ("auto", "onednn", "torch")


def use_cpu_kernels(kind: str, *models: nn.Module | None) -> PackedLinears | None:
    """The CLI's --cpu-kernels: "onednn" packs the models' linears (`prepack_linears`), "torch" leaves them as they
    are (returns None), "auto" packs where this torch build has the oneDNN linear. None models are skipped."""
    if kind not in CHOICES:
        raise ValueError(f"cpu kernels {kind!r}: choose one of {', '.join(CHOICES)}")
    if kind == "torch" or (kind == "auto" and not onednn_linear_available()):
        return None
    return prepack_linears(*(m for m in models if m is not None))
