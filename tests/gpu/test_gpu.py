"""The exactness guarantees in bf16 on CUDA (skipped without a GPU).

bf16 note: the verifier scores k+1 tokens in one forward pass with a draft and one token at a time
without; on a GPU the kernels for those shapes may round differently, so a near-tie between two
tokens can in principle flip. The tiny verifiers here have peaked distributions, so any mismatch
would point at the draft machinery, not at rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_greedy_exact, assert_sampling_exact, make_prompts, make_verifier

import speculators_hf as sh

pytestmark = pytest.mark.gpu


def cuda_verifier(family: str = "llama"):
    return make_verifier(family).to(device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_eagle3_greedy_exact_bf16_cuda(family):
    verifier = cuda_verifier(family)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    assert next(draft.parameters()).dtype == torch.bfloat16 and next(draft.parameters()).is_cuda
    prompts = [p.cuda() for p in make_prompts(20, seed=7)]
    assert_greedy_exact(verifier, draft, prompts, max_new_tokens=24)


def test_independent_copy_accepts_everything_bf16_cuda():
    verifier = cuda_verifier()
    draft = sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier)
    stats = assert_greedy_exact(verifier, draft, [p.cuda() for p in make_prompts(20, seed=3)], max_new_tokens=24)
    assert stats.tau > 4.0


def test_eagle3_sampling_bf16_cuda():
    verifier = cuda_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    assert_sampling_exact(verifier, draft, make_prompts(1, seed=3)[0].cuda(), n_samples=150)


def test_save_load_on_cuda(tmp_path):
    verifier = cuda_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    draft.save_pretrained(tmp_path)
    loaded = sh.AutoSpeculatorForCausalLM.from_pretrained(tmp_path, verifier=verifier, dtype=torch.bfloat16)
    assert next(loaded.parameters()).is_cuda
    assert_greedy_exact(verifier, loaded, [p.cuda() for p in make_prompts(5)], max_new_tokens=16)


def test_auto_drafting_exact_bf16_cuda():
    """`auto` on a GPU: where the tiny verifier's wide passes cost what a narrow one does, the own loop takes
    the wide-tree branch; both loops stay exact."""
    verifier = cuda_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    prompts = [p.cuda() for p in make_prompts(8, seed=7)]
    for prompt in prompts:
        ref = verifier.generate(prompt, max_new_tokens=24, do_sample=False)
        out = verifier.generate(
            prompt, max_new_tokens=24, do_sample=False, assistant_model=draft, num_assistant_tokens="auto"
        )
        assert torch.equal(ref, out)
        assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree="auto", max_new_tokens=24))
