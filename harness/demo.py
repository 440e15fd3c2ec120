"""`make demo`: a small CPU comparison, exactly as a user runs one, then its report.

    python -m harness.demo                                   # 3 MT-Bench questions x 2 turns x 64 tokens
    python -m harness.demo bench.limit=5 max_new_tokens=128  # any specdec-bench override
    python -m harness.demo method=vanilla,pld                # other methods

1. `specdec-bench -m method=<the CPU-sized methods> ...` (a subprocess: the user-facing path; Hydra's
   default launcher runs the jobs one after another, so they do not share the CPU while they are timed).
   The trained methods (eagle2_cpu, medusa_cpu_auto, ours_auto: sized for this CPU from its measured verify
   costs) load the heads the repository ships for the default model (heads/smollm2-135m, see its README.md);
2. `specdec-report` on the sweep folder: prints the leaderboard and the figures' paths.
About 4-5 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from harness import CONF_DIR, REPO_ROOT

# The methods the demo compares, in leaderboard order: weight-free ones, then the trained heads the repo ships
# (the trained ones in their CPU-sized presets: trees and draft lengths sized from this machine's verify costs)
CANDIDATES = ("vanilla", "hf_generate", "pld", "lookahead_cpu", "eagle2_cpu", "medusa_cpu_auto", "ours_auto")
DEFAULTS = {"bench": "mt_bench", "bench.limit": "3", "max_new_tokens": "64", "logger.wandb.group": "demo"}
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def available_methods() -> list[str]:
    return [name for name in CANDIDATES if (CONF_DIR / "method" / f"{name}.yaml").is_file()]


def bench_command() -> list[str]:
    script = Path(sys.executable).parent / "specdec-bench"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "harness.bench"]


def sweep_args(argv: list[str], sweep_dir: Path) -> list[str]:
    """Defaults, then the user's overrides (a key given twice is Hydra's error, so merge by key)."""
    overrides = dict(DEFAULTS, method=",".join(available_methods()))
    extra = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("+", "~")):
            overrides[key] = value
        else:
            extra.append(arg)
    overrides.setdefault("hydra.sweep.dir", str(sweep_dir))
    return ["-m", *(f"{k}={v}" for k, v in overrides.items()), *extra]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    if not env.get("SPECDEC_DATA") and (SHARED_DATA / "spec_bench" / "question.jsonl").is_file():
        env["SPECDEC_DATA"] = str(SHARED_DATA)     # as the Makefile does; no download needed
    sweep_dir = Path("multirun") / f"demo_{datetime.now():%Y-%m-%d_%H-%M-%S}"
    args = sweep_args(argv, sweep_dir)
    sweep_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")))
    command = [*bench_command(), *args]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        print(f"error: the sweep failed (exit {done.returncode}); its log is above, its folders in {sweep_dir}",
              file=sys.stderr)
        return done.returncode
    print(f"sweep done in {time.perf_counter() - started:.0f} s: {sweep_dir}", flush=True)

    report_cmd = [str(Path(sys.executable).parent / "specdec-report")]
    if not Path(report_cmd[0]).is_file():
        report_cmd = [sys.executable, "-m", "reports.report"]
    report_cmd += [f"runs={sweep_dir}", f"logger.wandb.group={args_value(args, 'logger.wandb.group') or 'demo'}"]
    print("$", " ".join(report_cmd), flush=True)
    done = subprocess.run(report_cmd, env=env)
    if done.returncode != 0:
        return done.returncode
    offline = sorted(str(p) for p in sweep_dir.glob("*/wandb/offline-run-*") if (p.parents[1] / "run.json").is_file())
    if offline:
        print(f"W&B offline bench runs ({len(offline)}): {sweep_dir}/*/wandb/offline-run-*  "
              f"(upload: wandb sync {offline[0]} ...)")
    return 0


def args_value(args: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")), None)


if __name__ == "__main__":
    sys.exit(main())
