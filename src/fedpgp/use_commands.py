"""The commands that use what a run learned: ``fedpgp eval``, ``fedpgp predict`` and ``fedpgp
export`` (docs/using.md). Heavy modules are imported when a command runs, not when the parser
is built."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError, DatasetError


def _add_prompt_choice(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--client", type=int, metavar="N", help="client N's personalized prompt")
    which.add_argument(
        "--global",
        dest="global_prompt",
        action="store_true",
        help="the global prompt (averaged by the server)",
    )


def _add_classes(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--classes", metavar="FILE", help=f"{what}, one per line (default: the run's base classes)"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from .trained import TrainedRun, eval_config, evaluate_run, format_eval

    run = TrainedRun.open(args.run)
    cfg = eval_config(run, args.config, args.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or f"runs/{stamp}-eval-{cfg.method}-{cfg.dataset.name}-s{cfg.seed}")
    document = evaluate_run(run, cfg, out_dir, per_image=args.per_image)
    print(format_eval(document))
    print(f"\neval.json and eval.csv in {out_dir}")
    return 0


def image_files(arguments: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The files to classify: each file named, and every file with an image extension PIL knows
    inside each folder named (recursively, sorted); and one error line per argument that is
    neither."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files, errors = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions
            )
            if not found:
                errors.append(f"{path}: a folder with no image file in it")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return files, errors


def format_predictions(results: list[tuple[Path, list[tuple[str, float]]]], output: str) -> str:
    """Each image's top classes with their probabilities, as an aligned table, CSV or JSON."""
    if output == "json":
        entries = [
            {"file": str(path), "predictions": [{"class": c, "probability": p} for c, p in top]}
            for path, top in results
        ]
        return json.dumps(entries, indent=2)
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "rank", "class", "probability"])
        for path, top in results:
            for rank, (name, probability) in enumerate(top, start=1):
                writer.writerow([path, rank, name, f"{probability:.6f}"])
        return buffer.getvalue().rstrip("\n")
    width = max((len(str(path)) for path, _ in results), default=4)
    lines = [f"{'file'.ljust(width)}  prediction (probability)"]
    for path, top in results:
        guesses = ", ".join(f"{name} ({100 * p:.1f}%)" for name, p in top)
        lines.append(f"{str(path).ljust(width)}  {guesses}")
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from .classifier import load_classifier, read_class_file
    from .data.datasets import read_image

    if args.top_k < 1:
        raise ConfigError(f"--top-k: expected a positive number of classes, got {args.top_k}")
    classes = read_class_file(args.classes) if args.classes else None
    files, errors = image_files(args.images)
    client = None if args.global_prompt else args.client
    classifier = load_classifier(args.run, client=client, classes=classes)
    pictures, readable = [], []
    for path in files:
        try:
            pictures.append(read_image(path))
            readable.append(path)
        except DatasetError as exc:
            errors.append(str(exc))
    results = []
    if pictures:
        probabilities = classifier.probabilities(pictures)
        k = min(args.top_k, len(classifier.classes))
        values, indices = probabilities.topk(k, dim=-1)
        for path, row_p, row_i in zip(readable, values.tolist(), indices.tolist(), strict=True):
            results.append(
                (path, [(classifier.classes[i], p) for i, p in zip(row_i, row_p, strict=True)])
            )
        print(format_predictions(results, args.format))
    for line in errors:
        print(f"fedpgp: error: {line}", file=sys.stderr)
    return 1 if errors else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .classifier import export_prompt, read_class_file, run_classes, run_prompt
    from .experiment import load_backbone
    from .trained import TrainedRun

    classes = read_class_file(args.classes) if args.classes else None
    run = TrainedRun.open(args.run)
    backbone = load_backbone(run.cfg, "cpu")
    prompt = run_prompt(run, None if args.global_prompt else args.client, backbone)
    names = classes if classes is not None else run_classes(run.cfg, run.path)
    out = export_prompt(prompt, names, args.out)
    which = "the global prompt" if prompt.client is None else f"client {prompt.client}'s prompt"
    print(f"{which} of {run.path} ({prompt.method}, {len(names)} classes) written to {out}")
    return 0


def add_use_commands(
    sub: argparse._SubParsersAction,
    config_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``eval``, ``predict`` and ``export``; ``config_args`` adds --config/--set."""
    ev = sub.add_parser(
        "eval",
        help="evaluate a trained run's prompts, on its own data or another's",
        description="Evaluate every client's personalized prompt and the global prompt of RUN "
        "(finished, or interrupted: its last checkpoint) with the metrics of `fedpgp run`. "
        "--config and --set say what to evaluate on (another dataset, partition, shots or "
        "seed); the method, n_ctx, method sections and backbone stay the run's.",
    )
    ev.add_argument("run", metavar="RUN", help="run directory")
    config_args(ev)
    ev.add_argument("--out", help="output folder (default: runs/<time>-eval-<method>-<dataset>)")
    ev.add_argument(
        "--per-image",
        action="store_true",
        help="also write predictions.csv: every test image's prediction by every prompt",
    )
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser(
        "predict",
        help="classify image files with a trained prompt",
        description="Class names and probabilities of each image, with client N's prompt or "
        "the global one. Any image PIL opens; a file that is not one gets an error line and "
        "exit status 1, the others are still classified.",
    )
    pr.add_argument("run", metavar="RUN", help="run directory, or a file `fedpgp export` wrote")
    _add_prompt_choice(pr)
    pr.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    _add_classes(pr, "class names")
    pr.add_argument("--top-k", type=int, default=1, help="classes shown per image (default 1)")
    pr.add_argument("--format", choices=("table", "csv", "json"), default="table")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser(
        "export",
        help="write a trained prompt to a safetensors file",
        description="The tensors of client N's prompt or the global prompt, with the method, "
        "the backbone's identity, the class names and the run's config in the file's "
        "metadata; fedpgp.load_classifier(FILE) reads it.",
    )
    ex.add_argument("run", metavar="RUN", help="run directory")
    _add_prompt_choice(ex)
    ex.add_argument("--out", required=True, metavar="FILE.safetensors")
    _add_classes(ex, "class names to store")
    ex.set_defaults(func=cmd_export)
