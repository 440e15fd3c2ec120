"""ShareGPT-format conversations: `[{"id", "conversations": [{"from": "human"|"gpt", "value"}...]}]`.

The format Medusa, EAGLE and FastChat train on. `specdec-distill` writes it, `specdec-train` reads it,
as a JSON list (`.json`) or one conversation a line (`.jsonl`).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

from harness.infra.errors import HarnessError

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard", "model"})


def read_sharegpt(path: str | Path) -> list[dict]:
    """All records of a ShareGPT `.json` (a list) or `.jsonl` file; ids made strings (missing: `row<i>`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(f"ShareGPT file {path} does not exist; fix data_path")
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
        else:
            records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    except ValueError as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc}); give a ShareGPT .json list or .jsonl file") from exc
    if not isinstance(records, list):
        raise HarnessError(f"{path} holds a {type(records).__name__}, not a list of conversations; "
                           "ShareGPT files are [{\"id\", \"conversations\": [...]}]")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise HarnessError(f"{path}: record {index} has no 'conversations' list; ShareGPT records are "
                               "{\"id\", \"conversations\": [{\"from\", \"value\"}]}")
        for turn, message in enumerate(record["conversations"]):
            if not isinstance(message, dict) or not isinstance(message.get("value", ""), str) \
                    or not isinstance(message.get("from"), str):
                raise HarnessError(f"{path}: record {index} turn {turn} is {str(message)[:60]!r}, not a message "
                                   "{\"from\": \"human\"|\"gpt\", \"value\": \"...\"}")
        record["id"] = str(record.get("id", f"row{index}"))
    return records


def user_turns(record: dict) -> list[str]:
    """The human turns, in order (assistant and system turns dropped: distillation regenerates answers)."""
    return [str(m.get("value", "")) for m in record["conversations"] if m.get("from") in USER_ROLES]


def turn_pairs(record: dict) -> list[tuple[str, str]]:
    """(user, assistant) pairs in order. Leading non-user and system turns are skipped; the conversation
    is cut at the first turn that breaks the user/assistant alternation (as FastChat's loader would refuse it)."""
    messages = [m for m in record["conversations"] if m.get("from") in USER_ROLES | ASSISTANT_ROLES]
    while messages and messages[0].get("from") not in USER_ROLES:
        messages = messages[1:]
    pairs = []
    for user, answer in zip(messages[0::2], messages[1::2]):
        if user.get("from") not in USER_ROLES or answer.get("from") not in ASSISTANT_ROLES:
            break
        pairs.append((str(user.get("value", "")), str(answer.get("value", ""))))
    return pairs


def normalise(text: str) -> str:
    """For overlap checks: Unicode-folded, lower case, punctuation and whitespace runs -> one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", " ", text).strip()


class JsonlLog:
    """Append-only `.jsonl`: one record a line, flushed and fsync'd per record (the pattern of
    harness/infra/store.py), so a kill loses at most the record being written; a torn last line is cut off."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
        # split on "\n" only: str.splitlines also breaks at U+2028, U+0085 ..., which json.dumps(ensure_ascii=False)
        # leaves raw inside strings (a model's answer held one: the shard could not be read back)
        return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def write_sharegpt(records: list[dict], path: str | Path) -> Path:
    """Write atomically: `.jsonl` one record a line, anything else a JSON list (what Medusa's loader reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            json.dump(records, handle, ensure_ascii=False, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path
