"""Scaling with the number of clients: time per round and memory per client.

The tiny backbone (fedpgp-tiny, random weights) on one fixed CIFAR-10-sized synthetic dataset
(10 classes, 5 base; 2000 training and 1000 test images per class, 16 px), Dirichlet-split
(beta 1000, nearly uniform) over 10, 100 and 1000 clients with frac 0.1, so every client holds
1/K of the data. Each case runs in its own process:

- time per round: rounds 1..R (round 0 trains every client by the protocol; it is not timed), each
  the library's local training (2 epochs, batch 32) of the sampled clients; sampling, aggregation
  and evaluation are not timed. It is timed twice, on the same sampled clients and the same
  received tensors: one client after another (``batch_clients: off``) and all of them in lockstep
  (``batch_clients: on``), after one untimed warm-up round of each on throwaway clients; the two
  must agree (relative error under 1e-2, as in bench_batched), and the sequential replies are
  aggregated. The growth of each from the smallest to the largest case, against the growth of the
  sampled clients, shows whether a round grows sub-linearly in them. The authors' loop runs the
  same sampled clients with their step (image encoder on the batch, four full-length text passes)
  plus their per-round copy of every client's prompt weights; it is compared with the sequential
  path. A control case, 1000 clients with frac 0.01, samples as many clients as the 100-client
  case: equal times there mean an unsampled client costs nothing per round.
- memory per client: resident memory after building the experiment and all clients; between
  100 and 1000 clients the data is the same (only split finer), so the difference over the 900
  extra clients is what a client costs beyond its data (goal: at most 64 KB).

    python benchmarks/bench_scale.py [--clients 10 100 1000] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import (
    AuthorsPrompts,
    authors_local_training,
    register_synthetic,
    relative_error,
    report,
    set_threads,
)

from fedpgp.config import RunConfig
from fedpgp.experiment import Experiment, build_experiment
from fedpgp.federation.inprocess import InProcess, inprocess_server
from fedpgp.federation.update import Update

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DATASET = "bench-scale-cifar10"
TRAIN_PER_CLASS, TEST_PER_CLASS, IMAGE_SIZE = 2000, 1000, 16
BUDGET = 64 * 1024
# bench_batched's tolerance: float-order differences of the lockstep path, amplified by training.
TOLERANCE = 1e-2
PATHS = {"sequential": "off", "batched": "on"}  # path -> batch_clients


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per case")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", nargs=2, metavar=("K", "FRAC"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resident_bytes() -> int:
    """This process's resident memory, after returning freed heap memory to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def client_bytes(experiment: Experiment) -> int:
    """Bytes of every client's own data tensors (features and labels)."""
    total = 0
    for data in experiment.client_data.values():
        for tensor in (
            data.train_features,
            data.train_labels,
            data.local.features,
            data.local.labels,
        ):
            total += tensor.numel() * tensor.element_size()
    return total


class AuthorsRound:
    """The authors' round for the sampled clients, on transformed image tensors."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        backbone, manifest = experiment.backbone, experiment.manifest
        names = [experiment.splits.classnames[c] for c in manifest.base_classes]
        self.prompts = AuthorsPrompts.build(backbone, names, experiment.cfg.n_ctx)
        self.transform = backbone.test_transform()
        # Their server keeps every client's prompt weights and loads them each round.
        width, device = experiment.backbone.text_width, experiment.backbone.device
        personal = {
            k: v.to(device) for k, v in experiment.method.initial_personal(width, 0).items()
        }
        self.weights = {
            cid: {k: v.clone() for k, v in personal.items()} for cid in experiment.client_data
        }
        self.learner = {k: v.clone() for k, v in personal.items()}

    def images(self, cid: int) -> torch.Tensor:
        train = self.experiment.splits.train.images
        return torch.stack(
            [self.transform(train[i]) for i in self.experiment.manifest.clients[cid].train]
        )

    def run(
        self, sampled: list[int], images: dict[int, torch.Tensor], sigma: torch.Tensor, round: int
    ) -> None:
        cfg, backbone = self.experiment.cfg, self.experiment.backbone
        for cid in sampled:
            leaves = [sigma.clone().requires_grad_(True)] + [
                self.weights[cid][k].clone().requires_grad_(True) for k in ("U", "V")
            ]
            authors_local_training(
                backbone,
                self.prompts,
                images[cid],
                self.experiment.client_data[cid].train_labels,
                leaves,
                cfg,
                torch.Generator().manual_seed(round * 100003 + cid),
            )
            self.weights[cid] = {"U": leaves[1].detach(), "V": leaves[2].detach()}
        for cid in self.weights:  # load_state_dict of every client, every round
            for key, value in self.weights[cid].items():
                self.learner[key].copy_(value)


class Fallbacks(logging.Handler):
    """The transport's warnings: a lockstep group that raised is trained again one client at a
    time, which would time the sequential path under the batched name."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def transport(experiment: Experiment, path: str) -> InProcess:
    """Every client of ``experiment``, from its start, training by ``path``."""
    cfg = dataclasses.replace(experiment.cfg, batch_clients=PATHS[path])
    built = InProcess(dataclasses.replace(experiment, cfg=cfg))
    if built.batches != (path == "batched"):
        raise SystemExit(f"batch_clients: {PATHS[path]} does not take the {path} path")
    return built


def timed_round(
    runtime: InProcess, round: int, sends: dict[int, dict[str, torch.Tensor]]
) -> tuple[float, list[Update]]:
    """CPU seconds of ``runtime``'s local training of ``sends``, and its Updates."""
    start = time.process_time()
    replies = runtime.train(round, sends)
    elapsed = time.process_time() - start
    faults = [r for r in replies if not isinstance(r, Update)]
    if faults:
        raise SystemExit(f"round {round}: faults {faults}")
    return elapsed, replies


def worker(num_clients: int, frac: float, rounds: int) -> dict:
    register_synthetic(DATASET, CIFAR10, TRAIN_PER_CLASS, TEST_PER_CLASS, IMAGE_SIZE)
    with tempfile.TemporaryDirectory() as root:
        cfg = RunConfig(
            method="fedpgp",
            num_clients=num_clients,
            frac=frac,
            shots=None,
            batch_size=32,
            local_epochs=2,
            rounds=rounds + 1,
            lr=0.001,
            grad_clip=None,
            device="cpu",
        )
        cfg.dataset.name, cfg.dataset.root = DATASET, root
        cfg.backbone.name, cfg.backbone.pretrained = "fedpgp-tiny", None
        cfg.partition.kind, cfg.partition.beta, cfg.partition.min_samples = "dirichlet", 1e3, 1
        baseline = resident_bytes()
        experiment = build_experiment(cfg)
    server = inprocess_server(experiment)
    paths = {"sequential": transport(experiment, "sequential")}
    resident = resident_bytes()
    # Built after the memory is read: the same start, and each path keeps its own PERSONAL
    # tensors from round to round.
    paths["batched"] = transport(experiment, "batched")
    # One untimed round of each path on throwaway clients: the first call in a process pays
    # one-off costs (allocations, first kernels) that would fall on whichever path went first.
    warm_up = {cid: server.sends(cid, 1) for cid in server.sample(1)}
    for path in PATHS:
        transport(experiment, path).train(1, warm_up)
    fallbacks = Fallbacks()
    logging.getLogger("fedpgp.federation.inprocess").addHandler(fallbacks)
    authors = AuthorsRound(experiment)
    clients = paths["sequential"].clients
    times: dict[str, list[float]] = {"authors": [], "sequential": [], "batched": []}
    sampled_counts, steps, lockstep, errors = [], [], [], [0.0]
    for round in range(1, rounds + 1):
        sampled = server.sample(round)
        sampled_counts.append(len(sampled))
        counts = [
            cfg.local_epochs * -(-clients[c].data.num_train // cfg.train_batch_size)
            for c in sampled
        ]
        steps.append(sum(counts))
        lockstep.append(max(counts))  # a lockstep round is as long as its longest client
        images = {cid: authors.images(cid) for cid in sampled}
        sends = {cid: server.sends(cid, round) for cid in sampled}
        start = time.process_time()
        authors.run(sampled, images, server.global_tensors["sigma"], round)
        times["authors"].append(time.process_time() - start)
        # Alternate which path goes first, so that neither always runs on the other's caches.
        order = list(PATHS) if round % 2 else list(reversed(PATHS))
        replies: dict[str, list[Update]] = {}
        for path in order:
            elapsed, replies[path] = timed_round(paths[path], round, sends)
            times[path].append(elapsed)
        if fallbacks.records:
            raise SystemExit(f"the batched path fell back: {fallbacks.records[0].getMessage()}")
        for a, b in zip(replies["sequential"], replies["batched"], strict=True):
            errors += [relative_error(b.tensors[k], a.tensors[k]) for k in a.tensors]
        for cid in sampled:
            kept = paths["batched"].clients[cid].personal
            errors += [relative_error(kept[k], v) for k, v in clients[cid].personal.items()]
        server.aggregate(replies["sequential"])
    if max(errors) > TOLERANCE:
        raise SystemExit(f"the two paths disagree: relative error {max(errors):.2e}")
    return {
        "clients": num_clients,
        "frac": frac,
        "sampled": sum(sampled_counts) / rounds,
        "steps": sum(steps) / rounds,
        "lockstep_steps": sum(lockstep) / rounds,
        **{f"{path}_s": sum(values) / rounds for path, values in times.items()},
        "error": max(errors),
        "resident": resident - baseline,
        "data": client_bytes(experiment),
    }


def run_case(num_clients: int, frac: float, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        str(num_clients),
        str(frac),
        "--rounds",
        str(args.rounds),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"case K={num_clients}, frac={frac} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), float(args.worker[1]), args.rounds)))
        return 0
    started = time.perf_counter()
    cases = [(k, 0.1) for k in args.clients]
    largest = max(args.clients)
    if len(args.clients) > 1:
        # As many sampled clients as the second-largest case, out of the largest population.
        second = max(k for k in args.clients if k != largest)
        control = (largest, 0.1 * second / largest)
        cases.append(control)
    results = {case: run_case(*case, args) for case in cases}

    rows, ratios = [], {}
    for (k, frac), r in results.items():
        name = f"K={k}" if frac == 0.1 else f"K={k}, frac={frac:g}"
        ratios[name] = round(r["authors_s"] / r["sequential_s"], 2)
        ratios[f"{name} seq/batched"] = round(r["sequential_s"] / r["batched_s"], 2)
        rows.append(
            [
                name,
                f"{r['sampled']:g}",
                f"{r['steps']:g}",
                f"{r['lockstep_steps']:g}",
                f"{r['authors_s']:.3f}",
                f"{r['sequential_s']:.3f}",
                f"{1000 * r['sequential_s'] / r['steps']:.1f}",
                f"{r['batched_s']:.3f}",
                f"{r['sequential_s'] / r['batched_s']:.2f}x",
                f"{r['resident'] / 2**20:.1f}",
                f"{r['data'] / 2**20:.1f}",
            ]
        )
    main_cases = sorted(k for k, f in results if f == 0.1)
    per_client, growth = None, None
    notes = [
        f"fedpgp-tiny, {torch.get_num_threads()} thread(s); CIFAR-10-sized synthetic data, "
        f"Dirichlet beta 1000; n_ctx 16, rank 8, 2 local epochs, batch 32",
        f"times are CPU seconds of local training per round, mean of rounds 1..{args.rounds}; "
        f"no evaluation; steps = local steps of the sampled clients per round, lockstep = "
        f"steps of the batched path (its longest client's); largest relative error between "
        f"the two paths {max(r['error'] for r in results.values()):.1e}",
        "a round of one sampled client trains it alone on both paths (nothing to batch)",
    ]
    if len(main_cases) > 1:
        small, large = main_cases[-2], main_cases[-1]
        a, b = results[(small, 0.1)], results[(large, 0.1)]
        per_client = ((b["resident"] - b["data"]) - (a["resident"] - a["data"])) / (large - small)
        verdict = "within" if per_client <= BUDGET else "OVER"
        notes.append(
            f"memory per extra client beyond its data, K={small} -> K={large}: "
            f"{per_client / 1024:.1f} KB ({verdict} the 64 KB budget)"
        )
        same = results[control]
        notes.append(
            f"unsampled clients cost nothing per round: K={large} with {same['sampled']:g} "
            f"sampled spends {1000 * same['sequential_s'] / same['steps']:.1f} ms per local "
            f"step, K={small} with {a['sampled']:g} sampled "
            f"{1000 * a['sequential_s'] / a['steps']:.1f} ms (a round is its sampled clients' "
            f"steps; every client holds 1/K of the data)"
        )
        first, last = results[(main_cases[0], 0.1)], b
        growth = {
            key: round(last[key] / first[key], 2)
            for key in ("sampled", "steps", "sequential_s", "batched_s")
        }
        notes.append(
            f"growth K={main_cases[0]} -> K={large}: sampled clients x{growth['sampled']:g}, "
            f"their local steps x{growth['steps']:g}; time per round sequential "
            f"x{growth['sequential_s']:g}, batched x{growth['batched_s']:g}; ms per sampled "
            f"client sequential {1000 * first['sequential_s'] / first['sampled']:.1f} -> "
            f"{1000 * last['sequential_s'] / last['sampled']:.1f}, batched "
            f"{1000 * first['batched_s'] / first['sampled']:.1f} -> "
            f"{1000 * last['batched_s'] / last['sampled']:.1f}"
        )
    notes.append(f"total wall time {time.perf_counter() - started:.0f} s")
    header = [
        "case",
        "sampled",
        "steps",
        "lockstep",
        "authors (s)",
        "seq (s)",
        "seq/step (ms)",
        "batched (s)",
        "seq/batched",
        "resident (MiB)",
        "client data (MiB)",
    ]
    extra = {
        "bytes_per_client": None if per_client is None else round(per_client),
        "growth": growth,
        "cases": list(results.values()),
    }
    report("Scaling with clients (tiny backbone)", header, rows, ratios, notes, args.json, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
