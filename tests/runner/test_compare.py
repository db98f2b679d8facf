"""fedpgp compare: three files, means and standard deviations over seeds."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image
from tiny import tiny_overrides

from fedpgp.cli import main


def test_compare_writes_table_csv_and_png(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "compare",
        "--methods",
        "zeroshot,promptfl,fedpgp",
        "--seeds",
        "0,1",
        "--out",
        str(tmp_path),
    ]
    for override in tiny_overrides(tiny_data, rounds=2):
        args += ["--set", override]
    assert main(args) == 0
    # Progress on stderr as in `fedpgp run`, each run named; the table on stdout.
    printed = capsys.readouterr()
    progress = printed.err.splitlines()
    assert progress[0] == "compare on dtd: 2 clients, 2 rounds"
    assert "compare: fedpgp, seed 1 (run 6 of 6)" in progress
    assert sum(line.startswith("round 2/2: local ") for line in progress) == 6
    assert "fedpgp" in printed.out and "round 2/2" not in printed.out
    with open(tmp_path / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["zeroshot", "promptfl", "fedpgp"]
    finals = [
        json.loads((tmp_path / "fedpgp" / f"seed{s}" / "results.json").read_text())["final"]
        for s in (0, 1)
    ]
    fedpgp = rows[2]
    assert float(fedpgp["local"]) == round(statistics.fmean(f["local"] for f in finals), 4)
    assert float(fedpgp["local_std"]) == round(statistics.pstdev(f["local"] for f in finals), 4)
    assert all(float(r["s_per_round"]) > 0 for r in rows)
    markdown = (tmp_path / "comparison.md").read_text()
    assert all(m in markdown for m in ("zeroshot", "promptfl", "fedpgp"))
    with Image.open(tmp_path / "comparison.png") as image:
        assert image.size[0] > 600 and image.size[1] > 300


def test_compare_rejects_unknown_method(capsys) -> None:
    assert main(["compare", "--methods", "fedpgp,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_all_runs_every_method_and_the_default_leaves_out_the_costly_ones() -> None:
    from fedpgp.compare import parse_methods
    from fedpgp.methods.registry import METHOD_NAMES, REGISTRY

    assert parse_methods("all") == list(METHOD_NAMES)
    costly = {info.name for info in REGISTRY if info.costly}
    assert costly and set(parse_methods(None)) == set(METHOD_NAMES) - costly


def test_one_experiment_serves_methods_of_other_templates_and_features(tiny_data: Path) -> None:
    """compare builds one experiment for all its methods: a method with another prompt
    template gets banks of its own (the same classes; Local and Base still share one), another
    feature kind its own features, and each runs as it would alone."""
    from fedpgp.config import load_config
    from fedpgp.experiment import build_experiment
    from fedpgp.federation.inprocess import run_inprocess

    cfg = load_config(None, tiny_overrides(tiny_data, rounds=1))
    shared = build_experiment(cfg, methods=["ivlp", "pfedmma"])
    for name, template, kind in (
        ("ivlp", (2, "of a {}."), "stem"),
        ("pfedmma", (4, "{}."), "stem@1"),
        ("fedpgp", (4, "{}."), "pooled"),
    ):
        experiment = shared.with_method(name)
        assert experiment.method.image_kind == kind
        assert tuple(experiment.base.bank.template[:2]) == template
        assert experiment.client_data[0].local.bank is experiment.base.bank
        assert experiment.base.bank.classnames == shared.base.bank.classnames
        alone = build_experiment(
            load_config(None, tiny_overrides(tiny_data, rounds=1, method=name))
        )
        assert run_inprocess(experiment)[0] == run_inprocess(alone)[0]
