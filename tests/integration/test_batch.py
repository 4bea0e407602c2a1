"""`speculators_hf.generate` on batches: left padding, per-row acceptance, eos per row, pruned caches.

Every greedy output is compared, row by row, with the verifier alone on that row's unpadded prompt.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_prompts, make_verifier

import speculators_hf as sh
from speculators_hf.generation.kvcache import MaskedCache, causal_block


def perturbed_copy(verifier, noise: float = 0.05) -> sh.IndependentSpeculator:
    model = copy.deepcopy(verifier)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return sh.IndependentSpeculator.from_model(model, verifier)


DRAFTS = {
    "eagle3": lambda v: sh.Eagle3Speculator.from_verifier(v, draft_vocab_size=64),
    "eagle3-full-vocab": lambda v: sh.Eagle3Speculator.from_verifier(
        v, draft_vocab_size=v.config.vocab_size, norm_before_residual=True
    ),
    "eagle": lambda v: sh.EagleSpeculator.from_verifier(v),
    "mlp_speculator": lambda v: sh.MLPSpeculator.from_verifier(v, n_predict=4),
    "medusa": lambda v: sh.MedusaSpeculator.from_verifier(v, medusa_num_heads=4),
    "independent-perturbed": perturbed_copy,
}
# drafts that propose a chain from one forward pass (P-EAGLE and DFlash: chains only; DSpark and DFlash2 also grow
# trees, tested in tests/unit/test_dspark_trees.py)
PARALLEL_DRAFTS = {
    "peagle": lambda v: sh.PEagleSpeculator.from_verifier(v, draft_vocab_size=64),
    "dflash": lambda v: sh.DFlashSpeculator.from_verifier(v, draft_vocab_size=64, block_size=6),
    "dspark": lambda v: sh.DSparkSpeculator.from_verifier(v, draft_vocab_size=64, block_size=6, markov_rank=16),
    "dflash2": lambda v: sh.DFlash2Speculator.from_verifier(v, block_size=6, selector_rank=16, selector_top_k=8),
}
ALL_DRAFTS = {**DRAFTS, **PARALLEL_DRAFTS}


def left_padded(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1] :] = p[0]
        mask[i, width - p.shape[1] :] = 1
    return ids, mask


def assert_rows_exact(verifier, prompts, sequences, max_new_tokens, **kwargs):
    """Row i of `sequences` (the padded prompt, then new tokens padded with pad) continues prompt i exactly as
    the verifier alone does."""
    pad_width = max(p.shape[1] for p in prompts)
    assert sequences.shape[1] <= pad_width + max_new_tokens
    for i, prompt in enumerate(prompts):
        ref = verifier.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)[0, prompt.shape[1] :]
        got = sequences[i, pad_width:]
        assert torch.equal(got[: ref.shape[0]], ref), f"row {i}: {got.tolist()} != verifier alone {ref.tolist()}"
        pad = verifier.generation_config.pad_token_id
        assert (got[ref.shape[0] :] == pad).all(), f"row {i} continues after the verifier stopped: {got.tolist()}"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("draft_name", list(ALL_DRAFTS))
def test_batch_chain_greedy_exact(family, draft_name):
    verifier = make_verifier(family)
    draft = ALL_DRAFTS[draft_name](verifier)
    prompts = make_prompts(6, seed=7)
    ids, mask = left_padded(prompts)
    out = sh.generate(verifier, draft, ids, mask, max_new_tokens=16, return_dict_in_generate=True)
    assert_rows_exact(verifier, prompts, out.sequences, 16)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert out.stats.drafted_tokens > 0
    assert len(out.row_stats) == 6 and all(s.verifier_forwards >= 1 for s in out.row_stats)


def test_rows_stop_at_their_own_eos():
    """eos ends each row separately; the batch goes on without it and the row is padded."""
    verifier = make_verifier(eos_token_id=None)
    prompts = make_prompts(5, seed=5)
    free = [verifier.generate(p, max_new_tokens=20, do_sample=False)[0, p.shape[1] :] for p in prompts]
    stop = free[0][6].item()  # the 7th token of row 0; other rows meet it at other times, or never
    verifier.generation_config.eos_token_id = stop
    for draft in (sh.Eagle3Speculator.from_verifier(verifier), perturbed_copy(verifier)):
        ids, mask = left_padded(prompts)
        out = sh.generate(verifier, draft, ids, mask, max_new_tokens=20, pad_token_id=0)
        verifier.generation_config.pad_token_id = 0
        assert_rows_exact(verifier, prompts, out, 20)
        lengths = [(row[ids.shape[1] :] != 0).sum().item() for row in out]
        assert lengths[0] == (free[0] == stop).nonzero()[0].item() + 1 and len(set(lengths)) > 1


def test_any_padding_side_gives_the_same_rows():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompts = make_prompts(4, seed=2)
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, p in enumerate(prompts):
        right_ids[i, : p.shape[1]], right_mask[i, : p.shape[1]] = p[0], 1
    left = sh.generate(verifier, draft, ids, mask, max_new_tokens=12)
    right = sh.generate(verifier, draft, right_ids, right_mask, max_new_tokens=12)
    assert torch.equal(left[:, width:], right[:, width:])


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_length_edges(max_new_tokens):
    verifier = make_verifier()
    prompts = make_prompts(3, seed=max_new_tokens)
    ids, mask = left_padded(prompts)
    for draft in (sh.Eagle3Speculator.from_verifier(verifier), perturbed_copy(verifier, noise=0.0)):
        out = sh.generate(verifier, draft, ids, mask, max_new_tokens=max_new_tokens)
        assert out.shape[1] <= ids.shape[1] + max_new_tokens
        assert_rows_exact(verifier, prompts, out, max_new_tokens)


def test_copy_of_verifier_accepts_whole_chains_in_every_row():
    """tau per row: a perfect draft emits k+1 tokens per verifier pass in every row."""
    verifier = make_verifier(eos_token_id=None)
    draft = sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier, speculative_tokens=5)
    prompts = make_prompts(4, seed=3)
    ids, mask = left_padded(prompts)
    out = sh.generate(verifier, draft, ids, mask, max_new_tokens=31, return_dict_in_generate=True)
    assert_rows_exact(verifier, prompts, out.sequences, 31)
    for stats in out.row_stats:  # prefill gives 1 token, then 5 rounds of 6
        assert stats.verifier_forwards == 6 and stats.tau == pytest.approx(31 / 6)
        assert stats.accepted_tokens == stats.drafted_tokens == 25
    assert draft.generation_stats.emitted_tokens == 4 * 31


def test_verifier_never_recomputes_the_prefix():
    """Each verifier pass after the prefill reads exactly the root plus the drafted tokens: the KV cache is
    kept and pruned to the accepted path, not recomputed."""
    verifier = make_verifier(eos_token_id=None)
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompts = make_prompts(3, seed=4)
    ids, mask = left_padded(prompts)
    widths = []
    handle = verifier.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        sh.generate(verifier, draft, ids, mask, max_new_tokens=12, tree="chain:3")
    finally:
        handle.remove()
    # root + 3 draft tokens per pass; only the last passes are cut to the tokens still allowed (12 new tokens)
    assert widths[0] == ids.shape[1] and widths[1] == 4 and set(widths[1:]) <= {2, 3, 4}, widths
    assert widths[1:].count(4) >= len(widths[1:]) - 3  # rooms 3, 2, 1: 2, 1 and 1 draft tokens


def test_compaction_keeps_the_output():
    verifier = make_verifier(eos_token_id=None)
    draft = perturbed_copy(verifier, noise=0.1)
    prompts = make_prompts(4, seed=8)
    ids, mask = left_padded(prompts)
    every_round = sh.generate(
        verifier, draft, ids, mask, max_new_tokens=24, compact_threshold=0.0, tree="dynamic:3:2:6"
    )
    never = sh.generate(verifier, draft, ids, mask, max_new_tokens=24, compact_threshold=1.0, tree="dynamic:3:2:6")
    assert torch.equal(every_round, never)
    assert_rows_exact(verifier, prompts, never, 24)


def test_masked_cache_keep_and_compact_preserve_attention():
    """Attention of a query over a MaskedCache equals attention over the alive entries alone."""
    torch.manual_seed(0)
    cache = MaskedCache(2)
    keys = torch.randn(2, 1, 6, 4)
    cache.cache.update(keys, keys.clone(), 0)
    cache.commit(torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool))
    block = torch.randn(2, 1, 3, 4)
    cache.cache.update(block, block.clone(), 0)
    cache.keep(torch.tensor([[2, 0, 0], [0, 1, 0]]), torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    assert cache.length == 9 and cache.alive.sum().item() == 5 + 3 + 4
    expect_k = [torch.cat([keys[0, 0, 1:], block[0, 0, [2, 0]]]), torch.cat([keys[1, 0, 3:], block[1, 0, [0, 1]]])]
    layer = cache.cache.layers[0]
    for row in range(2):
        assert torch.equal(layer.keys[row, 0][cache.alive[row]], expect_k[row])
    cache.compact()
    assert cache.length == 7 and cache.alive[1].tolist() == [False, False, True, True, True, True, True]
    for row in range(2):
        assert torch.equal(layer.keys[row, 0][cache.alive[row]], expect_k[row])
    assert causal_block(torch.tensor([[False, True]])).tolist() == [[[True, False], [False, True]]]


def test_unsupported_settings_fail_with_the_fix():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    with pytest.raises(ValueError, match="num_beams"):
        sh.generate(verifier, draft, make_prompts(1)[0], max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="tree spec"):
        sh.generate(verifier, draft, make_prompts(1)[0], max_new_tokens=4, tree="bushy")
