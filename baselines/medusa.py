"""Medusa (Cai et al. 2024, arXiv:2401.10774), Medusa-1: K heads on the frozen target's last hidden state.

Head i = `medusa_num_layers` residual blocks (x + SiLU(Linear(x)), the Linear weight zero-initialised
so a fresh head starts as the identity) + a vocabulary projection: its own lm_head copied from the
target's (`own_lm_head: true`, as in the paper) or the target's lm_head shared (`false`, ~113 MB less
per head on SmolLM2). From the state h_t (whose lm_head logits gave the pending token x_{t+1}), head i
predicts x_{t+i+2}.

Decoding: a static tree of candidates, `medusa_choices` (index paths: [0, 1] = head 0's top-1 token,
then head 1's top-2 token below it), verified in one forward by the harness loop and accepted by its
shared greedy / rejection-sampling code (lossless; the candidates are deterministic, q_draft = None).
`acceptance: typical` is Medusa's typical acceptance: LOSSY by design, routed through the Draft's
`acceptance_override` hook, and only allowed with `lossy: true` in the method config so every report
marks it.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from harness.acceptance import Acceptance, Sampling
from harness.decoding import DecodeContext, Draft, Proposer
from harness.errors import HarnessError
from harness.heads import BaseHandles, DraftHead, base_identity, load_head
from harness.target import Scores
from harness.tree import children_of

log = logging.getLogger(__name__)

# FasterDecoding/Medusa medusa/model/medusa_choices.py `mc_sim_7b_63`: the tree tuned for Vicuna-7B on
# an A100 (63 nodes, depth 4, so it uses 4 heads); a GPU preset.
MC_SIM_7B_63 = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
                [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0],
                [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5],
                [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9],
                [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0],
                [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]

# CPU preset: on 2 cores every verify token costs ~2 ms on SmolLM2-135M (DESIGN.md: 41 ms for 1 token,
# 63 ms for 11), so a handful of nodes on the most likely paths: 2 at depth 1, the top chain to depth 3.
MC_CPU_5 = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]

PRESETS = {"mc_sim_7b_63": MC_SIM_7B_63, "mc_cpu_5": MC_CPU_5}


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)); the weight starts at zero (Medusa), the bias keeps nn.Linear's init."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHead(DraftHead):
    """K Medusa heads. Parameter names follow the official checkpoints (`medusa_head.{i}.{j}.linear.*`,
    own lm_head = `medusa_head.{i}.{num_layers}.weight`)."""

    head_type = "medusa"

    def __init__(self, hidden_size: int, vocab_size: int, medusa_num_heads: int = 1, medusa_num_layers: int = 1,
                 own_lm_head: bool = False):
        super().__init__(dict(hidden_size=hidden_size, vocab_size=vocab_size, medusa_num_heads=medusa_num_heads,
                              medusa_num_layers=medusa_num_layers, own_lm_head=own_lm_head))
        if medusa_num_heads < 1 or medusa_num_layers < 0:
            raise HarnessError("a Medusa head needs medusa_num_heads >= 1 and medusa_num_layers >= 0")
        self.own_lm_head = bool(own_lm_head)
        self.medusa_head = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(medusa_num_layers)],
                          *([nn.Linear(hidden_size, vocab_size, bias=False)] if own_lm_head else []))
            for _ in range(medusa_num_heads))
        self.num_layers = medusa_num_layers

    @property
    def num_positions(self) -> int:
        return len(self.medusa_head)

    def init_from_base(self, base: BaseHandles) -> None:
        if self.own_lm_head:
            with torch.no_grad():
                for head in self.medusa_head:
                    head[self.num_layers].weight.copy_(base.lm_head.weight)

    def states(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> per-head states [K, ..., H] (before the vocabulary projection)."""
        return torch.stack([head[: self.num_layers](hidden) for head in self.medusa_head])

    def logits(self, hidden: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        """hidden [..., H] -> [K, ..., V]. A shared lm_head projects all K states in one matmul."""
        states = self.states(hidden)
        if self.own_lm_head:
            return torch.stack([head[self.num_layers](s) for head, s in zip(self.medusa_head, states)])
        return base.lm_head(states)

    def training_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        return self.logits(hidden, base)   # Medusa-1 reads only h_t: no token inputs to teacher-force
