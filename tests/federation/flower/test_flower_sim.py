"""``fedpgp run --runtime flower-sim``: Flower's simulation engine (Ray actors), started by the
real command line, killed with SIGKILL mid-run and resumed, gives the in-process runtime's
results."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flowerkit import Processes, flower_config, flower_env
from safetensors.torch import load_file

from fedpgp.experiment import build_experiment
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.report import build_results
from fedpgp.trained import TrainedRun, eval_config, evaluate_run

pytestmark = pytest.mark.slow


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The command and whatever it starts (Ray's processes included) are killed afterwards."""
    started = Processes(tmp_path / "logs", flower_env(tmp_path / "flwr-home"))
    yield started
    started.close()


def test_a_killed_flower_sim_run_resumes_to_the_inprocess_results(
    tiny_data: Path, tmp_path: Path, processes: Processes
) -> None:
    cfg = flower_config(tiny_data, rounds=4, eval_every=2, lr=0.05)
    rows, zeroshot, server = run_inprocess(build_experiment(cfg))
    expected = build_results(cfg.to_dict(), rows, zeroshot)
    config_file = tmp_path / "four-rounds.yaml"
    config_file.write_text(cfg.to_yaml())
    out_dir = tmp_path / "run"
    command = processes.start(
        "fedpgp-run",
        [sys.executable, "-m", "fedpgp.cli", "run", "--runtime", "flower-sim",
         "--config", str(config_file), "--out", str(out_dir)],
    )  # fmt: skip
    checkpoint = out_dir / "checkpoint" / "round-000002.json"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():
        assert time.monotonic() < deadline and command.poll() is None, processes.log_text(
            "fedpgp-run"
        )[-4000:]
        time.sleep(0.1)
    processes.kill(command)
    # Ray's own processes outlive the killed command; a restart starts a fresh Ray.
    processes.kill_tagged(lambda argv: True)
    assert not (out_dir / "results.json").exists()
    resumed = processes.start(
        "fedpgp-resume",
        [sys.executable, "-m", "fedpgp.cli", "run", "--runtime", "flower-sim",
         "--resume", str(out_dir)],
    )  # fmt: skip
    assert resumed.wait(timeout=300) == 0, processes.log_text("fedpgp-resume")[-4000:]
    assert json.loads((out_dir / "results.json").read_text()) == expected
    final = load_file(out_dir / "global.safetensors")
    torch.testing.assert_close(final["sigma"], server.global_tensors["sigma"], atol=1e-6, rtol=0)
    assert "resuming from" in (out_dir / "run.log").read_text()
    # The virtual nodes kept their personal state inside the run directory, where `fedpgp
    # eval` reads every client's prompt back.
    assert sorted((out_dir / "nodes").glob("*/partition-*/round-*.safetensors"))
    run = TrainedRun.open(out_dir)
    document = evaluate_run(run, eval_config(run), tmp_path / "eval")
    assert document["personal"]["summary"] == expected["final"]
