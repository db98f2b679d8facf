"""``fedpgp run --runtime flower-sim`` (and ``--resume DIR`` of such a run): the same apps on
Flower's simulation engine, in this process, with one virtual SuperNode per client.

Flower 1.42's simulation engine runs ClientApps in Ray actors (``flwr[simulation]``). Its
Python API (``flwr.simulation.run_simulation``) is used rather than ``flwr run`` with a local
simulation federation, which would start a detached SuperLink on fixed ports.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import RunConfig
from ...console import PROGRESS
from ...errors import CheckpointError, FedPGPError
from ...report import RESULTS
from ...rundir import LOG, RunDir, resumed_config
from .settings import ServerSettings

log = logging.getLogger(__name__)

# Below the run directory: the virtual nodes' personal state.
NODES = "nodes"


class _DropDeprecationNotice(logging.Filter):
    """run_simulation announces its own deprecation in favour of ``flwr run``; see the module
    docstring for why it is used anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: one CPU per actor, so as many actors as cores; a GPU shared by them
    when the config may use one."""
    cpus = os.cpu_count() or 1
    use_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    actors = max(1, min(cpus, cfg.num_clients))
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 1.0 / actors if use_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }


def run_flower_simulation(cfg: RunConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation engine (continuing the interrupted run in
    ``out_dir`` with ``resume``) and return results.json's content. The run directory holds
    what the ServerApp writes (see server_app) and, in ``nodes/``, the virtual nodes' personal
    state."""
    # Flower posts usage telemetry to its servers (from run_simulation among others) unless
    # FLWR_TELEMETRY_ENABLED=0; a fedpgp run stays offline unless the user asks otherwise. The
    # variable is read when flwr is first imported, hence the imports here.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from .client_app import make_client_app
    from .server_app import make_server_app

    if not resume:
        RunDir.check_new(out_dir)
    server_app = make_server_app(cfg, ServerSettings(out_dir=out_dir, resume=resume))
    client_app = make_client_app(cfg, all_clients=True, state_dir=out_dir / NODES)
    log.info(
        "flower-sim: starting Ray and %d virtual SuperNodes (each loads its own data)",
        cfg.num_clients,
        extra=PROGRESS,
    )
    flwr_log = logging.getLogger("flwr")
    notice = _DropDeprecationNotice()
    flwr_log.addFilter(notice)
    # Flower logs DEBUG lines to its own handler (INFO and up); they must not also reach the
    # command line's root handler.
    propagate, flwr_log.propagate = flwr_log.propagate, False
    try:
        run_simulation(
            server_app,
            client_app,
            num_supernodes=cfg.num_clients,
            backend_config=backend_config(cfg),
        )
    finally:
        flwr_log.removeFilter(notice)
        flwr_log.propagate = propagate
        _shutdown_ray()
    results = out_dir / RESULTS
    if not results.is_file():
        raise FedPGPError(
            f"the Flower simulation ended without {results}; {out_dir / LOG} says why. Continue "
            f"it with `fedpgp run --runtime flower-sim --resume {out_dir}`"
        )
    return json.loads(results.read_text())


def resume_flower_simulation(
    path: Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Continue the interrupted flower-sim run in ``path`` from its last checkpoint, with the
    config it was started with (``--config``/``--set`` may only repeat it or move its data)."""
    run_dir = RunDir.open(path)
    try:
        if run_dir.finished:
            raise CheckpointError(f"--resume {path}: the run is finished (results.json exists)")
        cfg = resumed_config(run_dir, config_path, overrides)
    finally:
        # The ServerApp takes the directory's lock itself.
        run_dir.close()
    return run_flower_simulation(cfg, path, resume=True)


def _shutdown_ray() -> None:
    """Stop the Ray processes the simulation started, so none outlive the run."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
