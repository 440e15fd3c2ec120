"""Acceptance, implemented once: greedy longest match and lossless rejection sampling over trees.

Verify logits row j (input position j) is the target's prediction for the children of position j.
Greedy accepts the longest root-to-node path whose every token is the target's argmax, then adds the
target's own next token (the bonus). Sampling walks the same tree with recursive rejection
(SpecInfer / EAGLE): at each node the children are tried in order; child x drawn from `q_draft` is
accepted with probability min(1, p_target[x] / q_draft[x]), and after a rejection the target
distribution becomes the normalised residual max(p_target - q_draft, 0). A child without
`q_draft` (lookup methods: a deterministic proposal) uses a one-hot q. The token emitted after the
last accepted node is drawn from the (residual) target distribution, so every emitted token follows
the target's own distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.engine.tree import children_of


@dataclass
class Sampling:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Acceptance:
    path: list[int]          # verify-input indices to keep in the KV cache, root first
    tokens: list[int]        # accepted draft tokens, then the bonus token
    accepted_draft: int      # number of draft tokens accepted (len(tokens) - 1)


def target_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution the target samples from: softmax(logits / T), then top-p. [..., vocab] fp32."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        drop_sorted = cumulative - sorted_probs >= sampling.top_p  # keep the smallest set reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def select_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The target's own next token from logits [vocab]: argmax, or a draw from target_probs."""
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(target_probs(logits, sampling), 1, generator=generator))


def greedy_accept(parents: tuple[int, ...], draft_tokens: list[int], logits: torch.Tensor) -> Acceptance:
    """logits: [N, vocab] over the verify input (extras after the tree are ignored)."""
    n_tree = len(parents) + 1
    predicted = logits[:n_tree].argmax(dim=-1).tolist()
    children = children_of(parents)
    path, tokens, node = [0], [], 0
    while True:
        want = predicted[node]
        match = next((c for c in children[node] if draft_tokens[c - 1] == want), None)
        if match is None:
            tokens.append(want)
            return Acceptance(path, tokens, len(path) - 1)
        path.append(match)
        tokens.append(want)
        node = match


def _residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    # total == 0 only if p == q, where rejection has probability 0; keep p to stay well defined
    return residual / total if total > 0 else p


def sample_accept(parents: tuple[int, ...], draft_tokens: list[int], logits: torch.Tensor,
                  q_draft: torch.Tensor | None, sampling: Sampling,
                  generator: torch.Generator | None) -> Acceptance:
    """Recursive rejection sampling. q_draft: [n, vocab], row i = distribution node i was drawn from
    given its earlier siblings (None for every node: deterministic proposals)."""
    children = children_of(parents)
    path, tokens, node = [0], [], 0
    p = target_probs(logits[0], sampling)
    while True:
        accepted = None
        for child in children[node]:
            token = draft_tokens[child - 1]
            q = None if q_draft is None else q_draft[child - 1].float()
            q_token = 1.0 if q is None else float(q[token])
            ratio = 0.0 if q_token <= 0 else min(1.0, float(p[token]) / q_token)
            if float(torch.rand((), generator=generator)) < ratio:
                accepted = child
                break
            p = _residual(p, q, token)
        if accepted is None:
            tokens.append(int(torch.multinomial(p, 1, generator=generator)))
            return Acceptance(path, tokens, len(path) - 1)
        path.append(accepted)
        tokens.append(draft_tokens[accepted - 1])
        node = accepted
        p = target_probs(logits[node], sampling)


def accept(parents: tuple[int, ...], draft_tokens: list[int], logits: torch.Tensor,
           q_draft: torch.Tensor | None, sampling: Sampling,
           generator: torch.Generator | None) -> Acceptance:
    if sampling.greedy:
        return greedy_accept(parents, draft_tokens, logits)
    return sample_accept(parents, draft_tokens, logits, q_draft, sampling, generator)
