"""Head checkpoints: the one place a head is written, read, checked and loaded.

Our folder = `model.safetensors` (head parameters only; a shared frozen base lm_head is not stored) +
`head_config.json` {head_type, config, base, format_version, ...extra}. `base` is the identity of the
model the head was trained on; `load_head` refuses a head trained for another model.

A published checkpoint (EAGLE's or Medusa's own folder layout) is read by its head class's `from_official`
(baselines/eagle.py, baselines/medusa.py) with the helpers here: `read_published_config`, `published_weights`,
`check_dims`, `has_published_layout`, `read_tensors` and `check_state_dict`. A foreign `.bin`/`.pt` is read with
torch.load(weights_only=True) only: plain tensors, never pickled code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import warnings
from pathlib import Path

import torch

from harness.heads.base import BaseHandles, DraftHead, build_head, head_class
from harness.infra.errors import HarnessError
from harness.model.packing import pack_frozen_head

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "head_config.json"

# the architecture fields that decide whether a head's weights can fit a model at all
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")
FINGERPRINT_ROWS = 64   # lm_head rows sampled for the identity (evenly spaced, first and last included)
FINGERPRINT_COLS = 4    # values per sampled row kept in head_config.json for the dtype-tolerant comparison


def _config_value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


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
            from harness.model.loading import model_config

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
# reading tensors and checking them (every layout)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors, or from a torch pickle read as plain tensors (weights_only=True)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)   # never unpickle code
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise several types for a bad file
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{path} is corrupt or truncated, or not plain tensors ({reason}); re-copy it or "
                           f"convert it to safetensors") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HarnessError(f"{path} is not a flat state dict of tensors; is it a head checkpoint?")
    return dict(state)


def check_state_dict(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str, layout: str,
                     fix: str) -> None:
    """The one state-dict check: a line naming the first missing, unexpected or misshapen key of `tensors`
    against a head's state_dict() (`layout` names what was expected, `fix` what to do about it)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise HarnessError(f"{where} does not have the {layout} (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); {fix}")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise HarnessError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, the {layout} needs "
                               f"{tuple(value.shape)}; {fix}")


# ---------------------------------------------------------------------------------------------
# our checkpoints


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


def _our_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if path.is_file():
        return read_tensors(path)
    foreign = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if foreign:
        return read_tensors(foreign[0])
    raise HarnessError(f"{folder} has no {WEIGHTS_FILE}; point method.head_path at a folder written by specdec-train")


def load_head(folder: str | Path, loaded) -> DraftHead:
    """A trained head for `loaded` (a LoadedModel), on its device and dtype, eval mode, frozen.

    One-line HarnessError when the folder or files are missing, the weights are corrupt, keys or
    shapes do not match the head config, or the head was trained for another base model.
    """
    from harness.model.quantization import check_head_quantization

    folder = Path(folder)
    info = read_head_config(folder)
    check_base(info.get("base") or {}, base_identity(loaded), folder)
    tensors = _our_tensors(folder)
    head = build_head(info["head_type"], loaded.model.config, **dict(info["config"]))
    check_state_dict(head.state_dict(), tensors, str(folder / WEIGHTS_FILE), f"layout of its {CONFIG_FILE}",
                     "re-save the head with specdec-train")
    if head.draft_vocab is not None:     # ids stay integers whatever dtype the head is moved to
        tensors["draft_vocab"] = tensors["draft_vocab"].to(torch.long)
    head.load_state_dict(tensors)
    check_head_quantization(info, loaded)
    return head.to(device=loaded.head_device, dtype=loaded.dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# published checkpoints: the helpers every `from_official` shares


def has_published_layout(folder: str | Path, weight_names: tuple[str, ...]) -> bool:
    """A published head folder: config.json + one of `weight_names`, and not one of ours (head_config.json)."""
    folder = Path(folder)
    return ((folder / "config.json").is_file() and not (folder / CONFIG_FILE).is_file()
            and any((folder / name).is_file() for name in weight_names))


def read_published_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise HarnessError(f"official head folder {folder} does not exist; download the published head there "
                           f"(config.json + weights) and point method.head_path at it")
    if not path.is_file():
        raise HarnessError(f"{folder} has no config.json; a published head folder holds config.json + its weights")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc}); re-download the head") from exc


def published_weights(folder: str | Path, names: tuple[str, ...], kind: str) -> Path:
    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise HarnessError(f"{folder} has none of {', '.join(names)}; download the published {kind} weights there")


def check_dims(config: dict, loaded, folder: str | Path, kind: str) -> None:
    """Refuse a published head whose hidden or vocabulary size is not the target's."""
    target = loaded.model.config
    for key in ("hidden_size", "vocab_size"):
        theirs, ours = config.get(key), getattr(target, key, None)
        if theirs is not None and theirs != ours:
            raise HarnessError(f"{kind} head {folder} has {key}={theirs} but the target has {ours}; pick the head "
                               f"published for this model (or the model it was trained for)")


# ---------------------------------------------------------------------------------------------
# for a decoder's setup: every method loads its head through here


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HEAD_FILES = ["*.json", "*.safetensors", "*.bin", "*.pt"]   # what a head folder holds (no tokenizer, no base model)


def locate(head_path: str | Path) -> Path:
    """A head location as a local folder: an existing folder as is; a Hub id (`owner/name`, e.g. a model config's
    `heads.eagle: yuhuili/EAGLE-Vicuna-7B-v1.3`) through huggingface_hub's cache (downloaded the first time, the
    head files only; HF_HUB_OFFLINE=1 reads the cache only). Anything else is one line naming the fix."""
    folder = Path(str(head_path)).expanduser()
    if folder.is_dir():
        return folder
    text = str(head_path)
    if folder.exists() or not HUB_ID.match(text):
        raise HarnessError(f"head {text} does not exist (no such folder, and not a Hub id owner/name); point "
                           f"the method's head at a head folder: model.heads.<method>=DIR or method.head_path=DIR")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=text, allow_patterns=HEAD_FILES)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all one line with the fix
        raise HarnessError(f"head {text}: not in the Hugging Face cache and not downloadable here "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); download it where "
                           f"the Hub is reachable (huggingface-cli download {text} --local-dir DIR) and set "
                           f"model.heads.<method>=DIR") from None
    log.info("head %s from the Hugging Face cache: %s", text, local)
    return Path(local)


def load_or_init_head(head_path, loaded, head_type: str, official: bool = False, official_options: dict | None = None,
                      dtype: torch.dtype | None = None, **kwargs) -> DraftHead:
    """The head a decoder drafts with, on loaded's device and dtype, eval, frozen:
    - a published checkpoint (`official: true`, or a folder in the head class's published layout): the class's
      `from_official(folder, loaded, **official_options)`;
    - a specdec-train folder: `load_head`, refused if it holds another type of head;
    - a Hub id: fetched into the Hugging Face cache first (`locate`), then as above;
    - null: a fresh UNTRAINED head built from `kwargs`, for plumbing and tests only (its drafts are near-random),
      said loudly; the bench refuses this unless allow_untrained=true (harness.bench.check_head).
    dtype: the head drafts in this dtype instead of the target's (method.draft_dtype, harness.heads.base.resolve_draft_dtype)."""
    head = _load_or_init(head_path, loaded, head_type, official, official_options, **kwargs)
    if dtype is not None and dtype != loaded.dtype:
        head = head.to(dtype=dtype)
    # beside a packed target (model.cpu_linear) the head's linears are packed too: drafting runs its few-row GEMMs
    # through oneDNN instead of MKL's small-M path; no verified token changes (the head only proposes)
    pack_frozen_head(head, getattr(loaded, "linear", "default"))
    return head


def _load_or_init(head_path, loaded, head_type: str, official: bool, official_options: dict | None,
                  **kwargs) -> DraftHead:
    cls = head_class(head_type)
    if head_path:
        head_path = locate(head_path)
        if official or cls.is_published(head_path):
            return cls.from_official(head_path, loaded, **(official_options or {}))
        head = load_head(head_path, loaded)
        if head.head_type != head_type:
            raise HarnessError(f"head {head_path} is a {head.head_type} head, this method needs a {head_type} "
                               f"head; point method.head_path at a {head_type} checkpoint")
        return head
    message = (f"no head for this method (method.head_path is null; allow_untrained=true): an UNTRAINED, randomly "
               f"initialised {head_type} head; its drafts are near-random (plumbing and tests, not speed numbers)")
    warnings.warn(message, stacklevel=3)
    log.warning(message)
    head = build_head(head_type, loaded.model.config, base=BaseHandles.of(loaded.model), **kwargs)
    return head.to(device=loaded.head_device, dtype=loaded.dtype).eval().requires_grad_(False)


def head_weights_sha256(head_path) -> str | None:
    """One sha256 over a local head folder's weight files (*.safetensors, *.bin, by name): what a run's answers
    were drafted with, so a resume into the run can refuse a head that changed since. None for a Hub id or a path
    that is not a folder (nothing local to read before loading)."""
    folder = Path(str(head_path)).expanduser() if head_path else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def trained_head_artifact(folder: str | Path) -> str | None:
    """The W&B artifact specdec-train logged for a head that `python -m harness.ship` copied to `folder` (the bf16
    copy is other bytes, so another artifact): a bench run declares it too, so lineage reaches the training run.
    None for a head that was not shipped, or shipped before ship recorded it."""
    try:
        info = read_head_config(folder)
    except HarnessError:
        return None
    return (info.get("shipped") or {}).get("trained_artifact")
