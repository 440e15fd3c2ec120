"""The stub's top-k / top-p masking, with vLLM 0.32's CPU path's name and semantics (sort every row, mask the
tail below top_p's mass and past top_k, -inf in place); `calls` records the rows each call received."""

from __future__ import annotations

import torch

calls: list[int] = []


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    if p is None and k is None:
        return logits
    calls.append(int(logits.shape[0]))
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        cut = logits_sort.gather(1, (logits_sort.size(1) - k.long()).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < cut, -float("inf"))
    if p is not None:
        cumulative = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        mask = cumulative <= 1 - p.unsqueeze(1)
        mask[:, -1] = False
        logits_sort.masked_fill_(mask, -float("inf"))
    return logits.scatter_(dim=-1, index=logits_idx, src=logits_sort)
