# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.tree. Do not edit.
"""Draft trees: their shapes (`TreeSpec`), the drafted tree of one round (`DraftTree`) and how a bound draft
grows one (`build_tree`), for any family implementing `tree_extend` / `tree_expand`.

Shapes:
- chain(depth): one token per depth (argmax, or a draw from the draft's distribution when sampling);
- dynamic(depth, top_k, total_tokens, beam) (EAGLE-2): from the root, keep the `beam` (default `top_k`)
  nodes of highest cumulative draft log-probability at each depth, expand each into its `top_k` best
  children, and finally rerank every candidate by cumulative log-probability and verify the best
  `total_tokens`. A child's score never exceeds its parent's, and ties go to the earlier (shallower)
  candidate, so the kept set always holds every kept node's ancestors. The draft's work per depth grows
  with `beam`, the verifier's with `total_tokens`: where a wide draft step costs more than a narrow one
  (a CPU), a small beam keeps the draft's cost that of a chain while the rerank still spends the
  verified nodes on the likeliest alternatives (beam 1: the draft's greedy chain plus its best siblings);
- static(choices) (Medusa, EAGLE-1): a fixed set of paths of ranks, e.g. (0,), (1,), (0, 0): the best
  and second-best first token, and the best token after the best one.

A round feeds the draft only the nodes whose children are needed, depth by depth (`tree_expand`), each
attending to the row's context and to its own ancestors among the nodes fed this round. Nodes are
returned parents first, so a node's parent always has a smaller index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch


@dataclass(frozen=True)
class TreeSpec:
    """The shape of the draft tree of every round."""

    kind: str = "chain"  # "chain", "dynamic" or "static"
    depth: int = 5  # draft tokens on the longest path
    top_k: int = 4  # dynamic: children of each expanded node
    total_tokens: int | None = None  # dynamic: nodes verified per round (default: top_k * depth)
    beam: int | None = None  # dynamic: nodes expanded per depth (default: top_k)
    choices: tuple[tuple[int, ...], ...] = ()  # static: paths of ranks
    stop_below: float | None = None  # chain: stop once the draft's probability of the chain (row mean) is below
    # chain with stop_below: per depth, what the chain's probability is multiplied by before that comparison (auto:
    # that depth's calibration and its cost against the base threshold's); past its end the last; empty: 1
    stop_scale: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("chain", "dynamic", "static"):
            raise ValueError(f"tree kind must be 'chain', 'dynamic' or 'static', got {self.kind!r}")
        if self.kind == "static":
            if not self.choices:
                raise ValueError("a static tree needs choices, e.g. [[0], [1], [0, 0]]")
            paths = set(self.choices)
            for path in self.choices:
                if not path or min(path) < 0:
                    raise ValueError(f"static tree path {list(path)} must be a non-empty list of ranks >= 0")
                if len(path) > 1 and path[:-1] not in paths:
                    raise ValueError(f"static tree path {list(path)} has no parent path {list(path[:-1])} in choices")
            object.__setattr__(self, "depth", max(len(p) for p in self.choices))
        if self.depth < 1 or self.top_k < 1 or any(n is not None and n < 1 for n in (self.total_tokens, self.beam)):
            raise ValueError(f"tree depth, top_k, total_tokens and beam must be >= 1, got {self}")
        if self.stop_below is not None and not (self.kind == "chain" and 0.0 <= self.stop_below < 1.0):
            raise ValueError(f"stop_below is a probability in [0, 1) for chains, got {self.stop_below} for {self.kind}")
        if self.beam is not None and self.beam > self.top_k:
            raise ValueError(
                f"tree beam ({self.beam}) cannot exceed top_k ({self.top_k}): a depth has top_k nodes to expand at first"
            )

    @classmethod
    def chain(cls, depth: int, stop_below: float | None = None, stop_scale: tuple[float, ...] = ()) -> TreeSpec:
        return cls("chain", depth=depth, stop_below=stop_below, stop_scale=tuple(stop_scale))

    @classmethod
    def dynamic(
        cls, depth: int = 5, top_k: int = 4, total_tokens: int | None = None, beam: int | None = None
    ) -> TreeSpec:
        return cls("dynamic", depth=depth, top_k=top_k, total_tokens=total_tokens, beam=beam)

    @classmethod
    def static(cls, choices: Any) -> TreeSpec:
        paths = tuple(sorted({tuple(int(r) for r in path) for path in choices}, key=lambda p: (len(p), p)))
        return cls("static", choices=paths)

    @classmethod
    def parse(cls, value: Any, default_depth: int = 5) -> TreeSpec:
        """A spec from a `TreeSpec`, None (chain of `default_depth`), "chain[:depth[:stop_below]]",
        "dynamic[:depth[:top_k[:total_tokens[:beam]]]]", or static choices (a list of paths, or its JSON)."""
        if value is None:
            return cls.chain(default_depth)
        if isinstance(value, TreeSpec):
            return value
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = json.loads(value)
        if isinstance(value, (list, tuple)):
            return cls.static(value)
        kind, *numbers = str(value).split(":")
        probability = numbers.pop() if kind == "chain" and len(numbers) == 2 else None  # chain:depth:stop_below
        try:
            args = [int(n) for n in numbers]
            stop_below = None if probability is None else float(probability)
        except ValueError:
            raise ValueError(f"cannot read tree spec {value!r}: numbers expected after the kind") from None
        if stop_below is not None:
            return cls.chain(args[0], stop_below=stop_below)
        if kind == "chain" and len(args) <= 1:
            return cls.chain(args[0] if args else default_depth)
        if kind == "dynamic" and len(args) <= 4:
            return cls.dynamic(*(args or [default_depth]))
        raise ValueError(
            f"cannot read tree spec {value!r}; use 'chain:5', 'chain:10:0.4' (stop once the draft's probability of "
            "the chain is below 0.4), 'dynamic:5:4:16[:beam]' (depth, top_k, total_tokens) "
            "or a JSON list of rank paths for a static tree"
        )

    @property
    def num_nodes(self) -> int:
        """Draft tokens verified per round (the verifier's pass also reads the root, one more)."""
        if self.kind == "chain":
            return self.depth
        if self.kind == "static":
            return len(self.choices)
        beam = self.beam or self.top_k
        pool = self.top_k + (self.depth - 1) * beam * self.top_k
        return min(self.total_tokens or self.top_k * self.depth, pool)

    def clamped(self, max_depth: int | None) -> TreeSpec:
        """The spec cut to a draft that predicts at most `max_depth` tokens ahead (MLP speculator, Medusa)."""
        if max_depth is None or self.depth <= max_depth:
            return self
        if self.kind == "static":
            return TreeSpec.static([p for p in self.choices if len(p) <= max_depth])
        return replace(self, depth=max_depth)


@dataclass
class DraftTree:
    """The tree drafted in one round, per batch row. Node i has token `tokens[:, i]`, depth `depths[:, i]`
    (1 = a child of the root) and parent `parents[:, i]` (-1 = the root, else a smaller node index).
    `q` [B, N, V]: for nodes drawn from a draft distribution (sampled chains), that distribution; None
    when every node was chosen deterministically. `scores` [B, N, V] (chains): the processed scores each
    node was picked from (what transformers' assisted loop is handed as the draft's scores)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    max_depth: int
    q: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    confidence: torch.Tensor | None = None  # chains stopped on confidence: [B, N] the draft's p of the chain so far

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def block_ancestors(self) -> torch.Tensor:
        """Bool [B, N+1, N+1] ancestor-or-self mask of the verified block (root at index 0, then the nodes),
        built one depth at a time: every block entry marks its current ancestor, then steps to its parent."""
        batch, n = self.tokens.shape
        device = self.tokens.device
        block_parents = torch.cat([self.tokens.new_zeros(batch, 1), self.parents + 1], dim=1)  # the root: itself
        anc = torch.eye(n + 1, dtype=torch.bool, device=device).repeat(batch, 1, 1)
        above = block_parents
        for _ in range(self.max_depth):
            anc.scatter_(2, above[:, :, None], True)
            above = block_parents.gather(1, above)
        return anc


class _FedNodes:
    """Tree nodes fed to the draft this round, with their ancestor-or-self mask among themselves."""

    def __init__(self, draft: Any, state: Any, root_handle: torch.Tensor, root_positions: torch.Tensor):
        self.draft, self.state = draft, state
        self.root_handle, self.root_positions = root_handle, root_positions
        batch = root_positions.shape[0]
        self.ancestors = torch.zeros(batch, 0, 0, dtype=torch.bool, device=root_positions.device)
        self.handles: torch.Tensor | None = None  # of every fed node, [B, T, ...]

    def expand(
        self, tokens: torch.Tensor, depth: int, parents: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed nodes `tokens` [B, K] at `depth` whose parents are fed nodes `parents` [B, K] (None: the root).
        Returns (draft logits [B, K, V] of their children, their fed indices [B, K])."""
        batch, k = tokens.shape
        fed = self.ancestors.shape[1]
        rows = torch.arange(batch, device=tokens.device)[:, None]
        eye = torch.eye(k, dtype=torch.bool, device=tokens.device).expand(batch, k, k)
        if parents is None:
            above = self.ancestors.new_zeros(batch, k, fed)
            handles = self.root_handle[:, None].expand(batch, k, *self.root_handle.shape[1:])
        else:
            assert self.handles is not None
            above = self.ancestors[rows, parents]
            handles = self.handles[rows, parents]
        block = torch.cat([above, eye], dim=2)  # [B, K, fed + K]
        positions = self.root_positions[:, None] + depth
        logits, new_handles = self.draft.tree_expand(self.state, handles, tokens, positions, depth, block)
        self.ancestors = torch.cat(
            [torch.cat([self.ancestors, self.ancestors.new_zeros(batch, fed, k)], dim=2), block], dim=1
        )
        self.handles = new_handles if self.handles is None else torch.cat([self.handles, new_handles], dim=1)
        return logits, fed + torch.arange(k, device=tokens.device).expand(batch, k)


def build_tree(
    draft: Any,
    state: Any,
    spec: TreeSpec,
    sampler: Any,
    root_logits: torch.Tensor,
    root_handle: torch.Tensor,
    root_positions: torch.Tensor,
) -> DraftTree:
    """Draft one round's tree after the root (each row's newest token, at `root_positions` [B]), from the
    draft's `root_logits` [B, V] for the token after it and its `root_handle` (see `tree_extend`)."""
    spec = spec.clamped(draft.max_tree_depth())
    fed = _FedNodes(draft, state, root_handle, root_positions)
    if spec.kind != "chain" and not getattr(draft, "drafts_trees", True):
        raise ValueError(
            f"{type(draft).__name__} drafts a chain in one forward pass and defines no trees; use a chain "
            "(tree='chain:5', 'chain:10:0.4' or 'auto')"
        )
    if spec.kind == "chain":
        return _chain(fed, spec, sampler, root_logits)
    if spec.kind == "dynamic":
        return _dynamic(fed, spec, sampler, root_logits)
    return _static(fed, spec, root_logits)


def _chain(fed: _FedNodes, spec: TreeSpec, sampler: Any, logits: torch.Tensor) -> DraftTree:
    tokens: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    parents = None
    confidence: list[torch.Tensor] = []  # per depth and row: the draft's probability of the whole chain so far
    # a parallel drafter's logits of depths 2 .. depth, from one forward pass; None from one whose later logits
    # depend on the tokens picked before them (DSpark): then each depth comes from `tree_expand`
    later = None
    if spec.depth > 1 and getattr(fed.draft, "drafts_in_parallel", False):
        later = fed.draft.parallel_logits(fed.state, fed.root_positions, spec.depth - 1)
    for depth in range(1, spec.depth + 1):
        path = torch.stack(tokens, dim=1) if tokens else None  # the tokens between the root and this position
        token, token_scores = sampler.pick(logits, path)
        tokens.append(token)
        scores.append(token_scores)
        if spec.stop_below is not None:
            # EAGLE-2's observation: the draft's confidence predicts acceptance, so a chain the draft itself
            # doubts is not worth extending; in a batch, one more depth costs every row a column, so the rows'
            # mean decides (the choice reads only the draft: exactness holds)
            # (a draft with an acceptance head, e.g. DSpark's confidence head, may predict it directly instead)
            predict = getattr(fed.draft, "predicted_acceptance", None)  # (remote code of older exports has none)
            predicted = None if predict is None else predict(fed.state)
            if predicted is not None:
                p = predicted.reshape(-1).float()
            else:
                p = torch.softmax(token_scores.float(), dim=-1).gather(-1, token[:, None]).squeeze(-1)
            confidence.append(p * confidence[-1] if confidence else p)
            scale = spec.stop_scale[min(depth, len(spec.stop_scale)) - 1] if spec.stop_scale else 1.0
            if bool(confidence[-1].mean() * scale < spec.stop_below):
                break
        if depth < spec.depth and later is not None:
            logits = later[:, depth - 1]
        elif depth < spec.depth:
            step_logits, parents = fed.expand(token[:, None], depth, parents)
            logits = step_logits[:, 0]
    batch, n = tokens[0].shape[0], len(tokens)
    device = tokens[0].device
    node = torch.arange(n, device=device)
    chain_scores = torch.stack(scores, dim=1)
    return DraftTree(
        tokens=torch.stack(tokens, dim=1),
        parents=(node - 1).expand(batch, n),
        depths=(node + 1).expand(batch, n),
        max_depth=n,
        q=torch.softmax(chain_scores, dim=-1) if sampler.do_sample else None,  # drawn from these: accept p/q
        scores=chain_scores,
        confidence=torch.stack(confidence, dim=1) if confidence else None,
    )


def _dynamic(fed: _FedNodes, spec: TreeSpec, sampler: Any, root_logits: torch.Tensor) -> DraftTree:
    k = spec.top_k
    beam = spec.beam or k
    scores, tokens = torch.log_softmax(sampler.warp(root_logits), dim=-1).topk(k, dim=-1)
    batch, device = tokens.shape[0], tokens.device
    rows = torch.arange(batch, device=device)[:, None]
    pool_tokens, pool_scores = [tokens], [scores]
    pool_parents, pool_depths = [torch.full_like(tokens, -1)], [torch.ones_like(tokens)]
    # the frontier: the `beam` best nodes of the newest depth (pool indices), their fed indices and their paths
    tokens, scores = tokens[:, :beam], scores[:, :beam]
    frontier, frontier_fed, pool_size = torch.arange(beam, device=device).expand(batch, beam), None, k
    paths = tokens[:, :, None]  # [B, beam, depth]: the tokens from the root (exclusive) to each frontier node
    for depth in range(1, spec.depth):
        logits, fed_index = fed.expand(tokens, depth, frontier_fed)  # feed the frontier
        child_scores, child_tokens = torch.log_softmax(sampler.warp(logits, paths), dim=-1).topk(k, dim=-1)
        cumulative = (scores[:, :, None] + child_scores).reshape(batch, beam * k)
        child_tokens = child_tokens.reshape(batch, beam * k)
        parent_slot = torch.arange(beam, device=device).repeat_interleave(k).expand(batch, beam * k)
        pool_tokens.append(child_tokens)
        pool_scores.append(cumulative)
        pool_parents.append(frontier[rows, parent_slot])
        pool_depths.append(torch.full_like(child_tokens, depth + 1))
        best = torch.sort(cumulative, dim=1, descending=True, stable=True).indices[:, :beam]
        tokens, scores = child_tokens[rows, best], cumulative[rows, best]
        paths = torch.cat([paths[rows, best // k], tokens[:, :, None]], dim=2)
        frontier, frontier_fed = pool_size + best, fed_index[rows, best // k]
        pool_size += beam * k
    all_scores = torch.cat(pool_scores, dim=1)
    total = spec.num_nodes
    # stable: on equal scores the earlier candidate (never deeper than a later one) wins, so parents go first
    kept = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :total].sort(dim=1).values
    new_index = torch.full((batch, pool_size), -1, dtype=torch.long, device=device)
    new_index[rows, kept] = torch.arange(total, device=device).expand(batch, total)
    old_parents = torch.cat(pool_parents, dim=1)[rows, kept]
    parents = torch.where(old_parents >= 0, new_index[rows, old_parents.clamp(min=0)], -1)
    if (parents[old_parents >= 0] < 0).any():
        raise RuntimeError("dynamic tree rerank dropped the parent of a kept node (non-monotone scores)")
    depths = torch.cat(pool_depths, dim=1)[rows, kept]
    return DraftTree(
        tokens=torch.cat(pool_tokens, dim=1)[rows, kept],
        parents=parents,
        depths=depths,
        max_depth=int(depths.max().item()),
    )


def _static(fed: _FedNodes, spec: TreeSpec, root_logits: torch.Tensor) -> DraftTree:
    index = {path: i for i, path in enumerate(spec.choices)}
    batch, device = root_logits.shape[0], root_logits.device
    has_children = {path[:-1] for path in spec.choices}
    logits_of: dict[tuple[int, ...], torch.Tensor] = {(): root_logits}
    fed_of: dict[tuple[int, ...], torch.Tensor] = {}
    tokens: dict[tuple[int, ...], torch.Tensor] = {}
    for depth in range(1, spec.depth + 1):
        level = [p for p in spec.choices if len(p) == depth]
        for path in level:
            ranked = logits_of[path[:-1]].topk(path[-1] + 1, dim=-1).indices
            tokens[path] = ranked[:, path[-1]]
        feed = [p for p in level if p in has_children]
        if feed:
            parents = None if depth == 1 else torch.stack([fed_of[p[:-1]] for p in feed], dim=1)
            logits, fed_index = fed.expand(torch.stack([tokens[p] for p in feed], dim=1), depth, parents)
            for j, path in enumerate(feed):
                logits_of[path], fed_of[path] = logits[:, j], fed_index[:, j]
    n = len(spec.choices)
    parent_ids = [index[p[:-1]] if len(p) > 1 else -1 for p in spec.choices]
    return DraftTree(
        tokens=torch.stack([tokens[p] for p in spec.choices], dim=1),
        parents=torch.tensor(parent_ids, device=device).expand(batch, n),
        depths=torch.tensor([len(p) for p in spec.choices], device=device).expand(batch, n),
        max_depth=spec.depth,
    )
