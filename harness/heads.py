"""Trained draft heads: the shared base class, checkpoints, the base-model identity, top-k accuracy.

A head reads the frozen target's final (normed) hidden states and predicts several future tokens.
Position k = 0 predicts t + 2 from the state at t (the target's own lm_head predicts t + 1): the
Medusa-1 convention, used by every head here (see notes/HEADS_CONTRACT.md).

Checkpoint folder = `model.safetensors` (head parameters only; a shared frozen base lm_head is not
stored) + `head_config.json` {head_type, config, base, format_version, ...extra}. `base` is the
identity of the model the head was trained on; `load_head` refuses a head trained for another model.

Head classes live next to their decoders (baselines/medusa.py, methods/trigram.py); `HEAD_TYPES`
names them so `build_head("medusa", ...)` works without importing every method up front.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "head_config.json"

# head_type -> "module:Class"; imported lazily so harness/ does not depend on baselines/ at import time
HEAD_TYPES = {
    "medusa": "baselines.medusa:MedusaHead",
    "trigram": "methods.trigram:TrigramHead",
    "eagle": "baselines.eagle:EagleHead",
}

# the architecture fields that decide whether a head's weights can fit a model at all
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")
FINGERPRINT_ROWS = 64   # lm_head rows sampled for the identity (evenly spaced, first and last included)
FINGERPRINT_COLS = 4    # values per sampled row kept in head_config.json for the dtype-tolerant comparison


@dataclass
class BaseHandles:
    """The frozen target's pieces a head may use: never registered as a head submodule, never saved."""
    embed: torch.nn.Module     # input embedding: ids [...] -> [..., hidden]
    lm_head: torch.nn.Module   # output projection: [..., hidden] -> [..., vocab]

    @staticmethod
    def of(model: torch.nn.Module) -> "BaseHandles":
        return BaseHandles(model.get_input_embeddings(), model.get_output_embeddings())

    @staticmethod
    def for_head(model: torch.nn.Module, head: "DraftHead", scatter: bool = True) -> "BaseHandles":
        """The handles a head drafts with: a head with a reduced draft vocabulary projects onto those rows of
        the target's lm_head only (scatter=True: into full-vocabulary logits, -inf elsewhere, so decoders
        and verification see ordinary token ids; scatter=False: the reduced logits, for training)."""
        handles = BaseHandles.of(model)
        if head.draft_vocab is not None:
            handles.lm_head = DraftVocabProjection(handles.lm_head, head, scatter)
        return handles


class DraftVocabProjection:
    """x [..., H] -> logits over the head's draft vocabulary (FR-Spec / EAGLE-3's reduced vocabulary): the
    rows `head.draft_vocab` of the frozen lm_head. Drafting only within it keeps verification lossless (the
    target still scores its full vocabulary); what it costs is the tokens outside it, never drafted."""

    def __init__(self, lm_head: torch.nn.Module, head: "DraftHead", scatter: bool):
        self.lm_head, self.head, self.scatter = lm_head, head, scatter
        self.vocab_size = int(lm_head.weight.shape[0])
        self._ids = self._weight = None

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.head.draft_vocab
        weight = self.lm_head.weight
        if self._ids is None or self._ids.shape != ids.shape or self._weight.dtype != weight.dtype \
                or self._weight.device != weight.device or not torch.equal(self._ids, ids.to(self._ids.device)):
            self._ids = ids.detach().clone().to(weight.device)
            self._weight = weight.detach()[self._ids].contiguous()
        return self._ids, self._weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weight = self._rows()
        logits = torch.nn.functional.linear(x, weight.to(x.dtype))                    # [..., V_draft]
        if not self.scatter:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, ids, logits)                                        # [..., V]

    def to_draft_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> draft-vocabulary indices (-1 outside it); IGNORE-style negatives stay -1."""
        ids, _ = self._rows()
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long, device=ids.device)
        lookup[ids] = torch.arange(ids.numel(), device=ids.device)
        safe = token_ids.clamp(min=0).to(ids.device)
        return torch.where(token_ids >= 0, lookup[safe], torch.full_like(safe, -1)).to(token_ids.device)


class DraftHead(torch.nn.Module):
    """Base for Medusa heads, ours (trigram) and later EAGLE.

    Subclasses set `head_type`, call `super().__init__(config)` with their JSON-able constructor
    kwargs, and implement `training_logits`. Decoding helpers are the subclass's own business.
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

    def init_from_base(self, base: BaseHandles) -> None:
        """Initialise what should start from the target (e.g. an own lm_head copy). Default: nothing."""

    def training_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        """hidden [B, T, H] (target final normed states), input_ids [B, T] -> logits [K, B, T, V];
        [k, b, t] predicts input_ids[b, t + k + 2]; token inputs are teacher-forced (true tokens)."""
        raise NotImplementedError


def _head_class(head_type: str) -> type[DraftHead]:
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
    cls = _head_class(head_type)
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


# ---------------------------------------------------------------------------------------------
# base-model identity


def _architecture(config) -> dict:
    return {key: _config_value(config, key) for key in ARCH_FIELDS}


def _lm_head_rows(model: torch.nn.Module) -> torch.Tensor | None:
    weight = getattr(model.get_output_embeddings(), "weight", None)
    if weight is None or not weight.dtype.is_floating_point:
        return None   # a quantized lm_head: identity falls back to the architecture hash
    vocab = weight.shape[0]
    rows = torch.linspace(0, vocab - 1, min(FINGERPRINT_ROWS, vocab)).round().long().unique()
    return weight.detach()[rows.to(weight.device)].float().cpu()


def base_identity(loaded_or_model, model_cfg=None) -> dict:
    """{name, hub_id, config_hash, lm_head_hash, lm_head_fingerprint} of a LoadedModel or a *ForCausalLM.

    config_hash: sha1 of the architecture fields of config.json (ARCH_FIELDS).
    lm_head_hash: sha1 of FINGERPRINT_ROWS evenly spaced rows of the lm_head weight (first and last
    included), rounded to fp16 on CPU — the same weights loaded in fp32 or fp16 hash the same.
    lm_head_fingerprint: the first FINGERPRINT_COLS values of those rows; the fallback comparison
    (relative 2 %) when the hashes differ only by dtype rounding (e.g. a bf16 target).
    """
    is_module = isinstance(loaded_or_model, torch.nn.Module)   # a *ForCausalLM has a `.model` body too
    model = loaded_or_model if is_module else loaded_or_model.model
    name = None if is_module else getattr(loaded_or_model, "name", None)
    hub_id = None
    if model_cfg is not None:
        name, hub_id = model_cfg.get("name", name), model_cfg.get("hub_id")
    elif name is not None:
        try:
            from harness.models import model_config

            hub_id = model_config(name).get("hub_id")
        except HarnessError:
            hub_id = None
    if hub_id is None:
        hub_id = getattr(model.config, "_name_or_path", None) or None
    arch = _architecture(model.config)
    rows = _lm_head_rows(model)
    identity = {
        "name": name,
        "hub_id": hub_id,
        "config_hash": hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
        "architecture": arch,
        "lm_head_hash": None,
        "lm_head_fingerprint": None,
    }
    if rows is not None:
        identity["lm_head_hash"] = hashlib.sha1(rows.half().numpy().tobytes()).hexdigest()
        identity["lm_head_fingerprint"] = [float(v) for v in rows[:, :FINGERPRINT_COLS].flatten()]
    return identity


def _same_lm_head(saved: dict, current: dict) -> bool:
    if saved.get("lm_head_hash") is None or current.get("lm_head_hash") is None:
        return True   # nothing to compare (a quantized lm_head): the architecture check decides
    if saved["lm_head_hash"] == current["lm_head_hash"]:
        return True
    a, b = saved.get("lm_head_fingerprint"), current.get("lm_head_fingerprint")
    if not a or not b or len(a) != len(b):
        return False
    return all(math.isclose(x, y, rel_tol=0.02, abs_tol=1e-4) for x, y in zip(a, b))


def check_base(saved: dict, current: dict, folder: str | Path) -> None:
    """Refuse (one line) a head trained for another base model."""
    trained_on = saved.get("name") or saved.get("hub_id") or "another model"
    loaded_as = current.get("name") or current.get("hub_id") or "this model"
    if saved.get("config_hash") != current.get("config_hash"):
        raise HarnessError(
            f"head {folder} was trained for {trained_on} (architecture {saved.get('architecture')}), not for "
            f"{loaded_as}; train a head for this model or pick the matching model=")
    if not _same_lm_head(saved, current):
        raise HarnessError(
            f"head {folder} was trained for {trained_on}, whose lm_head weights differ from {loaded_as}'s; "
            f"train a head for this model or pick the matching model=")


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_head(head: DraftHead, folder: str | Path, base_identity: dict, extra: dict | None = None) -> Path:
    """Write model.safetensors (head parameters only) + head_config.json into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in head.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"head_type": head.head_type,
                                                            "format_version": str(FORMAT_VERSION)})
    info = {"head_type": head.head_type, "config": head.config, "base": base_identity,
            "format_version": FORMAT_VERSION}
    info.update(extra or {})
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(folder / CONFIG_FILE)
    return folder


def read_head_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise HarnessError(f"head folder {folder} does not exist; set method.head_path to a trained head folder "
                           f"(specdec-train output_dir) or null for an untrained head")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise HarnessError(f"{folder} has no {CONFIG_FILE}; point method.head_path at a folder written by "
                           f"specdec-train (model.safetensors + {CONFIG_FILE})")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc}); re-save the head with specdec-train") from exc
    if not isinstance(info, dict) or "head_type" not in info or "config" not in info:
        raise HarnessError(f"{path} lacks head_type/config; re-save the head with specdec-train")
    return info


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            raise HarnessError(f"{path} is corrupt or truncated ({reason}); re-copy or retrain the head") from exc
    foreign = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if foreign:
        try:
            state = torch.load(foreign[0], map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as exc:  # noqa: BLE001
            raise HarnessError(f"{foreign[0]} cannot be read as plain tensors ({type(exc).__name__}); "
                               f"convert it to {WEIGHTS_FILE}") from exc
        return dict(state)
    raise HarnessError(f"{folder} has no {WEIGHTS_FILE}; point method.head_path at a folder written by specdec-train")


def load_head(folder: str | Path, loaded) -> DraftHead:
    """A trained head for `loaded` (a LoadedModel), on its device and dtype, eval mode, frozen.

    One-line HarnessError when the folder or files are missing, the weights are corrupt, keys or
    shapes do not match the head config, or the head was trained for another base model.
    """
    folder = Path(folder)
    info = read_head_config(folder)
    check_base(info.get("base") or {}, base_identity(loaded), folder)
    tensors = _read_tensors(folder)
    head = build_head(info["head_type"], loaded.model.config, **dict(info["config"]))
    expected = head.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise HarnessError(f"{folder / WEIGHTS_FILE} does not match its {CONFIG_FILE} (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); re-save the head with specdec-train")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise HarnessError(f"{folder / WEIGHTS_FILE}: {key} has shape {tuple(tensors[key].shape)}, the config "
                               f"needs {tuple(value.shape)}; re-save the head with specdec-train")
    if head.draft_vocab is not None:     # ids stay integers whatever dtype the head is moved to
        tensors["draft_vocab"] = tensors["draft_vocab"].to(torch.long)
    head.load_state_dict(tensors)
    from harness import quant

    check = getattr(quant, "check_head_quantization", None)   # added by the quantization issue
    if check is not None:
        check(info, loaded)
    return head.to(device=loaded.device, dtype=loaded.dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# the team's key number


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


def load_or_init_head(head_path, loaded, head_type: str, **kwargs) -> DraftHead:
    """For a decoder's setup: the trained head at `head_path`, or (null) a fresh UNTRAINED head built from
    `kwargs` — plumbing and tests only, its drafts are near-random, so say so loudly."""
    if head_path:
        from harness.official import is_official, load_official

        if is_official(head_path) == head_type:   # a published checkpoint folder (config.json + its weights)
            return load_official(head_path, loaded, head_type)
        head = load_head(head_path, loaded)
        if head.head_type != head_type:
            raise HarnessError(f"head {head_path} is a {head.head_type} head, this method needs a {head_type} "
                               f"head; point method.head_path at a {head_type} checkpoint")
        return head
    import warnings

    message = (f"method.head_path is null: using an UNTRAINED, randomly initialised {head_type} head; its "
               f"drafts are near-random (for tests and plumbing only, not for speed numbers)")
    warnings.warn(message, stacklevel=2)
    log.warning(message)
    head = build_head(head_type, loaded.model.config, base=BaseHandles.of(loaded.model), **kwargs)
    return head.to(device=loaded.device, dtype=loaded.dtype).eval().requires_grad_(False)
