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


ROWS_ONLY_ENV = "SPECDEC_VLLM_TOP_P_ROWS_ONLY"


def top_p_on_sampled_rows_only() -> bool:
    """Streamed distillation mixes sampled requests (the self-written user turns: T = 1, top_p 0.99) with greedy
    answers in every engine step, and vLLM's CPU sampler (0.32, no Triton) then sorts the whole batch's
    [rows, vocab] logits for top-p each step, greedy rows included: on the default model that halved the
    generation rate (measured: ~245 generated tok/s where greedy rounds run ~500). This restricts the top-k /
    top-p masking to the rows that ask for it (top_p < 1 or top_k < vocab); the other rows' masked logits are
    never used (a greedy row takes the argmax of the raw logits; top_p 1 masks nothing), so every request
    samples from the same distribution as before. Installed in each vLLM process: the module is re-imported
    by multiprocessing's spawn in the engine and worker processes, and the environment variable travels.
    The sampled tokens are unchanged; what differs is only what nobody samples from: a request that asked for
    vLLM's `processed_logits` logprobs on a greedy row would see the unmasked logits (the harness asks for none).
    CPU only: on a GPU the sampler is another kernel and a row test would cost a device sync per step.
    Returns whether it is installed (False: not a CPU platform, or this vLLM has no such function)."""
    try:
        import torch
        from vllm.v1.sample.ops import topk_topp_sampler as ops
    except Exception:                  # noqa: BLE001 - another vLLM layout: leave it as it is
        return False
    if not on_cpu_platform(torch):
        return False
    original = getattr(ops, "apply_top_k_top_p", None)
    if original is None:
        return False
    if getattr(original, "rows_only", False):
        return True

    def apply_top_k_top_p(logits, k, p):
        if (k is None and p is None) or logits.dim() != 2:
            return original(logits, k, p)
        need = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        if p is not None:
            need |= p < 1.0
        if k is not None:
            need |= (k > 0) & (k < logits.shape[1])
        if bool(need.all()):
            return original(logits, k, p)
        rows = need.nonzero().squeeze(1)
        if rows.numel():
            logits[rows] = original(logits[rows], None if k is None else k[rows], None if p is None else p[rows])
        return logits

    apply_top_k_top_p.rows_only = True
    ops.apply_top_k_top_p = apply_top_k_top_p
    print(f"specdec-harness: top-p / top-k on sampled rows only (pid {os.getpid()})", file=sys.stderr, flush=True)
    return True


def on_cpu_platform(torch) -> bool:
    """vLLM's own platform when it says (a CUDA build on a GPU machine is not CPU), else: no CUDA device."""
    try:
        from vllm.platforms import current_platform
        return bool(current_platform.is_cpu())
    except Exception:                  # noqa: BLE001 - an older vLLM or the test stub
        return not torch.cuda.is_available()


if os.environ.get(ROWS_ONLY_ENV) == "1":          # every vLLM process imports this file (spawn): patch each
    top_p_on_sampled_rows_only()


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
                  # the engine's own stats (running / waiting requests, KV use, tok/s) in its log every 10 s
                  **{"disable_log_stats": False, **(settings.get("engine_kwargs") or {})})
        import vllm

        # vLLM's CPU build (0.32) fails on per-request seeds ("CPU Generator does not use offset"): there only the
        # engine seed is set, and sampled tokens depend on which requests share a batch, i.e. on timing (greedy
        # answers do not)
        per_request_seed = bool(settings.get("per_request_seed", False))
        rows_only = os.environ.get(ROWS_ONLY_ENV) == "1" and top_p_on_sampled_rows_only()
        send({"ready": True, "vllm": getattr(vllm, "__version__", "unknown"), "top_p_rows_only": rows_only})
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
