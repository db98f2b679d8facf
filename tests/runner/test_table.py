"""fedpgp table: every config x method x seed a run directory, the table's numbers from the
cells' results, a killed table finished by running it again, dry runs, refused configs."""

from __future__ import annotations

import csv
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from runkit import fail_client
from tiny import TINY_CLASSES, tiny_overrides, write_tiny_coop, write_tiny_dtd

from fedpgp.cli import main

METHODS = ("promptfl", "fedpgp")
SEEDS = (0, 1)
ROUNDS = 3
# Two datasets in two real layouts; the file stems name the rows and the cells' folders.
DATASETS = {"tiny_dtd": "dtd", "tiny_pets": "oxford_pets"}
COMMON = [o for o in tiny_overrides(Path("-"), rounds=ROUNDS) if not o.startswith("dataset.")]
RUN_FILES = ("config.yaml", "partition.json", "results.json", "results.csv", "run.log")


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("table-data")
    write_tiny_dtd(root)
    write_tiny_coop(root, "oxford_pets", classes=TINY_CLASSES[2:], seed=1)
    files = []
    for stem, name in DATASETS.items():
        file = root / f"{stem}.yaml"
        file.write_text(yaml.safe_dump({"dataset": {"name": name, "root": str(root)}}))
        files.append(file)
    return files


def table_args(configs: list[Path], out: Path, *extra: str) -> list[str]:
    args = ["table", "--configs", *map(str, configs), "--methods", ",".join(METHODS)]
    args += ["--seeds", ",".join(map(str, SEEDS)), "--out", str(out), *extra]
    for override in COMMON:
        args += ["--set", override]
    return args


def cells(out: Path) -> dict[tuple[str, str, int], Path]:
    return {
        (stem, method, seed): out / stem / method / f"seed{seed}"
        for stem in DATASETS
        for method in METHODS
        for seed in SEEDS
    }


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, mtime in ns)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(configs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A table run without interruption."""
    out = tmp_path_factory.mktemp("reference")
    assert main(table_args(configs, out)) == 0
    return out


def test_cells_are_run_directories_and_the_table_their_means(reference: Path) -> None:
    finals = {}
    for key, cell in cells(reference).items():
        assert all((cell / name).is_file() for name in RUN_FILES)
        assert any((cell / "checkpoint").glob("round-*.json"))
        saved = yaml.safe_load((cell / "config.yaml").read_text())
        assert (saved["method"], saved["seed"], saved["rounds"]) == (key[1], key[2], ROUNDS)
        finals[key] = json.loads((cell / "results.json").read_text())["final"]
    with open(reference / "table.csv") as handle:
        rows = {(r["config"], r["method"]): r for r in csv.DictReader(handle)}
    assert len(rows) == len(DATASETS) * len(METHODS) + len(METHODS)
    for method in METHODS:
        means = {}
        for stem, name in DATASETS.items():
            row = rows[(stem, method)]
            assert row["dataset"] == name
            for metric in ("local", "base", "novel", "hm"):
                values = [finals[(stem, method, s)][metric] for s in SEEDS]
                means[(stem, metric)] = round(statistics.fmean(values), 4)
                assert float(row[metric]) == means[(stem, metric)]
                assert float(row[f"{metric}_std"]) == round(statistics.pstdev(values), 4)
        average = rows[("average", method)]
        for metric in ("local", "base", "novel", "hm"):
            expected = round(statistics.fmean(means[(s, metric)] for s in DATASETS), 4)
            assert float(average[metric]) == expected and average[f"{metric}_std"] == ""
    markdown = (reference / "table.md").read_text()
    assert all(word in markdown for word in ("tiny_dtd (dtd)", "tiny_pets", "Average", " ± "))
    with Image.open(reference / "table.png") as image:
        assert image.size[0] > 800 and image.size[1] > 150


def _killable(out: Path) -> tuple[list[Path], list[Path]]:
    """(finished cells, cells with a checkpoint but no results) of the table in ``out``."""
    finished, interrupted = [], []
    for cell in cells(out).values():
        if (cell / "results.json").is_file():
            finished.append(cell)
        elif any((cell / "checkpoint").glob("round-*.json")):
            interrupted.append(cell)
    return finished, interrupted


def kill_mid_table(command: list[str], out: Path, log: Path) -> None:
    """Start ``command`` and SIGKILL it once a cell is finished and another has a checkpoint
    but no results (checked with the process stopped, so the files cannot move meanwhile)."""
    with open(log, "w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the table ended first:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no cell to kill in:\n{log.read_text()}"
            if all(_killable(out)):
                process.send_signal(signal.SIGSTOP)
                if all(_killable(out)):
                    break
                process.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_table_finishes_on_rerun_as_if_never_stopped(
    configs: list[Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "table"
    command = [sys.executable, "-m", "fedpgp.cli", *table_args(configs, out)]
    kill_mid_table(command, out, tmp_path / "killed.log")
    finished, interrupted = _killable(out)
    kept = {cell: {n: (cell / n).read_bytes() for n in RUN_FILES} for cell in finished}
    stamps = {cell: snapshot(cell) for cell in finished}

    before = snapshot(out)
    capsys.readouterr()
    assert main(table_args(configs, out, "--dry-run")) == 0
    listing = capsys.readouterr().out
    assert snapshot(out) == before
    for cell in cells(out).values():
        line = next(line for line in listing.splitlines() if line.endswith(str(cell)))
        if cell in finished:
            assert "finished" in line
        elif cell in interrupted:
            rounds = sorted((cell / "checkpoint").glob("round-*.json"))
            assert f"interrupted at round {int(rounds[-1].stem[6:])} of {ROUNDS}" in line
        else:
            assert " new " in line

    assert main(table_args(configs, out)) == 0
    for cell in finished:
        assert {n: (cell / n).read_bytes() for n in RUN_FILES} == kept[cell]
        assert snapshot(cell) == stamps[cell]
    for cell in interrupted:
        assert "resuming from" in (cell / "run.log").read_text()
    for key, cell in cells(out).items():
        expected = (cells(reference)[key] / "results.json").read_bytes()
        assert (cell / "results.json").read_bytes() == expected
    assert (out / "table.csv").read_bytes() == (reference / "table.csv").read_bytes()


def test_dry_run_lists_states_and_features_and_writes_nothing(
    configs: list[Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(reference)
    capsys.readouterr()
    assert main(table_args(configs, reference, "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert len(lines) == len(cells(reference)) and snapshot(reference) == before
    assert all(" finished " in line and " cached " in line for line in lines)

    fresh, cache = tmp_path / "fresh", tmp_path / "empty-cache"
    assert main(table_args(configs, fresh, "--dry-run", "--set", f"cache_dir={cache}")) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert len(lines) == len(cells(fresh))
    assert all(" new " in line and " to encode " in line for line in lines)
    assert not fresh.exists() and not cache.exists()


def test_bad_configs_are_refused_before_any_cell_runs(
    configs: list[Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "table"
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {name: dtd}\neval_every: 0\n")
    capsys.readouterr()
    assert main(table_args([*configs, bad], out)) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and "eval_every" in error
    assert not out.exists()
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"dataset: {{name: dtd, root: {tmp_path / 'nowhere'}}}\n")
    assert main(table_args([*configs, missing], out)) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not out.exists()

    twin = tmp_path / "other" / configs[0].name
    twin.parent.mkdir()
    twin.write_text(configs[0].read_text())
    assert main(table_args([*configs, twin], out)) == 2
    assert "same file stem" in capsys.readouterr().err
    refused = (
        ("fedpgp,nope", "0", "nope"),
        ("fedpgp,fedpgp", "0", "twice"),
        ("fedpgp", "0,0", "twice"),
    )
    for methods, seeds, problem in refused:
        args = ["table", "--configs", str(configs[0]), "--methods", methods, "--seeds", seeds]
        assert main([*args, "--out", str(out)]) == 2
        assert problem in capsys.readouterr().err
    assert not out.exists()

    # A finished cell of another config is never mixed into the table.
    before = snapshot(reference)
    assert main([*table_args(configs, reference), "--set", "rounds=2"]) == 2
    error = capsys.readouterr().err
    assert "another config" in error and "rounds: 3 -> 2" in error
    assert snapshot(reference) == before


def test_ctrl_c_leaves_the_cell_resumable(
    configs: list[Path],
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "table"
    args = ["table", "--configs", str(configs[0]), "--methods", "promptfl", "--seeds", "1"]
    args += ["--out", str(out), *(a for o in COMMON for a in ("--set", o))]
    fail_client(monkeypatch, None, 2, KeyboardInterrupt())
    assert main(args) == 130
    monkeypatch.undo()
    cell = out / "tiny_dtd" / "promptfl" / "seed1"
    assert f"interrupted in {cell}" in capsys.readouterr().err
    assert main([*args, "--dry-run"]) == 0
    assert f"interrupted at round 2 of {ROUNDS}" in capsys.readouterr().out
    assert main(args) == 0
    expected = reference / "tiny_dtd" / "promptfl" / "seed1" / "results.json"
    assert (cell / "results.json").read_bytes() == expected.read_bytes()
