"""vllm.sampling_params of the stub: the output kinds (the worker asks for FINAL_ONLY)."""

import enum


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2
