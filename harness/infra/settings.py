"""Run settings checked before any work starts: every value that would otherwise run something else
(`max_new_tokens=0` generating a token, `temperature=-1` decoding greedily and recorded as -1.0, `top_p=0`
crashing mid-run, `threads=-1`, `device=cuda` on a machine without one) is one line naming the fix.

A rule is (dotted key, check, what is allowed); `check_settings(cfg, RULES)` walks them in order and stops at
the first bad value. Keys absent from a config are skipped (each app has its own subset). The bench
selection (limit, max_turns, question ids) is checked where it is read: harness/data/questions.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from harness.infra.errors import HarnessError

MISSING = object()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer_at_least(low: int) -> Callable[[object], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


def number_in(low: float, high: float, low_open: bool = False) -> Callable[[object], bool]:
    return lambda value: _number(value) and (low < value if low_open else low <= value) and value <= high


def device_name(value) -> bool:
    if value in ("auto", "cpu"):
        return True
    if not isinstance(value, str) or not (value == "cuda" or value.startswith("cuda:")):
        return False
    import torch

    if not torch.cuda.is_available():
        raise HarnessError(f"device={value}: this machine has no CUDA device; use device=cpu or device=auto")
    index = value.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise HarnessError(f"device={value}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
    return True


Rule = tuple[str, Callable[[object], bool], str]

DECODING: list[Rule] = [
    ("decoding.temperature", number_in(0.0, math.inf), "a number >= 0 (0 = greedy)"),
    ("decoding.top_p", number_in(0.0, 1.0, low_open=True), "a number in (0, 1] (1 = no nucleus cut)"),
]
COMMON: list[Rule] = [
    ("device", device_name, "auto, cpu, cuda or cuda:<index>"),
    ("threads", optional(integer_at_least(1)), "an integer >= 1, or null for torch's default"),
    ("seed", integer_at_least(0), "an integer >= 0"),
]
BENCH: list[Rule] = COMMON + DECODING + [
    ("max_new_tokens", integer_at_least(1), "an integer >= 1 (new tokens per turn)"),
    ("warmup", integer_at_least(0), "an integer >= 0 (untimed warm-up generations)"),
    ("warmup_tokens", optional(integer_at_least(1)), "an integer >= 1, or null for whole questions (Spec-Bench)"),
    ("host_probe_repeats", integer_at_least(0), "an integer >= 0 (1-token steps per host probe; 0 = none)"),
    ("host_probe_every", integer_at_least(0), "an integer >= 0 (questions between host probes; 0 = start and end)"),
    ("context.limit", lambda v: v is None or v == "auto" or integer_at_least(2)(v),
     "auto (the model's max_position_embeddings), an integer >= 2, or null (no cap)"),
    ("context.reserve", integer_at_least(0), "an integer >= 0 (positions kept free for a verify input)"),
]
DISTILL: list[Rule] = COMMON + DECODING + [
    ("max_length", integer_at_least(2), "an integer >= 2 (tokens of a whole conversation)"),
    ("max_new_tokens", optional(integer_at_least(1)), "an integer >= 1, or null for max_length only"),
    ("batch_size", integer_at_least(1), "an integer >= 1"),
    ("in_flight", optional(integer_at_least(1)), "an integer >= 1, or null"),
    ("stop_grace_s", number_in(0.0, math.inf), "a number of seconds >= 0"),
    ("self_prompts.count", integer_at_least(0), "an integer >= 0"),
    ("self_prompts.second_turn_fraction", number_in(0.0, 1.0), "a number in [0, 1]"),
    ("self_prompts.temperature", number_in(0.0, math.inf), "a number >= 0"),
    ("self_prompts.top_p", number_in(0.0, 1.0, low_open=True), "a number in (0, 1]"),
    ("eval_fraction", number_in(0.0, 1.0), "a number in [0, 1]"),
]
TRAIN: list[Rule] = COMMON + [
    ("model_max_length", integer_at_least(2), "an integer >= 2"),
]


def check_settings(cfg: DictConfig, rules: Sequence[Rule]) -> None:
    """Refuse the first bad value in one line: `key=value must be <allowed>`."""
    for key, check, allowed in rules:
        value = OmegaConf.select(cfg, key, default=MISSING)
        if value is MISSING:
            continue
        if not check(value):
            raise HarnessError(f"{key}={value!r} must be {allowed}; fix {key}=")
