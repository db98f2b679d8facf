"""One in-process run from a validated config (or a prebuilt experiment) to its run directory,
and the resumption of an interrupted one from its last checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .config import RunConfig
from .errors import CheckpointError
from .experiment import Experiment, build_experiment
from .federation.inprocess import InProcess, inprocess_server
from .federation.rounds import run_federation
from .methods.registry import method_class
from .rundir import RunDir, reconciled_config, resumed_config

log = logging.getLogger("fedpgp")


def _run(experiment: Experiment, run_dir: RunDir, checkpoint: Checkpoint | None) -> dict[str, Any]:
    """The rounds in this process, from ``checkpoint`` if given (checked against the
    experiment first), else from round 0."""
    cfg, method = experiment.cfg, experiment.method
    digest = experiment.manifest.digest()
    server = inprocess_server(experiment)
    transport = InProcess(experiment)
    if checkpoint is not None:
        width = experiment.backbone.text_width
        personal = {cid: method.initial_personal(width, cid) for cid in transport.clients}
        checkpoint.check_fits(method.initial_global(width), personal, digest)
        checkpoint.check_optimizer(method.trained_keys())
        log.info(
            "resuming from %s after round %d of %d",
            checkpoint.path,
            checkpoint.state.round,
            cfg.rounds,
        )
    # After the checkpoint's checks: a refused resume writes nothing.
    run_dir.write_partition(experiment.manifest.to_json(), digest)
    start = None if checkpoint is None else checkpoint.state
    hint = f"`fedpgp run --resume {run_dir.path}`"
    return run_federation(run_dir, cfg, server, transport, digest, start, hint)


def execute(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Build the experiment, run it in process, and write config.yaml, partition.json,
    checkpoint/, results.json, results.csv, curves.png and run.log into ``out_dir``. Every input
    (dataset, partition, weights) is checked while building, before anything is written."""
    RunDir.check_new(out_dir)
    started = time.perf_counter()
    experiment = build_experiment(cfg)
    return execute_experiment(experiment, out_dir, time.perf_counter() - started)


def execute_experiment(experiment: Experiment, out_dir: Path, setup_s: float) -> dict[str, Any]:
    """Run the prebuilt ``experiment`` into the new run directory ``out_dir``, writing what
    :func:`execute` writes: commands that share one experiment between runs (``fedpgp table``)
    start here. ``setup_s``, the seconds its building took, goes to run.log."""
    started = time.perf_counter() - setup_s
    run_dir = RunDir.create(out_dir)
    try:
        with run_dir.logging():
            log.info("run directory %s", out_dir.resolve())
            log.info("setup took %.1f s", setup_s)
            run_dir.write_config(experiment.cfg)
            results = _run(experiment, run_dir, None)
            log.info("run took %.1f s", time.perf_counter() - started)
            return results
    finally:
        run_dir.close()


def resume(
    path: Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Continue the interrupted run in ``path`` from its newest complete checkpoint; the
    results are byte-identical to those of a run that never stopped."""
    return _resume(
        path, lambda run_dir: resumed_config(run_dir, config_path, overrides), build_experiment
    )


def resume_experiment(experiment: Experiment, path: Path, source: str) -> dict[str, Any]:
    """Continue the interrupted run in ``path`` with the prebuilt ``experiment``, as
    :func:`resume` does; the experiment's config must be the run's but for the RELOCATABLE
    keys, else a ConfigError that ``source`` begins (it says where the config came from)."""
    return _resume(
        path,
        lambda run_dir: reconciled_config(run_dir, experiment.cfg, source),
        lambda cfg: experiment,
    )


def _resume(
    path: Path,
    config_of: Callable[[RunDir], RunConfig],
    experiment_for: Callable[[RunConfig], Experiment],
) -> dict[str, Any]:
    """Resume the run in ``path`` with the config ``config_of`` settles and the experiment
    ``experiment_for`` gives for it."""
    run_dir = RunDir.open(path)
    try:
        if run_dir.finished:
            raise CheckpointError(f"--resume {path}: the run is finished (results.json exists)")
        with run_dir.logging():
            cfg = config_of(run_dir)
            # The checkpoint is read and checked against the config before the costly setup.
            checkpoint = run_dir.load_checkpoint(cfg, method_class(cfg.method).trained_keys())
            if checkpoint is None:
                log.info("no complete checkpoint: starting again from round 0")
            started = time.perf_counter()
            experiment = experiment_for(cfg)
            log.info("setup took %.1f s", time.perf_counter() - started)
            results = _run(experiment, run_dir, checkpoint)
            log.info("run took %.1f s", time.perf_counter() - started)
            return results
    finally:
        run_dir.close()
