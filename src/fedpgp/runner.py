"""One run from a validated config to its run directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .config import RunConfig
from .errors import ConfigError
from .experiment import build_experiment, write_manifest
from .federation.simulation import run_simulation, zero_shot_reference
from .report import build_results, write_results

log = logging.getLogger("fedpgp")


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.method}-{cfg.dataset.name}-s{cfg.seed}"


def check_out_dir(out_dir: Path) -> None:
    """Refuse a run directory that already holds results, or a path that is a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: expected a folder, found a file")
    if (out_dir / "results.json").exists():
        raise ConfigError(f"--out {out_dir}: already holds a finished run; choose another folder")


def attach_log(out_dir: Path) -> logging.Handler:
    """Send this run's log (wall-clock times, paths) to out_dir/run.log."""
    handler = logging.FileHandler(out_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # The terminal gets progress bars and the final table; the details go to run.log only.
    log.propagate = False
    return handler


def execute(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Build the experiment, run it in process, and write config.yaml, partition.json,
    results.json, results.csv, curves.png and run.log into ``out_dir``. Every input (dataset,
    partition, weights) is checked while building, before anything is written."""
    check_out_dir(out_dir)
    started = time.perf_counter()
    experiment = build_experiment(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = attach_log(out_dir)
    try:
        log.info("run directory %s", out_dir.resolve())
        log.info("setup took %.1f s", time.perf_counter() - started)
        write_text_atomic(out_dir / "config.yaml", cfg.to_yaml())
        write_manifest(experiment, out_dir)
        outcome = run_simulation(experiment)
        results = build_results(cfg.to_dict(), outcome["rounds"], zero_shot_reference(experiment))
        write_results(out_dir, results, outcome["rounds"])
        log.info("run took %.1f s", time.perf_counter() - started)
        return results
    finally:
        log.removeHandler(handler)
        handler.close()
