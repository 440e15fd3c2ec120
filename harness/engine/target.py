"""The target model behind the loop: prefill, one verify forward over a draft tree, KV commit, and a
forward through its first layers only (early-exit drafting) with its rollback."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from harness.engine.kv import new_cache
from harness.engine.tree import compact_cache, verify_layout
from harness.model.device import lm_head_device, model_devices
from harness.infra.errors import HarnessError


@dataclass
class Scores:
    logits: torch.Tensor   # [N, vocab] target logits at every verify-input position
    hidden: torch.Tensor   # [N, hidden] final (normed) hidden states at those positions


class Target:
    """Wraps a *ForCausalLM: runs its decoder body, then the lm_head only where logits are needed."""

    def __init__(self, model: torch.nn.Module, buffered_kv: bool = True):
        self.model = model
        self.buffered_kv = buffered_kv   # False: transformers' concatenating DynamicCache (for A/B timing only)
        self.body = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        # a model spread over GPUs (model.device_map): ids enter at the embedding's device, logits (and the
        # draft heads, which read the final hidden states) live on the lm_head's
        self.device = model.get_input_embeddings().weight.device
        self.output_device = lm_head_device(model)
        self.devices = model_devices(model)
        self.dtype = self.lm_head.weight.dtype if hasattr(self.lm_head, "weight") else torch.float32
        self.cache: DynamicCache | None = None

    @property
    def past(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    @property
    def vocab_size(self) -> int:
        """Width of the target's logits (its lm_head's rows; may exceed the tokenizer's vocabulary)."""
        return self.lm_head.weight.shape[0]

    @property
    def num_layers(self) -> int:
        """Decoder layers, for a Llama-style body (a one-line error otherwise)."""
        return len(self._decoder_parts()[1])

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """input_ids [1, N] -> final hidden states [N, hidden]; appends N entries to the cache."""
        out = self.body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        cache=self.cache, use_cache=True)
        return out.last_hidden_state[0]

    def prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """New cache, forward the prompt. Returns hidden [P, hidden] and next-token logits [vocab]."""
        self.cache = new_cache(self.model.config, self.buffered_kv)   # written in place, not grown by torch.cat
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

    # -- the target cut after its first layers (early-exit drafting)

    def _decoder_parts(self) -> tuple:
        """(embed_tokens, layers, rotary_emb, norm) of a Llama-style body, or a one-line error."""
        parts = tuple(getattr(self.body, name, None) for name in ("embed_tokens", "layers", "rotary_emb", "norm"))
        if any(part is None for part in parts):
            raise HarnessError(f"{type(self.model).__name__} is not a Llama-style decoder (embed_tokens, layers, "
                               f"rotary_emb, norm), which a layer-prefix draft needs: use method=sps or method=pld")
        return parts

    def prefix_step(self, token: int, position: int, layers: int) -> torch.Tensor:
        """One token at `position` through the first `layers` decoder layers, the final norm and the lm_head
        -> logits [vocab]. Appends its keys/values to those layers of the target's cache (the others are not
        touched); `rollback_prefix` removes them.

        For committed tokens those layers' cached keys/values are exactly what the cut model computes (same
        weights, same inputs), so the prefix reads them as its own. One query may see every cached key: no mask.
        """
        embed_tokens, decoder_layers, rotary_emb, norm = self._decoder_parts()
        ids = torch.tensor([[token]], device=self.device)
        positions = torch.tensor([[position]], device=self.device)
        hidden = embed_tokens(ids)
        position_embeddings = rotary_emb(hidden, position_ids=positions)
        for layer in decoder_layers[:layers]:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, cache=self.cache,
                           use_cache=True, position_embeddings=position_embeddings)
        return self.lm_head(norm(hidden[:, -1]))[0]

    def rollback_prefix(self, past: int, layers: int) -> None:
        """Drop what prefix_step appended: the first `layers` layers of the cache back to `past` entries
        (a verify forward writes those positions next)."""
        compact_cache(self.cache, past, [], layers=layers)
