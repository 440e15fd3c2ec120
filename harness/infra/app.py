"""The command-line shell every specdec-* Hydra app shares: names checked before Hydra composes, and
bad input (a HarnessError) reported as one `error:` line with exit status 2 instead of a traceback."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from harness import CONF_DIR
from harness.infra.errors import HarnessError
from harness.infra.signals import Stopped

CHECKED_GROUPS = {"model", "method", "bench", "logger", "experiment", "train"}


def config_dirs(argv: list[str]) -> list[Path]:
    """The folders Hydra composes from, in its order: conf/, then `--config-dir` / `-cd` DIR (a user's own
    configs) and every `hydra.searchpath=[file://DIR, pkg://module.path, DIR]` entry given on the command line."""
    dirs = [CONF_DIR]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith(("--config-dir=", "-cd=")):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            entries = arg.split("=", 1)[1].strip().strip("[]")
            for entry in filter(None, (e.strip().strip("'\"") for e in entries.split(","))):
                dirs.append(_searchpath_dir(entry))
    return [d for d in dirs if d is not None]


def _searchpath_dir(entry: str) -> Path | None:
    if entry.startswith("pkg://"):
        import importlib.util

        spec = importlib.util.find_spec(entry.removeprefix("pkg://").replace("/", "."))
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        return Path(locations[0]) if locations else None     # Hydra reports a missing package itself
    return Path(entry.removeprefix("file://"))


def check_choices(argv: list[str]) -> None:
    """Unknown `model=`/`method=`/`bench=`/... names get one line listing the choices, before Hydra. The
    choices are the files in conf/<group>/ and in the same group of every user config folder (config_dirs)."""
    dirs = config_dirs(argv)
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in CHECKED_GROUPS:
            continue
        known = sorted({p.stem for folder in dirs for p in (folder / key).glob("*.yaml")})
        for name in value.split(","):
            name = name.strip()
            if name and not name.startswith(("glob(", "choice(", "range(")) and name not in known:
                where = ", ".join(f"{folder}/{key}/" for folder in dirs)
                print(f"error: unknown {key} '{name}'; choose one of: {', '.join(known)} (files in {where})",
                      file=sys.stderr)
                sys.exit(2)


FAILED_MARKER = "failed.json"     # a sweep job that stopped on bad input leaves this in its Hydra output folder


def _multirun_config():
    """Hydra's config when this call is one job of a multirun (a sweep), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:          # not under @hydra.main (a test calling the app function directly)
        return None
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def _sweep_job_dir() -> Path | None:
    """The job's output folder when this call is one job of a multirun, else None."""
    hydra_cfg = _multirun_config()
    return Path(hydra_cfg.runtime.output_dir) if hydra_cfg is not None else None


def sweep_dir() -> Path | None:
    """The sweep folder holding every job of this multirun, else None."""
    hydra_cfg = _multirun_config()
    return Path(str(hydra_cfg.sweep.dir)) if hydra_cfg is not None else None


def record_failure(folder: Path, error: str) -> Path:
    """Write the failed-job marker: the one-line error, the job's overrides and when (the report lists it)."""
    from datetime import datetime

    from hydra.core.hydra_config import HydraConfig

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / FAILED_MARKER
    info = {"error": error, "overrides": list(HydraConfig.get().overrides.task),
            "time": datetime.now().astimezone().isoformat(timespec="seconds")}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(marker)
    return marker


def hydra_app(config_name: str, run: Callable[[DictConfig], Any],
              show: Callable[[Any], None] | None = None) -> Callable[[], None]:
    """A console entry point: `run(cfg)` under `@hydra.main(conf/<config_name>.yaml)`, then `show(result)`.

    Bad input (a HarnessError) is one `error:` line and exit status 2; a job stopped by SIGTERM / SIGINT
    (harness.infra.signals.Stopped) is one line with its resume command and exit status 128 + the signal. In a multirun (a sweep), a job's bad
    input does not stop the sweep: the job leaves `failed.json` in its output folder, the other jobs run,
    and the sweep ends with one line counting the failed jobs and exit status 2."""
    failures: list[str] = []

    # wraps(run): Hydra names the job (log file, SLURM job name) after run's module, e.g. "bench"
    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @functools.wraps(run)
    def _hydra_main(cfg: DictConfig) -> Any:
        try:
            result = run(cfg)
        except Stopped as exc:       # a signal ends the sweep too (SLURM's time limit, Ctrl-C)
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:    # a Ctrl-C the app did not turn into Stopped (before it wrote anything)
            print("error: interrupted (Ctrl-C) before this job wrote a record; run the same command again",
                  file=sys.stderr)
            sys.exit(130)
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            job_dir = _sweep_job_dir()
            if job_dir is None:
                sys.exit(2)
            failures.append(str(record_failure(job_dir, str(exc))))
            return None
        if show is not None:
            show(result)
        return result

    def main() -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        check_choices(sys.argv[1:])
        _hydra_main()
        if failures:
            print(f"error: {len(failures)} sweep job(s) failed on bad input; the others ran. Their errors: "
                  f"{', '.join(failures)}", file=sys.stderr)
            sys.exit(2)

    return main
