"""The target model behind the loop: prefill, one verify forward over a draft tree, KV commit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from harness.engine.tree import compact_cache, verify_layout


@dataclass
class Scores:
    logits: torch.Tensor   # [N, vocab] target logits at every verify-input position
    hidden: torch.Tensor   # [N, hidden] final (normed) hidden states at those positions


class Target:
    """Wraps a *ForCausalLM: runs its decoder body, then the lm_head only where logits are needed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.body = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = self.lm_head.weight.dtype if hasattr(self.lm_head, "weight") else torch.float32
        self.cache: DynamicCache | None = None

    @property
    def past(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """input_ids [1, N] -> final hidden states [N, hidden]; appends N entries to the cache."""
        out = self.body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        cache=self.cache, use_cache=True)
        return out.last_hidden_state[0]

    def prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """New cache, forward the prompt. Returns hidden [P, hidden] and next-token logits [vocab]."""
        self.cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt_ids], device=self.device)
        positions = torch.arange(len(prompt_ids), device=self.device).unsqueeze(0)
        hidden = self.forward(ids, positions, None)
        return hidden, self.lm_head(hidden[-1:])[0]

    def verify(self, root: int, draft_tokens: list[int], parents: tuple[int, ...],
               extra_tokens: list[int] | None = None, extra_mask: torch.Tensor | None = None,
               extra_offsets: torch.Tensor | None = None) -> Scores:
        """ONE forward over [root, draft..., extra...] with tree attention over the cache."""
        extra_tokens = extra_tokens or []
        mask, positions = verify_layout(parents, self.past, len(extra_tokens), extra_mask, extra_offsets,
                                        dtype=self.dtype, device=self.device)
        ids = torch.tensor([[root, *draft_tokens, *extra_tokens]], device=self.device)
        hidden = self.forward(ids, positions, mask)
        return Scores(self.lm_head(hidden), hidden)

    def commit(self, past: int, path: list[int]) -> None:
        """Keep only the accepted path (verify-input indices, root first) of the last verify."""
        compact_cache(self.cache, past, path)
