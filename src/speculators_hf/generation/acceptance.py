"""Token selection and the verification of a drafted tree, for the package's own loop.

Greedy: walk down from the root; at each node the verifier's argmax (after the row's logits processors,
run on the node's own sequence: see `Sampler`) is emitted, and the walk continues into the child holding
that token, if any. Every emitted token is the verifier's own greedy choice, so
the output equals the verifier alone, whatever the tree.

Sampling (multi-draft speculative sampling, recursive rejection): at a node with verifier distribution
p (the softmax of its processed scores), the children x_1, x_2, ... are tried in order. A child drawn from the draft distribution q (a chain
when sampling) is accepted with probability min(1, p(x)/q(x)); otherwise p becomes norm(max(p - q, 0)).
A child chosen deterministically (tree drafting: top-k by draft confidence) is a draw from the point
mass q = delta_x, so the same rule reads: accept with probability p(x), otherwise remove x from p and
renormalise. When no child is accepted, the bonus token is drawn from what is left of p. By induction
over the children, the emitted token is distributed exactly as p, however the candidates were chosen
(as long as the choice does not look at the verifier's random draws), so the output follows the
verifier's distribution.
"""

from __future__ import annotations

import torch

from .sampling import Sampler
from .tree import DraftTree


def block_layout(tree: DraftTree, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, N+1] and parents [B, N+1] of the verified block: the root (index 0, parent -1) then the
    tree nodes, whose parents are renumbered into the block."""
    tokens = torch.cat([root[:, None], tree.tokens], dim=1)
    parents = torch.cat([torch.full_like(root[:, None], -1), tree.parents + 1], dim=1)
    return tokens, parents


def accept_greedy(
    logits: torch.Tensor, tree: DraftTree, root: torch.Tensor, sampler: Sampler | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify greedily. `logits` [B, N+1, V] are the verifier's at the block (root first); the target at each
    entry is the argmax after `sampler`'s logits processors (if any), as transformers' greedy search picks.

    Returns (path [B, S]: block indices of the root and the accepted nodes, emitted [B, S]: the token
    emitted after each path node, count [B]: how many columns are valid, i.e. accepted nodes + 1),
    S = the tree's depth + 1.

    A node is accepted when it and every ancestor is the verifier's argmax after its parent. Siblings carry
    different tokens, so the accepted nodes form one path from the root: the deepest of them and its
    ancestors, in block order (a parent's index is smaller than its child's)."""
    tokens, parents = block_layout(tree, root)
    if sampler is not None and sampler.has_processors:
        logits = sampler.block_scores(logits, tree)
    target = logits.argmax(dim=-1)  # [B, N+1]
    anc = tree.block_ancestors  # [B, N+1, N+1]
    width = tokens.shape[1]
    matches = tokens == target.gather(1, parents.clamp(min=0))
    matches[:, 0] = True  # the root is given
    accepted = ~(anc & ~matches[:, None, :]).any(dim=2)
    depth = anc.sum(dim=2)  # the root 1, its children 2, ...
    end = torch.where(accepted, depth, 0).argmax(dim=1)  # the deepest accepted node
    count = depth.gather(1, end[:, None]).squeeze(1)
    on_path = anc[torch.arange(tokens.shape[0], device=tokens.device), end]  # [B, N+1]
    columns = torch.arange(width, device=tokens.device)
    path = torch.where(on_path, columns, width).sort(dim=1).values[:, : tree.max_depth + 1]
    path = torch.where(path < width, path, end[:, None])
    return path, target.gather(1, path), count


def rejection_residual(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """What is left of p [V] once draft token x, drawn from q (None: chosen deterministically, a point mass at x),
    was rejected: norm(max(p - q, 0)), or p without x. Returns p unchanged when nothing is left (p == q up to
    rounding, in which case x was accepted with probability 1)."""
    if q is None:
        residual = p.clone()
        residual[x] = 0.0
    else:
        residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


def accept_sampling(
    logits: torch.Tensor, tree: DraftTree, root: torch.Tensor, sampler: Sampler
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify by recursive rejection sampling; same outputs as `accept_greedy`."""
    tokens, parents = block_layout(tree, root)
    probs = torch.softmax(sampler.block_scores(logits, tree), dim=-1)  # [B, N+1, V]
    batch, width = tokens.shape
    steps = tree.max_depth + 1
    path = torch.zeros(batch, steps, dtype=torch.long, device=tokens.device)
    emitted = torch.zeros(batch, steps, dtype=torch.long, device=tokens.device)
    count = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    parent_list, token_list = parents.tolist(), tokens.tolist()
    for b in range(batch):
        children: dict[int, list[int]] = {}
        for j in range(1, width):
            children.setdefault(parent_list[b][j], []).append(j)
        cur, n = 0, 0
        while True:
            path[b, n] = cur
            p = probs[b, cur].clone()
            chosen = None
            for j in children.get(cur, []):
                x = token_list[b][j]
                q = None if tree.q is None else tree.q[b, j - 1]
                accept = p[x] if q is None else torch.clamp(p[x] / q[x], max=1.0)
                if sampler.uniform() < float(accept):
                    chosen = j
                    break
                p = rejection_residual(p, q, x)
            if chosen is None:
                emitted[b, n] = torch.multinomial(p, 1, generator=sampler.generator).item()
                count[b] = n + 1
                break
            emitted[b, n] = token_list[b][chosen]
            cur, n = chosen, n + 1
    return path, emitted, count
