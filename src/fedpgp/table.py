"""``fedpgp table``: the paper's main table, every dataset config x method x seed.

Each cell is a normal run directory, ``DIR/<config stem>/<method>/seed<s>`` (what ``fedpgp run
--out`` writes, so ``fedpgp run --resume CELL`` works on it too). The same command run again
keeps the finished cells as they are and resumes an interrupted one from its last checkpoint,
so a table of hours survives Ctrl-C, a kill or a preemption. The frozen work of a (config,
seed) (backbone, dataset, features) is built once and shared by its methods, and not at all
when all of them are finished. Every config, and every cell already on disk, is checked before
any cell runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_text_atomic
from .backbone import FrozenCLIP
from .checkpoint import FOLDER, checkpointed_round
from .compare import mean_std, parse_methods, parse_seeds, plus_minus, summarize_finals
from .config import (
    RunConfig,
    describe_changes,
    load_config,
    read_yaml,
    run_changes,
    saved_config,
    validate,
)
from .errors import CheckpointError, ConfigError
from .experiment import (
    backbone_spec,
    build_experiment,
    features_cached,
    load_backbone,
    load_data,
    resolve_device,
)
from .methods.base import method_for
from .report import RESULTS, SUMMARY_KEYS, dict_rows_csv, format_table
from .rundir import CONFIG, RunDir
from .runner import execute_experiment, resume_experiment

AVERAGE = "average"
HEADER = ["dataset", "method", "Local", "Base", "Novel", "HM"]


@dataclass(frozen=True)
class Dataset:
    """One config file of the table: the rows of one dataset."""

    file: Path
    cfg: RunConfig
    seeds: tuple[int, ...]

    @property
    def label(self) -> str:
        """The config file's stem: the name of its folder and of its rows."""
        return self.file.stem

    @property
    def title(self) -> str:
        """The rows' name: the stem, with the dataset where the stem does not say it."""
        name = self.cfg.dataset.name
        return self.label if self.label == name else f"{self.label} ({name})"


@dataclass(frozen=True)
class Cell:
    """One run of the table: a dataset's config with the cell's method and seed, and the run
    directory that holds it."""

    dataset: Dataset
    cfg: RunConfig
    path: Path

    @property
    def finished(self) -> bool:
        return (self.path / RESULTS).is_file()

    @property
    def started(self) -> bool:
        """Whether the directory holds an unfinished run to resume (as RunDir.check_new sees
        it)."""
        return not self.finished and (
            (self.path / CONFIG).exists() or (self.path / FOLDER).exists()
        )

    def state(self) -> str:
        """finished, interrupted at round r of R, or new."""
        if self.finished:
            return "finished"
        if self.started:
            return f"interrupted at round {checkpointed_round(self.path)} of {self.cfg.rounds}"
        return "new"

    def describe(self) -> str:
        return f"{self.dataset.label} {self.cfg.method} seed {self.cfg.seed}"


def _load(file: Path, overrides: Sequence[str], methods: Sequence[str]) -> RunConfig:
    """The config of ``file`` with ``overrides``, validated with each of ``methods``; any
    problem is a ConfigError naming the file."""
    try:
        cfg = load_config(file, list(overrides))
        for method in methods:
            validate(dataclasses.replace(cfg, method=method))
    except ConfigError as exc:
        if str(file) in str(exc):
            raise
        raise ConfigError(f"config file {file}: {exc}") from None
    return cfg


def _check_on_disk(cell: Cell) -> None:
    """A cell already on disk must hold a run of the cell's config (but for where files lie):
    the table never mixes in numbers of another config."""
    if not (cell.path / CONFIG).is_file():
        if cell.finished or cell.started:
            raise CheckpointError(
                f"table cell {cell.path}: holds a run but no {CONFIG}; not a fedpgp run "
                f"directory, move it away"
            )
        return
    refused = run_changes(saved_config(read_yaml(cell.path / CONFIG)), cell.cfg)
    if refused:
        raise ConfigError(
            f"table cell {cell.path}: holds a run of another config than {cell.dataset.file} "
            f"gives now ({describe_changes(refused)}); move it away, or give the config it "
            f"was run with"
        )


def plan_table(
    files: Sequence[str | Path],
    overrides: Sequence[str],
    methods: Sequence[str],
    seeds: str | None,
    out_dir: Path,
) -> tuple[list[Dataset], list[Cell]]:
    """Every config loaded and checked, and its cells (by config, seed, then method), each
    cell on disk checked against its config: all before any work."""
    if len(set(methods)) < len(methods):
        raise ConfigError(f"--methods: a method is listed twice in {','.join(methods)}")
    datasets: list[Dataset] = []
    stems: dict[str, Path] = {}
    for file in map(Path, files):
        if file.stem in stems:
            raise ConfigError(
                f"--configs: {stems[file.stem]} and {file} have the same file stem "
                f"'{file.stem}', which names the folder of their cells; rename one"
            )
        stems[file.stem] = file
        cfg = _load(file, overrides, methods)
        cell_seeds = tuple(parse_seeds(seeds, cfg.seed))
        if len(set(cell_seeds)) < len(cell_seeds):
            raise ConfigError(f"--seeds: a seed is listed twice in {seeds}")
        datasets.append(Dataset(file, cfg, cell_seeds))
    cells = [
        Cell(
            dataset,
            validate(dataclasses.replace(dataset.cfg, method=method, seed=seed)),
            out_dir / dataset.label / method / f"seed{seed}",
        )
        for dataset in datasets
        for seed in dataset.seeds
        for method in methods
    ]
    for cell in cells:
        _check_on_disk(cell)
    return datasets, cells


def _groups(cells: Sequence[Cell]) -> list[list[Cell]]:
    """The cells of each (config, seed): the runs that share one experiment."""
    groups = groupby(cells, key=lambda cell: (cell.dataset.label, cell.cfg.seed))
    return [list(group) for _, group in groups]


def dry_run(cells: Sequence[Cell]) -> str:
    """Every cell with its state and whether the feature cache holds its image features (each
    backbone loaded once, each partition drawn, nothing encoded, nothing written)."""
    backbones: dict[tuple, FrozenCLIP] = {}
    rows = []
    for group in _groups(cells):
        cfg = group[0].cfg
        splits, manifest = load_data(cfg)
        key = (backbone_spec(cfg), cfg.device, cfg.precision)
        if key not in backbones:
            backbones[key] = load_backbone(cfg, resolve_device(cfg.device))
        cached: dict[str, bool] = {}
        for cell in group:
            backbone = backbones[key]
            kind = method_for(cell.cfg, backbone).image_kind
            if kind not in cached:
                cached[kind] = features_cached(cell.cfg, backbone, splits, manifest, [kind])
            rows.append(
                [
                    cell.dataset.label,
                    cfg.dataset.name,
                    cell.cfg.method,
                    cell.cfg.seed,
                    cell.state(),
                    "cached" if cached[kind] else "to encode",
                    cell.path,
                ]
            )
    header = ["config", "dataset", "method", "seed", "state", "features", "directory"]
    return format_table(header, rows)


def run_cells(cells: Sequence[Cell], overrides: Sequence[str]) -> None:
    """Run every cell that is not finished: a new one from round 0, an interrupted one from
    its last checkpoint; the experiment of each (config, seed) built once for its methods.
    Every dataset and partition they need is read (no image, no model), and every new cell's
    folder checked, before the first one runs."""
    for group in _groups(cells):
        if not all(cell.finished for cell in group):
            load_data(group[0].cfg)
        for cell in group:
            if not cell.finished and not cell.started:
                RunDir.check_new(cell.path)
    done = 0
    for group in _groups(cells):
        pending = [cell for cell in group if not cell.finished]
        done += len(group) - len(pending)
        if not pending:
            continue
        started = time.perf_counter()
        base = build_experiment(
            pending[0].cfg,
            methods=[c.cfg.method for c in pending],
        )
        setup_s = time.perf_counter() - started
        for cell in pending:
            done += 1
            print(f"[{done}/{len(cells)}] {cell.describe()}: {cell.state()}", flush=True)
            experiment = base.with_method(cell.cfg.method)
            try:
                if cell.started:
                    given = f" with --set {' '.join(overrides)}" if overrides else ""
                    source = f"table cell {cell.path}: {cell.dataset.file}{given}"
                    resume_experiment(experiment, cell.path, source)
                else:
                    execute_experiment(experiment, cell.path, setup_s)
            except KeyboardInterrupt:
                print(
                    f"interrupted in {cell.path}; the same command continues it from its last "
                    f"checkpoint",
                    file=sys.stderr,
                )
                raise


def _final_results(cell: Cell) -> dict[str, Any]:
    path = cell.path / RESULTS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"results file {path}: unreadable ({exc})") from exc


def summarize_table(
    datasets: Sequence[Dataset], methods: Sequence[str], cells: Sequence[Cell]
) -> list[dict[str, Any]]:
    """One row per dataset and method (mean and std over seeds of each final metric, from the
    cells' results.json), then one per method averaging the datasets' means."""
    rows = []
    for dataset in datasets:
        for method in methods:
            results = [
                _final_results(c) for c in cells if c.dataset is dataset and c.cfg.method == method
            ]
            rows.append(
                {
                    "config": dataset.label,
                    "dataset": dataset.cfg.dataset.name,
                    "method": method,
                    "seeds": " ".join(map(str, dataset.seeds)),
                    **summarize_finals(results),
                }
            )
    for method in methods:
        means = [row for row in rows if row["method"] == method]
        average: dict[str, Any] = {"config": AVERAGE, "dataset": "", "method": method, "seeds": ""}
        for key in SUMMARY_KEYS:
            average[key] = mean_std([row[key] for row in means])[0]
            average[f"{key}_std"] = None
        rows.append(average)
    return rows


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    columns = [
        "config",
        "dataset",
        "method",
        "seeds",
        *(name for key in SUMMARY_KEYS for name in (key, f"{key}_std")),
    ]
    return dict_rows_csv(columns, rows)


def _value(row: dict[str, Any], key: str) -> str:
    """``mean ± std``, or the mean alone in an average row."""
    mean, std = row[key], row[f"{key}_std"]
    return f"{mean:.2f}" if std is None and mean is not None else plus_minus(mean, std)


def _cells(rows: Sequence[dict[str, Any]], datasets: Sequence[Dataset]) -> list[list[str]]:
    """The table's text rows: the dataset named on its first row only, as the paper prints
    it; the averages without a std."""
    titles = {d.label: d.title for d in datasets} | {AVERAGE: "Average"}
    lines, previous = [], None
    for row in rows:
        title = titles[row["config"]]
        lines.append(
            [
                "" if title == previous else title,
                row["method"],
                *(_value(row, key) for key in SUMMARY_KEYS),
            ]
        )
        previous = title
    return lines


def table_markdown(rows: Sequence[dict[str, Any]], datasets: Sequence[Dataset]) -> str:
    seeds = {d.seeds for d in datasets}
    over = (
        f"seeds {', '.join(map(str, next(iter(seeds))))}"
        if len(seeds) == 1
        else "each config's seeds (table.csv, column seeds)"
    )
    lines = [
        "# Main table",
        "",
        f"Final-round accuracy (%), mean ± std over {over}. Average: per method, the mean over "
        "the datasets of their means.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(rows, datasets)]
    return "\n".join(lines) + "\n"


def format_main_table(rows: Sequence[dict[str, Any]], datasets: Sequence[Dataset]) -> str:
    """The table as an aligned terminal table."""
    return format_table(HEADER, _cells(rows, datasets))


def table_png(
    rows: Sequence[dict[str, Any]], datasets: Sequence[Dataset], methods: Sequence[str]
) -> bytes:
    """One heatmap per metric, methods x datasets and their average, each cell's mean (and std
    over seeds) printed in it: which method leads where, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = [d.label for d in datasets] + [AVERAGE]
    by_cell = {(row["config"], row["method"]): row for row in rows}
    width, height = max(4.0, 1.2 * len(columns) + 2.5), 0.55 * len(methods) + 2.4
    fig, axes = plt.subplots(2, 2, figsize=(2 * width, 2 * height))
    for axis, key in zip(axes.flat, SUMMARY_KEYS, strict=True):
        values = np.array([[by_cell[(c, m)][key] for c in columns] for m in methods], dtype=float)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
        if high - low < 1e-6:
            low, high = low - 1.0, high + 1.0
        image = axis.imshow(values, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        fig.colorbar(image, ax=axis, fraction=0.05, pad=0.02)
        for i, method in enumerate(methods):
            for j, column in enumerate(columns):
                row = by_cell[(column, method)]
                text = "-" if row[key] is None else f"{row[key]:.1f}"
                if row[f"{key}_std"] is not None:
                    text += f"\n± {row[f'{key}_std']:.1f}"
                shade = 0.0 if np.isnan(values[i, j]) else (values[i, j] - low) / (high - low)
                colour = "black" if shade > 0.6 else "white"
                axis.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
        axis.axvline(len(datasets) - 0.5, color="white", linewidth=4)
        axis.set_xticks(range(len(columns)))
        axis.set_xticklabels(
            [d.title for d in datasets] + ["Average"], rotation=30, ha="right", fontsize=8
        )
        axis.set_yticks(range(len(methods)))
        axis.set_yticklabels(methods, fontsize=8)
        axis.set_title({"hm": "HM"}.get(key, key.capitalize()))
    fig.suptitle("Final-round accuracy (%), mean ± std over seeds")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def write_table(
    out_dir: Path,
    rows: Sequence[dict[str, Any]],
    datasets: Sequence[Dataset],
    methods: Sequence[str],
) -> None:
    """table.csv, table.md and table.png in ``out_dir``, each written atomically."""
    write_text_atomic(out_dir / "table.csv", table_csv(rows))
    write_text_atomic(out_dir / "table.md", table_markdown(rows, datasets))
    write_bytes_atomic(out_dir / "table.png", table_png(rows, datasets, methods))


def cmd_table(args: argparse.Namespace) -> int:
    """``fedpgp table``: plan and check every cell, then list them (--dry-run) or run the
    unfinished ones and write the table."""
    methods = parse_methods(args.methods)
    out_dir = Path(args.out)
    datasets, cells = plan_table(args.configs, args.overrides, methods, args.seeds, out_dir)
    if args.dry_run:
        print(dry_run(cells))
        return 0
    run_cells(cells, args.overrides)
    rows = summarize_table(datasets, methods, cells)
    write_table(out_dir, rows, datasets, methods)
    print(format_main_table(rows, datasets))
    print(f"\ntable.md, table.csv and table.png in {out_dir}")
    return 0
