"""Token selection: the `Sampler` that picks every token, in transformers' assisted loop and the package's own.

What they promise: the token is the argmax (greedy) or a draw from softmax (sampling) of the scores AFTER the
logits processors, the scores returned are the distribution the token was drawn from, and every processor
sees the token sequence the scored position really has (the row's context, then the tree path to the node).
"""

from __future__ import annotations

import torch
from conftest import chi_square
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

from speculators_hf.generation.sampling import Sampler, choose
from speculators_hf.generation.tree import DraftTree


class Recorder:
    """A processor that records the sequences it is given and adds 0 to the scores."""

    def __init__(self):
        self.seen: list[list[list[int]]] = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.tolist())
        return scores


class BanToken:
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


def picked(processors, do_sample, ids, logits):
    sampler = Sampler(do_sample, row_processors=[processors])
    sampler.begin_round([0], None if ids is None else [ids[0]])
    return sampler.pick(logits)


def test_greedy_takes_the_argmax_after_the_processors():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    token, scores = picked([BanToken(1)], False, torch.tensor([[5, 6]]), logits)
    assert token.item() == 2 and scores[0, 1] == -float("inf")
    token, _ = picked([], False, None, logits)
    assert token.item() == 1


def test_sampling_draws_from_the_scores_it_returns():
    """20000 draws from one row of 6 tokens at temperature 0.5 with top-k 4: chi-square against softmax of the
    returned scores; a rule that draws at T=1 while returning T=0.5 scores fails the same test."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6).expand(20000, 6)
    sampler = Sampler(True, row_processors=[[TemperatureLogitsWarper(0.5), TopKLogitsWarper(4)]])
    tokens, scores = sampler.pick(logits)
    probs = torch.softmax(scores[0], -1)
    assert (probs > 0).sum() == 4
    stat, crit = chi_square(torch.bincount(tokens, minlength=6), probs)
    assert stat < crit
    wrong = choose(logits.float(), do_sample=True)  # drawn at T=1, top-k ignored
    stat, crit = chi_square(torch.bincount(wrong, minlength=6), probs)
    assert stat > crit


def test_processors_see_the_sequence():
    recorder = Recorder()
    picked([recorder], False, torch.tensor([[4, 5, 6]]), torch.zeros(1, 8))
    assert recorder.seen == [[[4, 5, 6]]]


def test_sampler_scores_each_position_on_its_own_sequence():
    """Rows with different contexts; a chain position's path is the tokens drafted before it."""
    recorder = Recorder()
    sampler = Sampler(do_sample=False, row_processors=[[recorder], [recorder]])
    assert not sampler.position_free
    sampler.begin_round([1, 0], [torch.tensor([7, 8, 9]), torch.tensor([3])])  # row 1 first, then row 0
    sampler.scores(torch.zeros(2, 5), torch.tensor([[1, 2], [3, 4]]))
    assert recorder.seen == [[[7, 8, 9, 1, 2]], [[3, 3, 4]]]


def test_sampler_block_scores_use_each_nodes_path():
    """Verified block of a tree: root (context only), nodes at depth 1 and 2 with their own ancestors."""
    recorder = Recorder()
    sampler = Sampler(do_sample=False, row_processors=[[recorder]])
    sampler.begin_round([0], [torch.tensor([9, 9])])
    # nodes: 0 (token 5, depth 1), 1 (token 6, depth 1), 2 (token 7, child of 1)
    tree = DraftTree(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, -1, 1]]), torch.tensor([[1, 1, 2]]), 2)
    sampler.block_scores(torch.zeros(1, 4, 10), tree)
    assert recorder.seen == [[[9, 9]], [[9, 9, 5], [9, 9, 6]], [[9, 9, 6, 7]]]


def test_sampler_matches_the_processors_run_one_sequence_at_a_time():
    """Repetition penalty (reads the sequence) over a batch with paths: the same scores as calling the
    processor on each full sequence separately."""
    torch.manual_seed(1)
    penalty = RepetitionPenaltyLogitsProcessor(2.0)
    sampler = Sampler(do_sample=False, row_processors=[[penalty], [penalty]])
    contexts = [torch.tensor([1, 2, 3]), torch.tensor([4, 4])]
    sampler.begin_round([0, 1], contexts)
    logits, paths = torch.randn(2, 3, 6), torch.tensor([[[5, 1], [0, 0], [2, 3]], [[1, 1], [5, 4], [0, 2]]])
    got = sampler.scores(logits, paths)
    for b in range(2):
        for k in range(3):
            ids = torch.cat([contexts[b], paths[b, k]])[None]
            torch.testing.assert_close(got[b, k], penalty(ids, logits[b, k][None].clone())[0])


def test_position_free_processors_run_once_over_the_batch():
    calls = []

    class Counted(TemperatureLogitsWarper):
        def __call__(self, input_ids, scores):
            calls.append(scores.shape)
            return super().__call__(input_ids, scores)

    sampler = Sampler(do_sample=True, row_processors=[[Counted(0.5)], [Counted(0.5)]])
    assert sampler.position_free
    sampler.begin_round([0, 1], None)
    out = sampler.scores(torch.ones(2, 3, 4))
    assert calls == [torch.Size([6, 4])] and torch.allclose(out, torch.full((2, 3, 4), 2.0))
