"""Draft trees: the verify input layout, its attention mask and position ids, and KV compaction.

Verify input = [root, draft_0 .. draft_{n-1}, extra_0 .. extra_{m-1}]. The root is the pending token
(chosen last step, not yet in the KV cache); `parents[i]` is the draft index of node i's parent, -1
for the root. Nodes come in topological order (parent before child). Extra tokens (Lookahead's
Jacobi window) bring their own mask over the whole input and their own position offsets.
The only implementations of tree mask building and KV compaction live here, and so do the tree builders
the methods share: static trees from index paths, tries of token branches, best-node cuts, subtrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from harness.infra.errors import HarnessError


@lru_cache(maxsize=256)
def _tree_layout(parents: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Ancestor lists (input indices, root included, self included) and depths (root = 0)."""
    ancestors: list[tuple[int, ...]] = [(0,)]
    depths = [0]
    for i, parent in enumerate(parents):
        if parent >= i:
            raise ValueError(f"draft node {i} has parent {parent}: nodes must follow their parents")
        parent_input = parent + 1
        ancestors.append(ancestors[parent_input] + (i + 1,))
        depths.append(depths[parent_input] + 1)
    return tuple(ancestors), tuple(depths)


def is_chain(parents: tuple[int, ...]) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(parents))


def depths_of(parents: tuple[int, ...]) -> tuple[int, ...]:
    """Depth of each verify-input position of the tree part (root = 0)."""
    return _tree_layout(parents)[1]


def children_of(parents: tuple[int, ...]) -> list[list[int]]:
    """children[j] = input indices of the children of input position j (root = 0), in draft order."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, parent in enumerate(parents):
        children[parent + 1].append(i + 1)
    return children


def tree_mask_bool(parents: tuple[int, ...]) -> torch.Tensor:
    """[1 + n, 1 + n] bool: row i may attend to column j iff j is an ancestor of i (or i itself)."""
    ancestors, _ = _tree_layout(parents)
    size = len(ancestors)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for row, cols in enumerate(ancestors):
        mask[row, list(cols)] = True
    return mask


def verify_layout(parents: tuple[int, ...], past: int, n_extra: int = 0,
                  extra_mask: torch.Tensor | None = None, extra_offsets: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention mask [1, 1, N, past + N] (additive; None when plain causal is exact) and positions [1, N].

    extra_mask: [m, N] bool over the verify input for the extra rows (cache prefix always visible).
    extra_offsets: [m] position of each extra token relative to the root.
    """
    n_tree = len(parents) + 1
    depths = torch.tensor(depths_of(parents), dtype=torch.long)
    if n_extra:
        depths = torch.cat([depths, extra_offsets.to(torch.long).cpu()])
    positions = (depths + past).unsqueeze(0).to(device)
    if n_extra == 0 and is_chain(parents):
        return None, positions
    size = n_tree + n_extra
    visible = torch.zeros(size, size, dtype=torch.bool)
    visible[:n_tree, :n_tree] = tree_mask_bool(parents)
    if n_extra:
        visible[n_tree:, :] = extra_mask.to(torch.bool).cpu()
    block = torch.zeros(size, past + size, dtype=dtype)
    block[:, past:].masked_fill_(~visible, torch.finfo(dtype).min)
    return block.view(1, 1, size, past + size).to(device), positions


def compact_cache(cache, past: int, keep: list[int], layers: int | None = None) -> None:
    """Keep the verify-input positions `keep` (ascending, root first) after `past`; drop the rest.

    A prefix [0, 1, .., k-1] is a crop; otherwise the kept rows move down in place, then a crop.
    layers: only the first `layers` decoder layers (all by default).
    """
    cache_layers = cache.layers[:layers]
    if keep == list(range(len(keep))):
        target_len = past + len(keep)
        for layer in cache_layers:
            if layer.keys.shape[-2] > target_len:
                layer.keys = layer.keys[..., :target_len, :]
                layer.values = layer.values[..., :target_len, :]
        return
    index = torch.tensor([past + i for i in keep], device=cache_layers[0].keys.device)
    on_device = {index.device: index}      # layers spread over GPUs (model.device_map): one copy per device
    target_len = past + len(keep)
    for layer in cache_layers:
        here = on_device.get(layer.keys.device)
        if here is None:
            here = on_device[layer.keys.device] = index.to(layer.keys.device)
        layer.keys[..., past:target_len, :] = layer.keys.index_select(-2, here)
        layer.values[..., past:target_len, :] = layer.values.index_select(-2, here)
        layer.keys = layer.keys[..., :target_len, :]
        layer.values = layer.values[..., :target_len, :]


# ---------------------------------------------------------------------------------------------
# tree builders shared by the methods (draft index space: parents[i] < i, -1 = the root)


def index_tree(paths: Sequence[Sequence[int]], max_depth: int | None = None, option: str = "tree_choices"
               ) -> tuple[tuple[int, ...], list[int], list[int]]:
    """Index paths -> (parents, depths, ranks) per node, parents first (sorted by depth, then path).

    Node [r_1, .., r_d] is the rank-r_d candidate below node [r_1, .., r_{d-1}], at depth d (1 = a child of
    the root). Medusa reads it as head d-1's rank-r_d token, EAGLE as the head's rank-r_d token given the
    path. Paths deeper than `max_depth` are dropped, duplicates and empty paths ignored. `option` names the
    config key in errors.
    """
    paths = sorted({tuple(int(r) for r in path) for path in paths
                    if len(path) > 0 and (max_depth is None or len(path) <= max_depth)},
                   key=lambda path: (len(path), path))
    index = {path: i for i, path in enumerate(paths)}
    parents, depths, ranks = [], [], []
    for path in paths:
        if min(path) < 0:
            raise HarnessError(f"{option} path {list(path)} has a negative rank; ranks start at 0")
        if len(path) > 1 and path[:-1] not in index:
            raise HarnessError(f"{option} has {list(path)} without its parent {list(path[:-1])}; every prefix "
                               f"of a path must be in the tree")
        parents.append(index[path[:-1]] if len(path) > 1 else -1)
        depths.append(len(path))
        ranks.append(path[-1])
    return tuple(parents), depths, ranks


def trie(branches: Sequence[Sequence[int]]) -> tuple[list[int], tuple[int, ...]]:
    """Token sequences from the root -> (tokens, parents) of one tree; equal prefixes become one node."""
    tokens: list[int] = []
    parents: list[int] = []
    child_of: dict[tuple[int, int], int] = {}          # (parent node, token) -> node
    for branch in branches:
        parent = -1
        for token in branch:
            node = child_of.get((parent, token))
            if node is None:
                node = len(tokens)
                tokens.append(token)
                parents.append(parent)
                child_of[(parent, token)] = node
            parent = node
    return tokens, tuple(parents)


def best_nodes(scores: Sequence[float] | torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, ascending; ties go to the lower index.

    With nodes listed parents first and a child never scoring above its parent (a cumulative log-prob or
    a path probability), the result is prefix-closed: a valid parents-first draft for `subtree`.
    """
    values = torch.as_tensor(scores, dtype=torch.float64)
    order = torch.sort(values, descending=True, stable=True).indices
    return sorted(order[:max(count, 0)].tolist())


def subtree(tokens: Sequence[int], parents: Sequence[int], keep: Sequence[int]) -> tuple[list[int], tuple[int, ...]]:
    """The draft restricted to the (prefix-closed, ascending) indices `keep`, parents renumbered."""
    index = {old: new for new, old in enumerate(keep)}
    return [tokens[i] for i in keep], tuple(index[parents[i]] if parents[i] >= 0 else -1 for i in keep)


def preset_paths(choice: str | Sequence, presets: dict[str, list], setting: str) -> list[list[int]]:
    """A tree given as a preset name (`presets`) or as index paths -> the index paths; an unknown name is one
    line naming `setting` (method.medusa_choices, method.tree_choices)."""
    if isinstance(choice, str):
        if choice not in presets:
            raise HarnessError(f"unknown {setting} '{choice}'; use one of {', '.join(presets)} or a list of index paths")
        choice = presets[choice]
    return [list(path) for path in choice]
