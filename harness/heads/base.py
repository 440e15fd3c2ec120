"""Draft heads: the shared base class, the registry of head types, top-k accuracy.

A head reads the frozen target's final (normed) hidden states and predicts several future tokens.
Position k = 0 predicts t + 2 from the state at t (the target's own lm_head predicts t + 1): the
Medusa-1 convention, used by every head here. Checkpoints (ours and the published layouts' shared
helpers) are harness/heads/checkpoint.py.

Head classes live next to their decoders (baselines/medusa.py, baselines/eagle.py, methods/ours.py);
`HEAD_TYPES` names them so `build_head("medusa", ...)` works without importing every method up front. A
head class that reads a published checkpoint implements `is_published` and `from_official`.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.infra.errors import HarnessError
from harness.model.packing import PackedLinear, linear_packed, packed_rows

log = logging.getLogger(__name__)

# head_type -> "module:Class"; imported lazily so harness/ does not depend on baselines/ at import time
HEAD_TYPES = {
    "medusa": "baselines.medusa:MedusaHead",
    "ours": "methods.ours:OursHead",
    "trigram": "methods.ours:OursHead",   # alias: the head type checkpoints written before the rename carry
    "eagle": "baselines.eagle:EagleHead",
}


@dataclass
class BaseHandles:
    """The frozen target's pieces a head may use: never registered as a head submodule, never saved."""
    embed: torch.nn.Module     # input embedding: ids [...] -> [..., hidden]
    lm_head: torch.nn.Module   # output projection: [..., hidden] -> [..., vocab]

    @staticmethod
    def of(model: torch.nn.Module) -> "BaseHandles":
        embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
        if embed.weight.device != lm_head.weight.device:     # a model spread over GPUs (model.device_map)
            embed = DeviceBridge(embed, lm_head.weight.device)
        return BaseHandles(embed, lm_head)

    @staticmethod
    def for_head(model: torch.nn.Module, head: "DraftHead", scatter: bool = True,
                 dtype: torch.dtype | None = None) -> "BaseHandles":
        """The handles a head drafts with: a head with a reduced draft vocabulary projects onto those rows of
        the target's lm_head only (scatter=True: into full-vocabulary logits, -inf elsewhere, so decoders
        and verification see ordinary token ids; scatter=False: the reduced logits, for training).
        dtype: the head drafts in another dtype than the target's (method.draft_dtype): the projection reads a
        copy of the lm_head in that dtype (the reduced rows only, when the vocabulary is reduced)."""
        handles = BaseHandles.of(model)
        if head.draft_vocab is not None:
            handles.lm_head = DraftVocabProjection(handles.lm_head, head, scatter)
        elif dtype is not None and dtype != handles.lm_head.weight.dtype:
            handles.lm_head = CastProjection(handles.lm_head, dtype)
        return handles


def resolve_draft_dtype(name: str | None, loaded=None) -> torch.dtype | None:
    """method.draft_dtype -> the dtype a head drafts in: null = the target's; bfloat16 / float32 / float16 by name.
    Drafting only proposes, so a draft dtype other than the target's changes no verified token (the target
    checks every draft in its own dtype); it changes what is drafted, and what drafting costs.
    loaded=None: only check the name (a proposer's constructor, before anything loads); None for null."""
    if name in (None, "", "null", "target"):
        return None if loaded is None else loaded.dtype
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
              "float16": torch.float16, "fp16": torch.float16}
    if str(name) not in dtypes:
        raise HarnessError(f"method.draft_dtype={name}: use null (the target's dtype), bfloat16, float32 or float16")
    dtype = dtypes[str(name)]
    if loaded is None:
        return dtype
    if dtype == torch.float16 and torch.device(loaded.head_device).type == "cpu":
        raise HarnessError("method.draft_dtype=float16 has no fast CPU kernels: use bfloat16 on a CPU")
    return dtype


class CastProjection:
    """The target's lm_head for a head drafting in another dtype: a frozen copy of its weight in that dtype
    (packed for oneDNN on a CPU), x [..., H] in that dtype -> logits [..., V] in that dtype."""

    def __init__(self, lm_head: torch.nn.Module, dtype: torch.dtype):
        self.weight = lm_head.weight.detach().to(dtype).contiguous()
        bias = getattr(lm_head, "bias", None)
        self.bias = None if bias is None else bias.detach().to(dtype)
        # packed where the target's own lm_head is (model.cpu_linear), the same rule as DraftVocabProjection's
        self.packed = packed_rows(self.weight) if self.bias is None and isinstance(lm_head, PackedLinear) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return linear_packed(x.to(self.weight.dtype), self.packed, self.weight)


class DeviceBridge:
    """The target's input embedding as a head on another device sees it: ids go to the embedding's device, the
    vectors come back to the head's (the lm_head's device, where the final hidden states come out)."""

    def __init__(self, embed: torch.nn.Module, device: torch.device):
        self.embed, self.device = embed, device
        self.weight = embed.weight

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.to(self.weight.device)).to(self.device)


class DraftVocabProjection:
    """x [..., H] -> logits over the head's draft vocabulary (FR-Spec / EAGLE-3's reduced vocabulary): the
    rows `head.draft_vocab` of the frozen lm_head. Drafting only within it keeps verification lossless (the
    target still scores its full vocabulary); what it costs is the tokens outside it, never drafted."""

    def __init__(self, lm_head: torch.nn.Module, head: "DraftHead", scatter: bool):
        self.lm_head, self.head, self.scatter = lm_head, head, scatter
        self.vocab_size = int(lm_head.weight.shape[0])
        self._ids = self._weight = self._packed = None

    def _rows(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows) in `dtype` (the lm_head's by default; a head drafting in another dtype gets its rows
        copied once in that dtype, not cast on every call)."""
        ids = self.head.draft_vocab
        weight = self.lm_head.weight
        dtype = dtype or weight.dtype
        if self._ids is None or self._ids.shape != ids.shape or self._weight.dtype != dtype \
                or self._weight.device != weight.device or not torch.equal(self._ids, ids.to(self._ids.device)):
            self._ids = ids.detach().clone().to(weight.device)
            self._weight = weight.detach()[self._ids].to(dtype).contiguous()
            # on a packed target (model.cpu_linear) these rows are packed too: the projection is most of a draft step
            self._packed = packed_rows(self._weight) if isinstance(self.lm_head, PackedLinear) else None
        return self._ids, self._weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # training (autocast, or x needing grad) projects with the lm_head's own rows; drafting in x's dtype
        plain = x.requires_grad or torch.is_autocast_enabled(x.device.type)
        ids, weight = self._rows(None if plain else x.dtype)
        logits = linear_packed(x, self._packed, weight)                                # [..., V_draft]
        if not self.scatter:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, ids, logits)                                        # [..., V]

    def to_draft_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> draft-vocabulary indices (-1 outside it); IGNORE-style negatives stay -1."""
        ids = self.head.draft_vocab.to(self.lm_head.weight.device)
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long, device=ids.device)
        lookup[ids] = torch.arange(ids.numel(), device=ids.device)
        safe = token_ids.clamp(min=0).to(ids.device)
        return torch.where(token_ids >= 0, lookup[safe], torch.full_like(safe, -1)).to(token_ids.device)


class DraftHead(torch.nn.Module):
    """Base for Medusa heads, EAGLE's and ours.

    Subclasses set `head_type`, call `super().__init__(config)` with their JSON-able constructor
    kwargs, and implement `training_logits`. Decoding helpers are the subclass's own business. A head
    type with a published checkpoint layout overrides `is_published` and `from_official`.
    """

    head_type = "base"

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        # [V_draft] token ids when the vocabulary is reduced (a buffer: saved with the weights once set)
        self.register_buffer("draft_vocab", None, persistent=True)

    def set_draft_vocab(self, size: int, token_ids=None) -> None:
        """Reduce the draft vocabulary to `size` token ids (a buffer saved with the weights); ids default to the
        first `size` (a fresh head before train.py picks the most frequent tokens of its data)."""
        ids = torch.arange(int(size)) if token_ids is None else torch.as_tensor(list(token_ids), dtype=torch.long)
        if ids.numel() != int(size) or ids.unique().numel() != ids.numel():
            raise HarnessError(f"draft vocabulary: {ids.numel()} ids given for draft_vocab_size={size}, or repeats")
        device = next(self.parameters()).device if any(True for _ in self.parameters()) else None
        self.draft_vocab = ids.to(device=device, dtype=torch.long)
        self.config["draft_vocab_size"] = int(size)

    @property
    def num_positions(self) -> int:
        """K: future positions predicted (k = 0 -> t + 2, ..., k = K-1 -> t + K + 1)."""
        raise NotImplementedError

    @classmethod
    def is_published(cls, folder: str | Path) -> bool:
        """Whether `folder` is a checkpoint in this head type's published (not specdec-train) layout."""
        return False

    @classmethod
    def from_official(cls, folder: str | Path, loaded, **options) -> "DraftHead":
        """The published checkpoint in `folder` as this head, on loaded's device and dtype, eval, frozen."""
        raise HarnessError(f"no published-checkpoint layout for {cls.head_type} heads (only eagle and medusa); "
                           f"set method.official=false and point method.head_path at a specdec-train folder")

    def init_from_base(self, base: BaseHandles) -> None:
        """Initialise what should start from the target (e.g. an own lm_head copy). Default: nothing."""

    def training_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        """hidden [B, T, H] (target final normed states), input_ids [B, T] -> logits [K, B, T, V];
        [k, b, t] predicts input_ids[b, t + k + 2]; token inputs are teacher-forced (true tokens)."""
        raise NotImplementedError


def head_class(head_type: str) -> type[DraftHead]:
    if head_type not in HEAD_TYPES:
        raise HarnessError(f"unknown head type '{head_type}'; use one of {', '.join(sorted(HEAD_TYPES))}")
    module_name, class_name = HEAD_TYPES[head_type].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise HarnessError(f"head type '{head_type}' is not implemented yet ({module_name} is missing)") from exc
    return getattr(module, class_name)


def _config_value(base_config, key: str):
    return base_config.get(key) if isinstance(base_config, dict) else getattr(base_config, key, None)


def build_head(head_type: str, base_config, base: BaseHandles | None = None, **kwargs) -> DraftHead:
    """A fresh head for a model with `base_config` (HF config or dict with hidden_size, vocab_size).

    kwargs: the head's own parameters (a `conf/train/*.yaml` `head:` block; a `type:` key is ignored).
    base: when given, parts that start from the target (an own lm_head) are initialised from it.
    """
    kwargs.pop("type", None)
    draft_vocab_size = kwargs.pop("draft_vocab_size", None)
    cls = head_class(head_type)
    kwargs.setdefault("hidden_size", int(_config_value(base_config, "hidden_size")))
    kwargs.setdefault("vocab_size", int(_config_value(base_config, "vocab_size")))
    from_base = getattr(cls, "kwargs_from_base", None)   # heads that copy more of the target's shape (EAGLE)
    if from_base is not None:
        kwargs = from_base(base_config, kwargs)
    try:
        head = cls(**kwargs)
    except TypeError as exc:
        raise HarnessError(f"bad parameters for a {head_type} head ({exc}); see {HEAD_TYPES[head_type]}") from exc
    if base is not None:
        head.init_from_base(base)
    if draft_vocab_size:
        if not 0 < int(draft_vocab_size) <= int(kwargs["vocab_size"]):
            raise HarnessError(f"head.draft_vocab_size={draft_vocab_size} must be in 1..{kwargs['vocab_size']} "
                               "(null: the full vocabulary)")
        head.set_draft_vocab(int(draft_vocab_size))
    return head


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Teacher-forced top-j accuracy per head position: {"pos{k+1}_top{j}": float}.

    logits [K, B, T, V]: [k, b, t] predicts input_ids[b, t + k + 2]; counted where that target
    position exists (t + k + 2 < T) and mask[b, t + k + 2] (assistant tokens) is True.
    NaN where a position has no counted token.
    """
    num_positions, _, length, vocab = logits.shape
    top = min(max(ks), vocab)
    result = {}
    for k in range(num_positions):
        shift = k + 2
        for j in ks:
            result[f"pos{k + 1}_top{j}"] = math.nan
        if length <= shift:
            continue
        target = input_ids[:, shift:]                                 # [B, T - shift]
        valid = mask[:, shift:].to(torch.bool)
        ranked = logits[k, :, : length - shift].topk(top, dim=-1).indices   # [B, T - shift, top]
        hit_rank = (ranked == target.unsqueeze(-1))                    # at most one True per row
        counted = int(valid.sum())
        if counted == 0:
            continue
        for j in ks:
            hits = hit_rank[..., : min(j, top)].any(dim=-1) & valid
            result[f"pos{k + 1}_top{j}"] = float(hits.sum()) / counted
    return result
