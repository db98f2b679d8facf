"""Whole runs: every method, determinism, learning, results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runkit import clients_of, run_rows, start_global
from tiny import tiny_overrides

from fedpgp.config import load_config
from fedpgp.evaluation import evaluate_clients, summarize
from fedpgp.experiment import build_experiment
from fedpgp.runner import execute

METHOD_NAMES = ("zeroshot", "local", "promptfl", "fedprox", "fedpgp")


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_method_runs_three_rounds_and_writes_results(
    method: str, tiny_data: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method=method))
    execute(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == method
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    for key in ("local", "base", "novel", "hm"):
        assert 0.0 <= results["final"][key] <= 100.0
    assert [c["id"] for c in results["clients"]] == [0, 1]
    assert all(c["n_train"] > 0 for c in results["clients"])
    for name in (
        "config.yaml",
        "run.json",
        "results.csv",
        "partition.json",
        "curves.png",
        "run.log",
        "global.safetensors",
    ):
        assert (tmp_path / "run" / name).is_file()
    rows = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert rows[0] == "round,client,n_train,local,base,novel" and len(rows) == 1 + 3 * 2


def test_same_seed_gives_byte_identical_results(tiny_data: Path, tmp_path: Path) -> None:
    outputs = []
    for name in ("a", "b"):
        execute(load_config(None, tiny_overrides(tiny_data)), tmp_path / name)
        outputs.append((tmp_path / name / "results.json").read_bytes())
    assert outputs[0] == outputs[1]
    execute(load_config(None, tiny_overrides(tiny_data, seed=1, lr=0.05)), tmp_path / "c")
    assert (tmp_path / "c" / "results.json").read_bytes() != outputs[0]


def test_zeroshot_changes_no_tensor(tiny_data: Path) -> None:
    experiment = build_experiment(load_config(None, tiny_overrides(tiny_data, method="zeroshot")))
    weights = {k: v.clone() for k, v in experiment.backbone.state_dict().items()}
    clients = clients_of(experiment)
    update = clients[0].train({}, 0)
    assert update.tensors == {} and clients[0].personal == {}
    after = experiment.backbone.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)


@pytest.mark.parametrize("method", ("fedpgp", "promptfl", "local"))
def test_training_improves_local_accuracy(method: str, tiny_data: Path) -> None:
    overrides = tiny_overrides(
        tiny_data, method=method, rounds=12, lr=0.01, local_epochs=2, **{"fedpgp.mu": 0.1}
    )
    experiment = build_experiment(load_config(None, overrides))
    clients = clients_of(experiment)
    initial = start_global(experiment)
    params = {cid: client.params(initial) for cid, client in clients.items()}
    before = summarize(evaluate_clients(experiment, params))["local"]
    after = run_rows(experiment)[-1]["local"]
    assert after >= before + 25.0, (before, after)


def test_rerun_with_the_written_manifest_reproduces_data_and_results(
    tiny_data: Path, tmp_path: Path
) -> None:
    execute(load_config(None, tiny_overrides(tiny_data, seed=3)), tmp_path / "first")
    manifest = tmp_path / "first" / "partition.json"
    again = [*tiny_overrides(tiny_data, seed=3), f"partition.file={manifest}"]
    execute(load_config(None, again), tmp_path / "again")
    assert (tmp_path / "again" / "partition.json").read_bytes() == manifest.read_bytes()
    first = (tmp_path / "first" / "results.json").read_bytes()
    assert (tmp_path / "again" / "results.json").read_bytes() == first
