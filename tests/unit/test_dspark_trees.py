"""DSpark token trees (`tree="dynamic:..."`, static rank paths, `"auto"`) in the package's own loop: the logits
after every node of a drafted tree equal the library's forward along that node's own path (the block pass once,
then the Markov steps of the path's tokens; checks that reject a node handed its sibling's token or rnn state),
greedy output equal to the verifier alone for every Markov head, with and without `sample_from_anchor`, also in
left-padded batches, and sampled output that follows the verifier. DFlash2's trees (each node's slot rescored
after its own token) pass the same path check. Which families draft trees (`drafts_trees`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_prompts, make_verifier
from test_dflash2 import bigram_pair as dflash2_bigram_pair
from test_dflash2 import golden_draft as dflash2_golden_draft
from test_dspark import _sampled_pit, bigram_pair, golden_draft, left_padded, strong_markov

import speculators_hf as sh
from speculators_hf.bench import _can_draft
from speculators_hf.generation import loop, policy
from speculators_hf.generation.policy import DraftingCosts
from speculators_hf.generation.sampling import Sampler
from speculators_hf.generation.tree import TreeSpec, _FedNodes, build_tree

STATIC = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]  # depth 4: cut to the block
TREES = {"dynamic": "dynamic:4:3:10", "dynamic-beam": "dynamic:4:3:7:1", "static": STATIC}


def drafted_logits(draft, prompts: torch.Tensor, states: list[torch.Tensor], tree) -> dict[tuple, torch.Tensor]:
    """One greedy tree `tree` drafted after each row of `prompts` [B, n] (the verifier's states `states` at
    positions 0 .. n-2): {(row, path): logits} of the token after the root (path ()) and after each node fed to
    the draft (path: the tokens from the root to it), as the tree was picked from them."""
    batch, n = prompts.shape
    paths: list[list[tuple[int, ...]]] = [[] for _ in range(batch)]  # per row, by fed index
    seen: dict[tuple, torch.Tensor] = {}
    expand = _FedNodes.expand

    def recording(fed, tokens, depth, parents):
        logits, index = expand(fed, tokens, depth, parents)
        for b in range(batch):
            for j in range(tokens.shape[1]):
                above = () if parents is None else paths[b][int(parents[b, j])]
                paths[b].append((*above, int(tokens[b, j])))
                seen[b, paths[b][-1]] = logits[b, j]
        return logits, index

    positions = torch.arange(n).expand(batch, n)
    state = draft.new_tree_state(batch)
    features = [F.pad(s, (0, 0, 1, 0)) for s in states]  # the state BEFORE each token
    _FedNodes.expand = recording
    try:
        with torch.no_grad():
            root_logits, root_handle = draft.tree_extend(
                state, prompts, positions, torch.ones_like(prompts) > 0, features
            )
            build_tree(draft, state, TreeSpec.parse(tree), Sampler(False), root_logits, root_handle, positions[:, -1])
    finally:
        _FedNodes.expand = expand
    return {**{(b, ()): root_logits[b] for b in range(batch)}, **seen}


def path_reference(draft, prompts: torch.Tensor, states: list[torch.Tensor], keys: list[tuple]) -> torch.Tensor:
    """The logits after each (row, path) of `keys` from scratch: the library's forward (`parallel_forward`) of the
    block at the row's newest token whose data continue with the path, at the slot after the path's end (its bias
    from the path's last token, its rnn state run along the path from the block's start)."""
    n, k = prompts.shape[1], draft.config.tokens_per_block
    rows = torch.tensor([b for b, _ in keys])
    paths = torch.tensor([[*path, *[0] * (k - len(path))] for _, path in keys])  # after the path: unread
    ids = torch.cat([prompts[rows], paths], dim=1)
    features = [torch.cat([s[rows], s.new_zeros(len(keys), k + 1, s.shape[-1])], dim=1) for s in states]
    with torch.no_grad():
        logits = draft.parallel_forward(ids, features, torch.full((len(keys), 1), n - 1))
    slots = int(not draft.config.sample_from_anchor) + torch.tensor([len(path) for _, path in keys])
    return draft.expand_vocab(logits[torch.arange(len(keys)), 0, slots])


def wrong_nodes(draft, tree, seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """The (row, path) of the root and every fed node of a tree drafted after two random prompts: those whose
    logits differ from `path_reference`, and all of them."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 90, (2, 9), generator=gen)
    states = [torch.randn(2, 8, 32, generator=gen) for _ in draft.verifier_layer_ids()]
    got = drafted_logits(draft, prompts, states, tree)
    keys = list(got)
    want = path_reference(draft, prompts, states, keys)
    wrong = [key for key, w in zip(keys, want) if not torch.allclose(got[key], w, rtol=1e-5, atol=1e-5)]
    return wrong, keys


# the library's drafts: DSpark's W1 rows are N(0, 0.3) (the bias matters); DFlash2's selectors keep 4 and 6
# candidates (a top-5 tree ranks tokens of probability 0 too)
GOLDEN_DRAFTS = {
    **{f"dspark-{v}": lambda v=v: golden_draft(v) for v in ("vanilla", "gated", "rnn", "rnn-bonus-anchor")},
    **{f"dflash2-{v}": lambda v=v: dflash2_golden_draft(v) for v in ("default", "anchor-k3")},
}


@pytest.mark.parametrize("tree", ["dynamic:4:3:10", "dynamic:9:2:12", "dynamic:3:5:14", STATIC])  # 9: cut
@pytest.mark.parametrize("name", list(GOLDEN_DRAFTS))
def test_every_node_has_the_logits_of_its_own_path(name, tree):
    """Each node's logits against the library's forward along its path, in a batch of two rows."""
    draft = GOLDEN_DRAFTS[name]()
    wrong, checked = wrong_nodes(draft, tree)
    assert wrong == []
    depths = [len(path) for _, path in checked]
    # as deep as asked, but never past the block's last slot
    assert max(depths) == TreeSpec.parse(tree).clamped(draft.config.tokens_per_block).depth - 1
    assert sum(depth > 1 for depth in depths) >= 2  # nodes whose rnn state continues a parent's other than the root


def _sibling_handles(tree_expand):
    """Mutant: each node continues the rnn state of its neighbour's parent (its sibling's, or a cousin's)."""

    def mutant(self, state, handles, tokens, *args):
        return tree_expand(self, state, handles.roll(1, dims=1), tokens, *args)

    return mutant


def _sibling_tokens(tree_expand):
    """Mutant: each node's step reads its neighbour's token (the bias and the rnn input of a sibling)."""

    def mutant(self, state, handles, tokens, *args):
        return tree_expand(self, state, handles, tokens.roll(1, dims=1), *args)

    return mutant


@pytest.mark.parametrize(
    "name, mutant, shallowest",
    [
        ("dspark-rnn", _sibling_handles, 2),  # depth-1 nodes all continue the root's state: first wrong at depth 2
        ("dspark-rnn-bonus-anchor", _sibling_handles, 2),
        ("dspark-vanilla", _sibling_tokens, 1),
        ("dspark-rnn", _sibling_tokens, 1),
        ("dflash2-default", _sibling_tokens, 1),
    ],
)
def test_the_path_check_rejects_a_node_given_its_siblings_state_or_token(name, mutant, shallowest, monkeypatch):
    draft = GOLDEN_DRAFTS[name]()
    monkeypatch.setattr(type(draft), "tree_expand", mutant(type(draft).tree_expand))
    wrong, _ = wrong_nodes(draft, "dynamic:4:3:10")
    assert wrong and min(len(path) for _, path in wrong) == shallowest


@pytest.mark.parametrize("sample_from_anchor", [True, False])
@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_greedy_trees_are_exact_alone_and_in_left_padded_batches(kind, sample_from_anchor):
    """Against a verifier close to the draft's table (`bigram_pair`, attention at 5%): trees accept drafted
    tokens, and every output is the verifier's alone."""
    verifier, draft = bigram_pair(kind, sample_from_anchor, attention=0.05, eos_token_id=None)
    prompts = make_prompts(4, seed=7)
    for prompt in prompts[:2]:
        ref = verifier.generate(prompt, max_new_tokens=14, do_sample=False)
        for tree in TREES.values():
            assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree=tree, max_new_tokens=14)), tree
    ids, mask = left_padded(prompts)
    for tree in (TREES["dynamic"], STATIC):
        out = sh.generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=12, return_dict_in_generate=True)
        for i, prompt in enumerate(prompts):
            ref = verifier.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
            assert torch.equal(out.sequences[i, ids.shape[1] :], ref), (tree, i)
        assert out.stats.accepted_tokens > out.stats.draft_rounds  # more than one token a round: trees accepted


@pytest.mark.parametrize("top_k", [None, 2])
def test_dflash2_greedy_trees_are_exact_in_left_padded_batches(top_k):
    """Against a verifier close to DFlash2's table (`bigram_pair` of test_dflash2): trees accept drafted tokens;
    with 2 selector candidates (the unary top 2, near ties: few accepted) a tree's third rank is a token of
    probability 0, and the output stays exact."""
    verifier, draft = dflash2_bigram_pair(top_k, attention=0.05, eos_token_id=None)
    prompts = make_prompts(4, seed=7)
    ids, mask = left_padded(prompts)
    for tree in ("dynamic:3:3:8", [[0], [1], [2], [0, 0], [0, 1], [0, 0, 0]]):
        out = sh.generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=12, return_dict_in_generate=True)
        for i, prompt in enumerate(prompts):
            ref = verifier.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
            assert torch.equal(out.sequences[i, ids.shape[1] :], ref), (tree, i)
        assert top_k or out.stats.accepted_tokens > out.stats.draft_rounds


@pytest.mark.parametrize("fields", [{"markov_head_type": "rnn"}, {"markov_rank": 0, "enable_confidence_head": False}])
def test_greedy_trees_are_exact_with_a_strong_path_state_and_without_a_markov_head(fields):
    """A random draft (rnn state and bias that decide each node's logits), and one without a Markov head (the
    block's slot alone, the same for every node of a depth)."""
    verifier = make_verifier("qwen3")
    draft = sh.DSparkSpeculator.from_verifier(
        verifier, draft_vocab_size=64, block_size=4, **{"markov_rank": 16, **fields}
    )
    if draft.markov_head is not None:
        strong_markov(draft)
    prompts = make_prompts(3, seed=5)
    ids, mask = left_padded(prompts)
    for tree in TREES.values():
        out = sh.generate(verifier, draft, ids, mask, tree=tree, max_new_tokens=12)
        for i, prompt in enumerate(prompts):
            ref = verifier.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
            assert torch.equal(out[i, ids.shape[1] : ids.shape[1] + ref.shape[0]], ref), (tree, i)


@pytest.mark.parametrize("kind, tree", [("rnn", "dynamic:3:3:8"), ("gated", [[0], [1], [0, 0], [1, 0], [0, 0, 0]])])
def test_sampled_trees_follow_the_verifier(kind, tree):
    """150 sampled continuations with trees whose nodes are the draft's top-k (point masses, accepted with p(x)):
    PIT values under the verifier's exact conditionals are Uniform(0, 1)."""
    stat, crit = _sampled_pit(tree, kind, accepted=100)
    assert stat < crit


FAMILIES = {
    "dspark": (lambda v: sh.DSparkSpeculator.from_verifier(v, draft_vocab_size=64, block_size=4, markov_rank=16), True),
    "dflash2": (
        lambda v: sh.DFlash2Speculator.from_verifier(v, block_size=4, selector_rank=16, selector_top_k=8),
        True,
    ),
    "dflash": (lambda v: sh.DFlashSpeculator.from_verifier(v, draft_vocab_size=64, block_size=4), False),
    "peagle": (lambda v: sh.PEagleSpeculator.from_verifier(v, draft_vocab_size=64), False),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_auto_verifies_trees_where_width_is_free_for_drafts_that_branch(name, monkeypatch):
    """`tree="auto"` with a verifier pass whose width costs nothing: DSpark and DFlash2 get dynamic trees (exact),
    DFlash and P-EAGLE chains; `bench` skips a tree only for the latter; a tree given to them is refused."""
    make, branches = FAMILIES[name]
    verifier = make_verifier(eos_token_id=None)
    draft = make(verifier)
    assert draft.drafts_trees is branches and _can_draft(draft, "dynamic:3:2:4") is branches
    free = DraftingCosts({1: 1e-3, 64: 1e-3}, draft_step=0.0, emitted=1.0, round_seconds=1e-3, smoothing=0.0)
    monkeypatch.setattr(policy, "drafting_costs", lambda *args, **kwargs: free)
    specs, original = [], loop.build_tree

    def recording(*args, **kwargs):
        specs.append(args[2].kind)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "build_tree", recording)
    prompts = make_prompts(3, seed=11)
    ids, mask = left_padded(prompts)
    out = sh.generate(verifier, draft, ids, mask, tree="auto", max_new_tokens=12)
    for i, prompt in enumerate(prompts):
        ref = verifier.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
        assert torch.equal(out[i, ids.shape[1] :], ref), i
    assert ("dynamic" in specs) is branches and specs
    if not branches:
        with pytest.raises(ValueError, match="drafts a chain in one forward pass and defines no trees; use a chain"):
            sh.generate(verifier, draft, ids, mask, tree="dynamic:3:2:4", max_new_tokens=4)
