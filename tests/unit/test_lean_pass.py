"""The own loop's lean verifier pass: bitwise the stock forward, or not used at all."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_prompts, make_verifier
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import speculators_hf as sh
from speculators_hf.cpu_kernels import onednn_linear_available, prepack_linears
from speculators_hf.generation import lean as lean_module
from speculators_hf.generation.kvcache import additive_mask, cache_kwargs, causal_block
from speculators_hf.generation.lean import LeanPass

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def _rounds(seed: int = 0, prompt: int = 9):
    """A padded prefill of 2 rows, then blocks whose masks drop some context entries and some block entries
    (as the loop's tree rounds and dead entries do), each with explicit positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, prompt), generator=gen)
    valid = torch.ones(2, prompt, dtype=torch.bool)
    valid[0, :3] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    yield ids, positions, additive_mask(causal_block(valid), torch.float32)
    alive, next_position = valid, positions[:, -1] + 1
    for width in (1, 4, 6):
        tokens = torch.randint(3, VOCAB, (2, width), generator=gen)
        block = torch.rand(2, width, width, generator=gen) < 0.6
        block = (block & torch.ones(width, width, dtype=torch.bool).tril()) | torch.eye(width, dtype=torch.bool)
        depths = block.long().sum(2) - 1
        context = alive[:, None, :].expand(-1, width, -1)
        yield tokens, next_position[:, None] + depths, additive_mask(torch.cat([context, block], dim=2), torch.float32)
        alive = torch.cat([alive, torch.rand(2, width, generator=gen) < 0.7], dim=1)
        next_position = next_position + width


def _counted(monkeypatch, method: str) -> list[int]:
    """A list that grows by one at each call of `LeanPass.<method>` (which still runs) while the test lasts."""
    calls: list[int] = []
    original = getattr(LeanPass, method)
    monkeypatch.setattr(LeanPass, method, lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def _compare(verifier, lean, layer_ids, prompt: int = 9):
    stock_cache, lean_cache = DynamicCache(), DynamicCache()
    num_layers = verifier.config.num_hidden_layers
    with torch.inference_mode():
        for step, (tokens, positions, mask) in enumerate(_rounds(prompt=prompt)):
            out = verifier(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                           output_hidden_states=True, **cache_kwargs(stock_cache))  # fmt: skip
            states = [out.hidden_states[i] if i < num_layers else out.hidden_states[-1] for i in layer_ids]
            logits, lean_states = lean(tokens, positions, mask, lean_cache, layer_ids)
            assert torch.equal(logits, out.logits)
            assert all(torch.equal(a, b) for a, b in zip(lean_states, states))
            if step == 0:  # the prefill, as the loop runs it: the last position's logits only
                last, _ = lean(tokens, positions, mask, DynamicCache(), [], logits_to_keep=1)
                stock_last = verifier(input_ids=tokens, position_ids=positions, attention_mask=mask,
                                      logits_to_keep=1, **cache_kwargs(DynamicCache())).logits  # fmt: skip
                assert last.shape[1] == 1 and torch.equal(last, stock_last)


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_pass_is_bitwise_the_stock_forward(family):
    verifier = make_verifier(family)
    layer_ids = [0, 2, 4]  # the embeddings, a middle layer's input, the post-norm last state
    lean = LeanPass.of(verifier, layer_ids)
    assert lean is not None
    _compare(verifier, lean, layer_ids)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lean_pass_is_bitwise_the_stock_forward_after_a_long_prompt(family):
    """sdpa's CPU kernel splits long queries into other blocks: the grouped-query shortcut must still agree."""
    verifier = make_verifier(family, max_position_embeddings=1024)
    lean = LeanPass.of(verifier, [1])
    assert lean is not None and lean.grouped  # 4 query heads on 2 key/value heads under sdpa
    _compare(verifier, lean, [1], prompt=800)


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")
def test_lean_pass_is_bitwise_the_stock_forward_with_packed_linears():
    verifier = make_verifier("llama", hidden_size=512, intermediate_size=1024, num_attention_heads=8)
    with prepack_linears(verifier, min_elements=1) as packed:
        assert packed.count > 0
        lean = LeanPass.of(verifier, [1, 4])
        assert lean is not None
        _compare(verifier, lean, [1, 4])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_pass_that_is_not_the_stock_computation_is_refused(family, monkeypatch):
    """The bind-time check can fail: a lean pass that skips the rotary embedding is not used."""
    verifier = make_verifier(family)
    monkeypatch.setattr(LeanPass, "__init__", _with_rotary(LeanPass.__init__, lambda q, k, cos, sin: (q, k)))
    assert LeanPass.of(verifier, [2]) is None
    monkeypatch.undo()
    assert LeanPass.of(verifier, [2]) is not None


def _with_rotary(init, rotary):
    def patched(self, verifier):
        init(self, verifier)
        self.rotary = rotary

    return patched


def test_an_unknown_module_layout_gets_no_lean_pass():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)).eval()
    assert LeanPass.of(gpt2, [1]) is None
    verifier = make_verifier("llama")
    verifier.model.layers[1].extra = torch.nn.Linear(2, 2)  # a module the stock forward may call
    assert LeanPass.of(verifier, [1]) is None


def test_hooks_the_lean_loop_would_bypass_make_it_decline():
    verifier = make_verifier("llama")
    calls = []
    handle = verifier.model.layers[2].mlp.register_forward_hook(lambda *args: calls.append(1))
    assert LeanPass.of(verifier, [1]) is None
    handle.remove()
    verifier.model.layers[0].self_attn.q_proj._hf_hook = object()  # accelerate's offloading hook
    assert LeanPass.of(verifier, [1]) is None
    del verifier.model.layers[0].self_attn.q_proj._hf_hook
    # transformers' own output capturing (installed by any output_hidden_states call) only observes
    verifier(torch.tensor([[3, 4, 5]]), output_hidden_states=True)
    assert LeanPass.of(verifier, [1]) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loop_runs_the_lean_pass_and_gives_the_stock_tokens(family, monkeypatch):
    verifier = make_verifier(family)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    calls = _counted(monkeypatch, "__call__")
    prompts = make_prompts(3, seed=7)
    for prompt in prompts:
        lean = sh.generate(verifier, draft, prompt, tree="dynamic:3:2:6", max_new_tokens=16)
        assert calls, "the loop did not use the lean pass"
        calls.clear()
        stock = sh.generate(verifier, draft, prompt, tree="dynamic:3:2:6", max_new_tokens=16, lean_verifier=False)
        assert not calls
        alone = verifier.generate(prompt, max_new_tokens=16, do_sample=False)
        assert torch.equal(lean, stock) and torch.equal(lean, alone)


def test_a_hook_added_after_binding_is_honoured(monkeypatch):
    """The bitwise check is made once per binding; hooks are looked for on every call, so a hook installed
    later (here: one that changes the verifier's output) runs, through the stock forward."""
    verifier = make_verifier("llama")
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    prompt = make_prompts(1, seed=3)[0]
    sh.generate(verifier, draft, prompt, max_new_tokens=4)
    assert draft._binding["lean"] is not None
    handle = verifier.lm_head.register_forward_hook(lambda module, args, out: out.flip(-1))
    try:
        ours = sh.generate(verifier, draft, prompt, max_new_tokens=12)
        assert torch.equal(ours, verifier.generate(prompt, max_new_tokens=12, do_sample=False))
        assert lean_module.LeanPass.supports(verifier) is False
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loop_runs_the_lean_layers_and_gives_the_verifier_alone_tokens(family, monkeypatch):
    verifier = make_verifier(family)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    calls = _counted(monkeypatch, "layer")
    for prompt in make_prompts(3, seed=5):
        alone = verifier.generate(prompt, max_new_tokens=12, do_sample=False)
        assert not calls  # the verifier alone keeps its stock layers
        assert torch.equal(verifier.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=draft), alone)
        assert calls, "transformers' loop did not run the lean layers"
        assert all("forward" not in layer.__dict__ for layer in verifier.model.layers)  # put back afterwards
        calls.clear()
    draft.lean_verifier = False
    verifier.generate(make_prompts(1)[0], max_new_tokens=6, do_sample=False, assistant_model=draft)
    assert not calls


def test_the_layer_check_can_fail_and_the_layers_are_put_back_after_an_error(monkeypatch):
    verifier = make_verifier("llama")
    lean = LeanPass.of(verifier, [1])
    assert lean is not None and lean.swappable
    monkeypatch.setattr(lean, "rotary", lambda q, k, cos, sin: (q, k))  # a layer without the rotary embedding
    assert not lean.matches_stock_in_layers()
    with pytest.raises(RuntimeError, match="boom"), lean.in_layers():
        assert all("forward" in layer.__dict__ for layer in verifier.model.layers)
        raise RuntimeError("boom")
    assert all("forward" not in layer.__dict__ for layer in verifier.model.layers)


def test_transformers_loop_keeps_the_stock_layers_when_attention_weights_are_asked_for(monkeypatch):
    verifier = make_verifier("llama", attn_implementation="eager")
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    calls = _counted(monkeypatch, "layer")
    prompt = make_prompts(1, seed=2)[0]
    out = verifier.generate(prompt, max_new_tokens=6, do_sample=False, assistant_model=draft,
                            output_attentions=True, return_dict_in_generate=True)  # fmt: skip
    assert not calls and out.attentions is not None
    assert torch.equal(out.sequences, verifier.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("vocab", [5, 23])
def test_the_check_runs_on_a_tiny_vocabulary(vocab):
    """The check's own inputs stay ids of the verifier's vocabulary (it once fed id = vocab to a 23-token model)."""
    verifier = make_verifier("llama", vocab_size=vocab)
    lean = LeanPass.of(verifier, [1])
    assert lean is not None and lean.swappable
