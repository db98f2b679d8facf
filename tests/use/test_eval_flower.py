"""`fedpgp eval` and `fedpgp export` of a run made by the Flower runtime: the clients' personal
prompts are read from the nodes' state files where flower-sim keeps them (``nodes/`` in the run
directory); where they stay on a deployment's nodes, only the global prompt is used."""

from __future__ import annotations

from pathlib import Path

import pytest
from flowerkit import (
    LoopbackGrid,
    reference_run,
    task_identity,  # noqa: F401 (an autouse fixture)
)

from fedpgp.cli import main
from fedpgp.errors import CheckpointError
from fedpgp.federation.flower.client_app import make_client_app
from fedpgp.federation.flower.server_app import run_server
from fedpgp.federation.flower.settings import ServerSettings
from fedpgp.trained import TrainedRun, eval_config, evaluate_run

NODES = {101: 0, 202: 1}


def test_a_flower_runs_prompts_are_read_from_its_nodes_state_files(
    tiny_data: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = reference_run(tiny_data, tmp_path_factory.getbasetemp() / "flower-reference")
    run_dir = tmp_path / "run"
    # State files where flower-sim's virtual nodes keep them.
    app = make_client_app(reference.cfg, all_clients=True, state_dir=run_dir / "nodes")
    run_server(LoopbackGrid(app, NODES), reference.cfg, ServerSettings(out_dir=run_dir))
    run = TrainedRun.open(run_dir)
    assert run.from_flower and run.personal is None
    document = evaluate_run(run, eval_config(run), tmp_path / "eval")
    assert document["personal"]["summary"] == reference.results["final"]
    assert document["personal"]["clients"] == reference.results["clients"]

    # A deployment's run directory holds no node state: the global prompt only.
    (run_dir / "nodes").rename(tmp_path / "elsewhere")
    run = TrainedRun.open(run_dir)
    document = evaluate_run(run, eval_config(run), tmp_path / "eval-global")
    assert "personal" not in document and document["global"]["predictor"] == "promptfl"
    with pytest.raises(CheckpointError, match="stay on its Flower nodes"):
        from fedpgp.classifier import load_classifier

        load_classifier(run_dir, client=0)
    assert main(["export", str(run_dir), "--global", "--out", str(tmp_path / "g.safetensors")]) == 0
