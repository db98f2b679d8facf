"""One FedPGP round at paper architecture: the authors' loop against the library's, warm cache.

A round of the paper's protocol is, for each of 10 clients, 2 local epochs over its 16-shot
data (batch 16) and then Local / Base / Novel evaluation with its personalized prompt. Every
client does the same kind of work, so the benchmark times a slice of the round: ``--clients``
of the 10 clients (1 by default, each with its full 2 epochs and full evaluation), on a test
set scaled to ``--test-per-class`` images per class. Per-step shapes are the paper's: ViT-B/16
(random weights), 224 px, batch 16, n_ctx 16, rank 8, all base classes in the label space.

- authors: per step the image encoder on the batch and four full-length text passes (their
  trainers/fedpgp.py); per evaluation every test batch of 100 images through the image encoder
  plus a full-length text pass (their test loop). Image decoding and augmentation are left out
  (they would only add to the authors' time).
- ours: the library's Client.train, Server.aggregate and evaluation, on features from the disk
  cache (warmed first: a cold cache is filled once and reused by every later run).

Both loops start from the same tensors and visit batches in the same order; the final sigma,
U and V must agree (relative 1e-3) before any time is reported.

    python benchmarks/bench_round.py [--classes 47] [--clients 1] [--test-per-class 2] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial

import torch
from benchlib import (
    FOOD101,
    AuthorsPrompts,
    Timing,
    authors_local_training,
    authors_predict,
    median_timing,
    register_synthetic,
    relative_error,
    report,
    set_threads,
    timed,
)
from torch import Tensor

from fedpgp.config import RunConfig
from fedpgp.evaluation import evaluate_clients
from fedpgp.experiment import Experiment, build_experiment
from fedpgp.federation.inprocess import InProcess, inprocess_server
from fedpgp.methods.registry import FedPGPSettings
from fedpgp.seeding import torch_generator

NUM_CLIENTS, SHOTS, EPOCHS, N_CTX, RANK = 10, 16, 2, 16, 8
TOLERANCE = 1e-3


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=47, help="dataset classes (DTD: 47)")
    parser.add_argument("--clients", type=int, default=1, help="clients of the 10 to time")
    parser.add_argument("--test-per-class", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of ours")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def our_round(experiment: Experiment) -> tuple[dict[str, Tensor], dict[int, dict], list[dict]]:
    """The library's round over the experiment's clients: train, aggregate, evaluate."""
    server = inprocess_server(experiment)
    clients = InProcess(experiment).clients.values()
    server.aggregate([client.train(server.global_tensors, 0) for client in clients])
    params = {client.id: client.params(server.global_tensors) for client in clients}
    return server.global_tensors, params, evaluate_clients(experiment, params)


class AuthorsLoop:
    """The authors' round over the same clients, on transformed image tensors."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        splits, manifest, backbone = experiment.splits, experiment.manifest, experiment.backbone
        transform = backbone.test_transform()
        device = backbone.device

        def tensors(images, indices: list[int]) -> Tensor:
            return torch.stack([transform(images[i]) for i in indices]).to(device)

        names = splits.classnames
        self.base = AuthorsPrompts.build(backbone, [names[c] for c in manifest.base_classes], N_CTX)
        self.novel = AuthorsPrompts.build(
            backbone, [names[c] for c in manifest.novel_classes], N_CTX
        )
        self.train_images = {
            cid: tensors(splits.train.images, manifest.clients[cid].train)
            for cid in experiment.client_data
        }
        self.local_images = {
            cid: tensors(splits.test.images, manifest.clients[cid].test)
            for cid in experiment.client_data
        }
        self.base_images = tensors(splits.test.images, manifest.base_test)
        self.novel_images = tensors(splits.test.images, manifest.novel_test)

    def train(self, cid: int, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg, backbone = self.experiment.cfg, self.experiment.backbone
        method, width = self.experiment.method, backbone.text_width
        initial = method.initial_personal(width, cid)
        personal = {k: v.to(backbone.device) for k, v in initial.items()}
        leaves = [
            t.detach().clone().requires_grad_(True) for t in (sigma, personal["U"], personal["V"])
        ]
        authors_local_training(
            backbone,
            self.base,
            self.train_images[cid],
            self.experiment.client_data[cid].train_labels,
            leaves,
            cfg,
            torch_generator(cfg.seed, "order", 0, cid),
        )
        return tuple(leaf.detach() for leaf in leaves)

    def round(self) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]], dict[int, dict]]:
        data = self.experiment.client_data
        method, width = self.experiment.method, self.experiment.backbone.text_width
        sigma = method.initial_global(width)["sigma"].to(self.experiment.backbone.device)
        trained = {cid: self.train(cid, sigma) for cid in sorted(data)}
        total = sum(data[cid].num_train for cid in trained)
        sigma = sum(trained[c][0] * (data[c].num_train / total) for c in trained)
        backbone = self.experiment.backbone
        accuracies = {}
        for cid, (_, U, V) in trained.items():
            ctx = sigma + U @ V
            sets = {
                "local": (self.base, self.local_images[cid], data[cid].local.labels),
                "base": (self.base, self.base_images, self.experiment.base.labels),
                "novel": (self.novel, self.novel_images, self.experiment.novel.labels),
            }
            accuracies[cid] = {
                metric: float(
                    (authors_predict(backbone, prompts, images, ctx) == labels).float().mean()
                )
                * 100
                for metric, (prompts, images, labels) in sets.items()
            }
        return sigma, {cid: (U, V) for cid, (_, U, V) in trained.items()}, accuracies


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    dataset = f"bench-food{args.classes}-t{args.test_per_class}"
    register_synthetic(dataset, FOOD101[: args.classes], SHOTS, args.test_per_class, size=64)
    with tempfile.TemporaryDirectory() as root:
        cfg = RunConfig(
            method="fedpgp",
            num_clients=NUM_CLIENTS,
            shots=SHOTS,
            local_epochs=EPOCHS,
            rounds=1,
            lr=0.001,
            grad_clip=None,
            n_ctx=N_CTX,
            fedpgp=FedPGPSettings(rank=RANK, anchor="official"),
            augment="none",
            device=args.device,
        )
        cfg.dataset.name, cfg.dataset.root = dataset, root
        cfg.backbone.name, cfg.backbone.pretrained = "ViT-B-16", None
        chosen = list(range(args.clients))
        warm_up, _ = timed(partial(build_experiment, cfg, chosen), torch.device("cpu"))
        setup, experiment = timed(partial(build_experiment, cfg, chosen), torch.device("cpu"))
    device = experiment.backbone.device
    authors_loop = AuthorsLoop(experiment)

    authors, (ref_sigma, ref_personal, ref_acc) = timed(authors_loop.round, device)
    sigma, params, per_client = our_round(experiment)
    errors = [relative_error(sigma["sigma"], ref_sigma)]
    for cid, (U, V) in ref_personal.items():
        errors += [relative_error(params[cid]["U"], U), relative_error(params[cid]["V"], V)]
    if max(errors) > TOLERANCE:
        raise SystemExit(f"ours and the authors' loop disagree (relative errors {errors})")
    if device.type == "cuda":
        experiment.backbone.autocast_dtype = torch.bfloat16
    ours: Timing = median_timing(partial(our_round, experiment), device, args.repeats)

    manifest = experiment.manifest
    steps = sum(
        EPOCHS * -(-experiment.client_data[c].num_train // cfg.train_batch_size) for c in chosen
    )
    ratio = authors.cost(device) / ours.cost(device)
    case = f"{args.clients}/{NUM_CLIENTS} clients"
    rows = [
        [
            "authors",
            f"{authors.wall:.1f}",
            f"{authors.cpu:.1f}",
            *(f"{ref_acc[0][m]:.1f}" for m in ("local", "base", "novel")),
        ],
        [
            "ours",
            f"{ours.wall:.2f}",
            f"{ours.cpu:.2f}",
            *(f"{per_client[0][m]:.1f}" for m in ("local", "base", "novel")),
        ],
    ]
    measure = "wall" if device.type == "cuda" else "CPU"
    notes = [
        f"device {device}, {torch.get_num_threads()} thread(s); ViT-B/16 random weights; "
        f"{args.classes} classes ({len(manifest.base_classes)} base, "
        f"{len(manifest.novel_classes)} novel; Food-101 names), {SHOTS} shots, batch 16",
        f"scaled: {args.clients} of the {NUM_CLIENTS} clients' share of a round ({steps} local "
        f"steps, then Local/Base/Novel of each); test set {args.test_per_class} image(s) per "
        f"class ({len(manifest.base_test)} base, {len(manifest.novel_test)} novel)",
        f"a full round is {NUM_CLIENTS / args.clients:g} such shares (plus averaging sigma); "
        f"speed-up = ratio of {measure} times",
        f"ours is the median of {args.repeats} rounds; final sigma, U, V agree to "
        f"{max(errors):.1e} (relative)",
        f"feature cache: first build {warm_up.wall:.1f} s, warm build {setup.wall:.1f} s "
        f"(setup, not part of the round)",
        f"total wall time {time.perf_counter() - started:.0f} s",
    ]
    header = ["loop", "wall (s)", "CPU (s)", "Local", "Base", "Novel"]
    report("One FedPGP round (scaled)", header, rows, {case: round(ratio, 2)}, notes, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
