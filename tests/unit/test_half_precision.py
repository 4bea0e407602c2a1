"""What greedy speculative decoding guarantees in half precision, checked on CPU in bfloat16.

A verifier pass over k + 1 tokens does not round like k + 1 one-token passes, so in bfloat16/float16 the output
with a draft can differ from one-token decoding at near-ties, in any speculative decoder. What holds in every
dtype is the defining property: every emitted token is the verifier's argmax in the forward pass that verified
it (`speculators_hf.bench.VerifierPasses`). tests/gpu checks the same on CUDA; here the check itself is shown to
hold for every family in both loops, for transformers' own assisted generation and prompt lookup, to reject
loops that emit a token the verifier did not choose, and to follow the pass, not one-token decoding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, make_prompts, make_verifier

import speculators_hf as sh
import speculators_hf.generation.loop as loop
from speculators_hf.bench import VerifierPasses, _can_draft

MAX_NEW = 16


def near_copy(verifier, noise: float = 0.02) -> sh.IndependentSpeculator:
    """A copy of the verifier with a little noise: it drafts mostly accepted chains, so most tokens are verified
    by entries past the first of a multi-token pass."""
    torch.manual_seed(1)
    model = copy.deepcopy(verifier)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return sh.IndependentSpeculator.from_model(model, verifier)


DRAFTS = {
    "eagle3": lambda v: sh.Eagle3Speculator.from_verifier(v, draft_vocab_size=64),
    "eagle": lambda v: sh.EagleSpeculator.from_verifier(v),
    "mlp_speculator": lambda v: sh.MLPSpeculator.from_verifier(v, n_predict=3),
    "medusa": lambda v: sh.MedusaSpeculator.from_verifier(v, medusa_num_heads=3),
    "peagle": lambda v: sh.PEagleSpeculator.from_verifier(v, draft_vocab_size=64),
    "dflash": lambda v: sh.DFlashSpeculator.from_verifier(v, draft_vocab_size=64, block_size=6),
    "independent (near copy)": near_copy,
}
LOOPS = ["transformers", "chain:4", "dynamic:3:3:6:2"]
CHAINS_ONLY = {"peagle", "dflash"}  # they draft a chain in one pass and define no trees
CASES = [(d, loop) for d in DRAFTS for loop in LOOPS if not (d in CHAINS_ONLY and loop.startswith("dynamic"))]
loop_accept_greedy = loop.accept_greedy  # the real one, before any test replaces it


def bf16_verifier(**overrides):
    return make_verifier(**overrides).to(torch.bfloat16)


def run_loop(verifier, draft, loop_name: str, prompt: torch.Tensor) -> torch.Tensor:
    if loop_name == "transformers":
        return verifier.generate(
            prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft, num_assistant_tokens=4
        )
    return sh.generate(verifier, draft, prompt, tree=loop_name, max_new_tokens=MAX_NEW, do_sample=False)


def mismatches_of(verifier, run, prompts) -> list[str]:
    """Every token of `run(prompt)` that was not the verifier's argmax in the pass that verified it."""
    problems = []
    for i, prompt in enumerate(prompts):
        with VerifierPasses(verifier) as passes:
            out = run(prompt)
        problems += [f"prompt {i}: {p}" for p in passes.mismatches(prompt.shape[1], out[0])]
    return problems


@pytest.mark.parametrize(("draft_name", "loop_name"), CASES)
def test_every_token_is_the_verifiers_argmax_in_its_pass_bf16(draft_name, loop_name):
    verifier = bf16_verifier()
    draft = DRAFTS[draft_name](verifier)
    assert next(draft.parameters()).dtype == torch.bfloat16
    assert loop_name == "transformers" or _can_draft(draft, loop_name)
    prompts = make_prompts(4, seed=5)
    assert mismatches_of(verifier, lambda p: run_loop(verifier, draft, loop_name, p), prompts) == []
    if draft_name.startswith("independent"):  # drafted tokens were accepted: entries past the first decided
        assert draft.generation_stats.accepted_tokens > 0


def test_transformers_own_assisted_generation_and_prompt_lookup_satisfy_the_same_check_bf16():
    """The property is what any greedy speculative decoder guarantees, not something of ours."""
    verifier = bf16_verifier()
    assistant = copy.deepcopy(verifier)
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    prompts = make_prompts(4, seed=6)
    greedy = dict(max_new_tokens=MAX_NEW, do_sample=False)
    assert mismatches_of(verifier, lambda p: verifier.generate(p, assistant_model=assistant, **greedy), prompts) == []
    assert mismatches_of(verifier, lambda p: verifier.generate(p, prompt_lookup_num_tokens=3, **greedy), prompts) == []


def accept_every_draft_token(logits, tree, root, sampler=None):
    """A broken greedy verification (chains): every drafted token accepted, whatever the verifier says."""
    depth = tree.tokens.shape[1]
    path = torch.arange(depth + 1, device=logits.device).expand(logits.shape[0], -1)
    emitted = torch.cat([tree.tokens, logits[:, -1:].argmax(dim=-1)], dim=1)
    return path, emitted, torch.full((logits.shape[0],), depth + 1, device=logits.device)


def wrong_bonus_token(logits, tree, root, sampler=None):
    """A broken greedy verification: the right path, but the verifier's own token after it replaced."""
    path, emitted, count = loop_accept_greedy(logits, tree, root, sampler)
    emitted = emitted.clone()
    last = (count - 1)[:, None]
    emitted.scatter_(1, last, (emitted.gather(1, last) + 1) % VOCAB)
    return path, emitted, count


@pytest.mark.parametrize("mutant", [accept_every_draft_token, wrong_bonus_token])
def test_the_check_rejects_a_loop_that_emits_a_token_the_verifier_did_not_choose(monkeypatch, mutant):
    verifier = bf16_verifier()
    draft = DRAFTS["eagle3"](verifier)
    prompts = make_prompts(3, seed=5)
    run = lambda p: run_loop(verifier, draft, "chain:4", p)  # noqa: E731
    assert mismatches_of(verifier, run, prompts) == []
    monkeypatch.setattr(loop, "accept_greedy", mutant)
    problems = mismatches_of(verifier, run, prompts)
    assert problems and all("is not the verifier's argmax" in p for p in problems)


def test_the_check_flags_an_altered_token_and_a_token_no_pass_verified():
    verifier = bf16_verifier(eos_token_id=None)
    prompt = make_prompts(1, seed=2)[0]
    with VerifierPasses(verifier) as passes:
        out = verifier.generate(prompt, max_new_tokens=8, do_sample=False)[0]
    n = prompt.shape[1]
    assert passes.mismatches(n, out) == []
    altered = out.clone()
    altered[n + 3] = (altered[n + 3] + 1) % VOCAB
    assert passes.mismatches(n, altered) == [
        f"token 3 ({int(altered[n + 3])}) is not the verifier's argmax ({int(out[n + 3])}) in pass 3",
        *(f"token {t} ({int(altered[n + t])}) was verified by no pass" for t in range(4, 8)),
    ]
    longer = torch.cat([out, out[-1:]])
    assert passes.mismatches(n, longer) == [f"token 8 ({int(out[-1])}) was verified by no pass"]


class NearTieFlips:
    """What half-precision rounding does to a verifier, exaggerated and made deterministic: in passes over more
    than one token, every entry whose two best logits lie within `margin` picks the runner-up; one-token passes
    are left alone. A speculative decoder then differs from one-token decoding exactly where the property says it
    may: where the multi-token pass decided otherwise."""

    def __init__(self, verifier, margin: float):
        self.verifier, self.margin = verifier, margin

    def __enter__(self):
        self._handle = self.verifier.register_forward_hook(self._flip, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def _flip(self, module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] < 2:
            return None
        logits = output.logits
        top = logits.topk(2, dim=-1)
        near = (top.values[..., 0] - top.values[..., 1]) < self.margin
        first, second = top.indices[..., :1], top.indices[..., 1:]
        flipped = logits.clone()
        flipped.scatter_(-1, first, torch.where(near[..., None], top.values[..., 1:], top.values[..., :1]))
        flipped.scatter_(-1, second, torch.where(near[..., None], top.values[..., :1], top.values[..., 1:]))
        output.logits = flipped
        return output


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_check_follows_the_verifying_pass_not_one_token_decoding(loop_name):
    """With near-ties decided the other way in multi-token passes, outputs with a draft differ from the verifier
    alone on some prompts, and every token is still the argmax of the pass that verified it."""
    verifier = bf16_verifier()
    draft = near_copy(verifier)  # made before the flips: the draft itself drafts unchanged
    prompts = make_prompts(8, seed=4)
    with NearTieFlips(verifier, margin=0.5):
        alone = [verifier.generate(p, max_new_tokens=MAX_NEW, do_sample=False) for p in prompts]
        with_draft = [run_loop(verifier, draft, loop_name, p) for p in prompts]
        assert mismatches_of(verifier, lambda p: run_loop(verifier, draft, loop_name, p), prompts) == []
    assert any(not torch.equal(a, b) for a, b in zip(alone, with_draft))
