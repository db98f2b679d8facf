"""The ServerApp: holds the GLOBAL tensors, drives the rounds over the SuperLink, and writes the
run directory: config.yaml, results.json / results.csv / curves.png (as the in-process
runtime), global.safetensors (final GLOBAL tensors), round-globals.safetensors (the GLOBAL
tensors each round started from), messages.jsonl (the names of every record and array sent or
received) and run.log.

``flwr run`` loads ``app``; ``make_server_app(cfg, settings)`` binds a config directly (the
simulation engine's Python API passes no run config).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save as save_tensors

from ...atomic import write_bytes_atomic, write_text_atomic
from ...backbone import FrozenCLIP
from ...config import RunConfig
from ...errors import FedPGPError
from ...experiment import backbone_spec
from ...methods import Method, Tensors, create_method
from ...report import build_results, write_results
from ...runner import check_out_dir, default_out_dir, log, run_log
from ...seeding import torch_generator
from ..server import Server
from .records import MessageLog
from .settings import ServerSettings, config_from_run_config, server_settings
from .strategy import FlowerRounds, NodeRegistry


def initial_global(cfg: RunConfig, method: Method, width: int) -> Tensors:
    """The starting GLOBAL tensors: the same seed stream as Experiment.initial_global, without
    loading any data on the server."""
    return method.init_global(width, torch_generator(cfg.seed, "init", "global"))


def _contiguous(tensors: Tensors) -> Tensors:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def run_server(grid: Grid, cfg: RunConfig, settings: ServerSettings) -> dict[str, Any]:
    """The whole run, from the first query to the results files; returns results.json's
    content."""
    out_dir = settings.out_dir
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_log(out_dir):
        log.info("Flower run directory %s", out_dir.resolve())
        write_text_atomic(out_dir / "config.yaml", cfg.to_yaml())
        # The server only needs the text width and logit scale, on CPU: it never sees data.
        backbone = FrozenCLIP.load(backbone_spec(cfg))
        method = create_method(cfg, backbone.logit_scale)
        server = Server(
            method, initial_global(cfg, method, backbone.text_width), cfg.num_clients, cfg.seed
        )
        message_log = MessageLog(out_dir / "messages.jsonl")
        registry = NodeRegistry(grid, cfg.num_clients, message_log, settings.node_wait)
        try:
            registry.wait_for_all(settings.node_wait)
            outcome = FlowerRounds(cfg, server, grid, registry, message_log).run()
        except FedPGPError as exc:
            # `flwr run` reports only an exit code; the reason belongs in the run's own log.
            log.error("run failed: %s", exc)
            raise
        results = build_results(cfg.to_dict(), outcome["rounds"], outcome["zeroshot"])
        write_results(out_dir, results, outcome["rounds"])
        write_bytes_atomic(
            out_dir / "global.safetensors", save_tensors(_contiguous(outcome["global"]))
        )
        by_round = {
            f"round-{r + 1}/{k}": v
            for r, tensors in outcome["round_globals"].items()
            for k, v in _contiguous(tensors).items()
        }
        write_bytes_atomic(out_dir / "round-globals.safetensors", save_tensors(by_round))
        return results


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
