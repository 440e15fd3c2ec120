"""pld and lookahead on the real default model: token-identical to vanilla greedy over 5 MT-Bench
questions x 2 turns (short answers), through the whole bench path (run_bench with `reference=`)."""

import pytest

from harness.bench import run_bench
from harness.infra.store import RunStore
from tests.conftest import REAL_LIMIT, compose_config, real_bench_overrides


def _check_against_vanilla(method, questions_path, vanilla_reference, tmp_path, *extra):
    run_dir = tmp_path / method
    summary = run_bench(compose_config(*real_bench_overrides(questions_path, run_dir, f"bench.limit={REAL_LIMIT}",
                                                             f"method={method}", f"reference={vanilla_reference}",
                                                             *extra)), run_dir)
    records = RunStore(run_dir).records()
    assert len(records) == 5 and all(len(r["turns"]) == 2 for r in records)
    assert summary["lossless_rate"] == 1.0, [r["lossless"] for r in records if not r["lossless"]["match"]]
    return summary


@pytest.mark.integration
def test_pld_matches_vanilla_on_the_real_model(questions_path, vanilla_reference, tmp_path):
    summary = _check_against_vanilla("pld", questions_path, vanilla_reference, tmp_path)
    # turn 2 often quotes turn 1 or the question: some lookups succeed
    assert summary["draft_tokens"] > 0 and summary["tau"] > 1.0


@pytest.mark.integration
def test_lookahead_cpu_preset_matches_vanilla_on_the_real_model(questions_path, vanilla_reference, tmp_path):
    summary = _check_against_vanilla("lookahead_cpu", questions_path, vanilla_reference, tmp_path)
    assert summary["draft_tokens"] > 0 and summary["tau"] > 1.0


@pytest.mark.integration
@pytest.mark.slow
def test_lookahead_official_defaults_match_vanilla_on_the_real_model(questions_path, vanilla_reference, tmp_path):
    summary = _check_against_vanilla("lookahead", questions_path, vanilla_reference, tmp_path)
    assert summary["tau"] > 1.0
