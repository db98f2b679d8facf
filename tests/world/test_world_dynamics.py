"""The paper's claims on the world with the default config, on seed 0 (the benchmark
``benchmarks/world_dynamics.py`` measures seeds 0, 1 and 2)."""

from __future__ import annotations

import json
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from fedpgp.claims import CLAIM_METHODS, CLAIMS
from fedpgp.compare import compare
from fedpgp.config import load_config

# Points by which every claim must hold, so that it is a property of the method on the world
# and not a rounding accident of one machine's arithmetic.
MARGIN = 2.0


def final_of(method: str) -> dict[str, float]:
    """The final numbers of ``method`` on seed 0, run as ``fedpgp compare`` runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        compare(load_config(None), [method], [0], Path(tmp))
        return json.loads((Path(tmp) / method / "seed0" / "results.json").read_text())["final"]


@pytest.mark.slow
def test_claims_hold_on_seed_0_with_a_margin() -> None:
    # Every run is single-threaded and deterministic, so two worker processes (this machine's
    # two cores) give the numbers of one process in half the time. The pool joins its workers.
    # FedPGP, the longest, first: one worker runs it while the other runs the rest.
    order = sorted(CLAIM_METHODS, key=lambda method: method != "fedpgp")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        finals = dict(zip(order, pool.map(final_of, order), strict=True))
    gaps = {claim.text: round(claim.gap(finals), 2) for claim in CLAIMS}
    assert all(gap >= MARGIN for gap in gaps.values()), (gaps, finals)
