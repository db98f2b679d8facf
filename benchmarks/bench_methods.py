"""Every method's local step and round as a ratio to FedPGP's, all measured in one run; and what
the cached stem of the methods with prompts inside the image tower saves and costs.

- step, world size: one local step (loss and backward) on cached features of the shipped world
  CLIP, its 45 base class names, batch 16 and the run's defaults (n_ctx 16).
- step, paper size: the same at the ViT-B/16 architecture with random weights, n_cls 50
  (Food-101 names), batch 16, n_ctx 16. FedOTP reads 196 patch tokens per image, pFedMoAP mixes
  9 experts (a round after the first); VPT, IVLP, MaPLe, FedMGP and pFedMMA read stems (197 x
  768 tokens per image) and run the image tower's blocks.
- round, world: the default protocol on the shipped world (10 clients, 5 local epochs, all
  clients sampled), the second round (so that pFedMoAP has experts) of the in-process runtime:
  train, aggregate, and evaluate every client's Local / Base / Novel. Train and evaluation are
  also given apart.
- stem, paper size: IVLP's step on cached stems against the same step computing the stem from
  transformed images (patch embedding, class token, positions, ln_pre), and the decoding and
  test transform of one JPEG image, which a step without any cache would pay too; the memory of
  a cached stem per image (float16) against the transformed image's.

Ratios are of CPU time on a CPU (wall time on a GPU), each against FedPGP in the same run.

    python benchmarks/bench_methods.py [--methods a,b] [--repeats 5] [--stem-repeats 2]
        [--no-world] [--no-paper] [--json]
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchlib import FOOD101, Timing, median_timing, report, set_threads, timed
from PIL import Image

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.backbone.prompted import PromptedImageTower
from fedpgp.config import RunConfig, validate
from fedpgp.data.world_images import class_names
from fedpgp.experiment import build_experiment, resolve_device, stem_block
from fedpgp.federation.inprocess import InProcess, inprocess_server
from fedpgp.methods.base import Method, Tensors, method_for
from fedpgp.methods.encoders import EncoderMethod
from fedpgp.methods.registry import METHOD_NAMES, method_class
from fedpgp.prompts import PromptBank
from fedpgp.report import format_table

BATCH, N_CLS, N_CTX, EXPERTS = 16, 50, 16, 9
WORLD_CLASSES = 45
# A typical photo of the paper's datasets, decoded and resized for the stem comparison.
JPEG_SIZE = (500, 375)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trained = ",".join(m for m in METHOD_NAMES if method_class(m).trains)
    parser.add_argument("--methods", default=trained, help="comma-separated (FedPGP is added)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    parser.add_argument(
        "--stem-repeats",
        type=int,
        default=2,
        help="timed steps at paper size for the methods that run the image tower",
    )
    parser.add_argument("--no-world", action="store_true", help="skip the world rounds")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-size steps")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def received_for(method: Method, start: Tensors, generator: torch.Generator) -> Tensors:
    """What client 0 receives in a later round: the GLOBAL tensors and, for a method that hands
    out other clients' uploads, those of EXPERTS other clients."""
    if not method.keeps_uploads:
        return dict(start)
    stored = {
        cid: {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in start.items()}
        for cid in range(1, EXPERTS + 1)
    }
    return {**start, **method.server_sends(0, 1, stored)}


def batch_features(
    method: Method, backbone: FrozenCLIP, generator: torch.Generator
) -> torch.Tensor:
    """A batch of the features ``method`` reads: random unit pooled or patch features, or the
    stems of random images."""
    embed = backbone.embed_dim
    if method.image_kind == "pooled":
        return F.normalize(torch.randn(BATCH, embed, generator=generator), dim=-1)
    if method.image_kind == "patches":
        visual = backbone.model.visual
        patches = visual.grid_size[0] * visual.grid_size[1]
        return F.normalize(torch.randn(BATCH, patches, embed, generator=generator), dim=-1)
    size = backbone.image_size
    images = torch.randn(BATCH, 3, size, size, generator=generator)
    return PromptedImageTower(backbone).stem(images, stem_block(method.image_kind)).half()


def step_times(
    names: list[str], backbone: FrozenCLIP, classes: list[str], repeats: dict[str, int]
) -> dict[str, tuple[Timing, float]]:
    """Method -> (median step timing, loss) on ``backbone`` over ``classes``."""
    device = backbone.device
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(classes), (BATCH,), generator=generator).to(device)
    out = {}
    for name in names:
        cfg = validate(RunConfig(method=name, n_ctx=N_CTX, num_clients=10))
        method = method_for(cfg, backbone)
        bank = PromptBank(backbone, classes, *method.template)
        start = {
            **method.initial_global(backbone.text_width),
            **method.initial_personal(backbone.text_width, 0),
        }
        received = {k: v.to(device) for k, v in received_for(method, start, generator).items()}
        features = batch_features(method, backbone, generator).to(device)
        params = method.merge({k: received.get(k, v).to(device) for k, v in start.items()})

        def step(method=method, params=params, features=features, received=received, bank=bank):
            leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in params.items()}
            loss = method.loss(leaves, features, labels, bank, received)
            loss.backward()
            return float(loss.detach())

        out[name] = (median_timing(step, device, repeats.get(name, repeats["*"])), step())
    return out


def world_rounds(names: list[str], device: torch.device) -> dict[str, tuple[Timing, Timing]]:
    """Method -> (train + aggregate timing, evaluation timing) of the world's second round."""
    cfg = validate(RunConfig(device=device.type))
    base = build_experiment(cfg, methods=names)
    out = {}
    for name in names:
        experiment = base.with_method(name)
        server, transport = inprocess_server(experiment), InProcess(experiment)

        def train(round: int, server=server, transport=transport) -> None:
            sends = {cid: server.sends(cid, round) for cid in server.sample(round)}
            accepted, _ = server.screen(round, transport.train(round, sends), 1)
            server.aggregate(accepted)

        train(0)
        training, _ = timed(lambda train=train: train(1), device)
        evaluation, _ = timed(
            lambda s=server, t=transport: t.evaluate(1, s.global_tensors, False), device
        )
        out[name] = (training, evaluation)
    return out


def stem_costs(backbone: FrozenCLIP, repeats: int) -> tuple[list[list[object]], dict[str, float]]:
    """IVLP's step on cached stems against recomputing them, one JPEG's decoding and test
    transform, and the memory per image of a cached stem and of a transformed image."""
    device = backbone.device
    generator = torch.Generator().manual_seed(1)
    method = method_for(validate(RunConfig(method="ivlp")), backbone)
    bank = PromptBank(backbone, FOOD101[:N_CLS], *method.template)
    tower = PromptedImageTower(backbone)
    size = backbone.image_size
    images = torch.randn(BATCH, 3, size, size, generator=generator).to(device)
    stems = tower.stem(images).half()
    labels = torch.randint(0, N_CLS, (BATCH,), generator=generator).to(device)
    start = {k: v.to(device) for k, v in method.initial_global(backbone.text_width).items()}

    def step(features=None) -> None:
        leaves = {k: v.clone().requires_grad_() for k, v in start.items()}
        stem = tower.stem(images) if features is None else features
        method.loss(leaves, stem, labels, bank, {}).backward()

    cached = median_timing(lambda: step(stems), device, repeats)
    recomputed = median_timing(step, device, repeats)
    pixels = np.random.default_rng(2).integers(0, 256, (JPEG_SIZE[1], JPEG_SIZE[0], 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    transform = backbone.test_transform()

    def decode() -> None:
        for _ in range(BATCH):
            transform(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    decoding = median_timing(decode, torch.device("cpu"), repeats)
    stem_bytes = stems[0].numel() * 2
    image_bytes = images[0].numel() * 4
    rows = [
        ["IVLP step, cached stems", f"{cached.cost(device) * 1e3:.0f} ms", "1.00x"],
        [
            "IVLP step, stems recomputed",
            f"{recomputed.cost(device) * 1e3:.0f} ms",
            f"{recomputed.cost(device) / cached.cost(device):.3f}x",
        ],
        [
            f"decode + transform {BATCH} JPEGs ({JPEG_SIZE[0]}x{JPEG_SIZE[1]})",
            f"{decoding.cpu * 1e3:.0f} ms",
            f"{decoding.cpu / cached.cost(device):.3f}x",
        ],
        ["cached stem per image (float16)", f"{stem_bytes / 1024:.0f} KiB", ""],
        ["transformed image (float32)", f"{image_bytes / 1024:.0f} KiB", ""],
    ]
    ratios = {
        "stem recomputed / cached": round(recomputed.cost(device) / cached.cost(device), 3),
        "jpeg decoding / cached step": round(decoding.cpu / cached.cost(device), 3),
    }
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = ["fedpgp", *(m for m in args.methods.split(",") if m and m != "fedpgp")]
    unknown = [m for m in names if m not in METHOD_NAMES or not method_class(m).trains]
    if unknown:
        raise SystemExit(f"--methods: not trained methods of {METHOD_NAMES}: {unknown}")
    set_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    world = FrozenCLIP.load(BackboneSpec()).to(device)
    world_steps = step_times(names, world, class_names(WORLD_CLASSES), {"*": args.repeats})
    paper_steps, stem_rows, stem_ratios = {}, [], {}
    if not args.no_paper:
        paper = FrozenCLIP.load(BackboneSpec("ViT-B-16", None)).to(device)
        heavy = {m: args.stem_repeats for m in names if issubclass(method_class(m), EncoderMethod)}
        paper_steps = step_times(names, paper, FOOD101[:N_CLS], {"*": args.repeats, **heavy})
        stem_rows, stem_ratios = stem_costs(paper, args.stem_repeats)
    rounds = {} if args.no_world else world_rounds(names, device)

    rows, ratios = [], {}
    for name in names:
        row = [name]
        for label, steps in (("world", world_steps), ("paper", paper_steps)):
            if not steps:
                continue
            step, _ = steps[name]
            ratio = step.cost(device) / steps["fedpgp"][0].cost(device)
            ratios[f"{name} step ({label})"] = round(ratio, 2)
            row += [f"{step.cost(device) * 1e3:.1f}", f"{ratio:.2f}x"]
        if rounds:
            training, evaluation = rounds[name]
            ref_train, ref_eval = rounds["fedpgp"]
            total = training.cost(device) + evaluation.cost(device)
            ref_total = ref_train.cost(device) + ref_eval.cost(device)
            ratios[f"{name} round"] = round(total / ref_total, 2)
            row += [
                f"{training.cost(device):.2f}",
                f"{evaluation.cost(device):.2f}",
                f"{total / ref_total:.2f}x",
            ]
        rows.append(row)
    header = ["method", "world step (ms)", "vs fedpgp"]
    if paper_steps:
        header += ["paper step (ms)", "vs fedpgp"]
    if rounds:
        header += ["world train (s)", "world eval (s)", "round vs fedpgp"]
    measure = "wall" if device.type == "cuda" else "CPU"
    notes = [
        f"device {device}, {torch.get_num_threads()} thread(s); {measure} times",
        f"world step: the shipped world CLIP, {WORLD_CLASSES} classes, batch {BATCH}, n_ctx "
        f"{N_CTX}, median of {args.repeats} after a warm-up",
    ]
    if paper_steps:
        notes.append(
            f"paper step: ViT-B/16 random weights, n_cls {N_CLS}, batch {BATCH}, n_ctx {N_CTX}, "
            f"median of {args.repeats} ({args.stem_repeats} for the stem methods) after a warm-up"
        )
    if rounds:
        notes.append(
            "round: the shipped world, default protocol, round 2 of 10 clients, one timing each"
        )
    notes.append(f"total wall time {time.perf_counter() - started:.0f} s")
    report("Each method against FedPGP", header, rows, {**ratios, **stem_ratios}, notes, args.json)
    if stem_rows and not args.json:
        print()
        print("The cached stem, paper size")
        print(format_table(["case", "cost", "vs cached step"], stem_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
