"""Test helpers for draft heads: teach a head the tiny model's own greedy continuations in a few
hundred Adam steps (memorisation), so decoding tests see drafts that are sometimes right."""

from __future__ import annotations

import pytest
import torch

from harness.engine.acceptance import Sampling
from harness.engine.loop import Proposer, StopCriteria, decode_turn
from harness.heads.base import BaseHandles, DraftHead
from harness.model.loading import LoadedModel
from harness.engine.target import Target


def as_loaded(model, name: str = "tiny") -> LoadedModel:
    return LoadedModel(name, model, None, None, torch.device("cpu"), torch.float32, "test")


def greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    return decode_turn(Target(model), Proposer(), prompt, Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=max_new_tokens)).token_ids


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
    """Tiny models run fastest on one thread, and a busy shared machine makes two threads spin: import
    this fixture into a test module to run it single-threaded (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
