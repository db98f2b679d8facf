"""Every method's local step and round as a ratio to FedPGP's, all measured in one run.

- step, paper size: one local step (loss and backward) on cached features, ViT-B/16
  architecture with random weights, n_cls 50 (Food-101 names), batch 16, n_ctx 16; FedOTP reads
  196 patch tokens per image, pFedMoAP mixes 9 experts (a round after the first).
- round, world: the default protocol on the shipped world (10 clients, 5 local epochs, all
  clients sampled), the second round (so that pFedMoAP has experts) of the in-process runtime:
  train, aggregate, and evaluate every client's Local / Base / Novel. Train and evaluation are
  also given apart.

Ratios are of CPU time on a CPU (wall time on a GPU), each against FedPGP in the same run.

    python benchmarks/bench_methods.py [--methods a,b] [--repeats 5] [--no-world] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from benchlib import FOOD101, Timing, median_timing, report, set_threads, timed

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.config import RunConfig, method_label_space, validate
from fedpgp.experiment import build_experiment, resolve_device
from fedpgp.federation.inprocess import InProcess, inprocess_server
from fedpgp.methods.base import Method, Tensors, create_method
from fedpgp.methods.registry import METHOD_NAMES, method_class
from fedpgp.prompts import PromptBank

BATCH, N_CLS, N_CTX, PATCHES, EXPERTS = 16, 50, 16, 196, 9


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trained = ",".join(m for m in METHOD_NAMES if method_class(m).trains)
    parser.add_argument("--methods", default=trained, help="comma-separated (FedPGP is added)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    parser.add_argument("--no-world", action="store_true", help="skip the world rounds")
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


def step_times(
    names: list[str], repeats: int, device: torch.device
) -> dict[str, tuple[Timing, float]]:
    """Method -> (median step timing, loss) at paper size."""
    backbone = FrozenCLIP.load(BackboneSpec("ViT-B-16", None)).to(device)
    bank = PromptBank(backbone, FOOD101[:N_CLS], N_CTX)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, N_CLS, (BATCH,), generator=generator).to(device)
    pooled = F.normalize(torch.randn(BATCH, backbone.embed_dim, generator=generator), dim=-1)
    patches = F.normalize(
        torch.randn(BATCH, PATCHES, backbone.embed_dim, generator=generator), dim=-1
    )
    out = {}
    for name in names:
        cfg = validate(RunConfig(method=name, n_ctx=N_CTX, num_clients=10))
        method = create_method(cfg, backbone.logit_scale, embed_dim=backbone.embed_dim)
        start = {
            **method.initial_global(backbone.text_width),
            **method.initial_personal(backbone.text_width, 0),
        }
        received = {k: v.to(device) for k, v in received_for(method, start, generator).items()}
        features = (patches if method.image_kind == "patches" else pooled).to(device)
        params = {k: received.get(k, v).to(device) for k, v in start.items()}

        def step(method=method, params=params, features=features, received=received) -> float:
            leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            loss = method.loss(leaves, features, labels, bank, received)
            loss.backward()
            return float(loss.detach())

        out[name] = (median_timing(step, device, repeats), step())
    return out


def world_rounds(names: list[str], device: torch.device) -> dict[str, tuple[Timing, Timing]]:
    """Method -> (train + aggregate timing, evaluation timing) of the world's second round."""
    cfg = validate(RunConfig(device=device.type))
    base = build_experiment(
        cfg,
        kinds=[method_class(m).image_kind for m in names],
        label_spaces=[method_label_space(cfg, m) for m in names],
    )
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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = ["fedpgp", *(m for m in args.methods.split(",") if m and m != "fedpgp")]
    unknown = [m for m in names if m not in METHOD_NAMES or not method_class(m).trains]
    if unknown:
        raise SystemExit(f"--methods: not trained methods of {METHOD_NAMES}: {unknown}")
    set_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    steps = step_times(names, args.repeats, device)
    rounds = {} if args.no_world else world_rounds(names, device)

    reference_step = steps["fedpgp"][0].cost(device)
    rows, ratios = [], {}
    for name in names:
        step, loss = steps[name]
        ratio = step.cost(device) / reference_step
        ratios[f"{name} step"] = round(ratio, 2)
        row = [name, f"{step.cost(device) * 1e3:.1f}", f"{ratio:.2f}x", f"{loss:.3f}"]
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
    header = ["method", "step (ms)", "step vs fedpgp", "loss"]
    if rounds:
        header += ["world train (s)", "world eval (s)", "round vs fedpgp"]
    measure = "wall" if device.type == "cuda" else "CPU"
    notes = [
        f"device {device}, {torch.get_num_threads()} thread(s); {measure} times",
        f"step: ViT-B/16 random weights, n_cls {N_CLS}, batch {BATCH}, n_ctx {N_CTX}, median "
        f"of {args.repeats} after a warm-up",
        "round: the shipped world, default protocol, round 2 of 10 clients, one timing each",
        f"total wall time {time.perf_counter() - started:.0f} s",
    ]
    report("Each method against FedPGP", header, rows, ratios, notes, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
