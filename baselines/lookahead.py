"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding"; hao-ai-lab/LookaheadDecoding). Written for this loop from the paper and the
published algorithm; greedy acceptance and rejection sampling are the harness's own.

Every step runs two branches in the one verify forward:
- lookahead branch (extra tokens): a 2-D Jacobi window of N-1 levels. Level 0 is the root (the
  pending token) followed by W-1 guesses; levels 1..N-2 hold W tokens each. Level l token i sits at
  position root + l + i and attends to the root, level 0 up to column i, and column i of levels
  1..l: one diagonal of consecutive positions. The argmax at the last level's W positions is the
  next Jacobi iterate. Column i of the window plus that iterate is an N-gram of consecutive
  positions; it goes into the pool keyed by its first token. Then the window slides one position
  (the official ALWAYS_FWD_ONE): level l+1 becomes level l, the new iterate the last level, whatever
  the verification accepted.
- verification branch (the draft): up to G pool n-grams keyed by the root token, as a tree from
  the root (a trie: shared prefixes verified once). Lookahead rows never see draft nodes.
Warm-up: level 0 starts as W+N-3 tokens drawn from the prompt; each of the first N-2 steps grows
the window by one level (the official multi-level fill).

`max_emit` caps what one step can emit. A pooled n-gram is the root's N-1 followers. `n` (this harness's
default): all N-1 can be accepted, then the bonus token: up to N new tokens a step. `n_minus_1` (official lade,
decoding.py jacobi_greedy_search_multilevel, also Spec-Bench's copy): its hit count max_hit is the `gg` left
by `for gg in range(len(myguess))`, which stops at N-2 even when all N-1 guess tokens match, and a step appends
`hits[:max_hit + 1]`, the root's next token + max_hit more: at most N-1 new tokens (its accept_length_tree).
Here that is at most N-2 accepted draft tokens + the bonus; we draft only each n-gram's
first N-2 tokens (lade verifies the last one and drops it), so the emitted tokens and τ match lade's with
fewer verify inputs (lade also verifies every guess in full, without our trie's shared prefixes).

`pool_from_prompt` also seeds the pool with every N-gram of the prompt and of the accepted text
(the official POOL_FROM_PROMPT). With an empty pool the draft is empty: a vanilla step plus the window.

Every window token costs verify time, so on a CPU the window must be small (conf/method/lookahead_cpu.yaml);
docs/method_notes.md has the τ and speed measured for several N, W, G on this machine.
"""

from __future__ import annotations

import random
from functools import lru_cache

import torch

from harness.engine.loop import DecodeContext, Draft, Proposer, Step
from harness.engine.tree import trie
from harness.infra.errors import HarnessError


class NgramPool:
    """first token -> up to `capacity` continuations of n-1 tokens; the least recently added is evicted
    first and a re-added n-gram becomes the most recent (the official LRU guess set)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.table: dict[int, dict[tuple[int, ...], None]] = {}

    def add(self, first: int, continuation: tuple[int, ...]) -> None:
        entries = self.table.setdefault(first, {})
        if continuation in entries:
            del entries[continuation]
        elif len(entries) >= self.capacity:
            del entries[next(iter(entries))]
        entries[continuation] = None

    def add_text(self, tokens: list[int], n: int, start: int = 0) -> None:
        """Every n-gram of `tokens` that ends at or after position `start`."""
        for end in range(max(start, n - 1), len(tokens)):
            self.add(tokens[end - n + 1], tuple(tokens[end - n + 2:end + 1]))

    def get(self, first: int) -> list[tuple[int, ...]]:
        """Continuations of `first`, most recent first."""
        entries = self.table.get(first)
        return list(reversed(entries)) if entries else []

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.table.values())


@lru_cache(maxsize=64)
def window_layout(level_sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [m, m] (bool, extra rows over extra columns) and position offsets [m] of a window whose
    level 0 holds level_sizes[0] tokens after the root and every other level one more."""
    width = level_sizes[0] + 1                      # columns, the root being column 0 of level 0
    starts = [0]
    for size in level_sizes[:-1]:
        starts.append(starts[-1] + size)
    m = sum(level_sizes)
    visible = torch.zeros(m, m, dtype=torch.bool)
    offsets = torch.zeros(m, dtype=torch.long)
    for level, size in enumerate(level_sizes):
        for column in range(width - size, width):   # level 0 has no column 0 (that is the root)
            row = starts[level] + column - (width - size)
            offsets[row] = level + column
            # level 0, columns 1..column (and the root, always visible): the causal part of the diagonal
            visible[row, starts[0]:starts[0] + column] = True
            # column `column` of levels 1..level (itself included)
            for upper in range(1, level + 1):
                visible[row, starts[upper] + column] = True
    return visible, offsets


class LookaheadProposer(Proposer):
    name = "lookahead"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Root + the Jacobi window (N-1 levels x W) + up to G candidate (N-1)-grams."""
        level, window, guesses = (int(cls.config_value(cfg, key)) for key in ("level", "window", "guess_set_size"))
        return 1 + (level - 1) * (window + guesses)

    def __init__(self, level: int = 5, window: int = 15, guess_set_size: int = 15,
                 pool_from_prompt: bool = False, window_with_draft_only: bool = False, seed: int = 0,
                 max_emit: str = "n"):
        if level < 3 or window < 1 or guess_set_size < 1:
            raise HarnessError(f"lookahead needs level (N) >= 3, window (W) >= 1, guess_set_size (G) >= 1 "
                               f"(got N={level}, W={window}, G={guess_set_size}); fix the method config")
        if max_emit not in ("n", "n_minus_1"):
            raise HarnessError(f"method.max_emit={max_emit}: use n (up to N tokens a step) or n_minus_1 (official "
                               f"lade: up to N-1)")
        self.level, self.window, self.guess_set_size = level, window, guess_set_size
        self.max_emit = max_emit
        # draft tokens per n-gram: all N-1 followers, or lade's N-2 (+ the bonus = N-1 tokens a step)
        self.draft_depth = level - 1 if max_emit == "n" else level - 2
        self.pool_from_prompt, self.seed = pool_from_prompt, seed
        self.window_with_draft_only = window_with_draft_only
        self.pool = NgramPool(guess_set_size)
        self.levels: list[list[int]] = []
        self.root = -1
        self.pooled = 0                              # ctx.tokens already added to the pool

    def reset(self, ctx: DecodeContext) -> None:
        self.pool = NgramPool(self.guess_set_size)
        prompt = ctx.tokens[:ctx.prompt_len]
        # the official initial guess: random tokens copied from the prompt (seeded here: reproducible runs)
        rng = random.Random(self.seed)
        self.levels = [[rng.choice(prompt) for _ in range(self.window + self.level - 3)]]
        self.pooled = 0
        if self.pool_from_prompt:
            self.pool.add_text(ctx.tokens, self.level)
            self.pooled = len(ctx.tokens)

    def propose(self, ctx: DecodeContext) -> Draft:
        self.root = ctx.tokens[-1]
        budget = ctx.draft_budget(self.draft_depth)
        branches = [list(c[:budget]) for c in self.pool.get(self.root)] if budget > 0 else []
        draft = Draft(*trie(branches)) if branches else Draft.empty()
        if self.window_with_draft_only and not draft.tokens:
            return draft                         # a plain one-token step; the window waits
        visible, offsets = window_layout(tuple(len(level) for level in self.levels))
        n, m = len(draft.tokens), len(offsets)
        extra_mask = torch.zeros(m, 1 + n + m, dtype=torch.bool)
        extra_mask[:, 0] = True                  # the root; draft columns 1..n stay hidden
        extra_mask[:, 1 + n:] = visible
        draft.extra_tokens = [token for level in self.levels for token in level]
        draft.extra_mask = extra_mask
        draft.extra_offsets = offsets
        return draft

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        draft = step.draft
        if draft.extra_tokens:
            last = self.levels[-1]
            logits = ctx.scores.logits[-len(last):]       # the last level is the tail of the input
            self._advance(logits.argmax(dim=-1).tolist())
        if self.pool_from_prompt:
            self.pool.add_text(ctx.tokens, self.level, start=self.pooled)
            self.pooled = len(ctx.tokens)

    def _advance(self, iterate: list[int]) -> None:
        """One Jacobi iteration: harvest n-grams once the window is full, then slide it by one position."""
        levels = self.levels
        if len(levels) < self.level - 1:
            # warm-up: every level moves one position; the iterate becomes a new last level
            self.levels = [level[1:] for level in levels] + [iterate if len(levels) == 1 else iterate[1:]]
            return
        firsts = [self.root] + levels[0]
        for column, first in enumerate(firsts):
            self.pool.add(first, tuple(level[column] for level in levels[1:]) + (iterate[column],))
        self.levels = [levels[1][1:]] + levels[2:] + [iterate]
