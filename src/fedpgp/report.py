"""results.json, results.csv, curves.png and the terminal tables of a run."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_text_atomic

SUMMARY_KEYS = ("local", "base", "novel", "hm")


def _round4(value: Any) -> Any:
    return None if value is None else round(float(value), 4)


def build_results(
    cfg: Mapping[str, Any], rounds: Sequence[dict], zeroshot: Mapping[str, Any]
) -> dict[str, Any]:
    """The results document: no wall-clock times and no paths, so equal runs give equal files."""
    summary_rows = []
    for row in rounds:
        entry = {"round": row["round"], **{k: _round4(row[k]) for k in SUMMARY_KEYS}}
        entry["sampled"] = row["sampled"]
        if "bytes" in row:
            # Tensor bytes of that round: {"down": server to clients, "up": clients to server}.
            entry["bytes"] = row["bytes"]
        if "faults" in row:
            # Sampled clients left out of aggregation: [{"client", "round", "reason"}].
            entry["faults"] = row["faults"]
        summary_rows.append(entry)
    last = rounds[-1]
    return {
        "method": cfg["method"],
        "seed": cfg["seed"],
        "dataset": cfg["dataset"]["name"],
        "augment": cfg["augment"],
        "rounds": summary_rows,
        "final": {k: _round4(last[k]) for k in SUMMARY_KEYS},
        "zeroshot": {k: _round4(zeroshot[k]) for k in SUMMARY_KEYS},
        "clients": [
            {
                "id": c["id"],
                "n_train": c["n_train"],
                **{k: _round4(c[k]) for k in ("local", "base", "novel")},
            }
            for c in last["clients"]
        ],
    }


def results_json(results: Mapping[str, Any]) -> str:
    return json.dumps(results, indent=2, sort_keys=False) + "\n"


def results_csv(rounds: Sequence[dict]) -> str:
    """One row per evaluated round and client."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["round", "client", "n_train", "local", "base", "novel"])
    for row in rounds:
        for c in row["clients"]:
            writer.writerow(
                [
                    row["round"],
                    c["id"],
                    c["n_train"],
                    *(_round4(c[k]) for k in ("local", "base", "novel")),
                ]
            )
    return buffer.getvalue()


def dict_rows_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as CSV text with a header of ``columns`` (keys of each row, in that order)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


RESULTS = "results.json"


def write_results(out_dir: Path, results: Mapping[str, Any], rounds: Sequence[dict]) -> None:
    """results.csv, curves.png and results.json, each written atomically; results.json last,
    since it marks the run finished."""
    write_text_atomic(out_dir / "results.csv", results_csv(rounds))
    write_bytes_atomic(out_dir / "curves.png", curves_png(results["rounds"]))
    write_text_atomic(out_dir / RESULTS, results_json(results))


def curves_png(rounds: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """A plot of Local / Base / Novel / HM per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [row["round"] for row in rounds]
    for key in SUMMARY_KEYS:
        ys = [row[key] for row in rounds]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, marker="o", label=key.capitalize() if key != "hm" else "HM")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in header]] + [
        [_cell(v) if isinstance(v, float) or v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_run(results: Mapping[str, Any]) -> str:
    """Per-round table, then the final numbers next to CLIP zero-shot's."""
    per_round = format_table(
        ["round", "Local", "Base", "Novel", "HM"],
        [[r["round"], *(r[k] for k in SUMMARY_KEYS)] for r in results["rounds"]],
    )
    final = format_table(
        ["", "Local", "Base", "Novel", "HM"],
        [
            ["CLIP zero-shot", *(results["zeroshot"][k] for k in SUMMARY_KEYS)],
            [results["method"], *(results["final"][k] for k in SUMMARY_KEYS)],
        ],
    )
    faults = [
        f"  round {f['round']}: client {f['client']} {f['reason']}"
        for row in results["rounds"]
        for f in row.get("faults", ())
    ]
    left_out = "\n\nclients left out of aggregation:\n" + "\n".join(faults) if faults else ""
    return (
        f"{per_round}{left_out}\n\nfinal ({results['dataset']}, seed {results['seed']}):\n{final}"
    )
