"""Prompt lookup decoding (Saxena 2023, apoorvumang/prompt-lookup-decoding; transformers'
`prompt_lookup_num_tokens`): the draft is what followed an earlier occurrence of the text's last
n-gram, looked up in the prompt and everything generated so far. No draft model, no q_draft
(a deterministic proposal: acceptance treats it as one-hot).

Defaults reproduce transformers' `PromptLookupCandidateGenerator`: n-gram sizes tried from
`max_ngram_size` (2) down to 1, the leftmost earlier occurrence wins, its next `num_pred_tokens` (10)
tokens are drafted (never past the end of the text), no match = an empty draft (a vanilla step).
`require_full_continuation` is the PLD repo's rule (apoorvumang/prompt-lookup-decoding
find_candidate_pred_tokens, copied by Spec-Bench model/pld/pld.py, which run max_ngram_size 3): an occurrence
counts only where `num_pred_tokens` tokens follow it (end_idx <= input_length) and its continuation starts
before the text's last n-gram (start_idx < input_length - ngram_size); otherwise the next occurrence, then
the next smaller n, is tried. So a match near the end never drafts a short continuation.
`max_matches > 1` verifies several distinct continuations at once as a tree (a trie: branches share
common prefixes), gathered from the longest n-gram size down.

The lookup is an incremental index (n-gram -> positions of the token that followed it), extended in
observe() by the tokens each step commits, so a step costs O(max_ngram_size) dict operations
instead of transformers' O(text length) sliding-window scan.
"""

from __future__ import annotations

from bisect import bisect_right

from harness.engine.loop import DecodeContext, Draft, Proposer, Step
from harness.engine.tree import trie
from harness.infra.errors import HarnessError


class NgramIndex:
    """For every n in [min_n, max_n]: n-gram (tuple) -> ascending positions of the token that followed it.

    A position is recorded only once its token exists, so every recorded continuation is non-empty;
    the text's own last n-gram (the lookup key) is therefore never found as its own match.
    """

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(min_n, max_n + 1)
        self.tables: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in self.sizes}
        self.tokens: list[int] = []

    def extend(self, new_tokens: list[int]) -> None:
        tokens = self.tokens
        for token in new_tokens:
            end = len(tokens)                  # position of `token`: the continuation of the n-grams ending before it
            tokens.append(token)
            for n in self.sizes:
                if end >= n:
                    self.tables[n].setdefault(tuple(tokens[end - n:end]), []).append(end)

    def sync(self, tokens: list[int]) -> None:
        """Catch up with a token history that only ever grows (DecodeContext.tokens)."""
        if len(tokens) > len(self.tokens):
            self.extend(tokens[len(self.tokens):])

    def continuations(self, n: int) -> list[int]:
        """Continuation positions of the text's last n-gram (ascending; empty when unseen)."""
        if len(self.tokens) < n:
            return []
        return self.tables[n].get(tuple(self.tokens[-n:]), [])


class PromptLookupProposer(Proposer):
    name = "pld"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Root + up to max_matches continuations of num_pred_tokens each (no shared prefix assumed)."""
        return 1 + int(cls.config_value(cfg, "num_pred_tokens")) * int(cls.config_value(cfg, "max_matches") or 1)

    def __init__(self, max_ngram_size: int = 2, min_ngram_size: int = 1, num_pred_tokens: int = 10,
                 max_matches: int = 1, match: str = "first", cut_at_stop: bool = True,
                 require_full_continuation: bool = False):
        if not 1 <= min_ngram_size <= max_ngram_size:
            raise HarnessError(f"pld needs 1 <= min_ngram_size <= max_ngram_size (got {min_ngram_size}, "
                               f"{max_ngram_size}); fix method.min_ngram_size / method.max_ngram_size")
        if num_pred_tokens < 1 or max_matches < 1:
            raise HarnessError("pld needs num_pred_tokens >= 1 and max_matches >= 1; fix the method config")
        if match not in ("first", "last"):
            raise HarnessError(f"pld match must be 'first' or 'last' (got {match!r}); fix method.match")
        self.max_ngram_size, self.min_ngram_size = max_ngram_size, min_ngram_size
        self.num_pred_tokens, self.max_matches = num_pred_tokens, max_matches
        self.match, self.cut_at_stop = match, cut_at_stop
        self.require_full_continuation = bool(require_full_continuation)
        self.stop_token_ids: frozenset[int] = frozenset()
        self.index = NgramIndex(min_ngram_size, max_ngram_size)

    def setup(self, loaded) -> None:
        self.stop_token_ids = frozenset(getattr(loaded.template, "stop_token_ids", ()) or ())

    def reset(self, ctx: DecodeContext) -> None:
        self.index = NgramIndex(self.min_ngram_size, self.max_ngram_size)
        self.index.extend(ctx.tokens)

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        self.index.sync(ctx.tokens)

    def candidates(self, budget: int) -> list[list[int]]:
        """Up to max_matches distinct continuations (each <= budget tokens), longest n-gram first."""
        index, text = self.index, self.index.tokens
        found: list[list[int]] = []
        prefixes: set[tuple[int, ...]] = set()          # every prefix of every branch found
        for n in range(self.max_ngram_size, self.min_ngram_size - 1, -1):
            starts = index.continuations(n)
            if self.require_full_continuation:   # ascending: the occurrences with a full continuation come first
                starts = starts[:bisect_right(starts, min(len(text) - self.num_pred_tokens, len(text) - n - 1))]
            if not starts:
                continue
            ordered = starts if self.match == "first" else reversed(starts)
            # a repetitive text repeats continuations; bound the scan so a step stays O(max_matches)
            for scanned, start in enumerate(ordered):
                if scanned >= 4 * self.max_matches:
                    break
                branch = text[start:start + budget]
                if self.cut_at_stop and self.stop_token_ids:
                    # nothing after a stop token can be emitted; keep the stop itself (it ends the turn)
                    cut = next((i for i, t in enumerate(branch) if t in self.stop_token_ids), None)
                    if cut is not None:
                        branch = branch[:cut + 1]
                if tuple(branch) in prefixes:
                    continue                             # adds no node to the tree
                # a branch this one extends adds nothing any more
                found = [f for f in found if tuple(branch[:len(f)]) != tuple(f)]
                prefixes.update(tuple(branch[:k]) for k in range(1, len(branch) + 1))
                found.append(branch)
                if len(found) >= self.max_matches:
                    return found
        return found

    def propose(self, ctx: DecodeContext) -> Draft:
        self.index.sync(ctx.tokens)
        budget = ctx.draft_budget(self.num_pred_tokens)
        if budget <= 0:
            return Draft.empty()
        branches = self.candidates(budget)
        if not branches:
            return Draft.empty()
        if len(branches) == 1:
            return Draft.chain(branches[0])
        return Draft(*trie(branches))
