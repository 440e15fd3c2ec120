"""Speculative sampling with a draft model (SpS: Leviathan et al. 2023; Chen et al. 2023): a small
causal LM sharing the target's tokenizer drafts a chain of k tokens, the target verifies it in one
forward. Greedy drafts are the draft's argmax; when sampling, each draft token is drawn from the
draft's distribution warped like the target's (temperature, top-p via `target_probs`), and that
distribution goes to the harness as `q_draft` so rejection sampling keeps the target's distribution.

The draft keeps its own KV cache and the list of tokens it holds. Before drafting it keeps the
longest prefix of that list that agrees with the committed tokens and feeds the rest (the pending
token plus whatever the target accepted that the draft has not seen, e.g. the bonus token). A
rejection therefore crops the draft's cache to the last agreeing token; nothing is recomputed twice.

adaptive_k follows transformers' assisted-decoding "heuristic" schedule: after a step in which every
draft token was accepted, k grows by 2; after any rejection it shrinks by 1 (bounded by k_min/k_max).
k restarts from its configured value every turn (transformers' "heuristic_transient").
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from harness.engine.acceptance import target_probs
from harness.engine.kv import new_cache
from harness.engine.rng import categorical
from harness.engine.loop import DecodeContext, Draft, DraftLength, Proposer, Step
from harness.infra.errors import HarnessError
from harness.engine.tree import compact_cache


def check_same_vocabulary(target_tokenizer, draft_tokenizer, draft_name: str) -> None:
    """Draft tokens are target tokens only if both tokenizers map the same strings to the same ids."""
    if target_tokenizer is None or draft_tokenizer is None:
        return
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise HarnessError(f"sps: draft model '{draft_name}' has a different tokenizer vocabulary from the "
                           f"target; pick a method.draft_model from the target's family (same tokenizer)")


class SpSProposer(Proposer):
    name = "sps"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Root + the longest chain: k, or k_max when adaptive_k may grow it."""
        key = "k_max" if cls.config_value(cfg, "adaptive_k") else "k"
        return 1 + int(cls.config_value(cfg, key))

    def __init__(self, draft_model: str | torch.nn.Module = "smollm2-135m", k: int = 5, adaptive_k: bool = False,
                 k_min: int = 1, k_max: int = 16):
        self.draft_name = draft_model if isinstance(draft_model, str) else type(draft_model).__name__
        self.draft = None if isinstance(draft_model, str) else draft_model.eval()
        self.length = DraftLength("sps", k, adaptive_k, k_min, k_max)
        self.cache: DynamicCache | None = None
        self.cached_tokens: list[int] = []   # the tokens whose keys/values are in self.cache, in order
        self.checked = 0                     # cached_tokens[:checked] are known to equal committed tokens

    def setup(self, loaded) -> None:
        """Load the draft named by `draft_model` (a conf/model config) on the target's device."""
        if self.draft is None and self.draft_name == loaded.name:
            self.draft = loaded.model   # the target as its own draft: a plumbing check (tau ~ k + 1), no copy
        if self.draft is None:
            from harness.model.loading import load_model, model_config

            draft = load_model(model_config(self.draft_name), str(loaded.device))
            check_same_vocabulary(loaded.tokenizer, draft.tokenizer, self.draft_name)
            self.draft = draft.model

    def reset(self, ctx: DecodeContext) -> None:
        if self.draft is None:
            raise HarnessError("sps: no draft model; call setup(loaded) or pass a model instance as draft_model")
        # same tokenizer, but the two lm_heads may be padded to different widths: q_draft needs the target's
        self.target_vocab = ctx.target.vocab_size
        # a fresh draft cache per turn, as the target's is (its prefill is counted as draft time)
        self.cache = new_cache(self.draft.config)
        self.cached_tokens = []
        self.checked = 0
        # k restarts every turn (transformers' "heuristic_transient"), so a resumed run repeats itself
        self.length.reset()

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones; returns the draft logits for the next token [vocab]."""
        device = next(self.draft.parameters()).device
        start = len(self.cached_tokens)
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device).unsqueeze(0)
        out = self.draft(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cached_tokens.extend(tokens)
        logits = out.logits[0, -1]
        width = logits.shape[-1]
        if width > self.target_vocab:
            logits = logits[: self.target_vocab]
        elif width < self.target_vocab:
            logits = torch.cat([logits, logits.new_full((self.target_vocab - width,), float("-inf"))])
        return logits

    def _sync(self, committed: list[int]) -> list[int]:
        """Crop the draft cache to its longest prefix agreeing with `committed` (keeping at least one
        token to feed); return the committed tokens the draft still has to see."""
        limit = min(len(self.cached_tokens), len(committed) - 1)
        keep = min(self.checked, limit)   # committed tokens never change within a turn: skip what matched
        while keep < limit and self.cached_tokens[keep] == committed[keep]:
            keep += 1
        if keep < len(self.cached_tokens):
            compact_cache(self.cache, keep, [])   # keep=[] after `keep` positions: a crop to that length
            del self.cached_tokens[keep:]
        self.checked = len(committed)             # everything fed below is committed
        return committed[keep:]

    def propose(self, ctx: DecodeContext) -> Draft:
        budget = ctx.draft_budget(self.length.k)
        if budget <= 0:
            return Draft.empty()
        feed = self._sync(ctx.tokens)
        tokens: list[int] = []
        q_rows: list[torch.Tensor] = []
        for _ in range(budget):
            logits = self._forward(feed)
            if ctx.sampling.greedy:
                token = int(logits.argmax())
            else:
                q_draft = target_probs(logits, ctx.sampling)
                token = categorical(q_draft, ctx.generator)
                q_rows.append(q_draft)
            tokens.append(token)
            feed = [token]
        # the last draft token is not fed: if accepted, the next _sync feeds it with the bonus token
        return Draft.chain(tokens, torch.stack(q_rows) if q_rows else None)

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        self.length.update(step)
