"""The ServerApp: holds the GLOBAL tensors, drives the round loop over the SuperLink, and writes
the run directory through fedpgp.rundir as the in-process runtime does (config.yaml,
partition.json, checkpoint/, global.safetensors, results.json / results.csv / curves.png,
run.log), plus messages.jsonl (the names of every record and array sent or received).

With the run config's ``resume = true`` it continues the interrupted run in ``out-dir`` from
its last checkpoint (after a killed ServerApp or SuperLink). ``flwr run`` loads ``app``;
``make_server_app(cfg, settings)`` binds a config directly (the simulation engine's Python API
passes no run config).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ...backbone import FrozenCLIP
from ...checkpoint import Checkpoint
from ...config import RunConfig, describe_changes, run_changes, run_digest
from ...errors import CheckpointError, ConfigError, FedPGPError
from ...experiment import backbone_spec
from ...methods.base import method_for
from ...methods.registry import method_class
from ...rundir import RunDir, default_out_dir
from ..rounds import run_federation
from ..server import Server
from .records import MessageLog
from .settings import ServerSettings, config_from_run_config, server_settings
from .strategy import FlowerTransport, NodeRegistry, fetch_manifest

log = logging.getLogger("fedpgp")


def _open(cfg: RunConfig, settings: ServerSettings) -> tuple[RunDir, Checkpoint | None]:
    """The run directory, new or (``resume``) the interrupted one with its last checkpoint,
    checked against ``cfg`` before any node is contacted."""
    out = settings.out_dir
    if not settings.resume:
        run_dir = RunDir.create(out)
        run_dir.write_config(cfg)
        return run_dir, None
    run_dir = RunDir.open(out)
    if run_dir.finished:
        run_dir.close()
        raise CheckpointError(f"resume {out}: the run is finished (results.json exists)")
    refused = run_changes(run_dir.saved_config(), cfg)
    if refused:
        run_dir.close()
        raise ConfigError(
            f"resume {out}: the run config would change the run's config "
            f"({describe_changes(refused)}); resume with the config it was started with"
        )
    try:
        checkpoint = run_dir.load_checkpoint(cfg, method_class(cfg.method).trained_keys())
    except FedPGPError:
        run_dir.close()
        raise
    return run_dir, checkpoint


def run_server(grid: Grid, cfg: RunConfig, settings: ServerSettings) -> dict[str, Any]:
    """The whole run, from the first query to the results files; returns results.json's
    content."""
    run_dir, checkpoint = _open(cfg, settings)
    try:
        with run_dir.logging():
            try:
                return _run(grid, cfg, settings, run_dir, checkpoint)
            except FedPGPError as exc:
                # `flwr run` reports only an exit code; the reason belongs in the run's own log.
                log.error("run failed: %s", exc)
                raise
    finally:
        run_dir.close()


def _run(
    grid: Grid,
    cfg: RunConfig,
    settings: ServerSettings,
    run_dir: RunDir,
    checkpoint: Checkpoint | None,
) -> dict[str, Any]:
    log.info("Flower run directory %s", run_dir.path.resolve())
    # The server only needs the towers' shapes, the logit scale and the token embeddings its
    # initial tensors may start from, on CPU: it never sees data.
    backbone = FrozenCLIP.load(backbone_spec(cfg))
    method = method_for(cfg, backbone)
    message_log = MessageLog(run_dir.path / "messages.jsonl")
    registry = NodeRegistry(grid, cfg.num_clients, message_log, settings.node_wait)
    registry.wait_for_all(settings.node_wait)
    manifest = fetch_manifest(grid, registry, message_log, settings.node_wait)
    digest = manifest.digest()
    initial = method.initial_global(backbone.text_width)
    server = Server(method, initial, cfg.num_clients, cfg.seed, manifest.sample_counts())
    if checkpoint is not None:
        checkpoint.check_fits(initial, None, digest)
        log.info("resuming from %s after round %d", checkpoint.path, checkpoint.state.round)
    # After the checkpoint's checks: a refused resume writes nothing.
    run_dir.write_partition(manifest.to_json(), digest)
    transport = FlowerTransport(
        cfg, server, run_dir.info.run_id, run_digest(cfg), digest, grid, registry, message_log
    )
    hint = f"`flwr run` with --run-config 'resume=true out-dir=\"{run_dir.path}\"'"
    start = None if checkpoint is None else checkpoint.state
    return run_federation(run_dir, cfg, server, transport, digest, start, hint)


def make_server_app(
    cfg: RunConfig | None = None, settings: ServerSettings | None = None
) -> ServerApp:
    """A ServerApp for ``cfg`` and ``settings``; where None, both come from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_run_config(context.run_config)
        run_settings = settings or server_settings(context.run_config, default_out_dir(run_cfg))
        run_server(grid, run_cfg, run_settings)

    return app


app = make_server_app()
