"""Token trees in `speculators_hf.generate`: EAGLE-2 dynamic trees, static trees, chains, verified in ONE
verifier pass per round with a tree attention mask. Greedy output equals the verifier alone for every
family; sampled output follows the verifier's distribution (KS test of the PIT values, and an exact
check of the acceptance rule on a tiny vocabulary)."""

from __future__ import annotations

import pytest
import torch
from conftest import ks_critical_value, ks_uniform_statistic, make_prompts, make_verifier, sampling_pit_values
from test_batch import DRAFTS, assert_rows_exact, left_padded, perturbed_copy

import speculators_hf as sh
from speculators_hf.generation.acceptance import Sampler, accept_greedy, accept_sampling
from speculators_hf.generation.tree import DraftTree, TreeSpec

TREES = {
    "dynamic": "dynamic:4:3:12",
    "dynamic-beam": "dynamic:4:3:7:1",  # the draft's greedy chain plus its best siblings
    "static": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]],
}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("draft_name", list(DRAFTS))
@pytest.mark.parametrize("tree", list(TREES))
def test_tree_greedy_exact_in_batches(family, draft_name, tree):
    verifier = make_verifier(family)
    draft = DRAFTS[draft_name](verifier)
    prompts = make_prompts(5, seed=11)
    ids, mask = left_padded(prompts)
    out = sh.generate(verifier, draft, ids, mask, tree=TREES[tree], max_new_tokens=16, return_dict_in_generate=True)
    assert_rows_exact(verifier, prompts, out.sequences, 16)
    assert out.stats.drafted_tokens > 0


@pytest.mark.parametrize("draft_name", ["eagle3", "eagle", "independent"])
def test_dynamic_tree_beats_its_own_chain_on_a_good_draft(draft_name):
    """A draft close to the verifier: the dynamic tree, verified in one pass per round, emits more tokens per
    pass than the chain of the same depth, and the output stays exact."""
    verifier = make_verifier(eos_token_id=None)
    # untrained EAGLE drafts rarely propose the verifier's token; a perturbed copy of the verifier often does
    draft = perturbed_copy(verifier, noise=0.08) if draft_name == "independent" else DRAFTS[draft_name](verifier)
    prompts = make_prompts(4, seed=1)
    ids, mask = left_padded(prompts)
    chain = sh.generate(verifier, draft, ids, mask, tree="chain:4", max_new_tokens=24, return_dict_in_generate=True)
    tree = sh.generate(
        verifier, draft, ids, mask, tree="dynamic:4:4:24", max_new_tokens=24, return_dict_in_generate=True
    )
    assert torch.equal(chain.sequences, tree.sequences)
    assert_rows_exact(verifier, prompts, tree.sequences, 24)
    if draft_name == "independent":
        assert tree.stats.tau > chain.stats.tau
    assert tree.stats.tau >= 1.0


def test_one_verifier_pass_per_round_over_the_whole_tree():
    verifier = make_verifier(eos_token_id=None)
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    widths = []
    handle = verifier.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        out = sh.generate(
            verifier,
            draft,
            make_prompts(1, seed=3)[0],
            tree="dynamic:3:2:5",
            max_new_tokens=10,
            return_dict_in_generate=True,
        )
    finally:
        handle.remove()
    # root + total_tokens per round; the last rounds are cut to the tokens still allowed (depth 1: root + top_k)
    assert widths[1] == 6 and set(widths[1:]) <= {3, 6}, widths
    assert out.stats.verifier_forwards == len(widths)


@pytest.mark.parametrize(("tree", "size", "beam"), [("dynamic:5:3:10", 10, 3), ("dynamic:5:3:8:1", 8, 1)])
def test_dynamic_tree_shape_and_rerank(tree, size, beam):
    """EAGLE-2 expansion: parents first, every node's parent kept, depths consistent, no duplicate siblings;
    the draft is fed `beam` nodes per depth, so at most `beam` nodes of a depth have children."""
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompts = make_prompts(3, seed=5)
    ids, mask = left_padded(prompts)
    seen, fed = [], []
    import speculators_hf.generation.loop as loop

    original = loop.build_tree

    def recording(*args, **kwargs):
        seen.append((args[2], original(*args, **kwargs)))  # (the round's spec, the tree drafted)
        return seen[-1][1]

    def counting(state, handles, tokens, *args):
        fed.append(tokens.shape[1])
        return type(draft).tree_expand(draft, state, handles, tokens, *args)

    loop.build_tree, draft.tree_expand = recording, counting
    try:
        sh.generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=8)
    finally:
        loop.build_tree = original
    assert set(fed) == {beam}
    assert seen[0][1].size == size  # the last rounds may be cut to the tokens still allowed
    for round_spec, drafted in seen:
        assert drafted.size == round_spec.num_nodes <= size
        for row in range(drafted.tokens.shape[0]):
            parents, depths = drafted.parents[row].tolist(), drafted.depths[row].tolist()
            tokens = drafted.tokens[row].tolist()
            pairs = set()
            for i, (p, d) in enumerate(zip(parents, depths)):
                assert p < i and d == (1 if p < 0 else depths[p] + 1)
                assert (p, tokens[i]) not in pairs
                pairs.add((p, tokens[i]))
            for depth in set(depths):
                assert len({p for p, d in zip(parents, depths) if d == depth + 1}) <= beam
        anc = drafted.block_ancestors
        assert anc[:, :, 0].all() and torch.equal(anc.diagonal(dim1=1, dim2=2), torch.ones_like(anc[:, :, 0]))


def test_static_tree_is_clamped_to_what_the_mlp_speculator_predicts():
    verifier = make_verifier()
    draft = sh.MLPSpeculator.from_verifier(verifier, n_predict=2)
    prompts = make_prompts(3, seed=6)
    ids, mask = left_padded(prompts)
    for tree in ("chain:5", "dynamic:5:2:8", TREES["static"]):
        out = sh.generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=12)
        assert_rows_exact(verifier, prompts, out, 12)


def test_medusa_static_tree_reads_head_d_at_depth_d():
    """Medusa heads in a tree (root children from head 0, the children of depth-d nodes from head d,
    whatever the parent): exact, with the static tree cut to the number of heads."""
    verifier = make_verifier()
    draft = sh.MedusaSpeculator.from_verifier(verifier, medusa_num_heads=3)
    assert draft.max_tree_depth() == 3
    prompts = make_prompts(4, seed=9)
    ids, mask = left_padded(prompts)
    medusa_tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]  # the depth-4 path is cut
    out = sh.generate(verifier, draft, ids, mask, tree=medusa_tree, max_new_tokens=40, return_dict_in_generate=True)
    assert_rows_exact(verifier, prompts, out.sequences, 40)
    # 7 nodes per round and per row (the depth-4 path cut), but in the last rounds, cut to the tokens left
    per_row = [s.drafted_tokens / s.draft_rounds for s in out.row_stats]
    assert max(per_row) == 7 and min(per_row) > 5, per_row


def test_tree_spec_parsing():
    assert TreeSpec.parse(None, default_depth=3) == TreeSpec.chain(3)
    assert TreeSpec.parse("dynamic:6:10:60") == TreeSpec.dynamic(6, 10, 60)
    assert TreeSpec.parse("dynamic:6:3:9:1") == TreeSpec.dynamic(6, 3, 9, beam=1)
    with pytest.raises(ValueError, match=r"beam \(4\) cannot exceed top_k \(3\)"):
        TreeSpec.parse("dynamic:6:3:9:4")
    assert TreeSpec.parse("[[0], [0, 1], [0, 0]]").choices == ((0,), (0, 0), (0, 1))
    with pytest.raises(ValueError, match="no parent path"):
        TreeSpec.static([[0, 1]])
    assert TreeSpec.dynamic(6, 2).clamped(3).depth == 3
    assert TreeSpec.parse("chain:10:0.4") == TreeSpec.chain(10, stop_below=0.4)
    assert TreeSpec.chain(10, stop_below=0.4).clamped(3) == TreeSpec.chain(3, stop_below=0.4)
    with pytest.raises(ValueError, match=r"stop_below is a probability in \[0, 1\)"):
        TreeSpec.parse("chain:10:1.5")
    with pytest.raises(ValueError, match="for chains"):
        TreeSpec("dynamic", stop_below=0.3)
    with pytest.raises(ValueError, match="numbers expected"):
        TreeSpec.parse("chain:10:high")


def test_a_chain_stops_where_the_draft_doubts_itself_and_stays_exact():
    """`chain:D:p` stops drafting once the draft's probability of the whole chain is below p (mean over rows):
    fewer tokens drafted per round the higher p, never a different output (the stop reads only the draft)."""
    verifier = make_verifier(eos_token_id=None)
    draft = perturbed_copy(verifier, noise=0.08)
    prompts = make_prompts(4, seed=1)
    ids, mask = left_padded(prompts)
    per_round = {}
    for tree in ("chain:6", "chain:6:0.0", "chain:6:0.01", "chain:6:0.5"):
        out = sh.generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=24, return_dict_in_generate=True)
        assert_rows_exact(verifier, prompts, out.sequences, 24)
        per_round[tree] = out.stats.drafted_tokens / out.stats.draft_rounds
    assert per_round["chain:6:0.0"] == per_round["chain:6"]  # a probability is never below 0
    assert per_round["chain:6:0.5"] < per_round["chain:6:0.01"] < per_round["chain:6"]


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------
def test_acceptance_rule_keeps_the_distribution_exactly():
    """Recursive rejection on a tiny vocabulary: the first emitted token is distributed as the verifier's p,
    for deterministic siblings (point masses) and for a chain token drawn from the draft's q; chi-square
    over 20000 draws."""
    torch.manual_seed(0)
    vocab, draws = 6, 20000
    p_logits = torch.randn(vocab) * 1.5
    p = torch.softmax(p_logits, -1)
    logits = p_logits.expand(draws, 4, vocab).clone()
    # tree: root -> children 3 and 1 (deterministic), child 3 -> its child 0
    tree = DraftTree(
        tokens=torch.tensor([3, 1, 0]).expand(draws, 3),
        parents=torch.tensor([-1, -1, 0]).expand(draws, 3),
        depths=torch.tensor([1, 1, 2]).expand(draws, 3),
        max_depth=2,
    )
    q = torch.softmax(torch.randn(vocab), -1)
    chain_tokens = torch.multinomial(q, draws, replacement=True)
    chain = DraftTree(
        tokens=torch.stack([chain_tokens, torch.zeros_like(chain_tokens)], 1),
        parents=torch.tensor([-1, 0]).expand(draws, 2),
        depths=torch.tensor([1, 2]).expand(draws, 2),
        max_depth=2,
        q=torch.stack([q, q]).expand(draws, 2, vocab),
    )
    sampler = Sampler(do_sample=True, generator=torch.Generator().manual_seed(1))
    root = torch.zeros(draws, dtype=torch.long)
    for drafted in (tree, chain):
        _path, emitted, counts = accept_sampling(logits[:, : drafted.size + 1], drafted, root, sampler)
        freq = torch.bincount(emitted[:, 0], minlength=vocab).float()
        chi2 = ((freq - draws * p) ** 2 / (draws * p)).sum().item()
        assert chi2 < 25.0, (chi2, freq / draws, p)  # 5 degrees of freedom: P(chi2 > 25) < 2e-4
        assert (counts >= 1).all() and (counts > 1).any()
    greedy_path, greedy_emitted, greedy_counts = accept_greedy(logits[:, :4], tree, root)
    assert greedy_emitted[0, 0].item() == p.argmax().item() and greedy_path[0, 0].item() == 0
    assert greedy_counts[0].item() == (2 if p.argmax().item() in (1, 3) else 1)


def test_greedy_acceptance_walks_the_tree_like_the_definition():
    """`accept_greedy` (vectorized over ancestors) against the definition: from the root, move to the child
    whose token is the verifier's argmax after the current node, while there is one. Random trees with
    distinct sibling tokens, a tiny vocabulary so that long paths are accepted."""
    gen = torch.Generator().manual_seed(3)
    vocab = 4
    for _ in range(300):
        batch, n = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 13, (1,), generator=gen))
        parents = torch.full((batch, n), -1)
        tokens = torch.zeros(batch, n, dtype=torch.long)
        depths = torch.ones(batch, n, dtype=torch.long)
        for b in range(batch):
            used: dict[int, set[int]] = {}
            for i in range(n):
                open_parents = [p for p in range(-1, i) if len(used.get(p, ())) < vocab]
                p = open_parents[int(torch.randint(len(open_parents), (1,), generator=gen))]
                free = [t for t in range(vocab) if t not in used.get(p, set())]
                t = free[int(torch.randint(len(free), (1,), generator=gen))]
                used.setdefault(p, set()).add(t)
                parents[b, i], tokens[b, i] = p, t
                depths[b, i] = 1 if p < 0 else depths[b, p] + 1
        tree = DraftTree(tokens, parents, depths, int(depths.max()))
        logits = torch.randn(batch, n + 1, vocab, generator=gen)
        root = torch.zeros(batch, dtype=torch.long)
        path, emitted, counts = accept_greedy(logits, tree, root)
        target = logits.argmax(-1)
        for b in range(batch):
            want_path, cur = [0], 0
            while True:
                nxt = [j + 1 for j in range(n) if parents[b, j] + 1 == cur and tokens[b, j] == target[b, cur]]
                if not nxt:
                    break
                cur = nxt[0]
                want_path.append(cur)
            count = int(counts[b])
            assert path[b, :count].tolist() == want_path
            assert emitted[b, :count].tolist() == target[b, want_path].tolist()


def _pit_ks(verifier, draft, prompt, tree, n_rows, calls, max_new_tokens=8, **sampling):
    sequences, stats = [], sh.GenerationStats()
    ids = prompt.expand(n_rows, -1)
    for call in range(calls):
        torch.manual_seed(100 + call)
        out = sh.generate(
            verifier, draft, ids, tree=tree, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
            return_dict_in_generate=True, **sampling,
        )  # fmt: skip
        stats = stats + out.stats
        for row in out.sequences:
            length = prompt.shape[1] + (row[prompt.shape[1] :] != verifier.generation_config.pad_token_id).sum().item()
            sequences.append(row[None, :length])
    values = sampling_pit_values(verifier, sequences, prompt.shape[1], sampling.get("temperature", 1.0))
    return ks_uniform_statistic(values), ks_critical_value(len(values), 1e-3), stats


@pytest.mark.parametrize(
    "draft_name,tree,min_accepted",
    [
        ("eagle3", "dynamic:3:3:8", 0),
        ("independent-perturbed", "chain:4", 200),  # drawn from q: accepted with min(1, p/q)
        ("independent-perturbed", "chain:6:0.3", 100),  # chains cut where the draft's own q of them is low
        ("independent-perturbed", "dynamic:3:2:6", 20),  # top-k siblings (point masses): accepted with p(x)
        ("independent-perturbed", [[0], [1], [0, 0], [1, 0]], 20),
    ],
)
def test_sampling_with_trees_and_batches_follows_the_verifier(draft_name, tree, min_accepted):
    """150 sampled continuations (6 calls of 25 rows) of 8 tokens: PIT values under the verifier's exact
    conditionals are Uniform(0, 1) (KS at false-alarm rate 1e-3)."""
    verifier = make_verifier(pad_token_id=None)  # pad 0 may be sampled; no pad id -> rows are not cut
    verifier.generation_config.pad_token_id = -1
    draft = DRAFTS[draft_name](verifier)
    stat, crit, stats = _pit_ks(verifier, draft, make_prompts(1, seed=3)[0], tree, n_rows=25, calls=6)
    assert stat < crit, f"KS {stat:.4f} >= {crit:.4f}"
    assert stats.accepted_tokens >= min_accepted  # the acceptance branches were exercised


def test_sampling_check_has_power_against_a_wrong_rule():
    """The same KS test rejects a loop that accepts every drafted token."""
    import speculators_hf.generation.loop as loop

    verifier = make_verifier(pad_token_id=None)
    verifier.generation_config.pad_token_id = -1
    draft = perturbed_copy(verifier, noise=0.3)
    original = loop.accept_sampling

    def accept_all(logits, tree, root, sampler):
        path, emitted, counts = original(logits, tree, root, sampler)
        n = tree.size
        full = torch.arange(n + 1, device=path.device).expand(path.shape[0], n + 1)
        return full, torch.cat([tree.tokens, emitted[:, -1:]], 1), torch.full_like(counts, n + 1)

    loop.accept_sampling = accept_all
    try:
        stat, crit, _ = _pit_ks(verifier, draft, make_prompts(1, seed=3)[0], "chain:3", n_rows=25, calls=6)
    finally:
        loop.accept_sampling = original
    assert stat > crit


def test_sampling_with_temperature_and_top_k_runs():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    ids, mask = left_padded(make_prompts(3, seed=4))
    out = sh.generate(
        verifier, draft, ids, mask, tree="dynamic:3:2:6", max_new_tokens=10, do_sample=True, temperature=0.7, top_k=5
    )
    assert out.shape[1] <= ids.shape[1] + 10
    assert not out.is_inference()  # the rounds run in inference mode; what is returned is an ordinary tensor
    out[:, -1] = 0


def test_assisted_path_still_works_after_tree_loop():
    """The same bound draft serves transformers' assisted generation after the package's loop."""
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompt = make_prompts(1, seed=2)[0]
    sh.generate(verifier, draft, prompt, tree="dynamic:3:2:6", max_new_tokens=8)
    ref = verifier.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(ref, verifier.generate(prompt, max_new_tokens=10, do_sample=False, assistant_model=draft))
    assert torch.equal(ref, sh.generate(verifier, draft, prompt, max_new_tokens=10))
