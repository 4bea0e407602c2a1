"""The guarantees on CUDA (skipped without a GPU).

float32: greedy output with a draft equals the verifier alone, token for token.

bfloat16: a verifier pass over k + 1 tokens does not round like k + 1 one-token passes (other kernels, other
reduction orders), so at a near-tie between two tokens greedy output with a draft can differ from one-token
decoding, in every speculative decoder (transformers' assisted generation and prompt lookup included; measured on
CPU in BENCHMARKS.md, "Half precision"). Comparing with the verifier alone would test the kernels, not the draft
machinery. What holds, and what these tests check, is the defining property of speculative decoding: every emitted
token is the verifier's argmax in the forward pass that verified it (`speculators_hf.bench.VerifierPasses`).
tests/unit/test_half_precision.py runs the same check on CPU in bfloat16 and shows that it rejects a loop that
emits a token the verifier did not choose and accepts one whose multi-token passes decide a near-tie otherwise.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_exact, assert_sampling_exact, make_prompts, make_verifier

import speculators_hf as sh

pytestmark = pytest.mark.gpu


def _half_precision_tests():
    """tests/unit/test_half_precision.py: the drafts, the loops and the check, shared with the CPU tests."""
    spec = importlib.util.spec_from_file_location(
        "half_precision_tests", Path(__file__).parents[1] / "unit" / "test_half_precision.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


half = _half_precision_tests()


def cuda_verifier(family: str = "llama", dtype: torch.dtype = torch.bfloat16, **overrides):
    return make_verifier(family, **overrides).to(device="cuda", dtype=dtype)


def cuda_prompts(n: int, seed: int) -> list[torch.Tensor]:
    return [p.cuda() for p in make_prompts(n, seed=seed)]


def assert_each_token_verified(verifier, draft, loop_name: str, prompts) -> None:
    problems = half.mismatches_of(verifier, lambda p: half.run_loop(verifier, draft, loop_name, p), prompts)
    assert problems == []


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_eagle3_greedy_exact_float32_cuda(family):
    verifier = cuda_verifier(family, torch.float32)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    assert next(draft.parameters()).dtype == torch.float32 and next(draft.parameters()).is_cuda
    prompts = cuda_prompts(20, seed=7)
    assert_greedy_exact(verifier, draft, prompts, max_new_tokens=24)
    for prompt in prompts:  # the own loop, a chain and a tree
        ref = verifier.generate(prompt, max_new_tokens=24, do_sample=False)
        for tree in ("chain:4", "dynamic:4:4:12"):
            assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree=tree, max_new_tokens=24))


@pytest.mark.parametrize(("draft_name", "loop_name"), half.CASES)
def test_every_token_is_the_verifiers_argmax_in_its_pass_bf16_cuda(draft_name, loop_name):
    verifier = cuda_verifier()
    draft = half.DRAFTS[draft_name](verifier)
    assert next(draft.parameters()).dtype == torch.bfloat16 and next(draft.parameters()).is_cuda
    assert_each_token_verified(verifier, draft, loop_name, cuda_prompts(20, seed=7))


def test_independent_copy_accepts_everything_bf16_cuda():
    """An exact copy of the verifier as the draft: nearly every drafted token accepted, each the verifier's argmax
    in the pass over k + 1 tokens that verified it (which may differ from one-token decoding at a near-tie)."""
    verifier = cuda_verifier()
    draft = sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier)
    stats = []

    def run(prompt):
        out = half.run_loop(verifier, draft, "transformers", prompt)
        stats.append(draft.generation_stats)
        return out

    assert half.mismatches_of(verifier, run, cuda_prompts(20, seed=3)) == []
    assert sum(stats, sh.GenerationStats()).tau > 3.5  # 4 draft tokens a round: at most 5


def test_eagle3_sampling_bf16_cuda():
    """The output follows the distribution of the verifier's verifying passes; at 150 samples the test cannot
    tell it from the one-token passes' (their difference is bf16 rounding)."""
    verifier = cuda_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    assert_sampling_exact(verifier, draft, make_prompts(1, seed=3)[0].cuda(), n_samples=150)


def test_save_load_on_cuda(tmp_path):
    verifier = cuda_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    draft.save_pretrained(tmp_path)
    loaded = sh.AutoSpeculatorForCausalLM.from_pretrained(tmp_path, verifier=verifier, dtype=torch.bfloat16)
    assert next(loaded.parameters()).is_cuda and next(loaded.parameters()).dtype == torch.bfloat16
    assert_each_token_verified(verifier, loaded, "transformers", cuda_prompts(5, seed=0))


def test_auto_drafting_cuda():
    """`auto` on a GPU: where the tiny verifier's wide passes cost what a narrow one does, the own loop takes
    the wide-tree branch; both loops are exact in float32 and verified pass by pass in bfloat16."""
    verifier = cuda_verifier(dtype=torch.float32)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    prompts = cuda_prompts(8, seed=7)
    for prompt in prompts:
        ref = verifier.generate(prompt, max_new_tokens=24, do_sample=False)
        out = verifier.generate(
            prompt, max_new_tokens=24, do_sample=False, assistant_model=draft, num_assistant_tokens="auto"
        )
        assert torch.equal(ref, out)
        assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree="auto", max_new_tokens=24))
    verifier, draft = verifier.to(torch.bfloat16), draft.to(torch.bfloat16)
    problems = half.mismatches_of(
        verifier, lambda p: sh.generate(verifier, draft, p, tree="auto", max_new_tokens=24), prompts
    )
    problems += half.mismatches_of(
        verifier,
        lambda p: verifier.generate(
            p, max_new_tokens=24, do_sample=False, assistant_model=draft, num_assistant_tokens="auto"
        ),
        prompts,
    )
    assert problems == []
