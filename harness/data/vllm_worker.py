"""The vLLM side of `specdec-distill backend=vllm`: a subprocess run by the vLLM environment's Python
(`make distill-env`), never imported by the harness. It imports only the standard library and vllm, so
the two environments' pins never meet.

Protocol: JSON lines. The first line on stdin is the engine's settings; the worker answers
`{"ready": true, "vllm": <version>}`. Each later line

    {"id": n, "submit": [{"key": k, "prompt": [token ids], "params": {"temperature", "top_p", "max_tokens",
     "stop_token_ids", "stop", "seed"}}, ...]}

adds its requests to the engine (none is fine), steps the engine until at least one request is finished
(or, with `"timeout_s": t` in the line, until t seconds have passed) and answers
`{"id": n, "done": [{"key": k, "token_ids": [...], "finish_reason": "stop"|"length"}, ...]}`:
the caller submits the next turn of a finished conversation while the others keep generating, so the batch
never drains between rounds. A failure is `{"error": "..."}` and the worker exits. vLLM and its workers log
to the real stdout, so the protocol runs on a private copy of it and fd 1 is pointed at stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def _protocol_stream():
    private = os.dup(1)
    os.dup2(2, 1)                      # anything printed from here on (vLLM's logs) goes to stderr
    sys.stdout = sys.stderr
    return os.fdopen(private, "w", buffering=1, encoding="utf-8")


def main() -> int:
    out = _protocol_stream()
    # Ctrl-C is the harness's to handle (it stops in order, then closes this worker's stdin)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def send(message: dict) -> None:
        out.write(json.dumps(message, separators=(",", ":")) + "\n")
        out.flush()

    try:
        settings = json.loads(sys.stdin.readline())
        from vllm import LLM, SamplingParams

        try:
            from vllm.inputs import TokensPrompt
        except ImportError:            # older vLLM: a plain dict is the same prompt
            TokensPrompt = dict        # noqa: N806
        llm = LLM(model=settings["model"], dtype=settings.get("dtype", "auto"),
                  tensor_parallel_size=int(settings.get("tensor_parallel_size", 1)),
                  max_model_len=settings.get("max_model_len"), seed=int(settings.get("seed", 0)),
                  trust_remote_code=bool(settings.get("trust_remote_code", False)),
                  **(settings.get("engine_kwargs") or {}))
        import vllm

        # vLLM's CPU build (0.32) fails on per-request seeds ("CPU Generator does not use offset"): there only the
        # engine seed is set, and sampled tokens depend on which requests share a batch, i.e. on timing (greedy
        # answers do not)
        per_request_seed = bool(settings.get("per_request_seed", False))
        send({"ready": True, "vllm": getattr(vllm, "__version__", "unknown")})
    except Exception as exc:           # noqa: BLE001 - reported to the harness as one line
        send({"error": f"vLLM could not start: {type(exc).__name__}: {exc}"})
        return 1

    engine = llm.llm_engine
    try:                               # only finished requests come back from step(): no per-token outputs
        from vllm.sampling_params import RequestOutputKind
        final_only = {"output_kind": RequestOutputKind.FINAL_ONLY}
    except ImportError:
        final_only = {}

    def sampling(p: dict):
        stop = list(p.get("stop") or [])
        return SamplingParams(temperature=float(p["temperature"]), top_p=float(p.get("top_p", 1.0)),
                              max_tokens=int(p["max_tokens"]), stop_token_ids=list(p.get("stop_token_ids") or []),
                              stop=stop or None, seed=p.get("seed") if per_request_seed else None,
                              skip_special_tokens=False, detokenize=bool(stop), **final_only)

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            for item in request.get("submit") or []:
                engine.add_request(str(item["key"]), TokensPrompt(prompt_token_ids=item["prompt"]),
                                   sampling(item["params"]))
            done = []
            timeout = request.get("timeout_s")
            deadline = None if timeout is None else time.monotonic() + float(timeout)
            while not done and engine.has_unfinished_requests():
                for result in engine.step():
                    if not result.finished:
                        continue
                    reason = result.outputs[0].finish_reason
                    if reason not in ("stop", "length"):     # aborted or failed: not a training example
                        raise RuntimeError(f"request {result.request_id} ended with finish_reason={reason!r}")
                    done.append({"key": int(str(result.request_id).split("-")[0]),
                                 "token_ids": list(result.outputs[0].token_ids), "finish_reason": reason})
                if deadline is not None and time.monotonic() >= deadline:
                    break
            send({"id": request["id"], "done": done})
        except Exception as exc:       # noqa: BLE001
            send({"error": f"vLLM failed on request {line[:80]!r}: {type(exc).__name__}: {exc}"})
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
