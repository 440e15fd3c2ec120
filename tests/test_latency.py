"""The verify-cost curve (harness/latency.py): one entry per size, cache left exactly as it was."""

from __future__ import annotations

import json
import re

import pytest
import torch

from harness.infra.errors import HarnessError
from harness.engine.timing import bandwidth_bound, format_bound, format_curve, measure_read_bandwidth, measure_verify_latency
from harness.latency import main
from harness.engine.target import Target

PROMPT = list(range(3, 43))


def cache_snapshot(target: Target) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in target.cache.layers]


@pytest.mark.parametrize("tree", [False, True])
def test_curve_has_every_size_and_leaves_the_prefilled_cache(tiny_llama, tree):
    target = Target(tiny_llama)
    curve = measure_verify_latency(target, PROMPT, sizes=(1, 3, 8), repeats=2, warmup=1, tree=tree)
    assert list(curve) == [1, 3, 8] and all(seconds > 0 for seconds in curve.values())
    assert target.past == len(PROMPT)
    reference = Target(tiny_llama)
    with torch.inference_mode():
        reference.prefill(PROMPT)
    for (keys, values), (ref_keys, ref_values) in zip(cache_snapshot(target), cache_snapshot(reference)):
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    assert len(format_curve(curve).splitlines()) == 4


def test_measuring_over_the_current_cache_keeps_it(tiny_llama):
    target = Target(tiny_llama)
    with torch.inference_mode():
        target.prefill(PROMPT)
        target.verify(5, [6, 7], (-1, 0))
        target.commit(len(PROMPT), [0, 1])          # a mid-turn cache: prompt + 2 committed tokens
    before = cache_snapshot(target)
    curve = measure_verify_latency(target, None, sizes=(2, 4), repeats=1, warmup=0)
    assert list(curve) == [2, 4] and target.past == len(PROMPT) + 2
    for (keys, values), (old_keys, old_values) in zip(cache_snapshot(target), before):
        assert torch.equal(keys, old_keys) and torch.equal(values, old_values)


def test_sizes_are_measured_round_robin_so_a_drifting_host_slows_them_alike(tiny_llama, monkeypatch):
    target = Target(tiny_llama)
    order, verify = [], target.verify
    monkeypatch.setattr(target, "verify", lambda root, draft, parents: (order.append(len(draft) + 1),
                                                                        verify(root, draft, parents))[1])
    with torch.inference_mode():
        measure_verify_latency(target, PROMPT, sizes=(1, 3, 8), repeats=2, warmup=1)
    assert order == [1, 3, 8] * 3       # one warm-up round, then two measured rounds


def test_bad_sizes_fail_clearly(tiny_llama):
    with pytest.raises(HarnessError, match="sizes must be >= 1"):
        measure_verify_latency(Target(tiny_llama), PROMPT, sizes=(0, 4))
    with pytest.raises(HarnessError, match="pass prompt_ids"):
        measure_verify_latency(Target(tiny_llama), None, sizes=(1,))


def test_bandwidth_bound_arithmetic_and_line():
    bound = bandwidth_bound(538_000_000, 54e9, 0.0437)
    assert bound["bound_s"] == pytest.approx(538e6 / 54e9)
    assert bound["x_bound"] == pytest.approx(0.0437 / bound["bound_s"])
    assert format_bound(bound) == ("bound: 538 MB / 54.0 GB/s = 9.96 ms per step; "
                                   "1-token step measured 43.70 ms = 4.4x the bound")
    assert format_bound(bandwidth_bound(10**6, 1e9)).endswith("= 1.00 ms per step")     # no 1-token size measured
    assert measure_read_bandwidth("cpu", megabytes=8, repeats=2) > 1e8                 # > 0.1 GB/s on any machine
    with pytest.raises(HarnessError, match="megabytes >= 1"):
        measure_read_bandwidth("cpu", megabytes=0)


def test_cli_reports_the_bandwidth_bound_of_the_loaded_model(tiny_model_dir, capsys, monkeypatch):
    import harness.latency
    from harness.model.loading import load_model, model_config
    from harness.model.quantization import weight_memory_bytes

    measured = []
    monkeypatch.setattr(harness.latency, "measure_read_bandwidth",       # a fixed bandwidth: exact arithmetic
                        lambda device, megabytes: measured.append(megabytes) or 10e9)
    args = ["--model-path", str(tiny_model_dir), "--device", "cpu", "--sizes", "1,2", "--repeats", "1",
            "--warmup", "0", "--prompt-len", "16", "--bandwidth-mb", "8"]
    assert main(args) == 0 and measured == [8]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["1", "2"]       # the curve, then the bound under it
    cfg = model_config("smollm2-135m")
    cfg.path = str(tiny_model_dir)
    weights = weight_memory_bytes(load_model(cfg, "cpu").model)
    match = re.fullmatch(r"bound: (\d+) MB / 10\.0 GB/s = ([\d.]+) ms per step; "
                         r"1-token step measured ([\d.]+) ms = ([\d.]+)x the bound", lines[4])
    assert match, lines[4]
    megabytes, bound_ms, step_ms, ratio = match.groups()
    assert int(megabytes) == round(weights / 1e6) and bound_ms == f"{weights / 10e9 * 1e3:.2f}"
    assert float(ratio) == pytest.approx(float(step_ms) / (weights / 10e9 * 1e3), abs=0.06)
    assert main(args[:-1] + ["0"]) == 0 and "bound:" not in capsys.readouterr().out   # --bandwidth-mb 0: skipped


@pytest.mark.integration
def test_cli_prints_the_table_for_the_default_model(capsys, tmp_path):
    out = tmp_path / "curve.json"
    assert main(["--sizes", "1,4", "--repeats", "1", "--warmup", "1", "--prompt-len", "64", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# smollm2-135m") and "prefix 64 tokens" in lines[0]
    assert [line.split()[0] for line in lines[2:4]] == ["1", "4"] and lines[4].startswith("bound: ")
    assert out.is_file() and set(json.loads(out.read_text())) == {"1", "4"}


def test_interleaved_timing_pairs_methods_per_question(tiny_model_dir, questions_path, tmp_path, capsys):
    """Two methods take turns on every question (order flipping), in one process; greedy answers compared."""
    from harness.interleave import main

    out = tmp_path / "ab.json"
    overrides = [f"model.path={tiny_model_dir}", f"bench.path={questions_path}", "bench.limit=3", "max_new_tokens=12",
                 "warmup=1", "warmup_tokens=2", "progress=false"]
    assert main(["--methods", "vanilla,pld", "--passes", "2", "--json", str(out), *overrides]) == 0
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert result["questions"] == 3 and rows["vanilla"]["answers"] == rows["pld"]["answers"] == 6
    assert rows["pld"]["identical"] == 6 and rows["vanilla"]["ratio_total"] == rows["vanilla"]["ratio_paired"] == 1.0
    assert rows["pld"]["tokens"] == rows["vanilla"]["tokens"] and rows["pld"]["ratio_paired"] > 0
    # tau and the share of steps that carried a draft, counted like the bench's (vanilla: one token a step)
    assert rows["vanilla"]["tau"] == 1.0 and rows["vanilla"]["drafted_steps"] == 0
    assert rows["pld"]["tau"] == rows["pld"]["tokens"] / rows["pld"]["steps"] >= 1.0
    assert 0 <= rows["pld"]["drafted_steps"] <= rows["pld"]["verify_steps"] < rows["pld"]["steps"]
    assert "paired" in capsys.readouterr().out
    assert main(["--methods", "vanilla"]) == 2
    assert "two or more distinct" in capsys.readouterr().err


def test_cli_compares_the_cpu_runtime_options_side_by_side(tiny_model_dir, capsys):
    assert main(["--compare-runtime", "--model-path", str(tiny_model_dir), "--dtypes", "fp32,bf16", "--rounds", "1",
                 "--repeats", "1", "--warmup", "0", "--sizes", "1,2", "--prompt-len", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("fp32", "bf16"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [(d, lin, kv) for d in ("fp32", "bf16")
                                                  for lin in ("default", "onednn") for kv in ("cat", "buffered")]
    assert all(float(r[3]) > 0 and r[-1].endswith("x") for r in rows)
    assert "median of 1 interleaved rounds" in out
