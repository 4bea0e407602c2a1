"""P-EAGLE (`speculators_model_type = "peagle"`): the reference forward of the `speculators` library matched to
1e-5 (tests/golden/speculators-0.9.0-peagle, made by its make_golden.py with speculators 0.9.0), the drafting
path (one pass over the mask entries on the cache) equal to that forward, exact output in both loops and
`pipeline`, loading through AutoModelForCausalLM with the package hidden, and a training loss that learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
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
from speculators_hf.config import SpeculatorConfig

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "speculators-0.9.0-peagle"


def assert_matches_golden(draft) -> list[torch.Tensor]:
    """`draft.parallel_forward` on the golden inputs against the library's logits of every (anchor, depth)."""
    golden = load_file(GOLDEN / "golden.safetensors")
    with torch.no_grad():
        logits = draft.parallel_forward(golden["tokens"], list(golden["aux"].chunk(3, dim=-1)), 3)
    got = torch.stack([logits[d][0, a] for a, d in zip(golden["anchor"].tolist(), golden["depth"].tolist())])
    torch.testing.assert_close(got, golden["draft_logits"], rtol=1e-5, atol=1e-5)
    return logits


def test_forward_matches_the_speculators_library():
    config = SpeculatorConfig.from_dict(json.loads((GOLDEN / "config.json").read_text()))
    assert isinstance(config, sh.PEagleSpeculatorConfig) and config.mask_token_id == 95
    draft = sh.PEagleSpeculator(config).eval()
    missing, unexpected = draft.load_state_dict(load_file(GOLDEN / "model.safetensors"), strict=False)
    assert missing == [] and unexpected == []
    logits = assert_matches_golden(draft)
    # the check can fail: a different mask_hidden changes every mask entry's logits and no depth-0 one
    with torch.no_grad():
        draft.mask_hidden.add_(0.05 * torch.randn_like(draft.mask_hidden))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_matches_golden(draft)
    golden = load_file(GOLDEN / "golden.safetensors")
    with torch.no_grad():
        wrong = draft.parallel_forward(golden["tokens"], list(golden["aux"].chunk(3, dim=-1)), 3)
    assert torch.equal(wrong[0], logits[0])


def test_drafting_in_one_pass_equals_the_parallel_forward():
    """`tree_extend` over a prompt then `parallel_logits` (the generation path, on the draft's cache) gives the
    logits of `parallel_forward`'s last anchor at every depth."""
    verifier = make_verifier()
    draft = sh.PEagleSpeculator.from_verifier(verifier, draft_vocab_size=verifier.config.vocab_size).eval()
    n, depths = 7, 4
    tokens = torch.randint(3, 90, (1, n))
    features = [torch.randn(1, n, 32) for _ in draft.verifier_layer_ids()]
    with torch.no_grad():
        reference = draft.parallel_forward(tokens, features, depths)
        state = draft.new_tree_state(1)
        positions = torch.arange(1, n + 1)[None]  # token i+1 at position i+1, the states of position i beside it
        root_logits, _ = draft.tree_extend(
            state, tokens, positions, torch.ones_like(tokens, dtype=torch.bool), features
        )
        later = draft.parallel_logits(state, positions[:, -1], depths - 1)
    torch.testing.assert_close(root_logits[0], reference[0][0, -1], rtol=1e-5, atol=1e-5)
    for d in range(1, depths):
        torch.testing.assert_close(later[0, d - 1], reference[d][0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_exact_in_both_loops_and_batches(family):
    verifier = make_verifier(family)
    draft = sh.PEagleSpeculator.from_verifier(verifier, draft_vocab_size=64)
    prompts = make_prompts(6, seed=7)
    for prompt in prompts:
        ref = verifier.generate(prompt, max_new_tokens=20, do_sample=False)
        for k in (5, "auto"):
            got = verifier.generate(
                prompt, max_new_tokens=20, do_sample=False, assistant_model=draft, num_assistant_tokens=k
            )
            assert torch.equal(ref, got)
        for tree in ("chain:6", "chain:8:0.3", "auto"):
            assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree=tree, max_new_tokens=20))
    verifier.generation_config.eos_token_id = None  # rows of equal length, comparable as one tensor
    batch = torch.randint(3, 90, (4, 5), generator=torch.Generator().manual_seed(1))
    refs = [verifier.generate(row[None], max_new_tokens=12, do_sample=False) for row in batch]
    assert torch.equal(torch.cat(refs), sh.generate(verifier, draft, batch, max_new_tokens=12))


def test_trees_are_refused_with_the_fix():
    verifier = make_verifier()
    draft = sh.PEagleSpeculator.from_verifier(verifier)
    with pytest.raises(ValueError, match="defines no trees; use a chain"):
        sh.generate(verifier, draft, make_prompts(1)[0], tree="dynamic:3:2:4", max_new_tokens=4)


def test_sampling_follows_the_verifier():
    verifier = make_verifier(pad_token_id=None, eos_token_id=None)
    draft = sh.PEagleSpeculator.from_verifier(verifier)
    prompt = make_prompts(1, seed=3)[0]
    torch.manual_seed(0)
    out = sh.generate(
        verifier, draft, prompt.expand(150, -1), tree="chain:4", max_new_tokens=8, do_sample=True, top_k=0
    )
    values = sampling_pit_values(verifier, [row[None] for row in out], prompt.shape[1], 1.0)
    assert ks_uniform_statistic(values) < ks_critical_value(len(values), 1e-3)


def test_pipeline_returns_the_same_text(tiny_tokenizer):
    verifier = make_verifier(vocab_size=len(tiny_tokenizer))
    draft = sh.PEagleSpeculator.from_verifier(verifier, tokenizer=tiny_tokenizer)
    plain = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer)
    assisted = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer, assistant_model=draft)
    for text in ["the draft model", "fast"]:
        expected = plain(text, max_new_tokens=15, do_sample=False)[0]["generated_text"]
        assert assisted(text, max_new_tokens=15, do_sample=False)[0]["generated_text"] == expected


def test_loads_and_stays_exact_with_the_package_hidden(tmp_path):
    verifier = make_verifier()
    draft = sh.PEagleSpeculator.from_verifier(verifier, draft_vocab_size=64)
    verifier.save_pretrained(tmp_path / "verifier")
    draft.save_pretrained(tmp_path / "draft")
    prompts = [p.tolist() for p in make_prompts(4, seed=9)]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True)
        assert type(draft).__name__ == "PEagleSpeculator" and draft.config.mask_token_id is not None
        verifier = AutoModelForCausalLM.from_pretrained("verifier").eval()
        draft.bind_verifier(verifier)
        for prompt in {prompts}:
            ids = torch.tensor(prompt)
            ref = verifier.generate(ids, max_new_tokens=12, do_sample=False)
            got = verifier.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
            assert torch.equal(ref, got), (ref, got)
        print("EXACT", float(draft.mask_hidden.sum()))
        """,
        cwd=tmp_path,
    )
    assert f"EXACT {float(draft.mask_hidden.detach().sum())}" in out


def test_the_training_loss_learns_every_depth():
    """A few optimiser steps on one sequence lower the loss of every depth (the mask entries' included)."""
    verifier = make_verifier()
    draft = sh.PEagleSpeculator.from_verifier(verifier, draft_vocab_size=verifier.config.vocab_size)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = [
            f.detach() for f in sh.generation.capture.verifier_hidden_states(verifier, ids, draft.verifier_layer_ids())
        ]
    loss_mask = torch.ones_like(ids)
    optimiser = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    first, metrics = draft.training_loss(ids, loss_mask, features, steps=3)
    for _ in range(30):
        loss, _ = draft.training_loss(ids, loss_mask, features, steps=3)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    last, last_metrics = draft.training_loss(ids, loss_mask, features, steps=3)
    assert last < 0.5 * first
    assert draft.mask_hidden.grad is not None and draft.mask_hidden.grad.abs().sum() > 0
    print(metrics, last_metrics)


def test_converted_in_from_the_speculators_format_and_exported_back(tmp_path):
    """The library's own save (no model_type) imports (detected as speculators_peagle), keeps the reference
    logits, and exports to the speculators/vLLM format with the very same tensors."""
    from speculators_hf.convert import convert

    out = convert(GOLDEN, tmp_path / "ours")
    draft = sh.load_draft(out)
    assert isinstance(draft, sh.PEagleSpeculator) and draft.config.mask_token_id == 95
    assert_matches_golden(draft)
    for target in ("speculators", "vllm"):
        exported = convert(out, tmp_path / target, to=target)
        original, again = load_file(GOLDEN / "model.safetensors"), load_file(exported / "model.safetensors")
        assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
        config = json.loads((exported / "config.json").read_text())
        assert config["speculators_model_type"] == "peagle" and config["mask_token_id"] == 95


def test_a_speculators_file_without_mask_token_id_names_the_fix(tmp_path):
    from speculators_hf.convert import ConversionError, convert

    source = tmp_path / "src"
    source.mkdir()
    config = json.loads((GOLDEN / "config.json").read_text())
    del config["mask_token_id"]
    (source / "config.json").write_text(json.dumps(config))
    (source / "model.safetensors").write_bytes((GOLDEN / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=r"mask_token_id.*--set mask_token_id=ID"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = convert(source, tmp_path / "fixed", overrides={"mask_token_id": 95})
    assert sh.load_draft(out).config.mask_token_id == 95
