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

A method names its rule (`Proposer.acceptance`) and the loop applies it: `lossless` (the above, every
method's default) or `typical` (Medusa's typical acceptance, LOSSY by design: a method config may choose
it only together with `lossy: true`, so every report marks the run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.engine.tree import children_of
from harness.engine.rng import categorical, uniform
from harness.infra.errors import HarnessError


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
    return categorical(target_probs(logits, sampling), generator)


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
            if uniform(generator) < ratio:
                accepted = child
                break
            p = _residual(p, q, token)
        if accepted is None:
            tokens.append(categorical(p, generator))
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


def typical_accept(parents: tuple[int, ...], draft_tokens: list[int], logits: torch.Tensor,
                   q_draft: torch.Tensor | None, sampling: Sampling, generator: torch.Generator | None,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3) -> Acceptance:
    """Medusa's typical acceptance (LOSSY): a candidate passes where p_target(x) > min(threshold,
    alpha * exp(-entropy(p_target))); the longest passing path wins (ties: higher likelihood), then the
    next token is drawn from p_target truncated to the tokens above that bar. At temperature 0 Medusa
    falls back to greedy, and so does this; an empty draft (a plain target step) takes the lossless rule,
    drawing from the target's own distribution. q_draft is not read (Medusa's candidates are deterministic)."""
    if sampling.greedy or not draft_tokens:
        return accept(parents, draft_tokens, logits, q_draft, sampling, generator)
    n_tree = len(parents) + 1
    probs = torch.softmax(logits[:n_tree].float() / sampling.temperature, dim=-1)   # [N, V]
    entropy = -(probs * torch.log(probs + 1e-5)).sum(dim=-1)
    bar = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)   # [N]
    parent_rows = torch.tensor([p + 1 for p in parents], device=probs.device)
    token_ids = torch.tensor(draft_tokens, device=probs.device)
    p_token = probs[parent_rows, token_ids]                                   # [n]
    passes = (p_token > bar[parent_rows]).tolist()
    log_p = torch.log(p_token).tolist()
    best, best_key = 0, (0, 0.0)
    depth, likelihood, alive = [0] * n_tree, [0.0] * n_tree, [True] + [False] * (n_tree - 1)
    for i, parent in enumerate(parents):
        node = i + 1
        alive[node] = alive[parent + 1] and passes[i]
        if alive[node]:
            depth[node] = depth[parent + 1] + 1
            likelihood[node] = likelihood[parent + 1] + log_p[i]
            if (depth[node], likelihood[node]) > best_key:
                best, best_key = node, (depth[node], likelihood[node])
    path, node = [], best
    while node > 0:
        path.insert(0, node)
        node = parents[node - 1] + 1
    path = [0] + path
    last = probs[best]
    truncated = torch.where(last >= bar[best], last, torch.zeros_like(last))
    bonus = categorical(truncated / truncated.sum(), generator)
    tokens = [draft_tokens[node - 1] for node in path[1:]] + [bonus]
    return Acceptance(path, tokens, len(path) - 1)


AcceptanceRule = Callable[..., Acceptance]
# name -> (rule, lossy). Every rule takes (parents, draft_tokens, logits, q_draft, sampling, generator,
# **the method's acceptance options).
RULES: dict[str, tuple[AcceptanceRule, bool]] = {"lossless": (accept, False), "typical": (typical_accept, True)}


def acceptance_rule(name: str, lossy: bool, method: str = "method") -> AcceptanceRule:
    """The rule a method declared, checked against its config's `lossy` flag (a one-line error unless
    they agree: a lossy rule must be declared, and a lossless run must not be marked lossy)."""
    if name not in RULES:
        raise HarnessError(f"{method}: unknown acceptance '{name}'; use one of {', '.join(RULES)} "
                           f"(harness/engine/acceptance.py)")
    rule, rule_is_lossy = RULES[name]
    if rule_is_lossy and not lossy:
        raise HarnessError(f"{method}: method.acceptance={name} is lossy and must be declared: set method.lossy=true "
                           f"together with method.acceptance={name}")
    if lossy and not rule_is_lossy:
        raise HarnessError(f"{method}: method.lossy=true marks a lossy acceptance, but method.acceptance={name} is "
                           f"lossless; set method.lossy=false (or a lossy acceptance such as typical)")
    return rule
