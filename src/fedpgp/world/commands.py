"""``fedpgp world pretrain`` and ``fedpgp world show``. Building their parser imports no torch:
the pretraining and the backbone are imported when a command needs them."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np

from fedpgp.data.world import load_world
from fedpgp.errors import ConfigError
from fedpgp.world.settings import MODEL_NAME, PretrainSettings

PACKAGED_TAG = "world"


def add_world_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``world pretrain`` and ``world show`` to the CLI's subcommands."""
    world = subparsers.add_parser("world", help="the offline world and its small CLIP")
    commands = world.add_subparsers(dest="world_command", required=True)
    defaults = PretrainSettings()

    train = commands.add_parser(
        "pretrain",
        help="pretrain the world CLIP from scratch and print its zero-shot accuracy",
        description="Pretrain the world CLIP from scratch (deterministic from --seed on the "
        "same thread count) and print its zero-shot accuracy on seen, held-out and all classes.",
    )
    train.add_argument("--out", default="fedpgp-world.safetensors", help="weights file to write")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    train.add_argument(
        "--install",
        action="store_true",
        help="maintainers: also copy the file into the package as the shipped "
        f"'{MODEL_NAME}:{PACKAGED_TAG}' weights and record its sha256",
    )
    train.set_defaults(func=_pretrain_command)

    show = commands.add_parser("show", help="save a grid of example images with class names")
    show.add_argument("--out", default="world.png", help="image file to write")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument(
        "--clean", action="store_true", help="show every class without its client style"
    )
    show.set_defaults(func=_show_command)


def _pretrain_command(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.threads < 1:
        raise ConfigError("world pretrain: --steps and --threads must be positive")
    from fedpgp.world.pretrain import pretrain

    settings = PretrainSettings(seed=args.seed, steps=args.steps, threads=args.threads)
    result = pretrain(Path(args.out), settings, log=lambda line: print(line, flush=True))
    print(f"wrote {result.path} (sha256 {result.sha256}) in {result.seconds / 60:.1f} min")
    accuracy = result.accuracy
    print(
        "zero-shot 'a photo of a {class}.' over 90 classes: "
        f"seen {accuracy['seen']:.1f}%  "
        f"held-out {accuracy['held_out']:.1f}%  all {accuracy['all']:.1f}%"
    )
    if args.install:
        print(f"installed as {install_weights(result.path, result.sha256)}")
    return 0


def install_weights(path: Path, sha256: str) -> Path:
    """Copy ``path`` into the package's weights folder and record it in ``weights.json`` as
    ``fedpgp-world:world``; both writes are atomic."""
    # Imported when called: the backbone imports open_clip and torch.
    from fedpgp.backbone import weights

    folder = weights.PACKAGE_WEIGHTS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{MODEL_NAME}.safetensors"
    if Path(path).resolve() != target.resolve():
        temporary = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, temporary)
        temporary.replace(target)
    manifest = folder / "weights.json"
    entries = json.loads(manifest.read_text()) if manifest.is_file() else {}
    entries[f"{MODEL_NAME}:{PACKAGED_TAG}"] = {"file": target.name, "sha256": sha256}
    temporary = manifest.with_name(".weights.json.tmp")
    temporary.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    temporary.replace(manifest)
    return target


def _show_command(args: argparse.Namespace) -> int:
    import matplotlib  # imported here: slow to import, and only this command draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = {"styles": 0} if args.clean else {}
    world = load_world(None, seed=args.seed, **options)
    test = world.test
    first = np.searchsorted(test.labels, np.arange(world.num_classes))
    size, label_space, columns = world.test.images[0].size[0], 14, 10
    cell_w, cell_h = size + 4, size + label_space
    rows = math.ceil(world.num_classes / columns)
    # One canvas with room above each image for its name: far faster to draw than 90 axes.
    canvas = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    figure, axis = plt.subplots(figsize=(columns * 1.7, rows * 1.75))
    for label in range(world.num_classes):
        top, left = (label // columns) * cell_h + label_space, (label % columns) * cell_w + 2
        canvas[top : top + size, left : left + size] = np.asarray(test.images[int(first[label])])
        style = world.domain_names[int(test.domains[first[label]])]
        axis.text(
            left + size / 2,
            top - 1,
            f"{world.classnames[label]}\n({style})",
            ha="center",
            va="bottom",
            fontsize=6.5,
        )
    axis.imshow(canvas, interpolation="nearest")
    axis.axis("off")
    num_base = math.ceil(world.num_classes / 2)
    axis.set_title(
        f"world (seed {args.seed}): the first {num_base} classes are base, the rest novel"
    )
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=130)
    plt.close(figure)
    print(f"wrote {args.out}")
    return 0
