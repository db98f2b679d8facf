"""What FedOTP learns on the offline world, next to FedPGP (issue 17).

For each seed, on the default config (or ``--set`` overrides), it runs the variants named by
``--runs`` in process and reports:

- the final Local / Base / Novel / HM of each run, and CLIP zero-shot's;
- training accuracy per round: each client's prediction on its own training features after its
  local round, mean over clients (and the mean training loss);
- the gradient norm of every local step before clipping (the value ``clip_grad_norm_``
  returns): its quantiles, how often it exceeds ``grad_clip`` and by how much;

and, once (it does not depend on the run seed), a linear probe of the world CLIP's image
tokens: a multinomial logistic regression fitted on the world's training images and tested on
its test images, on the pooled feature, on the mean of the projected patch tokens, on each single
patch token and on all patch tokens side by side, with zero-shot accuracy ("a photo of a
{class}.") through the same representation.

Variants: ``fedpgp``; ``fedotp`` (the config's ``fedotp.ot``); ``fedotp-cot`` and
``fedotp-sinkhorn`` (that ``ot``); ``fedotp-uniform`` (the plan replaced by the uniform one,
i.e. logit = exp(logit_scale) * mean of the similarities over patches and prompts, defined only
here).

    python benchmarks/fedotp_world.py [--seeds 10,11] [--runs fedpgp,fedotp,...]
        [--no-probe] [--probe-only] [--set key=value ...] [--json]

FedOTP trains with ``fedotp.lr`` (0.03 by default); ``--set fedotp.lr=null`` gives it the
run's ``lr`` (0.01), as before issue 17. A FedOTP run takes 4 to 15 minutes on 2 CPU cores,
FedPGP 2 to 4; ``--set eval_every=20`` evaluates the final round only (the final numbers are
the same).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedpgp.compare import parse_list, parse_seeds
from fedpgp.config import RunConfig, load_config, validate
from fedpgp.experiment import Experiment, build_experiment, load_backbone, load_data
from fedpgp.federation.client import Client
from fedpgp.federation.faults import Fault
from fedpgp.federation.inprocess import InProcess, inprocess_server
from fedpgp.federation.rounds import run_rounds
from fedpgp.federation.update import Update
from fedpgp.methods.base import Tensors
from fedpgp.methods.fedotp import FedOTP
from fedpgp.report import format_table

RUNS = ("fedpgp", "fedotp", "fedotp-cot", "fedotp-sinkhorn", "fedotp-uniform")
PROBE_STEPS = 300
PROBE_WEIGHT_DECAY = 1e-3


class UniformPlanFedOTP(FedOTP):
    """FedOTP with the transport plan replaced by the uniform one, 1 / (M N) everywhere: the
    logit is exp(logit_scale) times the mean similarity over patches and prompts."""

    def _transport_logits(self, patches: Tensor, text_features: Tensor) -> Tensor:
        sim = torch.einsum("bpe,nce->bcpn", patches.to(text_features.dtype), text_features)
        return self.logit_scale * sim.mean(dim=(-2, -1))


class RecordingInProcess(InProcess):
    """The in-process transport, also measuring each client's training accuracy at the start
    of its local round (with the GLOBAL tensors the server sent, i.e. after the last
    aggregation) and right after it (with the tensors it trained), and its training loss."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.records: dict[str, dict[int, list[float]]] = {
            "train_accuracy_start": {},
            "train_accuracy": {},
            "train_loss": {},
        }

    def _record(self, key: str, round: int, value: float) -> None:
        self.records[key].setdefault(round, []).append(value)

    def _accuracy(self, client: Client, params: Tensors) -> float:
        data = client.data
        with torch.no_grad():
            predicted = self.experiment.method.predict(params, data.bank, data.train_features[-1])
        return float((predicted == data.train_labels).float().mean()) * 100.0

    def _train_one(self, client: Client, received: Tensors, round: int) -> Update | Fault:
        start = self._accuracy(client, client.params(received))
        reply = super()._train_one(client, received, round)
        if isinstance(reply, Update):
            trained = {**client.params(received), **reply.tensors, **client.personal}
            self._record("train_accuracy_start", round, start)
            self._record("train_accuracy", round, self._accuracy(client, trained))
            self._record("train_loss", round, reply.metrics["loss"])
        return reply


@contextlib.contextmanager
def recorded_grad_norms(norms: list[float]) -> Iterator[None]:
    """Append the norm every ``clip_grad_norm_`` call measures (before clipping) to ``norms``."""
    original = torch.nn.utils.clip_grad_norm_

    def recording(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Tensor:
        norm = original(parameters, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    torch.nn.utils.clip_grad_norm_ = recording
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def variant(experiment: Experiment, name: str) -> Experiment:
    """The experiment driven by variant ``name`` of :data:`RUNS`."""
    if name == "fedpgp":
        return experiment.with_method("fedpgp")
    fedotp = experiment.with_method("fedotp")
    cfg = fedotp.cfg
    if name in ("fedotp-cot", "fedotp-sinkhorn"):
        ot = name.removeprefix("fedotp-")
        cfg = validate(dataclasses.replace(cfg, fedotp=dataclasses.replace(cfg.fedotp, ot=ot)))
        fedotp = dataclasses.replace(fedotp, cfg=cfg, method=FedOTP(cfg, fedotp.method.logit_scale))
    elif name == "fedotp-uniform":
        fedotp = dataclasses.replace(
            fedotp, method=UniformPlanFedOTP(cfg, fedotp.method.logit_scale)
        )
    return fedotp


def run(experiment: Experiment) -> dict[str, Any]:
    """One in-process run: final metrics, zero-shot's, and the per-round records."""
    cfg = experiment.cfg
    transport = RecordingInProcess(experiment)
    norms: list[float] = []
    start = time.perf_counter()
    with recorded_grad_norms(norms):
        rows, zeroshot = run_rounds(
            cfg, inprocess_server(experiment), transport, None, lambda state: None
        )
    metrics = ("local", "base", "novel", "hm")
    per_round = {
        key: [statistics.mean(values[r]) for r in sorted(values)]
        for key, values in transport.records.items()
    }
    steps = len(norms) // cfg.rounds
    return {
        "final": {key: rows[-1][key] for key in metrics},
        "zeroshot": {key: zeroshot[key] for key in metrics},
        **per_round,
        "grad_norms": norms,
        "grad_norm_median_per_round": [
            statistics.median(norms[r * steps : (r + 1) * steps]) for r in range(cfg.rounds)
        ]
        if steps
        else [],
        "seconds": round(time.perf_counter() - start, 1),
    }


def norm_summary(norms: list[float], clip: float | None) -> dict[str, float | None]:
    """Quantiles of the step gradient norms, the share of steps above ``clip`` and the mean
    factor by which those steps were shrunk."""
    if not norms:
        return {}
    ordered = sorted(norms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    over = [n for n in norms if clip is not None and n > clip]
    return {
        "steps": len(norms),
        "p10": quantile(0.1),
        "median": quantile(0.5),
        "p90": quantile(0.9),
        "max": ordered[-1],
        "clipped %": 100.0 * len(over) / len(norms) if clip is not None else None,
        "mean shrink": statistics.mean(n / clip for n in over) if over else None,
    }


# --- the linear probe -----------------------------------------------------------------------


def encode_split(cfg: RunConfig, split: str) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """Pooled (n, E) and patch (n, P, E) features of every image of the world's ``split``, its
    labels and the class names."""
    splits, _ = load_data(cfg)
    backbone = load_backbone(cfg, "cpu")
    labeled = getattr(splits, split)
    transform = backbone.test_transform()
    pooled, patches = [], []
    with torch.no_grad():
        for start in range(0, len(labeled), 256):
            indices = range(start, min(start + 256, len(labeled)))
            images = torch.stack([transform(labeled.images[i]) for i in indices])
            p, t = backbone.encode_images_with_patches(images)
            pooled.append(p)
            patches.append(t)
    labels = torch.as_tensor(labeled.labels, dtype=torch.long)
    return torch.cat(pooled), torch.cat(patches), labels, splits.classnames


def fit_probe(train: Tensor, labels: Tensor, test: Tensor, test_labels: Tensor) -> float:
    """Test accuracy (%) of a multinomial logistic regression (standardised inputs, L2 weight
    PROBE_WEIGHT_DECAY, full-batch L-BFGS for PROBE_STEPS iterations)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x, x_test = (train - mean) / std, (test - mean) / std
    classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    x, x_test = x.double(), x_test.double()
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=PROBE_STEPS, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels)
        loss = loss + PROBE_WEIGHT_DECAY * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (x_test @ weight + bias).argmax(-1)
    return float((predicted == test_labels).double().mean()) * 100.0


def zero_shot(features: Tensor, labels: Tensor, text: Tensor) -> float:
    """Accuracy (%) of cos(feature, "a photo of a {class}.") over all classes."""
    predicted = (F.normalize(features, dim=-1) @ text.t()).argmax(-1)
    return float((predicted == labels).float().mean()) * 100.0


def probe(cfg: RunConfig) -> list[list[Any]]:
    """Rows (representation, probe test accuracy, zero-shot accuracy) of the linear probe."""
    pooled, patches, labels, names = encode_split(cfg, "train")
    test_pooled, test_patches, test_labels, _ = encode_split(cfg, "test")
    with torch.no_grad():
        text = load_backbone(cfg, "cpu").encode_texts([f"a photo of a {n}." for n in names])
    rows = [
        [
            "pooled feature",
            fit_probe(pooled, labels, test_pooled, test_labels),
            zero_shot(test_pooled, test_labels, text),
        ],
        [
            "mean of patch tokens",
            fit_probe(patches.mean(1), labels, test_patches.mean(1), test_labels),
            zero_shot(test_patches.mean(1), test_labels, text),
        ],
    ]
    singles = [
        (
            fit_probe(patches[:, p], labels, test_patches[:, p], test_labels),
            zero_shot(test_patches[:, p], test_labels, text),
        )
        for p in range(patches.shape[1])
    ]
    for label, pick in (("min", min), ("mean", statistics.mean), ("max", max)):
        rows.append(
            [
                f"single patch token ({label} of {len(singles)})",
                pick(s[0] for s in singles),
                pick(s[1] for s in singles),
            ]
        )
    rows.append(
        [
            "all patch tokens side by side",
            fit_probe(patches.flatten(1), labels, test_patches.flatten(1), test_labels),
            None,
        ]
    )
    return rows


# --- report -----------------------------------------------------------------------------------


def report(results: dict[int, dict[str, dict[str, Any]]], clip: float | None) -> str:
    """The tables of every run: finals, training accuracy per round, gradient norms."""
    finals = []
    for seed, runs in results.items():
        zs = next(iter(runs.values()))["zeroshot"]
        finals.append([f"zeroshot (seed {seed})", *zs.values(), None])
        finals.extend(
            [f"{name} (seed {seed})", *r["final"].values(), r["seconds"]]
            for name, r in runs.items()
        )
    out = [format_table(["run", "Local", "Base", "Novel", "HM", "s"], finals)]
    columns = [(seed, name) for seed, runs in results.items() for name in runs]
    rounds = max(len(results[s][n]["train_accuracy"]) for s, n in columns)
    for key, title in (
        ("train_accuracy_start", "training accuracy at the start of the local round (%)"),
        ("train_accuracy", "training accuracy after the local round (%), mean over clients"),
        ("train_loss", "mean training loss of the local round"),
        ("grad_norm_median_per_round", "median step gradient norm (before clipping)"),
    ):
        rows = [
            [
                r + 1,
                *(
                    results[s][n][key][r] if r < len(results[s][n][key]) else None
                    for s, n in columns
                ),
            ]
            for r in range(rounds)
        ]
        header = ["round", *(f"{n} s{s}" for s, n in columns)]
        out += ["", title, format_table(header, rows)]
    norms = [
        [f"{n} (seed {s})", *norm_summary(results[s][n]["grad_norms"], clip).values()]
        for s, n in columns
    ]
    header = ["run", "steps", "p10", "median", "p90", "max", "clipped %", "mean shrink"]
    out += ["", f"step gradient norms (grad_clip {clip})", format_table(header, norms)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="10,11")
    parser.add_argument("--runs", default="fedpgp,fedotp,fedotp-sinkhorn,fedotp-uniform")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    parser.add_argument("--probe-only", action="store_true", help="only the linear probe")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    cfg = load_config(None, args.overrides)
    torch.set_num_threads(cfg.threads)
    seeds = parse_seeds(args.seeds, cfg.seed)
    names = [] if args.probe_only else parse_list(args.runs, "runs")
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {unknown}; expected some of {', '.join(RUNS)}")
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds if names else []:
        # The records hook the one-client-at-a-time path (Client.train), not lockstep training.
        seeded = validate(dataclasses.replace(cfg, seed=seed, batch_clients="off"))
        experiment = build_experiment(seeded, kinds=["patches"])
        results[seed] = {}
        for name in names:
            results[seed][name] = run(variant(experiment, name))
            print(f"seed {seed} {name}: {results[seed][name]['final']}", file=sys.stderr)
    probe_rows = None if args.no_probe else probe(cfg)
    everything = json.dumps({"runs": results, "probe": probe_rows})
    if args.save:
        Path(args.save).write_text(everything)
    if args.json:
        print(everything)
        return 0
    if results:
        print(report(results, cfg.grad_clip))
    if probe_rows is not None:
        print()
        print("linear probe (90 classes, world train -> test) and zero-shot, accuracy %")
        print(format_table(["representation", "probe", "zero-shot"], probe_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
