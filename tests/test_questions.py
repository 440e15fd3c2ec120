"""Question files are read with types (integer, unique ids; turns a non-empty list of strings) and the bench
selection values are checked before any question is read: each bad input is one line naming the fix."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from harness.data.questions import load_questions, parse_questions
from harness.infra.errors import HarnessError

GOOD = {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}


def write(tmp_path, *records, raw: bytes | None = None):
    path = tmp_path / "question.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("record, words", [
    ({**GOOD, "turns": "Write a poem"}, "turns must be a non-empty list"),       # became 12 one-character turns
    ({**GOOD, "turns": []}, "turns must be a non-empty list"),
    ({**GOOD, "turns": ["ok", 3]}, "turns must be a non-empty list"),
    ({**GOOD, "question_id": 81.7}, "is not an integer"),                      # 81.7 and 81.2 both became 81
    ({**GOOD, "question_id": "81"}, "is not an integer"),
    ({**GOOD, "question_id": True}, "is not an integer"),
    ({**GOOD, "category": 5}, "category 5 is not a string"),
    ({"question_id": 81, "turns": ["x"]}, "lacks category"),
    ("[1, 2]", "must be a JSON object"),
    ("{not json", "not JSON"),
])
def test_a_mistyped_question_is_refused_with_its_line(tmp_path, record, words):
    path = write(tmp_path, GOOD | {"question_id": 80}, record)
    with pytest.raises(HarnessError) as caught:
        parse_questions(path)
    message = one_line(caught)
    assert words in message and f"{path}:2" in message


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(HarnessError) as caught:
        parse_questions(write(tmp_path, GOOD, GOOD | {"turns": ["other"]}))
    assert "question_id 81 repeats line 1" in one_line(caught)


def test_a_latin1_file_is_one_line(tmp_path):
    with pytest.raises(HarnessError) as caught:
        parse_questions(write(tmp_path, raw=json.dumps(GOOD | {"turns": ["caf\u00e9"]}).encode("latin-1")
                              .replace(b"\\u00e9", "\u00e9".encode("latin-1"))))
    assert "is not UTF-8" in one_line(caught) and "re-save it as UTF-8" in str(caught.value)


def test_a_good_file_parses_with_its_types(tmp_path):
    questions = parse_questions(write(tmp_path, GOOD, GOOD | {"question_id": 82, "turns": ["Only one."]}))
    assert [(q.question_id, q.turns) for q in questions] == [(81, GOOD["turns"]), (82, ["Only one."])]


def bench(path, **values):
    return OmegaConf.create({"name": "mt_bench", "path": str(path), "id_range": None, "question_ids": None,
                             "categories": None, "limit": None, "max_turns": None, **values})


@pytest.mark.parametrize("values, words", [
    ({"limit": 0}, "bench.limit=0 must be an integer >= 1"),                   # ran all 80 questions
    ({"limit": -1}, "bench.limit=-1 must be an integer >= 1"),                 # ran 79
    ({"max_turns": 0}, "bench.max_turns=0 must be an integer >= 1"),           # ran both turns
    ({"limit": 2.5}, "bench.limit=2.5"),
    ({"question_ids": 81}, "bench.question_ids=[81]"),                         # a scalar: a traceback before
    ({"question_ids": ["81"]}, "must be a list of integer ids"),
    ({"id_range": [90, 81]}, "low <= high"),
    ({"categories": "writing"}, "bench.categories=[writing]"),
])
def test_bad_selection_values_are_refused_before_reading(tmp_path, values, words):
    missing = tmp_path / "not-read.jsonl"          # never opened: the values are checked first
    with pytest.raises(HarnessError) as caught:
        load_questions(bench(missing, **values))
    assert words in one_line(caught)


def test_the_selection_still_selects(tmp_path):
    path = write(tmp_path, *[GOOD | {"question_id": i} for i in range(81, 86)])
    chosen = load_questions(bench(path, id_range=[82, 85], limit=2, max_turns=1))
    assert [(q.question_id, len(q.turns)) for q in chosen] == [(82, 1), (83, 1)]
    assert [q.question_id for q in load_questions(bench(path, question_ids=[85, 81]))] == [81, 85]


@pytest.mark.parametrize("conversations, words", [
    (["hello", "hi"], "turn 0 is 'hello', not a message"),
    ([{"from": "human", "value": 5}], "turn 0 is"),
    ([{"value": "no role"}], "turn 0 is"),
])
def test_sharegpt_items_that_are_not_messages_are_one_line(tmp_path, conversations, words):
    from harness.data.sharegpt import read_sharegpt

    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "a", "conversations": conversations}]))
    with pytest.raises(HarnessError) as caught:
        read_sharegpt(path)
    assert words in one_line(caught) and "record 0" in str(caught.value)
    path.write_bytes("[{\"id\": \"caf\u00e9\"}]".encode("latin-1"))
    with pytest.raises(HarnessError, match="is not UTF-8"):
        read_sharegpt(path)
