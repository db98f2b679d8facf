"""FedMGP (groups drawn on the nodes, uploaded by rank) and IVLP under ``--runtime flower-sim``
(Flower's simulation engine, one virtual SuperNode per client) give the in-process results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_overrides

from fedpgp.config import load_config
from fedpgp.runner import execute


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedmgp", "ivlp"])
def test_flower_simulation_equals_the_inprocess_run(
    tiny_data: Path, tmp_path: Path, method: str
) -> None:
    from fedpgp.federation.flower.sim import run_flower_simulation

    overrides = tiny_overrides(
        tiny_data, method=method, rounds=3, eval_every=1, frac=0.5, device="cpu", lr=0.05
    )
    cfg = load_config(None, overrides)
    execute(cfg, tmp_path / "inprocess")
    expected = json.loads((tmp_path / "inprocess" / "results.json").read_text())
    assert run_flower_simulation(cfg, tmp_path / "flower") == expected
    if method == "fedmgp":
        # Each round the sampled client sends s = 2 of its 5 groups of each modality, as large
        # as the global groups it receives.
        assert all(row["bytes"]["up"] == row["bytes"]["down"] for row in expected["rounds"])
