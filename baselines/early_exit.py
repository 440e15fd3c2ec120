"""Early-exit self-speculation (Draft & Verify, Zhang et al. 2023; LayerSkip, Elhoushi et al. 2024):
the draft is the target itself cut after its first `exit_layer` decoder layers, followed by the
target's own final norm and lm_head. No extra weights.

The draft shares the target's KV cache. For committed tokens the first L layers' keys/values are
exactly what the draft would compute (same weights, same inputs), so the draft reads the target's
cache for layers < L and appends its own entries for the tokens it drafts. Those entries must be
gone before the verify forward (which appends the verify tokens at the same positions), so propose()
crops layers < L back to the committed length before it returns. Layers >= L are never touched.

The draft feeds one token per forward (the pending token, then each draft token), so attention needs
no mask: a single query may see every cached key.

Only a model trained for early exit (LayerSkip's layer dropout + early-exit loss) drafts well this
way. Measured on SmolLM2-135M-Instruct (30 layers, not trained for it), teacher-forced over 4 MT-Bench
answers: the layer-L draft's argmax equals the full model's on 3% of tokens for L = 4..10, 6% at 12,
11% at 16, 18% at 20, 46% at 28, and its confidence does not separate right from wrong drafts. A
draft step costs about L/30 of a target step plus the full lm_head (~6.5 ms of ~41 ms on 2 CPU
cores), so no L pays on that model; adaptive_k at least shrinks the loss to ~k_min drafts per step.
"""

from __future__ import annotations

import torch

from harness.engine.acceptance import target_probs
from harness.engine.loop import DecodeContext, Draft, DraftLength, Proposer, Step
from harness.infra.errors import HarnessError
from harness.engine.target import Target
from harness.engine.tree import compact_cache


def _decoder_parts(model: torch.nn.Module) -> tuple:
    """(embed_tokens, layers, rotary_emb, norm) of a Llama-style decoder, or a one-line error."""
    body = getattr(model, model.base_model_prefix, None)
    parts = tuple(getattr(body, name, None) for name in ("embed_tokens", "layers", "rotary_emb", "norm"))
    if body is None or any(part is None for part in parts):
        raise HarnessError(f"early_exit needs a Llama-style decoder (embed_tokens, layers, rotary_emb, norm); "
                           f"{type(model).__name__} has another layout: use method=sps or method=pld")
    return parts


class _LayerView:
    """The first n layers of a cache, as compact_cache expects (it only walks `.layers`)."""

    def __init__(self, cache, n: int):
        self.layers = cache.layers[:n]


class EarlyExitProposer(Proposer):
    name = "early_exit"

    def __init__(self, exit_layer: int = 8, k: int = 6, min_confidence: float = 0.0, adaptive_k: bool = True,
                 k_min: int = 1, k_max: int = 12):
        if exit_layer < 1:
            raise HarnessError(f"early_exit: exit_layer={exit_layer} must be >= 1 (the number of layers the draft runs)")
        self.exit_layer = int(exit_layer)
        self.length = DraftLength("early_exit", k, adaptive_k, k_min, k_max)
        self.min_confidence = float(min_confidence)
        self._model = None

    def setup(self, loaded) -> None:
        self._bind(loaded.model)

    def _bind(self, model: torch.nn.Module) -> None:
        if model is self._model:
            return
        self.embed_tokens, layers, self.rotary_emb, self.norm = _decoder_parts(model)
        if self.exit_layer >= len(layers):
            raise HarnessError(f"early_exit: exit_layer={self.exit_layer} must be below the model's "
                               f"{len(layers)} layers; set method.exit_layer to a smaller value")
        self.layers = layers[: self.exit_layer]
        self.lm_head = model.get_output_embeddings()
        self._model = model

    def reset(self, ctx: DecodeContext) -> None:
        self._bind(ctx.target.model)
        self.length.reset()

    def _draft_logits(self, target: Target, token: int, position: int) -> torch.Tensor:
        """One token through layers < L (appending to their cache), final norm, lm_head -> [vocab]."""
        ids = torch.tensor([[token]], device=target.device)
        positions = torch.tensor([[position]], device=target.device)
        hidden = self.embed_tokens(ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, cache=target.cache,
                           use_cache=True, position_embeddings=position_embeddings)
        return self.lm_head(self.norm(hidden[:, -1]))[0]

    def propose(self, ctx: DecodeContext) -> Draft:
        # a step emits at most len(draft) + 1 tokens; drafting past the cap is wasted work
        budget = min(self.length.k, ctx.remaining - 1)
        if budget <= 0:
            return Draft.empty()
        target = ctx.target
        past = target.past
        token = ctx.tokens[-1]
        tokens: list[int] = []
        q_rows: list[torch.Tensor] = []
        try:
            for i in range(budget):
                logits = self._draft_logits(target, token, past + i)
                q_draft = None if ctx.sampling.greedy else target_probs(logits, ctx.sampling)
                # Draft & Verify's stop rule (a fixed threshold): an unsure draft token is likely rejected,
                # so it is not proposed and drafting stops
                if self.min_confidence > 0:
                    probs = torch.softmax(logits.float(), -1) if q_draft is None else q_draft
                    if float(probs.max()) < self.min_confidence:
                        break
                if q_draft is None:
                    token = int(logits.argmax())
                else:
                    token = int(torch.multinomial(q_draft, 1, generator=ctx.generator))
                    q_rows.append(q_draft)
                tokens.append(token)
        finally:
            # drop the draft's own entries from layers < L: the verify forward writes these positions
            compact_cache(_LayerView(target.cache, self.exit_layer), past, [])
        return Draft.chain(tokens, torch.stack(q_rows) if q_rows else None)

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        self.length.update(step)
