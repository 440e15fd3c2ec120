"""Scratch measurement (issue 14): what each method's steps cost, side by side in one process.

Runs `harness.interleave` (methods alternating per question) and times, per method, every `Target.verify` by
its draft size and every proposal that drafted; prints the interleaved table, then median / p10 / p90 per
(method, draft size) and per method's drafting. Answers session 14's question (does eagle2_cpu's step cost more
than vanilla's without a draft?) and shows what a draft costs next to a target step.

    OMP_NUM_THREADS=2 python scripts/step_costs.py --methods vanilla,eagle2_cpu bench.limit=4 bench.max_turns=1 \
        max_new_tokens=128 threads=2

Not part of the harness: a record of what was measured (docs/results_heads_v2.md quotes its output).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

from harness import interleave
from harness.engine import target as target_module
from harness.engine.loop import Proposer


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"median {1e3 * statistics.median(ordered):7.2f} ms  p10 {1e3 * ordered[len(ordered) // 10]:7.2f}  "
            f"p90 {1e3 * ordered[9 * len(ordered) // 10]:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    current = ["(setup)"]           # the method whose answer is running: verify calls are charged to it
    verify_times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    draft_times: dict[str, list[float]] = collections.defaultdict(list)

    verify = target_module.Target.verify

    def timed_verify(self, root, draft_tokens, *rest, **options):
        start = time.perf_counter()
        out = verify(self, root, draft_tokens, *rest, **options)
        verify_times[(current[0], len(draft_tokens))].append(time.perf_counter() - start)
        return out

    target_module.Target.verify = timed_verify
    import harness.bench as bench

    answer = bench.answer_question

    def charged_answer(runner, question, seed):
        current[0] = runner.method.name
        propose = type(runner.method).propose
        if not getattr(propose, "_timed", False) and propose is not Proposer.propose:
            def timed_propose(self, ctx, propose=propose):
                start = time.perf_counter()
                draft = propose(self, ctx)
                if draft.tokens:
                    draft_times[self.name].append(time.perf_counter() - start)
                return draft
            timed_propose._timed = True
            type(runner.method).propose = timed_propose
        try:
            return answer(runner, question, seed)
        finally:
            current[0] = "(setup)"

    bench.answer_question = charged_answer
    result = interleave.run([m.strip() for m in args.methods.split(",")], list(args.overrides), 1)
    print(interleave.format_rows(result))
    print("\nverify forwards by draft size (sizes with >= 5 calls; '(setup)' = warm-up and verify-curve probes)")
    for (method, size), values in sorted(verify_times.items()):
        if len(values) >= 5:
            print(f"{method:<18} draft {size:>3}: {len(values):>5} calls  {percentiles(values)}")
    print("\nproposals that drafted")
    for method, values in sorted(draft_times.items()):
        if values:
            print(f"{method:<18} {len(values):>5} calls  {percentiles(values)}")


if __name__ == "__main__":
    main()
