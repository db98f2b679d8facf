"""The `fedpgp data` commands: `data check NAME --root DIR` and `data download NAME --root DIR`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpgp.data.datasets import (
    DatasetProblemsError,
    DatasetSplits,
    FileImages,
    LabeledSet,
    dataset_names,
    load_dataset,
    read_image,
)
from fedpgp.data.download import (
    MANUAL_INSTRUCTIONS,
    TORCHVISION_SOURCES,
    still_needed,
    torchvision_download,
)
from fedpgp.errors import ConfigError, DatasetError


@dataclass
class CheckReport:
    """The outcome of `data check`: the loaded dataset (if it loaded) and every problem."""

    name: str
    root: Path
    splits: DatasetSplits | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _labeled_sets(splits: DatasetSplits) -> dict[str, LabeledSet]:
    sets = {"train": splits.train, "val": splits.val, "test": splits.test}
    return {name: labeled for name, labeled in sets.items() if labeled is not None}


def _verify_images(splits: DatasetSplits, problems: list[str]) -> None:
    """Decode every image file once, recording each unreadable one."""
    for labeled in _labeled_sets(splits).values():
        if not isinstance(labeled.images, FileImages):
            continue
        for index in range(len(labeled.images)):
            try:
                read_image(labeled.images.path(index))
            except DatasetError as exc:
                problems.append(str(exc))


def check_dataset(name: str, root: str | Path, verify_images: bool = False) -> CheckReport:
    """Load dataset `name` from `root` collecting every problem instead of stopping at one."""
    if name not in dataset_names():
        raise ConfigError(f"NAME: unknown dataset '{name}'; known: {', '.join(dataset_names())}")
    report = CheckReport(name, Path(root))
    try:
        report.splits = load_dataset(name, root)
    except DatasetProblemsError as exc:
        report.problems.extend(exc.problems)
    except DatasetError as exc:
        report.problems.append(str(exc))
    if report.splits is not None and verify_images:
        _verify_images(report.splits, report.problems)
    return report


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_counts(splits: DatasetSplits) -> str:
    """Per-split totals, per-class counts and (domain datasets) per-domain counts."""
    sets = _labeled_sets(splits)
    header = ["class", *sets]
    totals = ["total", *(str(len(s)) for s in sets.values())]
    counts = {n: np.bincount(s.labels, minlength=splits.num_classes) for n, s in sets.items()}
    rows = [header, totals]
    rows += [
        [f"{label} {classname}", *(str(counts[n][label]) for n in sets)]
        for label, classname in enumerate(splits.classnames)
    ]
    text = _table(rows)
    if splits.domain_names:
        domain_rows = [["domain", *sets]]
        for domain_id, domain in enumerate(splits.domain_names):
            domain_rows.append(
                [domain, *(str(int(np.sum(s.domains == domain_id))) for s in sets.values())]
            )
        text += "\n\n" + _table(domain_rows)
    return text


def run_check(args: argparse.Namespace) -> int:
    """`fedpgp data check`: print the counts (exit 0) or every problem (exit 2)."""
    report = check_dataset(args.name, args.root, verify_images=args.verify_images)
    if report.splits is not None:
        splits = report.splits
        print(f"dataset '{splits.name}' at {report.root}: {splits.num_classes} classes")
        print(format_counts(splits))
    if report.ok:
        files = report.splits is not None and isinstance(report.splits.train.images, FileImages)
        if files and not args.verify_images:
            print("image files were found but not decoded (--verify-images decodes them)")
        print("OK")
        return 0
    print(f"{len(report.problems)} problem(s) in '{args.name}' at {report.root}:")
    for problem in report.problems:
        print(f"  {problem}")
    return 2


def run_download(args: argparse.Namespace) -> int:
    """`fedpgp data download`: fetch with torchvision, or say where to get the data."""
    name, root = args.name, Path(args.root).expanduser()
    if name not in dataset_names():
        raise ConfigError(f"NAME: unknown dataset '{name}'; known: {', '.join(dataset_names())}")
    if check_dataset(name, root).ok:
        print(f"'{name}' is already present and valid under {root}")
        return 0
    if name in MANUAL_INSTRUCTIONS:
        print(MANUAL_INSTRUCTIONS[name].replace("<root>", str(root)))
        return 2
    for line in torchvision_download(name, root):
        print(line)
    needed = still_needed(name, root)
    for line in needed:
        print(line)
    if not needed:
        print(f"run `fedpgp data check {name} --root {root}` to validate the folder")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(dataset_names())}")
    parser.add_argument(
        "--root", default="data", help="the data root holding every dataset (default: data)"
    )


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `data check` and `data download` to the CLI's subparsers (each sets `func`)."""
    data = subparsers.add_parser("data", help="check or download datasets")
    commands = data.add_subparsers(dest="data_command", metavar="{check,download}", required=True)
    check = commands.add_parser("check", help="validate a dataset folder and print its counts")
    _add_common(check)
    check.add_argument(
        "--verify-images", action="store_true", help="also decode every image file (slow)"
    )
    check.set_defaults(func=run_check)
    download = commands.add_parser(
        "download",
        help="download with torchvision where possible ("
        + ", ".join(sorted(TORCHVISION_SOURCES))
        + "), else say where to get the data",
    )
    _add_common(download)
    download.set_defaults(func=run_download)
