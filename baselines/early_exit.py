"""Early-exit self-speculation (Draft & Verify, Zhang et al. 2023; LayerSkip, Elhoushi et al. 2024):
the draft is the target itself cut after its first `exit_layer` decoder layers, followed by the
target's own final norm and lm_head. No extra weights.

The draft shares the target's KV cache: for committed tokens the first L layers' keys/values are
exactly what the draft would compute, so it reads them and appends its own for the tokens it drafts
(`Target.prefix_step`). Those entries must be gone before the verify forward, which writes the same
positions, so propose() rolls them back (`Target.rollback_prefix`) before it returns. Layers >= L are
never touched.

Only a model trained for early exit (LayerSkip's layer dropout + early-exit loss) drafts well this
way; docs/method_notes.md has what an untrained small model gives. `adaptive_k` shrinks a weak
draft to about k_min tokens per step.
"""

from __future__ import annotations

import torch

from harness.engine.acceptance import target_probs
from harness.engine.rng import categorical
from harness.engine.loop import DecodeContext, Draft, DraftLength, Proposer, Step
from harness.engine.target import Target
from harness.infra.errors import HarnessError


class EarlyExitProposer(Proposer):
    name = "early_exit"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Root + the longest chain: k, or k_max when adaptive_k may grow it."""
        key = "k_max" if cls.config_value(cfg, "adaptive_k") else "k"
        return 1 + int(cls.config_value(cfg, key))

    def __init__(self, exit_layer: int = 8, k: int = 6, min_confidence: float = 0.0, adaptive_k: bool = True,
                 k_min: int = 1, k_max: int = 12):
        if exit_layer < 1:
            raise HarnessError(f"early_exit: exit_layer={exit_layer} must be >= 1 (the number of layers the draft runs)")
        self.exit_layer = int(exit_layer)
        self.length = DraftLength("early_exit", k, adaptive_k, k_min, k_max)
        self.min_confidence = float(min_confidence)

    def setup(self, loaded) -> None:
        self._check(Target(loaded.model))

    def _check(self, target: Target) -> None:
        if self.exit_layer >= target.num_layers:
            raise HarnessError(f"early_exit: exit_layer={self.exit_layer} must be below the model's "
                               f"{target.num_layers} layers; set method.exit_layer to a smaller value")

    def reset(self, ctx: DecodeContext) -> None:
        self._check(ctx.target)
        self.length.reset()

    def propose(self, ctx: DecodeContext) -> Draft:
        budget = ctx.draft_budget(self.length.k)
        if budget <= 0:
            return Draft.empty()
        target = ctx.target
        past = target.past
        token = ctx.tokens[-1]
        tokens: list[int] = []
        q_rows: list[torch.Tensor] = []
        try:
            for i in range(budget):
                logits = target.prefix_step(token, past + i, self.exit_layer)
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
                    token = categorical(q_draft, ctx.generator)
                    q_rows.append(q_draft)
                tokens.append(token)
        finally:
            target.rollback_prefix(past, self.exit_layer)
        return Draft.chain(tokens, torch.stack(q_rows) if q_rows else None)

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        self.length.update(step)
