"""``fedpgp run --runtime flower-sim``: Flower's simulation engine (Ray actors), started by the
real command line, gives the in-process runtime's results."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flowerkit import Processes, Reference, flower_env, reference_run
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference_run(tiny_data, tmp_path_factory.getbasetemp() / "flower-reference")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The command and whatever it starts (Ray's processes included) are killed afterwards."""
    started = Processes(tmp_path / "logs", flower_env(tmp_path / "flwr-home"))
    yield started
    started.close()


def test_flower_sim_runtime_equals_inprocess(
    reference: Reference, tmp_path: Path, processes: Processes
) -> None:
    out_dir = tmp_path / "run"
    argv = [
        sys.executable, "-m", "fedpgp.cli", "run", "--runtime", "flower-sim",
        "--config", str(reference.config_file), "--out", str(out_dir),
    ]  # fmt: skip
    command = processes.start("fedpgp-run", argv)
    assert command.wait(timeout=300) == 0, processes.log_text("fedpgp-run")[-4000:]

    assert json.loads((out_dir / "results.json").read_text()) == reference.results
    final = load_file(out_dir / "global.safetensors")
    torch.testing.assert_close(final["sigma"], reference.global_tensors["sigma"], atol=1e-6, rtol=0)
