"""Target features on disk: the frozen target's final (normed) hidden states per conversation, written once
and read back by every epoch of EAGLE training (EAGLE's own recipe, `ge_data` then `train`).

Size: T x H x 2 bytes per conversation (bf16 by default; fp16 / fp32 possible): a 512-token conversation of SmolLM2-135M (H = 576) is
0.59 MB; a 2048-token ShareGPT conversation of a 7B Llama (H = 4096) is 16.8 MB, so ~68k conversations
take ~1.1 TB -- the cache is the fast path on a GPU node with a scratch disk, the on-the-fly path (the
target runs in the training step) needs no disk at all.

Layout of a cache folder:
    index.json                  {format, base (heads.base_identity), dtype, hidden_size, examples: [{id, shard,
                                 num_tokens}], shards: [file names], total_bytes}
    shard-00000.safetensors     per example i: `{i}.hidden` bf16 [T, H], `{i}.input_ids` int32 [T],
                                `{i}.loss_mask` uint8 [T]   (`shard_size` examples per file)
index.json is written last, so a folder without it is an unfinished cache: write_cache continues it from
progress.json (written after every shard) when the settings match, else starts over.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from harness.infra.errors import HarnessError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"


def feature_bytes(num_tokens: int, hidden_size: int, bytes_per_value: int = 2) -> int:
    """Bytes of one conversation's features: T x H x 2 in fp16."""
    return int(num_tokens) * int(hidden_size) * int(bytes_per_value)


@torch.no_grad()
def target_features(model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] ids -> the target's final normed hidden states [B, T, H] (its body only: no lm_head)."""
    body = getattr(model, model.base_model_prefix)
    return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


PROGRESS_FILE = "progress.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def write_cache(model: torch.nn.Module, examples: Iterable[dict], folder: str | Path, base: dict,
                shard_size: int = 256, progress: bool = True, total: int | None = None,
                dtype: str = "bfloat16", stop=None) -> Path | None:
    """Run the target over each example {"id", "input_ids" [T], "loss_mask" [T]} (one at a time: no padding)
    and store its features in `dtype`; `base` is heads.base_identity(...) of the target, checked on read.

    Resumable: after each shard file `progress.json` lists what is written, so a killed run (same examples,
    same order) continues after the last finished shard instead of starting over. `stop` (a
    harness.infra.signals.StopRequest): once requested, what is computed is written as a shard and None is
    returned (the caller says how to continue)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_FILE).unlink(missing_ok=True)
    if dtype not in DTYPES:
        raise HarnessError(f"feature cache dtype {dtype} is not one of {', '.join(DTYPES)}")
    device = next(model.parameters()).device
    entries, shards, tensors, total_bytes, hidden_size = [], [], {}, 0, None
    in_shard = 0
    state = {"base": base, "dtype": dtype, "shard_size": shard_size}
    progress_path = folder / PROGRESS_FILE
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        if {k: saved.get(k) for k in state} == json.loads(json.dumps(state)) and all(
                (folder / name).is_file() for name in saved["shards"]):
            entries, shards, total_bytes, hidden_size = (saved["entries"], saved["shards"], saved["total_bytes"],
                                                         saved["hidden_size"])
    skip = len(entries)

    def flush():
        nonlocal in_shard
        if tensors:
            name = f"shard-{len(shards):05d}.safetensors"
            tmp = folder / (name + ".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(folder / name)
            shards.append(name)
            tensors.clear()
            in_shard = 0
            record = {**state, "entries": entries, "shards": shards, "total_bytes": total_bytes,
                      "hidden_size": hidden_size}
            progress_tmp = folder / (PROGRESS_FILE + ".tmp")
            progress_tmp.write_text(json.dumps(record, default=str))
            progress_tmp.replace(progress_path)

    bar = tqdm(examples, total=total, desc="features", unit="conv", disable=not progress, mininterval=5)
    for position, example in enumerate(bar):
        if position < skip:
            continue
        if stop is not None and stop.requested:
            flush()
            bar.close()
            return None
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(example["loss_mask"], dtype=torch.bool)
        if ids.ndim != 1 or mask.shape != ids.shape:
            raise HarnessError(f"example {example.get('id')}: input_ids and loss_mask must be 1-D and the same length")
        hidden = target_features(model, ids[None].to(device))[0].to("cpu", DTYPES[dtype])
        hidden_size = hidden.shape[-1]
        key = str(in_shard)
        in_shard += 1
        tensors[f"{key}.hidden"] = hidden.contiguous()
        tensors[f"{key}.input_ids"] = ids.to(torch.int32)
        tensors[f"{key}.loss_mask"] = mask.to(torch.uint8)
        entries.append({"id": str(example.get("id", len(entries))), "shard": len(shards), "key": key,
                        "num_tokens": int(ids.numel())})
        total_bytes += feature_bytes(ids.numel(), hidden_size)
        if in_shard >= shard_size:
            flush()
    flush()
    index = {"format": FORMAT_VERSION, "base": base, "dtype": dtype, "hidden_size": hidden_size,
             "examples": entries, "shards": shards, "total_bytes": total_bytes}
    tmp = folder / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(folder / INDEX_FILE)
    progress_path.unlink(missing_ok=True)
    return folder


class FeatureCache(torch.utils.data.Dataset):
    """A written cache as a Dataset of {"id", "input_ids" [T] long, "loss_mask" [T] bool, "hidden" [T, H] fp16}.
    Refuses (one line) a cache of another base model when `base` (heads.base_identity) is given."""

    def __init__(self, folder: str | Path, base: dict | None = None):
        self.folder = Path(folder)
        path = self.folder / INDEX_FILE
        if not path.is_file():
            raise HarnessError(f"{self.folder} is not a finished feature cache (no {INDEX_FILE}); build it with "
                               f"harness.data.feature_cache.write_cache (or specdec-train feature_cache=<folder>)")
        try:
            self.index = json.loads(path.read_text())
        except ValueError as exc:
            raise HarnessError(f"{path} is not valid JSON ({exc}); delete the cache folder and rebuild it") from exc
        if self.index.get("format") != FORMAT_VERSION:
            raise HarnessError(f"{self.folder} has cache format {self.index.get('format')}, this code reads "
                               f"{FORMAT_VERSION}; delete it and rebuild")
        if base is not None:
            from harness.heads.checkpoint import check_base

            check_base(self.index.get("base") or {}, base, self.folder)
        self.examples = self.index["examples"]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getstate__(self) -> dict:   # DataLoader workers open their own file handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    @property
    def total_bytes(self) -> int:
        return int(self.index.get("total_bytes", 0))

    def _shard(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            path = self.folder / self.index["shards"][shard]
            try:
                self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise HarnessError(f"{path} is missing or corrupt ({type(exc).__name__}); rebuild the cache") from exc
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict:
        entry = self.examples[index]
        handle, key = self._shard(entry["shard"]), entry["key"]
        return {"id": entry["id"], "input_ids": handle.get_tensor(f"{key}.input_ids").long(),
                "loss_mask": handle.get_tensor(f"{key}.loss_mask").bool(),
                "hidden": handle.get_tensor(f"{key}.hidden")}


class CachedTrainingSet(torch.utils.data.Dataset):
    """A FeatureCache as specdec-train examples: {"input_ids", "labels" (IGNORE_INDEX off the loss mask),
    "hidden" [T, H]}, so the training step skips the target's forward."""

    def __init__(self, cache: FeatureCache, ignore_index: int = -100):
        self.cache, self.ignore_index = cache, ignore_index

    def __len__(self) -> int:
        return len(self.cache)

    def lengths(self) -> list[int]:
        return [int(e["num_tokens"]) for e in self.cache.examples]

    def __getitem__(self, index: int) -> dict:
        item = self.cache[index]
        labels = item["input_ids"].masked_fill(~item["loss_mask"], self.ignore_index)
        return {"input_ids": item["input_ids"].tolist(), "labels": labels.tolist(), "hidden": item["hidden"]}


class FeatureCollator:
    """Wraps a token collator (right padding) and pads the cached features the same way: [B, T_max, H]."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if "hidden" not in examples[0]:          # eval examples: the target runs on the fly
            return self.collate(examples)
        batch = self.collate([{k: v for k, v in e.items() if k != "hidden"} for e in examples])
        width = batch["input_ids"].shape[1]
        first = examples[0]["hidden"]
        hidden = first.new_zeros(len(examples), width, first.shape[-1])
        for row, example in enumerate(examples):
            hidden[row, : example["hidden"].shape[0]] = example["hidden"]
        batch["hidden"] = hidden
        return batch


def training_examples(dataset, ignore_index: int = -100):
    """specdec-train examples ({"input_ids", "labels"}) -> write_cache examples ({"id", "input_ids", "loss_mask"})."""
    for index in range(len(dataset)):
        example = dataset[index]
        labels = torch.as_tensor(example["labels"])
        yield {"id": str(index), "input_ids": example["input_ids"], "loss_mask": labels != ignore_index}

