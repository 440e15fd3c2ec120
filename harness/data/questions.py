"""Benchmark questions (MT-Bench / Spec-Bench `question.jsonl`).

The file comes from `bench.path`, else `$SPECDEC_DATA` (a file, or a folder holding
`spec_bench/question.jsonl`), else a cached download of Spec-Bench's file. Offline with no cache is one
line that says how to point at a copy.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from harness.infra.errors import HarnessError
from harness.model.loading import cache_root

SPEC_BENCH_URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"
MT_BENCH_IDS = range(81, 161)


@dataclass
class Question:
    question_id: int
    category: str
    turns: list[str]


def _from_env() -> Path | None:
    value = os.environ.get("SPECDEC_DATA")
    if not value:
        return None
    path = Path(value)
    return path / "spec_bench" / "question.jsonl" if path.is_dir() else path


def question_file(bench: DictConfig) -> Path:
    if bench.get("path"):
        path = Path(bench.path).expanduser()
        if not path.is_file():
            raise HarnessError(f"question file {path} does not exist; fix bench.path or unset it to use $SPECDEC_DATA")
        return path
    env = _from_env()
    if env is not None:
        if not env.is_file():
            raise HarnessError(f"$SPECDEC_DATA points at {env}, which does not exist; point it at question.jsonl")
        return env
    cached = cache_root() / "data" / "spec_bench" / "question.jsonl"
    if cached.is_file():
        return cached
    url = bench.get("url") or SPEC_BENCH_URL
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=20) as response:
            tmp.write_bytes(response.read())
        parse_questions(tmp)  # never cache a broken download
        os.replace(tmp, cached)
        return cached
    except (OSError, HarnessError) as exc:
        raise HarnessError(
            f"no question file: bench.path and $SPECDEC_DATA are unset and downloading {url} failed "
            f"({type(exc).__name__}); set bench.path=/path/to/question.jsonl or SPECDEC_DATA") from exc


def _question(record, path: Path, line_no: int) -> Question:
    """One line of question.jsonl, typed: an integer id, a string category, a non-empty list of strings."""
    where = f"{path}:{line_no}"
    if not isinstance(record, dict):
        raise HarnessError(f"{where}: a question must be a JSON object with question_id, category and turns")
    missing = [key for key in ("question_id", "category", "turns") if key not in record]
    if missing:
        raise HarnessError(f"{where}: the question lacks {', '.join(missing)}; each line needs question_id, category "
                           f"and turns")
    qid, category, turns = record["question_id"], record["category"], record["turns"]
    if isinstance(qid, bool) or not isinstance(qid, int):
        raise HarnessError(f"{where}: question_id {qid!r} is not an integer; write ids as integers (81, not 81.7 "
                           f"or \"81\")")
    if not isinstance(category, str):
        raise HarnessError(f"{where}: category {category!r} is not a string")
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) and turn for turn in turns):
        raise HarnessError(f"{where}: turns must be a non-empty list of non-empty strings (got {str(turns)[:60]!r}); "
                           f"write [\"first turn\", \"second turn\"]")
    return Question(qid, category, list(turns))


def parse_questions(path: Path) -> list[Question]:
    questions, seen = [], {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise HarnessError(f"{path}:{line_no}: not JSON ({exc}); each line must be one JSON question") from None
        question = _question(record, path, line_no)
        if question.question_id in seen:
            raise HarnessError(f"{path}:{line_no}: question_id {question.question_id} repeats line "
                               f"{seen[question.question_id]}; ids must be unique")
        seen[question.question_id] = line_no
        questions.append(question)
    if not questions:
        raise HarnessError(f"{path} holds no questions")
    return questions


def _positive(bench: DictConfig, key: str) -> int | None:
    value = bench.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HarnessError(f"bench.{key}={value!r} must be an integer >= 1, or null for no limit")
    return value


def _selection(bench: DictConfig):
    """The bench selection settings, checked: one line per bad value, before any question is read."""
    id_range = bench.get("id_range")
    if id_range is not None:
        if (len(id_range) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in id_range)
                or id_range[0] > id_range[1]):
            raise HarnessError(f"bench.id_range={list(id_range)} must be [low, high], integers with low <= high")
    ids = bench.get("question_ids")
    if ids is not None:
        if isinstance(ids, (int, str)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            raise HarnessError(f"bench.question_ids={ids!r} must be a list of integer ids, e.g. "
                               f"bench.question_ids=[{ids if isinstance(ids, int) else 81}]")
    categories = bench.get("categories")
    if categories is not None and (isinstance(categories, str) or not all(isinstance(c, str) for c in categories)):
        raise HarnessError(f"bench.categories={categories!r} must be a list of names, e.g. bench.categories=[writing]")
    return id_range, ids, categories, _positive(bench, "limit"), _positive(bench, "max_turns")


def load_questions(bench: DictConfig) -> list[Question]:
    """Questions selected by the bench config: id range, ids, categories, limit; turns capped."""
    id_range, ids, categories, limit, max_turns = _selection(bench)
    questions = parse_questions(question_file(bench))
    if id_range:
        low, high = id_range
        questions = [q for q in questions if low <= q.question_id <= high]
    if ids:
        wanted = set(ids)
        questions = [q for q in questions if q.question_id in wanted]
    if categories:
        wanted_categories = set(categories)
        questions = [q for q in questions if q.category in wanted_categories]
    if limit:
        questions = questions[:limit]
    if max_turns:
        for q in questions:
            q.turns = q.turns[:max_turns]
    if not questions:
        raise HarnessError(f"bench '{bench.name}' selects no questions; check bench.question_ids / categories / limit")
    return questions
