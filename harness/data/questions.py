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


def parse_questions(path: Path) -> list[Question]:
    questions = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question = Question(int(record["question_id"]), str(record["category"]),
                                    [str(turn) for turn in record["turns"]])
                if not question.turns:
                    raise ValueError("empty 'turns'")
            except (ValueError, KeyError, TypeError) as exc:
                raise HarnessError(f"{path}:{line_no}: malformed question ({type(exc).__name__}: {exc}); "
                                   "each line must be JSON with question_id, category and turns") from exc
            questions.append(question)
    if not questions:
        raise HarnessError(f"{path} holds no questions")
    return questions


def load_questions(bench: DictConfig) -> list[Question]:
    """Questions selected by the bench config: id range, ids, categories, limit; turns capped."""
    questions = parse_questions(question_file(bench))
    if bench.get("id_range"):
        low, high = bench.id_range
        questions = [q for q in questions if low <= q.question_id <= high]
    if bench.get("question_ids"):
        wanted = {int(i) for i in bench.question_ids}
        questions = [q for q in questions if q.question_id in wanted]
    if bench.get("categories"):
        wanted_categories = set(bench.categories)
        questions = [q for q in questions if q.category in wanted_categories]
    if bench.get("limit"):
        questions = questions[: int(bench.limit)]
    if bench.get("max_turns"):
        for q in questions:
            q.turns = q.turns[: int(bench.max_turns)]
    if not questions:
        raise HarnessError(f"bench '{bench.name}' selects no questions; check bench.question_ids / categories / limit")
    return questions
