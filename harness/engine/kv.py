"""The target's KV cache: transformers' DynamicCache, with each full-attention layer writing into a buffer that
grows by doubling instead of concatenating.

DynamicLayer appends by `torch.cat`, which copies the layer's whole cache on every forward: on SmolLM2-135M at a
256-token context the profiler put 27 % of a 1-token bf16 step there; timed side by side, the buffer gains
0-10 % of a step (docs/cpu_runtime.md). Here `keys` / `values` are
views of the first n positions of a preallocated buffer; a forward writes its new positions in place. Everything
that reads or edits a DynamicLayer keeps working: `compact_cache` slices and moves rows inside the views, and when
anything replaces `keys` by a tensor of its own (a crop by a library, a batch reorder), the next update copies it
into a fresh buffer. Numerics are unchanged (the same values, in the same order, reach attention).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers of `capacity` >= length positions."""

    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None
    max_capacity: int | None = None       # the model's context length: the buffer never doubles past it

    def _views_own_buffer(self) -> bool:
        return (self.key_buffer is not None and self.keys.numel() > 0
                and self.keys.data_ptr() == self.key_buffer.data_ptr()
                and self.values.data_ptr() == self.value_buffer.data_ptr()
                and self.keys.shape[:2] == self.key_buffer.shape[:2])

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int) -> None:
        capacity = max(MIN_CAPACITY, 2 * needed)
        if self.max_capacity:
            capacity = max(needed, min(capacity, self.max_capacity))
        batch, heads, _, head_dim = key_states.shape
        key_buffer = key_states.new_empty(batch, heads, capacity, head_dim)
        value_buffer = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
        if length:
            key_buffer[..., :length, :] = self.keys
            value_buffer[..., :length, :] = self.values
        self.key_buffer, self.value_buffer = key_buffer, value_buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        if not self._views_own_buffer() or end > self.key_buffer.shape[-2]:
            self._grow(key_states, value_states, length, end)
        self.key_buffer[..., length:end, :] = key_states
        self.value_buffer[..., length:end, :] = value_states
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def new_cache(config, buffered: bool = True) -> DynamicCache:
    """A DynamicCache for `config`; with `buffered`, its plain full-attention layers are BufferedLayers
    (sliding-window and other layer kinds are kept as transformers made them)."""
    cache = DynamicCache(config=config)
    if buffered:
        max_capacity = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
        for layer in cache.layers:
            if type(layer) is DynamicLayer:
                layer.__class__ = BufferedLayer
                layer.max_capacity = max_capacity
    return cache
