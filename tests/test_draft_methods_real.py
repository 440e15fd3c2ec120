"""SpS and early exit on the real default model (SmolLM2-135M-Instruct): greedy answers token-identical
to vanilla over 5 MT-Bench questions x 2 turns, through the bench's own Runner.

Only SmolLM2-135M exists on this machine, so SpS uses the target as its own draft: every draft token
must be accepted (tau = k + 1 but for the last, capped step), which proves the plumbing (draft cache,
feeds after the bonus token, chain verify) on a real model, not a speedup.
"""

from __future__ import annotations

import pytest

from harness.bench import Runner, answer_question, build_method
from harness.data.questions import load_questions
from harness.infra.store import RunStore
from tests.conftest import REAL_LIMIT, REAL_NEW_TOKENS, compose_config

pytestmark = pytest.mark.integration


def bench_config(method: str, questions_path, *overrides: str):
    return compose_config(f"method={method}", f"bench.path={questions_path}", f"bench.limit={REAL_LIMIT}",
                          f"max_new_tokens={REAL_NEW_TOKENS}", *overrides)


def answers(loaded, cfg) -> dict[int, list[dict]]:
    runner = Runner(build_method(cfg.method), loaded, cfg)
    return {q.question_id: answer_question(runner, q, 0) for q in load_questions(cfg.bench)}


@pytest.fixture(scope="module")
def vanilla_answers(vanilla_reference):
    """The shared vanilla run (conftest), same questions, token budget and seed."""
    return {r["question_id"]: r["turns"] for r in RunStore(vanilla_reference).records()}


def token_ids(result: dict[int, list[dict]]) -> dict[int, list[list[int]]]:
    return {qid: [turn["token_ids"] for turn in turns] for qid, turns in result.items()}


def test_sps_with_the_target_as_draft_is_lossless_and_accepts_everything(default_model, questions_path,
                                                                        vanilla_answers):
    k = 4
    result = answers(default_model, bench_config("sps", questions_path, f"method.k={k}"))
    assert token_ids(result) == token_ids(vanilla_answers)
    for turns in result.values():
        for turn in turns:
            assert len(turn["token_ids"]) > 0
            assert all(length == k + 1 for length in turn["accepted_lengths"][1:-1])
            assert turn["pos_accepted"] == turn["pos_attempted"]


def test_early_exit_default_config_is_lossless(default_model, questions_path, vanilla_answers):
    result = answers(default_model, bench_config("early_exit", questions_path))
    assert token_ids(result) == token_ids(vanilla_answers)
    assert sum(sum(t["draft_sizes"]) for turns in result.values() for t in turns) > 0
