"""``fedpgp compare``: several methods on one partition, over one seed or several, sharing the
frozen work (backbone, dataset, features) of each seed between the methods."""

from __future__ import annotations

import dataclasses
import io
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_text_atomic
from .config import RunConfig, validate
from .console import PROGRESS
from .errors import ConfigError
from .experiment import build_experiment
from .federation.inprocess import run_inprocess
from .methods.registry import COMPARED, METHOD_NAMES
from .report import (
    SUMMARY_KEYS,
    build_results,
    dict_rows_csv,
    format_table,
    results_csv,
    results_json,
)

log = logging.getLogger(__name__)

DEFAULT_METHODS = COMPARED


def parse_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--{what}: expected a comma-separated list, got {text!r}")
    return items


def parse_methods(text: str | None) -> list[str]:
    """Method names from ``a,b,c`` (``all``: every method); unknown names are a ConfigError."""
    if text is not None and text.strip() == "all":
        return list(METHOD_NAMES)
    methods = list(DEFAULT_METHODS) if text is None else parse_list(text, "methods")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; known: {', '.join(METHOD_NAMES)}")
    return methods


def parse_seeds(text: str | None, default: int) -> list[int]:
    """Seeds from ``0,1,2``; non-integers or negatives are a ConfigError."""
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in parse_list(text, "seeds")]
    except ValueError:
        raise ConfigError(f"--seeds: expected integers like 0,1,2, got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: expected non-negative integers, got {text!r}")
    return seeds


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and population standard deviation (4 decimals) of the values that are not None;
    (None, None) when none is."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    std = statistics.pstdev(present) if len(present) > 1 else 0.0
    return round(statistics.fmean(present), 4), round(std, 4)


def summarize_runs(
    runs: dict[str, list[dict[str, Any]]], seconds: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """One row per method: mean and standard deviation over seeds of each final metric and of
    the wall seconds per round (``seconds``: per method, one value per seed)."""
    rows = []
    for method, results in runs.items():
        row: dict[str, Any] = {"method": method, **summarize_finals(results)}
        row["s_per_round"], row["s_per_round_std"] = mean_std(seconds[method])
        rows.append(row)
    return rows


def summarize_finals(results: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """``{local, local_std, base, ...}``: mean and standard deviation over runs (seeds) of each
    final metric of their results.json documents."""
    summary: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        summary[key], summary[f"{key}_std"] = mean_std([r["final"][key] for r in results])
    return summary


def comparison_csv(rows: list[dict[str, Any]]) -> str:
    columns = [
        "method",
        *SUMMARY_KEYS,
        *(f"{k}_std" for k in SUMMARY_KEYS),
        "s_per_round",
        "s_per_round_std",
    ]
    return dict_rows_csv(columns, rows)


def plus_minus(mean: float | None, std: float | None) -> str:
    """``mean ± std`` with 2 decimals, ``-`` for a metric that has no value."""
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def comparison_markdown(rows: list[dict[str, Any]], seeds: list[int], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Final-round accuracy (%), mean ± std over seeds {', '.join(map(str, seeds))}; wall "
        "seconds per round (training and evaluation, this machine).",
        "",
        "| method | Local | Base | Novel | HM | s / round |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        keys = (*SUMMARY_KEYS, "s_per_round")
        cells = [plus_minus(row[k], row[f"{k}_std"]) for k in keys]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_png(rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> bytes:
    """Bars per method and metric, and each metric per round (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig = plt.figure(figsize=(14, 7))
    grid = fig.add_gridspec(2, 4)
    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [k + i * width for k in range(len(SUMMARY_KEYS))]
        heights = [row[k] or 0.0 for k in SUMMARY_KEYS]
        errors = [row[f"{k}_std"] or 0.0 for k in SUMMARY_KEYS]
        bars.bar(xs, heights, width, yerr=errors, label=row["method"], capsize=2)
    bars.set_xticks([k + 0.4 - width / 2 for k in range(len(SUMMARY_KEYS))])
    bars.set_xticklabels(["Local", "Base", "Novel", "HM"])
    bars.set_ylabel("accuracy (%)")
    bars.legend(ncol=len(rows), fontsize=8)
    for k, key in enumerate(SUMMARY_KEYS):
        axis = fig.add_subplot(grid[1, k])
        for method, results in runs.items():
            rounds = [r["round"] for r in results[0]["rounds"]]
            means = [
                statistics.fmean(res["rounds"][j][key] or 0.0 for res in results)
                for j in range(len(rounds))
            ]
            axis.plot(rounds, means, marker=".", label=method)
        axis.set_title({"hm": "HM"}.get(key, key.capitalize()))
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def compare(
    cfg: RunConfig, methods: list[str], seeds: list[int], out_dir: Path
) -> list[dict[str, Any]]:
    """Run every method for every seed; write each run's results and the comparison files."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    started_runs = 0
    for seed in seeds:
        base = build_experiment(
            validate(dataclasses.replace(cfg, seed=seed)),
            methods=methods,
        )
        for method in methods:
            started_runs += 1
            log.info(
                "compare: %s, seed %d (run %d of %d)",
                method,
                seed,
                started_runs,
                len(methods) * len(seeds),
                extra=PROGRESS,
            )
            experiment = base.with_method(method)
            started = time.perf_counter()
            rounds, zeroshot, _ = run_inprocess(experiment)
            seconds[method].append((time.perf_counter() - started) / cfg.rounds)
            results = build_results(experiment.cfg.to_dict(), rounds, zeroshot)
            run_dir = out_dir / method / f"seed{seed}"
            write_text_atomic(run_dir / "results.json", results_json(results))
            write_text_atomic(run_dir / "results.csv", results_csv(rounds))
            runs[method].append(results)
    rows = summarize_runs(runs, seconds)
    title = f"{cfg.dataset.name}: {', '.join(methods)}"
    write_text_atomic(out_dir / "comparison.csv", comparison_csv(rows))
    write_text_atomic(out_dir / "comparison.md", comparison_markdown(rows, seeds, title))
    write_bytes_atomic(out_dir / "comparison.png", comparison_png(rows, runs))
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """The comparison as an aligned terminal table (means over seeds)."""
    return format_table(
        ["method", "Local", "Base", "Novel", "HM", "s / round"],
        [[r["method"], *(r[k] for k in SUMMARY_KEYS), r["s_per_round"]] for r in rows],
    )
