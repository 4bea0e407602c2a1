"""DFlash (`speculators_model_type = "dflash"`): the reference forward of the `speculators` library matched to 1e-5
(tests/golden/speculators-0.9.0-dflash, made by its make_golden.py with speculators 0.9.0: a sliding-window layer
and a full-attention layer), the drafting path (the cached context + one block) equal to that forward, exact
output in both loops, batches and `pipeline`, loading through AutoModelForCausalLM with the package hidden, clear
errors, and a training loss that learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_rounds_match_recomputation,
    ks_critical_value,
    ks_uniform_statistic,
    make_prompts,
    make_verifier,
    run_without_package,
    sampling_pit_values,
)
from safetensors.torch import load_file
from transformers import pipeline

import speculators_hf as sh
from speculators_hf.config import SpeculatorConfig, SpeculatorConfigError
from speculators_hf.generation.capture import VerifierBindingError, verifier_hidden_states

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "speculators-0.9.0-dflash"


def golden_draft() -> sh.DFlashSpeculator:
    """The library's saved draft, bound to a tiny verifier that holds the embedding it was made with."""
    config = SpeculatorConfig.from_dict(json.loads((GOLDEN / "config.json").read_text()))
    draft = sh.DFlashSpeculator(config).eval()
    missing, unexpected = draft.load_state_dict(load_file(GOLDEN / "model.safetensors"), strict=False)
    assert missing == [] and unexpected == []
    verifier = make_verifier("qwen3", vocab_size=96, hidden_size=32, num_hidden_layers=6)
    with torch.no_grad():
        verifier.get_input_embeddings().weight.copy_(load_file(GOLDEN / "golden.safetensors")["embed"])
    return draft.bind_verifier(verifier)


def golden_logits(draft) -> tuple[torch.Tensor, torch.Tensor]:
    golden = load_file(GOLDEN / "golden.safetensors")
    with torch.no_grad():
        got = draft.parallel_forward(golden["tokens"], list(golden["aux"].chunk(3, dim=-1)), golden["anchors"][None])
    return got[0].flatten(0, 1), golden["draft_logits"]


def test_forward_matches_the_speculators_library():
    draft = golden_draft()
    assert draft.config.mask_token_id == 95 and draft.config.block_size == 4
    got, want = golden_logits(draft)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutant, blocks_changed",
    [
        ("no_window", [2, 3]),  # the anchors at 5 and 8 have context beyond the 4-position window
        ("non_causal", [0, 1, 2, 3]),  # the sliding layer sees the whole block instead of the slots before
    ],
)
def test_the_reference_check_rejects_a_wrong_attention_rule(mutant, blocks_changed):
    draft = golden_draft()
    if mutant == "no_window":
        draft.config.transformer_layer_config.sliding_window = None
    else:
        draft.config.sliding_window_non_causal = True
    got, want = golden_logits(draft)
    differs = [
        b for b in range(4) if not torch.allclose(got[4 * b + 1 : 4 * b + 4], want[4 * b + 1 : 4 * b + 4], atol=1e-5)
    ]
    assert differs == blocks_changed


def test_drafting_from_the_cache_equals_the_parallel_forward():
    """`tree_extend` over a prompt (context keys/values cached, then the block) and `parallel_logits` give the
    logits of `parallel_forward`'s block at the newest token, also when the context outgrows the window and
    when it arrives in several calls."""
    draft = golden_draft()
    n = 10
    tokens = torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(1))
    features = [torch.randn(1, n, 32) for _ in draft.verifier_layer_ids()]
    with torch.no_grad():
        reference = draft.expand_vocab(draft.parallel_forward(tokens, features, torch.tensor([[n - 1]])))[0, 0]
        for splits in ([n], [4, 3, 3]):
            state, start = draft.new_tree_state(1), 0
            for size in splits:
                positions = torch.arange(start, start + size)[None]
                shifted = [torch.cat([f[:, :1], f[:, :-1]], 1)[:, start : start + size] for f in features]
                root, _ = draft.tree_extend(
                    state, tokens[:, start : start + size], positions, torch.ones(1, size, dtype=torch.bool), shifted
                )
                start += size
            later = draft.parallel_logits(state, positions[:, -1], 2)
            torch.testing.assert_close(root[0], reference[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(later[0], reference[2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_exact_in_both_loops_and_batches(family):
    verifier = make_verifier(family)
    draft = sh.DFlashSpeculator.from_verifier(verifier, draft_vocab_size=64, num_layers=2)
    assert draft.config.speculative_tokens == 7 and draft.max_tree_depth() == 7
    for prompt in make_prompts(6, seed=7):
        ref = verifier.generate(prompt, max_new_tokens=20, do_sample=False)
        for k in (3, 7, 12, "auto"):  # 12: more than a block holds, cut to 7
            got = verifier.generate(
                prompt, max_new_tokens=20, do_sample=False, assistant_model=draft, num_assistant_tokens=k
            )
            assert torch.equal(ref, got)
        for tree in ("chain:7", "chain:7:0.3", "auto"):
            assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree=tree, max_new_tokens=20))
    verifier.generation_config.eos_token_id = None  # rows of equal length, comparable as one tensor
    batch = torch.randint(3, 90, (4, 5), generator=torch.Generator().manual_seed(1))
    refs = [verifier.generate(row[None], max_new_tokens=12, do_sample=False) for row in batch]
    assert torch.equal(torch.cat(refs), sh.generate(verifier, draft, batch, max_new_tokens=12))


def test_a_draft_that_proposes_from_the_anchor_slot_is_exact_too():
    verifier = make_verifier("qwen3")
    draft = sh.DFlashSpeculator.from_verifier(verifier, block_size=4, sample_from_anchor=True)
    assert draft.config.speculative_tokens == 4 and draft.config.draft_vocab_size == verifier.config.vocab_size
    for prompt in make_prompts(4, seed=2):
        ref = verifier.generate(prompt, max_new_tokens=16, do_sample=False)
        assert torch.equal(ref, verifier.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=draft))
        assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree="chain:4", max_new_tokens=16))


def test_rounds_in_transformers_loop_match_drafting_from_scratch():
    verifier = make_verifier()
    draft = sh.DFlashSpeculator.from_verifier(verifier, draft_vocab_size=verifier.config.vocab_size, block_size=4)
    assert_rounds_match_recomputation(verifier, draft)


def test_trees_are_refused_with_the_fix():
    verifier = make_verifier()
    draft = sh.DFlashSpeculator.from_verifier(verifier)
    with pytest.raises(ValueError, match="defines no trees; use a chain"):
        sh.generate(verifier, draft, make_prompts(1)[0], tree="dynamic:3:2:4", max_new_tokens=4)


def test_sampling_follows_the_verifier():
    verifier = make_verifier(pad_token_id=None, eos_token_id=None)
    draft = sh.DFlashSpeculator.from_verifier(verifier, block_size=5)
    prompt = make_prompts(1, seed=3)[0]
    torch.manual_seed(0)
    out = sh.generate(
        verifier, draft, prompt.expand(150, -1), tree="chain:4", max_new_tokens=8, do_sample=True, top_k=0
    )
    values = sampling_pit_values(verifier, [row[None] for row in out], prompt.shape[1], 1.0)
    assert ks_uniform_statistic(values) < ks_critical_value(len(values), 1e-3)


def test_pipeline_returns_the_same_text(tiny_tokenizer):
    verifier = make_verifier(vocab_size=len(tiny_tokenizer))
    draft = sh.DFlashSpeculator.from_verifier(verifier, tokenizer=tiny_tokenizer)
    plain = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer)
    assisted = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer, assistant_model=draft)
    for text in ["the draft model", "fast"]:
        expected = plain(text, max_new_tokens=15, do_sample=False)[0]["generated_text"]
        assert assisted(text, max_new_tokens=15, do_sample=False)[0]["generated_text"] == expected


@pytest.mark.parametrize("draft_vocab_size", [64, None])
def test_loads_and_stays_exact_with_the_package_hidden(tmp_path, draft_vocab_size):
    """Saved without the verifier's embedding (and, for the full vocabulary, without any lm_head), loaded as
    remote code, exact once bound."""
    verifier = make_verifier("qwen3")
    draft = sh.DFlashSpeculator.from_verifier(verifier, draft_vocab_size=draft_vocab_size, num_layers=2)
    verifier.save_pretrained(tmp_path / "verifier")
    draft.save_pretrained(tmp_path / "draft")
    saved = load_file(tmp_path / "draft" / "model.safetensors")
    assert "embed_tokens.weight" not in saved and ("lm_head.weight" in saved) == (draft_vocab_size is not None)
    prompts = [p.tolist() for p in make_prompts(4, seed=9)]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True)
        assert type(draft).__name__ == "DFlashSpeculator" and draft.config.block_size == 8
        verifier = AutoModelForCausalLM.from_pretrained("verifier").eval()
        draft.bind_verifier(verifier)
        for prompt in {prompts}:
            ids = torch.tensor(prompt)
            ref = verifier.generate(ids, max_new_tokens=12, do_sample=False)
            got = verifier.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
            assert torch.equal(ref, got), (ref, got)
        print("EXACT", float(draft.fc.weight.sum()))
        """,
        cwd=tmp_path,
    )
    assert f"EXACT {float(draft.fc.weight.detach().sum())}" in out


def test_errors_name_the_problem_and_the_fix():
    verifier = make_verifier("qwen3")
    config = sh.DFlashSpeculator.config_for(verifier)
    unbound = sh.DFlashSpeculator(config)
    with pytest.raises(VerifierBindingError, match="verifier's token embedding: bind it first"):
        unbound.embed(torch.tensor([[3]]))
    draft = sh.DFlashSpeculator.from_verifier(verifier)
    draft.config.mask_token_id = None
    with pytest.raises(ValueError, match=r"no mask_token_id: set draft\.config\.mask_token_id"):
        sh.generate(verifier, draft, make_prompts(1)[0], max_new_tokens=4)
    bad = json.loads((GOLDEN / "config.json").read_text())  # no fingerprint: the family's own check speaks
    with pytest.raises(VerifierBindingError, match="target_hidden_size: draft expects verifier hidden size 32"):
        sh.DFlashSpeculator(SpeculatorConfig.from_dict(bad)).bind_verifier(make_verifier("qwen3", hidden_size=48))
    bad["mask_token_id"] = 500
    bad["transformer_layer_config"]["sliding_window"] = None
    with pytest.raises(SpeculatorConfigError) as err:
        SpeculatorConfig.from_dict(bad)
    assert "mask_token_id: 500 is outside the vocabulary (size 96)" in str(err.value)
    assert "sliding_window: sliding_attention layers need a window size" in str(err.value)


def test_the_training_loss_learns_every_slot():
    """A few optimiser steps on two sequences lower the loss of every slot of the block."""
    verifier = make_verifier("qwen3")
    draft = sh.DFlashSpeculator.from_verifier(verifier, draft_vocab_size=64, block_size=4)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    draft.prepare_training(ids, torch.ones_like(ids), verifier)
    assert draft.draft_vocab_chosen and bool(draft.t2d[ids].all())  # the data's tokens are in the vocabulary
    with torch.no_grad():
        features = [f.detach() for f in verifier_hidden_states(verifier, ids, draft.verifier_layer_ids())]
    loss_mask = torch.ones_like(ids)
    optimiser = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    first, metrics = draft.training_loss(ids, loss_mask, features)
    for _ in range(40):
        loss, _ = draft.training_loss(ids, loss_mask, features)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    last, last_metrics = draft.training_loss(ids, loss_mask, features)
    assert sorted(metrics) == ["acc_0", "acc_1", "acc_2", "loss"]
    assert last < 0.5 * first
    assert all(last_metrics[f"acc_{j}"] > metrics[f"acc_{j}"] for j in range(3)), (metrics, last_metrics)


def test_a_mask_token_with_a_zero_embedding_is_refused():
    """The pad row of an embedding with padding_idx is all zeros: mask slots holding it would all be zero inputs
    (attention gets no gradient), so a new draft refuses it and the default (the last id) avoids it."""
    verifier = make_verifier("qwen3")
    assert not verifier.get_input_embeddings().weight[0].any()
    with pytest.raises(ValueError, match="mask_token_id=0: the verifier's embedding of this token is all zeros"):
        sh.DFlashSpeculator.from_verifier(verifier, mask_token_id=0)
    assert sh.DFlashSpeculator.from_verifier(verifier).config.mask_token_id == verifier.config.vocab_size - 1
