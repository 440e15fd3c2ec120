"""Hardware-aware draft sizing (`tree: auto` / `total_token: auto`): how many draft tokens pay on this device.

One step that verifies n draft tokens emits 1 + A(n) tokens on average (A = expected accepted draft
tokens) and costs draft_time(n) + verify_time(n + 1) seconds (n + 1: the root rides in the same forward).
The best size maximises

    tokens_per_second(n) = (1 + A(n)) / (draft_time(n) + verify_time(n + 1))

over n >= 0; n = 0 is a plain target step, so an auto-sized method never plans to be slower than vanilla.

verify_time comes from `harness.engine.timing.measure_verify_latency` (a {verify tokens: seconds} curve, linear
between measured sizes). A(n) comes from the method:
- a chain with per-position acceptance a_1..a_K (P(token k accepted | 1..k-1 accepted)):
  A(n) = sum_{k<=n} prod_{j<=k} a_j                                    (`expected_chain`)
- a static tree (Medusa / EAGLE-1 choices) with per-node acceptance given the parent: the path
  probability of each node, summed over the first n nodes                (`expected_tree`)
- per step, from the draft's own path confidences (the product of the drafter's probabilities along a
  node's path) sorted high to low: their running sum estimates the accepted length, scaled by a
  calibration factor c = (drafts the target accepted) / (what the confidences predicted), learnt online
  (`OnlineSizer`). EAGLE-2 (`total_token: auto`), Medusa (`tree: auto`: its heads' probabilities along a
  choice path) and ours (`max_nodes: auto`: the head's probabilities along its chain, beam or tree) size
  every step this way (`make_sizer` + `keep_most_likely`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.infra.errors import HarnessError

# verify sizes measured for an auto-sized method (root included); linear interpolation in between
CURVE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def interpolate(curve: dict[int, float], size: float) -> float:
    """Seconds for a verify of `size` tokens: piecewise linear through the measured points, the nearest
    point's value below the smallest, the last segment's slope beyond the largest."""
    if not curve:
        raise HarnessError("empty verify latency curve; measure one with `python -m harness.latency --tree --json <file>`")
    points = sorted((int(k), float(v)) for k, v in curve.items())
    if size <= points[0][0] or len(points) == 1:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if size <= x1:
            return y0 + (y1 - y0) * (size - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (size - x1) / (x1 - x0)


def expected_chain(acceptance: Sequence[float]) -> list[float]:
    """A(n) for n = 0..K of a chain whose k-th token is accepted with probability acceptance[k-1] given
    the earlier ones: A(n) = sum_{k<=n} prod_{j<=k} acceptance[j-1]."""
    expected, survive = [0.0], 1.0
    for rate in acceptance:
        survive *= float(rate)
        expected.append(expected[-1] + survive)
    return expected


def expected_tree(node_acceptance: Sequence[float], parents: Sequence[int]) -> list[float]:
    """A(n) for the first n nodes of a tree (parents first; -1 = root); node_acceptance[i] = P(node i
    accepted | its parent accepted). Prefixes of a parents-first list are trees, so every n is valid."""
    path_probability: list[float] = []
    expected = [0.0]
    for rate, parent in zip(node_acceptance, parents):
        reach = float(rate) * (path_probability[parent] if parent >= 0 else 1.0)
        path_probability.append(reach)
        expected.append(expected[-1] + reach)
    return expected


@dataclass
class SizeChoice:
    size: int                                   # draft tokens n (the verify input is n + 1)
    tokens_per_second: float
    table: list[tuple[int, float, float, float]]   # (n, expected tokens per step, seconds per step, tokens/s)

    def format(self) -> str:
        lines = [f"{'n':>4} {'tokens/step':>11} {'ms/step':>8} {'tokens/s':>9}"]
        for n, tokens, seconds, rate in self.table:
            mark = "  <-" if n == self.size else ""
            lines.append(f"{n:>4} {tokens:>11.3f} {seconds * 1e3:>8.2f} {rate:>9.2f}{mark}")
        return "\n".join(lines)


def pick_size(expected: Sequence[float], verify_latency: dict[int, float],
              draft_time: float | Sequence[float] | Callable[[int], float] = 0.0, overhead: float = 0.0,
              sizes: Sequence[int] | None = None) -> SizeChoice:
    """The n (index into `expected`, A(0) = 0 included) maximising (1 + A(n)) / (draft(n) + verify(n+1) + overhead).

    draft_time: seconds to draft n tokens -- a constant (charged for n >= 1 only: n = 0 drafts nothing), a
    sequence indexed by n, or a function of n. sizes: the n to consider (default: every index of expected).
    Ties go to the smaller n.
    """
    if not expected:
        raise HarnessError("pick_size needs the expected accepted length for at least n = 0")
    candidates = range(len(expected)) if sizes is None else [n for n in sizes if 0 <= n < len(expected)]
    table = []
    for n in candidates:
        if callable(draft_time):
            drafting = float(draft_time(n))
        elif isinstance(draft_time, (int, float)):
            drafting = float(draft_time) if n > 0 else 0.0
        else:
            drafting = float(draft_time[n])
        seconds = drafting + interpolate(verify_latency, n + 1) + overhead
        tokens = 1.0 + float(expected[n])
        table.append((n, tokens, seconds, tokens / seconds))
    best = max(table, key=lambda row: (row[3], -row[0]))
    return SizeChoice(best[0], best[3], table)


# ---------------------------------------------------------------------------------------------
# the verify curve of the device at hand

_CURVES: dict[tuple, dict[int, float]] = {}   # measured once per model, device and thread count in a process


def read_curve(source: str | dict) -> dict[int, float]:
    """A curve given directly ({size: seconds}) or as a JSON file (`python -m harness.latency --json`)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise HarnessError(f"latency curve {path} does not exist; write one with "
                               f"`python -m harness.latency --tree --json {path}` or set it to null to measure")
        source = json.loads(path.read_text())
    try:
        curve = {int(k): float(v) for k, v in dict(source).items()}
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"latency curve must map verify sizes to seconds ({exc})") from exc
    if not curve or min(curve) < 1 or any(v <= 0 or not math.isfinite(v) for v in curve.values()):
        raise HarnessError("latency curve must map verify sizes >= 1 to positive seconds")
    return curve


def verify_curve(loaded, source: str | dict | None = None, max_tokens: int = 64, prompt_len: int = 128,
                 repeats: int = 5) -> dict[int, float]:
    """The {verify tokens: seconds} curve for `loaded` on its device: read from `source`, or measured
    (flat tree mask, a `prompt_len`-token prefix, median of `repeats`) and cached for the process."""
    if source is not None:
        return read_curve(source)
    from harness.engine.target import Target
    from harness.engine.timing import filler_ids, measure_verify_latency

    sizes = sorted({s for s in CURVE_SIZES if s <= max_tokens} | {max(1, int(max_tokens))})
    key = (id(loaded.model), str(loaded.device), torch.get_num_threads(), tuple(sizes), prompt_len)
    if key not in _CURVES:
        prompt = filler_ids(loaded, prompt_len)
        _CURVES[key] = measure_verify_latency(Target(loaded.model), prompt, sizes, repeats=repeats, warmup=1,
                                              tree=True)
    return _CURVES[key]


class OnlineSizer:
    """Per-step sizing for a method that ranks its candidates by path confidence (EAGLE-2).

    choose(): given this step's candidates' path probabilities (sorted high to low) and the drafting time
    already spent, keep the n that maximises (1 + c * sum(top n)) / (draft + ingest + verify(n + 1)).
    observe(): after the target verified, update c (accepted drafts / predicted, with a prior of
    `prior_steps` calibrated steps) and the mean time to read the accepted path back (ingest).
    should_draft(): False while drafting has not paid recently (the best planned rate stayed below a plain
    target step's); drafting is still probed so the estimate can recover: after `probe_every` declined
    steps, the interval doubling (up to `max_probe_every`) while probes keep planning below a plain step's
    rate, and back to `probe_every` once one plans above it.
    """

    def __init__(self, verify_latency: dict[int, float], calibrate: bool = True, prior_steps: float = 4.0,
                 max_tokens: int | None = None, probe_every: int = 8, max_probe_every: int = 32):
        self.verify_latency = verify_latency
        self.calibrate = calibrate
        self.max_tokens = max_tokens or max(verify_latency)
        self.accepted_sum = self.predicted_sum = prior_steps    # c starts at 1
        self.ingest_time = 0.0
        self.ingest_steps = 0
        self.last_prediction = 0.0
        self.gain = 1.0                   # EMA of (best planned rate) / (plain step rate)
        self.probe_every, self.max_probe_every = probe_every, max(probe_every, max_probe_every)
        self.interval, self.skipped = probe_every, 0
        self.sizes: list[int] = []        # chosen n per drafted step, for reports and tests

    @property
    def calibration(self) -> float:
        if not self.calibrate:
            return 1.0
        return min(4.0, max(0.05, self.accepted_sum / self.predicted_sum))

    def should_draft(self) -> bool:
        if self.gain >= 1.0:
            return True
        self.skipped += 1
        if self.skipped >= self.interval:
            self.skipped = 0
            return True
        return False

    def choose(self, path_probs: torch.Tensor, draft_seconds: float) -> int:
        limit = min(len(path_probs), self.max_tokens - 1)
        confidences = path_probs[:limit].double().cumsum(0).tolist()
        expected = [0.0] + [self.calibration * value for value in confidences]
        cost = draft_seconds + self.ingest_time
        choice = pick_size(expected, self.verify_latency, lambda n: cost)
        plain = 1.0 / interpolate(self.verify_latency, 1)
        ratio = choice.tokens_per_second / plain
        self.gain = 0.8 * self.gain + 0.2 * ratio
        if ratio > 1.0:             # drafting pays again: probe at the base rate
            self.interval = self.probe_every
        elif self.gain < 1.0:       # a probe (or the step that ended drafting) that did not pay: probe less often
            self.interval = min(2 * self.interval, self.max_probe_every)
        self.last_prediction = confidences[choice.size - 1] if choice.size > 0 else 0.0
        self.sizes.append(choice.size)
        return choice.size

    def observe(self, accepted_draft: int, ingest_seconds: float | None) -> None:
        """ingest_seconds: what reading the step back cost the method; None: nothing was read (the method
        queued it), which leaves the ingest estimate as it was."""
        if self.last_prediction > 0:
            self.accepted_sum += accepted_draft
            self.predicted_sum += self.last_prediction
        self.last_prediction = 0.0
        if ingest_seconds is None:
            return
        self.ingest_steps += 1
        self.ingest_time += (ingest_seconds - self.ingest_time) / min(self.ingest_steps, 32)


def make_sizer(loaded, latency_curve: str | dict | None, max_tokens: int, calibrate: bool = True) -> OnlineSizer:
    """An OnlineSizer for an auto-sized method: the verify curve read from `latency_curve` or measured on
    `loaded`'s device (up to `max_tokens` verify tokens, root included), sizes capped at `max_tokens`."""
    if int(max_tokens) < 2:
        raise HarnessError(f"method.auto_max_tokens={max_tokens}: an auto-sized draft needs room for at least "
                           f"one draft token (>= 2 verify tokens, root included)")
    curve = verify_curve(loaded, latency_curve, max_tokens=int(max_tokens))
    return OnlineSizer(curve, calibrate=calibrate, max_tokens=int(max_tokens))


def keep_most_likely(sizer: OnlineSizer, path_probs: torch.Tensor, draft_seconds: float) -> list[int]:
    """The candidates to verify this step: `sizer` picks how many (n), the n with the highest path
    probability are kept, returned in ascending index order.

    Candidates are listed parents first and a child's path probability never exceeds its parent's (a
    product of probabilities), so with ties going to the lower index the kept set is prefix-closed: every
    kept node's ancestors are kept, and ascending order is a valid parents-first draft.
    """
    order = torch.sort(path_probs.detach().double(), descending=True, stable=True)
    count = min(sizer.choose(order.values, draft_seconds), len(order.indices))
    return sorted(order.indices[:count].tolist())
