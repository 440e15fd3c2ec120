"""The command-line shell every specdec-* Hydra app shares: names checked before Hydra composes, and
bad input (a HarnessError) reported as one `error:` line with exit status 2 instead of a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from harness import CONF_DIR
from harness.infra.errors import HarnessError

CHECKED_GROUPS = {"model", "method", "bench", "logger", "experiment", "train"}


def check_choices(argv: list[str]) -> None:
    """Unknown `model=`/`method=`/`bench=`/... names get one line listing the choices, before Hydra."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in CHECKED_GROUPS:
            continue
        folder = CONF_DIR / key
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        for name in value.split(","):
            name = name.strip()
            if name and not name.startswith(("glob(", "choice(", "range(")) and name not in known:
                print(f"error: unknown {key} '{name}'; choose one of: {', '.join(known)} "
                      f"(files in conf/{key}/)", file=sys.stderr)
                sys.exit(2)


def hydra_app(config_name: str, run: Callable[[DictConfig], Any],
              show: Callable[[Any], None] | None = None) -> Callable[[], None]:
    """A console entry point: `run(cfg)` under `@hydra.main(conf/<config_name>.yaml)`, then `show(result)`."""

    # wraps(run): Hydra names the job (log file, SLURM job name) after run's module, e.g. "bench"
    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @functools.wraps(run)
    def _hydra_main(cfg: DictConfig) -> Any:
        try:
            result = run(cfg)
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        if show is not None:
            show(result)
        return result

    def main() -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        check_choices(sys.argv[1:])
        _hydra_main()

    return main
