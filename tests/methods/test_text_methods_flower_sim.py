"""PromptFolio, FedTPG, FedCoCoOp and pFedMoAP under ``--runtime flower-sim`` (Flower's
simulation engine, one virtual SuperNode per client) give the in-process results, experts and
all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_overrides

from fedpgp.config import load_config
from fedpgp.runner import execute


@pytest.mark.slow
@pytest.mark.parametrize("method", ["promptfolio", "fedtpg", "fedcocoop", "pfedmoap"])
def test_flower_simulation_equals_the_inprocess_run(
    tiny_data: Path, tmp_path: Path, method: str
) -> None:
    from fedpgp.federation.flower.sim import run_flower_simulation

    overrides = tiny_overrides(tiny_data, method=method, rounds=2, device="cpu", lr=0.05)
    cfg = load_config(None, overrides)
    execute(cfg, tmp_path / "inprocess")
    expected = json.loads((tmp_path / "inprocess" / "results.json").read_text())
    assert run_flower_simulation(cfg, tmp_path / "flower") == expected
    # pFedMoAP's second round sends each client ctx and the other client's upload.
    if method == "pfedmoap":
        assert expected["rounds"][1]["bytes"]["down"] == 2 * expected["rounds"][1]["bytes"]["up"]
