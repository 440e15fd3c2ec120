"""Hardware-aware sizing: the expected-throughput model and its choice, checked against hand-computed answers."""

from __future__ import annotations

import json

import pytest
import torch

from harness.infra.errors import HarnessError
from harness.engine.sizing import (OnlineSizer, expected_chain, expected_tree, interpolate, keep_most_likely, make_sizer,
                            pick_size, read_curve, verify_curve)
from harness.engine.tree import subtree
from helpers import as_loaded, single_thread

# a CPU-like curve: 40 ms for one token, +2 ms per extra verify token up to 16 (then flattening)
CURVE = {1: 0.040, 2: 0.042, 4: 0.046, 8: 0.054, 16: 0.070}


def test_interpolation_is_linear_between_points_and_extends_the_last_slope():
    assert interpolate(CURVE, 5) == pytest.approx(0.048)            # between 4 and 8
    assert interpolate(CURVE, 1) == pytest.approx(0.040)
    assert interpolate(CURVE, 0.5) == pytest.approx(0.040)          # below the first point: its value
    assert interpolate(CURVE, 32) == pytest.approx(0.102)           # slope of 8 -> 16 (2 ms per token)
    with pytest.raises(HarnessError, match="empty"):
        interpolate({}, 3)


def test_expected_accepted_length_of_a_chain_and_of_a_tree():
    assert expected_chain([0.8, 0.75, 0.5]) == pytest.approx([0.0, 0.8, 1.4, 1.7])
    # root -> 0 (0.6) -> 2 (0.5) -> 4 (0.4);  root -> 1 (0.2);  0 -> 3 (0.3)
    assert expected_tree([0.6, 0.2, 0.5, 0.3, 0.4], [-1, -1, 0, 0, 2]) == \
        pytest.approx([0.0, 0.6, 0.8, 1.1, 1.28, 1.4])


def test_pick_size_maximises_expected_tokens_per_second():
    """By hand, draft 10 ms, acceptance 0.8, 0.75 then 0.5 per position:
    n=0: 1/0.040 = 25.0;  n=3: 2.7/(0.010+0.046) = 48.21;  n=4: 2.85/(0.010+0.048) = 49.14;
    n=5: 2.925/(0.010+0.050) = 48.75  ->  n = 4."""
    expected = expected_chain([0.8, 0.75, 0.5, 0.5, 0.5, 0.5])
    choice = pick_size(expected, CURVE, draft_time=0.010)
    assert choice.size == 4
    assert choice.tokens_per_second == pytest.approx(2.85 / 0.058)
    rates = {n: rate for n, _, _, rate in choice.table}
    assert rates[0] == pytest.approx(25.0) and rates[3] == pytest.approx(2.7 / 0.056)
    assert "<-" in choice.format().splitlines()[5]


def test_costly_drafts_or_weak_heads_choose_no_draft():
    """A draft costing 6.5 ms per token (a CPU vocabulary projection) on a 41 ms target step, +2.2 ms per
    verify token: acceptance 0.3 pays for one token (1.3/0.0497 = 26.2 > 1/0.041 = 24.4), 0.2 does not."""
    curve = {1: 0.041, 11: 0.063}
    per_token = lambda n: 0.0065 * n   # noqa: E731
    assert pick_size(expected_chain([0.3] * 5), curve, per_token).size == 1
    assert pick_size(expected_chain([0.2] * 5), curve, per_token).size == 0
    # the same head on a GPU-like flat curve drafts deep
    assert pick_size(expected_chain([0.3] * 5), {1: 0.02, 64: 0.021}, 0.001).size == 5


def test_online_sizer_calibrates_confidence_and_stops_drafting_when_it_does_not_pay():
    sizer = OnlineSizer({1: 0.010, 64: 0.0101})                       # verifying is nearly free
    confident = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])
    assert sizer.choose(confident, 0.001) == 8
    for _ in range(40):                                               # the target never accepts
        sizer.observe(0, 0.0)
        sizer.choose(confident, 0.001)
    assert sizer.calibration < 0.2
    steep = OnlineSizer({1: 0.010, 2: 0.030, 64: 1.0})
    for _ in range(10):
        assert steep.choose(torch.tensor([0.3, 0.1]), 0.005) == 0     # drafting costs more than it brings
    assert steep.interval == 32                                       # probes that keep declining back off
    decisions = [steep.should_draft() for _ in range(64)]
    assert decisions.count(True) == 2                                 # only the periodic probes still draft
    assert steep.choose(torch.tensor([1.0, 1.0]), 0.0) == 0 and steep.interval == 32   # a plain step is no recovery
    cheap = OnlineSizer({1: 0.010, 2: 0.012, 64: 0.2})               # one draft token costs 20 % of a step
    for _ in range(10):
        cheap.choose(torch.tensor([0.3, 0.1]), 0.005)                 # 1.3 tokens in 17 ms: below 1 in 10 ms
    assert cheap.interval == 32
    assert cheap.choose(torch.tensor([1.0, 1.0, 1.0]), 0.0) == 3 and cheap.interval == 8   # a probe that pays


def test_keep_most_likely_keeps_a_prefix_closed_subtree_in_draft_order():
    """root -> 0 (0.6) -> 2 (0.3) -> 4 (0.12);  root -> 1 (0.3) -> 3 (0.15). With a flat curve every node
    pays: all 5 kept. With each extra verify token at +10 ms on a 40 ms step, one node at 0.6 pays
    (1.6 / 0.050 = 32 > 25) and a second at 0.3 does not (1.9 / 0.060 = 31.7): only node 0."""
    parents = (-1, -1, 0, 1, 2)
    probs = torch.tensor([0.6, 0.3, 0.3, 0.15, 0.12])
    assert keep_most_likely(OnlineSizer({1: 0.040, 64: 0.0401}, calibrate=False), probs, 0.0) == [0, 1, 2, 3, 4]
    steep = OnlineSizer({1: 0.040, 2: 0.050, 3: 0.060, 64: 0.670}, calibrate=False)
    assert keep_most_likely(steep, probs, 0.0) == [0]
    # three nodes: 0, then the tie at 0.3 goes to the lower index (1), never to 2 ahead of 1's subtree order
    three = OnlineSizer({1: 0.040, 64: 0.0401}, calibrate=False, max_tokens=4)
    keep = keep_most_likely(three, probs, 0.0)
    assert keep == [0, 1, 2]
    assert subtree([10, 11, 12, 13, 14], parents, [0, 1, 3]) == ([10, 11, 13], (-1, -1, 1))
    assert subtree([10, 11, 12, 13, 14], parents, []) == ([], ())
    with pytest.raises(HarnessError, match="auto_max_tokens"):
        make_sizer(None, {1: 0.04}, max_tokens=1)


def test_curves_read_from_json_and_measured_once_per_process(tmp_path, tiny_llama):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"1": 0.04, "8": 0.05}))
    assert read_curve(str(path)) == {1: 0.04, 8: 0.05}
    with pytest.raises(HarnessError, match="does not exist"):
        read_curve(str(tmp_path / "nope.json"))
    with pytest.raises(HarnessError, match="positive seconds"):
        read_curve({1: -1.0})

    class Template:                                    # prefix_ids needs only encode()
        @staticmethod
        def encode(turns):
            return list(range(5, 45))

    with single_thread():
        loaded = as_loaded(tiny_llama, template=Template())
        curve = verify_curve(loaded, max_tokens=8, prompt_len=32, repeats=1)
        assert sorted(curve) == [1, 2, 3, 4, 6, 8] and all(seconds > 0 for seconds in curve.values())
        assert verify_curve(loaded, max_tokens=8, prompt_len=32, repeats=1) is curve


def test_a_step_the_method_did_not_read_back_leaves_the_ingest_estimate():
    from harness.engine.sizing import OnlineSizer

    sizer = OnlineSizer({1: 0.010, 16: 0.012})
    sizer.observe(0, 0.004)
    sizer.observe(0, None)          # queued, nothing read: says nothing about what a read costs
    assert sizer.ingest_time == pytest.approx(0.004) and sizer.ingest_steps == 1
