"""Test helpers for draft heads: teach a head the tiny model's own greedy continuations in a few
hundred Adam steps (memorisation), so decoding tests see drafts that are sometimes right."""

from __future__ import annotations

import pytest
import torch
from helpers import as_loaded, greedy, single_thread  # noqa: F401 - as_loaded, greedy: imported from here too

from harness.heads.base import BaseHandles, DraftHead


def head_loss(head: DraftHead, base: BaseHandles, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every head position against the true tokens (Medusa-1 offsets)."""
    logits = head.training_logits(hidden, ids, base)                   # [K, B, T, V]
    losses = []
    for k in range(logits.shape[0]):
        shift = k + 2
        losses.append(torch.nn.functional.cross_entropy(
            logits[k, :, :-shift].reshape(-1, logits.shape[-1]), ids[:, shift:].reshape(-1)))
    return torch.stack(losses).mean()


def fit_head(head: DraftHead, model, sequences: list[list[int]], steps: int = 200, lr: float = 1e-2,
             base: BaseHandles | None = None) -> list[float]:
    ids = torch.tensor(sequences)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state          # final normed states [B, T, H]
    base = base or BaseHandles.of(model)
    head.train().requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = head_loss(head, base, hidden, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    head.eval().requires_grad_(False)
    return losses


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import this fixture into a test module to run the whole module single-threaded (helpers.single_thread;
    conftest's `one_thread` is the same, for modules that opt in by name instead)."""
    with single_thread():
        yield
