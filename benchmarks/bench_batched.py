"""The local training of a round's clients one after another against all of them in lockstep
(``batch_clients: off`` against ``on``), measured in one run on the same start.

- world: the shipped world's default protocol (10 clients, 5 local epochs, batch 16, all base
  classes in the label space), round 1's local training of every sampled client;
- paper: ViT-B/16 architecture with random weights, 10 clients, n_cls 50 (Food-101 names, 25
  base), 16 shots, batch 16, 2 local epochs, ``--paper-clients`` of them trained.

Before any time is reported, every client's uploaded and kept tensors of the two paths must
agree (relative error, ||a - b|| / ||a||, under ``--tolerance``; the largest is printed).
Ratios are of CPU time on a CPU, wall time on a GPU (benchlib.Timing).

    python benchmarks/bench_batched.py [--methods fedpgp,promptfl] [--no-paper] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

import torch
from benchlib import FOOD101, Timing, register_synthetic, report, set_threads, timed

from fedpgp.config import RunConfig, load_config
from fedpgp.experiment import Experiment, build_experiment
from fedpgp.federation.inprocess import InProcess, inprocess_server
from fedpgp.federation.update import Update
from fedpgp.methods.base import Tensors
from fedpgp.methods.registry import FedPGPSettings


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="fedpgp,promptfl")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per path")
    parser.add_argument("--no-paper", action="store_true", help="the world only")
    parser.add_argument("--paper-clients", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    # Not 1e-5: on the world one PromptFL client's 25 steps amplify float-order differences to
    # ~3e-3, as much as running the sequential path on 2 threads instead of 1 does.
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


def one_round(experiment: Experiment, mode: str) -> tuple[list[Update], dict[int, Tensors]]:
    """Round 1's local training of every sampled client with ``batch_clients: mode``."""
    cfg = dataclasses.replace(experiment.cfg, batch_clients=mode)
    transport = InProcess(dataclasses.replace(experiment, cfg=cfg))
    server = inprocess_server(experiment)
    sends = {cid: server.sends(cid, 0) for cid in server.sample(0)}
    updates = transport.train(0, sends)
    return updates, {cid: dict(c.personal) for cid, c in transport.clients.items()}


def compare(experiment: Experiment, repeats: int, tolerance: float) -> tuple[Timing, Timing, float]:
    """Median timings of both paths and the largest relative error between their tensors."""
    device = experiment.backbone.device
    runs: dict[str, list[tuple[Timing, object]]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(timed(lambda m=mode: one_round(experiment, m), device))
    (seq_updates, seq_personal), (bat_updates, bat_personal) = runs["off"][0][1], runs["on"][0][1]
    errors = [0.0]
    for a, b in zip(seq_updates, bat_updates, strict=True):
        errors += [_relative(a.tensors[k], b.tensors[k]) for k in a.tensors]
    for cid, personal in seq_personal.items():
        errors += [_relative(v, bat_personal[cid][k]) for k, v in personal.items()]
    if max(errors) > tolerance:
        raise SystemExit(f"the two paths disagree: relative error {max(errors):.2e}")

    def median(mode: str) -> Timing:
        walls = sorted(t.wall for t, _ in runs[mode])
        cpus = sorted(t.cpu for t, _ in runs[mode])
        return Timing(walls[len(walls) // 2], cpus[len(cpus) // 2])

    return median("off"), median("on"), max(errors)


def paper_config(method: str, device: str, root: str) -> RunConfig:
    register_synthetic("bench-food50", FOOD101[:50], 16, 1, size=32)
    cfg = RunConfig(
        method=method,
        num_clients=10,
        shots=16,
        local_epochs=2,
        rounds=1,
        lr=0.001,
        grad_clip=None,
        n_ctx=16,
        fedpgp=FedPGPSettings(rank=8),
        device=device,
    )
    cfg.dataset.name, cfg.dataset.root = "bench-food50", root
    cfg.backbone.name, cfg.backbone.pretrained = "ViT-B-16", None
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_threads(args.threads)
    rows, ratios, notes = [], {}, []
    for method in args.methods.split(","):
        world = load_config(None, [f"method={method}", f"device={args.device}"])
        cases = [("world", build_experiment(world))]
        if not args.no_paper:
            with tempfile.TemporaryDirectory() as root:
                cfg = paper_config(method, args.device, root)
                clients = list(range(args.paper_clients))
                cases.append(("paper", build_experiment(cfg, clients)))
        for case, experiment in cases:
            device = experiment.backbone.device
            sequential, batched, error = compare(experiment, args.repeats, args.tolerance)
            ratio = sequential.cost(device) / batched.cost(device)
            key = f"{method} {case}"
            ratios[key] = round(ratio, 2)
            rows.append(
                [key, f"{sequential.wall:.2f}", f"{batched.wall:.2f}", f"{sequential.cpu:.2f}",
                 f"{batched.cpu:.2f}", f"{error:.1e}"]
            )  # fmt: skip
            peak = ""
            if device.type == "cuda":
                peak = (
                    f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                )
                torch.cuda.reset_peak_memory_stats(device)
            # Lockstep groups are the clients sharing a prompt bank; a method training each
            # client over its own classes (FedTPG) has groups of one, trained one by one.
            groups = len({id(data.local.bank) for data in experiment.client_data.values()})
            notes.append(
                f"{key}: {len(experiment.client_data)} clients in {groups} lockstep group(s), "
                f"{len(experiment.base.bank)} base classes, device {device}{peak}"
            )
    header = ["case", "seq wall", "batched wall", "seq CPU", "batched CPU", "rel. error"]
    report("Local training of a round: sequential vs batched", header, rows, ratios, notes,
           args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
