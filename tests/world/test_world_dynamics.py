"""The paper's claims on the world with the default config, on seed 0 (the benchmark
``benchmarks/world_dynamics.py`` measures seeds 0, 1 and 2)."""

from __future__ import annotations

import pytest

from fedpgp.config import load_config
from fedpgp.world.claims import CLAIMS, measure

# Points by which every claim must hold, so that it is a property of the method on the world
# and not a rounding accident of one machine's arithmetic.
MARGIN = 2.0


@pytest.mark.slow
def test_claims_hold_on_seed_0_with_a_margin() -> None:
    finals = measure(load_config(None), [0])[0]
    gaps = {claim.text: round(claim.gap(finals), 2) for claim in CLAIMS}
    assert all(gap >= MARGIN for gap in gaps.values()), (gaps, finals)
