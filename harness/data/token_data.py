"""The distilled dataset as training reads it: token ids + text, columnar (parquet), with a manifest.

One row a conversation:
    id, source (input | self), category, human [turns], gpt [turns]           the text, for reading and export
    input_ids [T] (int32)      the tokens the target saw at the last turn: its prompt + its generated answer
    answer_spans [2 x turns]   [start, end) token spans of the answers in input_ids (flattened pairs)
    new_tokens [turns], stop_reasons [turns]

Training takes input_ids as they are (no re-tokenisation) and labels the answer spans, so a head learns the
very tokens the target generated. `<stem>.manifest.json` beside it says what made it (model, dtype,
backend, sampling, prompt source, counts, sha256 of the file).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch.utils.data import Dataset

from harness.infra.errors import HarnessError

IGNORE_INDEX = -100

COLUMNS = ("id", "source", "category", "human", "gpt", "input_ids", "answer_spans", "new_tokens", "stop_reasons")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_parquet(records: list[dict], path: str | Path) -> Path:
    """Shard records (with token ids) -> one zstd parquet file, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [r["id"] for r in records if "input_ids" not in r]
    if missing:
        raise HarnessError(f"{len(missing)} records carry no token ids (e.g. {missing[0]}): they come from an older "
                           "specdec-distill; write them as ShareGPT (output=...json) or distil them again")
    rows = {name: [] for name in COLUMNS}
    for record in records:
        turns = record["conversations"]
        rows["id"].append(record["id"])
        rows["source"].append(record.get("source", "input"))
        rows["category"].append(record.get("category"))
        rows["human"].append([t["value"] for t in turns if t["from"] == "human"])
        rows["gpt"].append([t["value"] for t in turns if t["from"] == "gpt"])
        rows["input_ids"].append(record["input_ids"])
        rows["answer_spans"].append([int(x) for span in record["answer_spans"] for x in span])
        rows["new_tokens"].append(record["new_tokens"])
        rows["stop_reasons"].append(record["stop_reasons"])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("category", pa.string()),
                        ("human", pa.list_(pa.string())), ("gpt", pa.list_(pa.string())),
                        ("input_ids", pa.list_(pa.int32())), ("answer_spans", pa.list_(pa.int32())),
                        ("new_tokens", pa.list_(pa.int32())), ("stop_reasons", pa.list_(pa.string()))])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows, schema=schema), tmp, compression="zstd", compression_level=19)
    os.replace(tmp, path)
    return path


def read_parquet(path: str | Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(f"dataset {path} does not exist; fix data_path (specdec-distill ... merge=true writes it)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001
        raise HarnessError(f"{path} is not a readable parquet file ({exc}); rebuild it with specdec-distill") from exc
    missing = [c for c in ("input_ids", "answer_spans") if c not in table.column_names]
    if missing:
        raise HarnessError(f"{path} has no {', '.join(missing)} column(s); it is not a specdec-distill dataset")
    return table.to_pydict()


def to_sharegpt(columns: dict[str, list]) -> list[dict]:
    """Rows back to ShareGPT records (what Medusa's train.py and FastChat read)."""
    records = []
    for index, conversation_id in enumerate(columns["id"]):
        turns = []
        for user, answer in zip(columns["human"][index], columns["gpt"][index]):
            turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
        records.append({"id": conversation_id, "conversations": turns})
    return records


def manifest_path(path: str | Path) -> Path:
    """`<stem>.manifest.json` beside a dataset (`d.parquet`, `d.train.parquet` -> `d.manifest.json`)."""
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + ".manifest.json")


def write_manifest(path: Path, manifest: dict) -> Path:
    out = manifest_path(path) if path.suffix == ".parquet" else path
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    return out


class TokenDataset(Dataset):
    """A distilled parquet file as training examples {input_ids [T], labels [T]}: labels are the token on the
    answer spans, IGNORE_INDEX elsewhere; truncated to max_length."""

    def __init__(self, path: str | Path, max_length: int):
        columns = read_parquet(path)
        self.input_ids, self.spans = columns["input_ids"], columns["answer_spans"]
        if not self.input_ids:
            raise HarnessError(f"{path} holds no conversation; distil more data")
        self.max_length, self.path = int(max_length), str(path)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        ids = list(self.input_ids[index][: self.max_length])
        labels = [IGNORE_INDEX] * len(ids)
        flat = self.spans[index]
        for start, end in zip(flat[0::2], flat[1::2]):
            for position in range(start, min(end, len(ids))):
                labels[position] = ids[position]
        return {"input_ids": ids, "labels": labels}

    def lengths(self) -> list[int]:
        return [min(len(ids), self.max_length) for ids in self.input_ids]


def is_token_dataset(path) -> bool:
    return str(path).endswith(".parquet")
