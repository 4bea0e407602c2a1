"""oneDNN prepacked linears (`speculators_hf.cpu_kernels`): same products, same greedy output, stock forward back."""

from __future__ import annotations

import pytest
import torch
from conftest import make_prompts, make_verifier
from torch import nn

import speculators_hf as sh
from speculators_hf import cpu_kernels
from speculators_hf.cpu_kernels import CpuKernelError, prepack_linears, use_cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.onednn_linear_available(), reason="this torch has no oneDNN linear")


def packed_forward(module: nn.Module):
    return vars(module).get("forward")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (3, 17), (2,)])
def test_packed_linear_gives_torchs_products(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape, 48)
    want = linear(x)
    with prepack_linears(linear, min_elements=0) as packed, torch.no_grad():
        assert packed.count == 1 and isinstance(packed_forward(linear), cpu_kernels._PackedForward)
        got = linear(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(linear)  # the stock forward is back


def test_a_weight_changed_in_place_is_packed_again():
    """A packed copy made before `load_state_dict` (or any in-place edit) would give the old weight's products."""
    torch.manual_seed(0)
    linear, other = nn.Linear(16, 24), nn.Linear(16, 24)
    x = torch.randn(2, 16)
    with prepack_linears(linear, min_elements=0), torch.no_grad():
        linear(x)
        linear.load_state_dict(other.state_dict())
        torch.testing.assert_close(linear(x), other(x), rtol=1e-5, atol=1e-5)
        new = other.weight.detach() * 2
        while new._version < linear.weight._version:  # a new tensor at the same version: only its address tells
            new.mul_(1)
        linear.weight.data = new
        torch.testing.assert_close(linear(x), x @ new.T + other.bias, rtol=1e-5, atol=1e-5)


def test_training_falls_back_to_torch_and_gets_the_same_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    linear(x).square().sum().backward()
    want = linear.weight.grad.clone()
    linear.weight.grad = None
    with prepack_linears(linear, min_elements=0):
        linear(x).square().sum().backward()
    torch.testing.assert_close(linear.weight.grad, want)


def test_only_float32_cpu_linears_are_packed_and_state_dict_is_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8))
    model[2] = model[0]  # a shared module is packed once
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with prepack_linears(model, min_elements=0) as packed:
        assert packed.count == 1 and packed.packed_bytes == 8 * 8 * 4
        assert packed_forward(model[1]) is None
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_kernel_that_disagrees_is_refused_and_nothing_stays_packed(monkeypatch):
    """The self-check at packing time: a packed weight that is not the module's (here scaled by 1.01, as a torch
    build whose private op changed meaning might give) is caught before any token is generated."""
    original = torch.ops.mkldnn._reorder_linear_weight

    def wrong(weight, rows):
        return original(weight * 1.01, rows)

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    monkeypatch.setattr(cpu_kernels, "_reorder", wrong)
    with pytest.raises(CpuKernelError, match=r"disagrees with torch's.*--cpu-kernels torch"):
        prepack_linears(model, min_elements=0)
    assert all(packed_forward(m) is None for m in model)


def test_use_cpu_kernels_choices_and_small_weights_stay_on_torch():
    small, large = nn.Linear(100, 100), nn.Linear(512, 512)  # below and above MIN_PACKED_ELEMENTS
    assert small.weight.numel() < cpu_kernels.MIN_PACKED_ELEMENTS <= large.weight.numel()
    assert use_cpu_kernels("torch", small, large) is None and packed_forward(large) is None
    packed = use_cpu_kernels("auto", small, None, large)
    assert packed is not None and packed.count == 1
    assert packed_forward(small) is None and packed_forward(large) is not None
    packed.restore()
    linear = small
    with pytest.raises(ValueError, match="choose one of auto, onednn, torch"):
        use_cpu_kernels("fast", linear)


@pytest.mark.parametrize("family", sorted(sh.FAMILIES))
def test_every_family_is_exact_with_packed_verifier_and_draft(family):
    """Greedy output of the packed verifier + packed draft equals the STOCK verifier alone, in transformers'
    loop and in the package's own loop."""
    verifier = make_verifier()
    draft = sh.FAMILIES[family].from_verifier(verifier)
    prompts = make_prompts(4, seed=3)
    with torch.no_grad():
        references = [verifier.generate(p, max_new_tokens=16, do_sample=False) for p in prompts]
    with prepack_linears(verifier, draft, min_elements=0) as packed, torch.no_grad():
        assert packed.count >= 4 * 7  # every verifier layer's projections, at least
        for prompt, reference in zip(prompts, references):
            ours = verifier.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=draft)
            own = sh.generate(verifier, draft, prompt, torch.ones_like(prompt), max_new_tokens=16)
            assert torch.equal(ours, reference) and torch.equal(own, reference)
