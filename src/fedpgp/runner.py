"""One run from a validated config to its run directory, and the resumption of an interrupted
one from its last checkpoint."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .checkpoint import (
    FOLDER,
    RELOCATABLE,
    RunState,
    config_changes,
    describe_changes,
    load_checkpoint,
    save_checkpoint,
)
from .config import RunConfig, apply_overrides, config_from_dict, load_config, read_yaml
from .errors import CheckpointError, ConfigError
from .experiment import Experiment, build_experiment, write_manifest
from .federation.faults import RoundFailedError
from .federation.simulation import run_simulation, zero_shot_reference
from .report import build_results, write_results

log = logging.getLogger("fedpgp")


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.method}-{cfg.dataset.name}-s{cfg.seed}"


def check_out_dir(out_dir: Path) -> None:
    """Refuse a run directory that already holds results or an interrupted run, or a path that
    is a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: expected a folder, found a file")
    if (out_dir / "results.json").exists():
        raise ConfigError(f"--out {out_dir}: already holds a finished run; choose another folder")
    if (out_dir / FOLDER).exists():
        raise ConfigError(
            f"--out {out_dir}: holds an interrupted run; continue it with "
            f"`fedpgp run --resume {out_dir}` or choose another folder"
        )


@contextlib.contextmanager
def run_log(out_dir: Path) -> Iterator[None]:
    """Send this run's log (wall-clock times, paths) to out_dir/run.log, appending on resume."""
    handler = logging.FileHandler(out_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # The terminal gets progress bars and the final table; the details go to run.log only.
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(experiment: Experiment, out_dir: Path, resume_from: RunState | None) -> dict[str, Any]:
    """The rounds (checkpointed into out_dir) and the results files."""
    cfg = experiment.cfg
    partition_digest = experiment.manifest.digest()

    def save(state: RunState) -> None:
        save_checkpoint(out_dir, state, cfg, partition_digest)

    try:
        outcome = run_simulation(experiment, resume_from=resume_from, save=save)
    except RoundFailedError as exc:
        raise RoundFailedError(
            f"{exc}. The last checkpoint is in {out_dir / FOLDER}; once the clients are back, "
            f"continue with `fedpgp run --resume {out_dir}`"
        ) from exc
    results = build_results(cfg.to_dict(), outcome["rounds"], zero_shot_reference(experiment))
    write_results(out_dir, results, outcome["rounds"])
    return results


def execute(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Build the experiment, run it in process, and write config.yaml, partition.json,
    checkpoint/, results.json, results.csv, curves.png and run.log into ``out_dir``. Every input
    (dataset, partition, weights) is checked while building, before anything is written."""
    check_out_dir(out_dir)
    started = time.perf_counter()
    experiment = build_experiment(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_log(out_dir):
        log.info("run directory %s", out_dir.resolve())
        log.info("setup took %.1f s", time.perf_counter() - started)
        write_text_atomic(out_dir / "config.yaml", cfg.to_yaml())
        write_manifest(experiment, out_dir)
        results = _run(experiment, out_dir, None)
        log.info("run took %.1f s", time.perf_counter() - started)
        return results


def resumed_config(
    run_dir: Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """The config of the run in ``run_dir`` (its config.yaml). ``--config``/``--set`` may only
    repeat it, except for the RELOCATABLE keys (where the data and caches are now); any other
    change is a ConfigError listing the changed keys."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no {saved_path}; not a fedpgp run directory")
    saved = read_yaml(saved_path)
    cfg = config_from_dict(saved)
    if config_path is None and not overrides:
        return cfg
    if config_path is not None:
        requested = load_config(config_path, list(overrides))
    else:
        requested = config_from_dict(apply_overrides(copy.deepcopy(saved), list(overrides)))
    changes = config_changes(cfg.to_dict(), requested.to_dict())
    refused = {key: change for key, change in changes.items() if key not in RELOCATABLE}
    if refused:
        given = "--config/--set" if config_path is not None else "--set"
        raise ConfigError(
            f"--resume {run_dir}: {given} would change the run's config "
            f"({describe_changes(refused)}); a resumed run keeps {saved_path} unchanged, "
            f"except for {', '.join(RELOCATABLE)}"
        )
    return requested


def resume(
    run_dir: Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Continue the interrupted run in ``run_dir`` from its newest complete checkpoint; the
    results are byte-identical to those of a run that never stopped."""
    if (run_dir / "results.json").exists():
        raise CheckpointError(f"--resume {run_dir}: the run is finished (results.json exists)")
    cfg = resumed_config(run_dir, config_path, overrides)
    checkpoint = load_checkpoint(run_dir, cfg)
    started = time.perf_counter()
    experiment = build_experiment(cfg)
    checkpoint.check_fits(experiment)
    saved_path = run_dir / "config.yaml"
    moved = config_changes(config_from_dict(read_yaml(saved_path)).to_dict(), cfg.to_dict())
    with run_log(run_dir):
        if moved:
            # Only RELOCATABLE keys can differ here (resumed_config refused the others).
            write_text_atomic(saved_path, cfg.to_yaml())
            log.info("config.yaml updated on resume: %s", describe_changes(moved))
        log.info(
            "resuming from %s after round %d of %d",
            checkpoint.path,
            checkpoint.state.round,
            cfg.rounds,
        )
        log.info("setup took %.1f s", time.perf_counter() - started)
        results = _run(experiment, run_dir, checkpoint.state)
        log.info("run took %.1f s", time.perf_counter() - started)
        return results
