"""fedpgp.rank above n_ctx is allowed but cannot raise the rank of U V (n_ctx x D): one warning
says so, once per process, and only when the method is fedpgp."""

from __future__ import annotations

import logging

import pytest

from fedpgp import config
from fedpgp.config import load_config

NOTICE = (
    "fedpgp.rank 12 > n_ctx 4: U V (4 x D) has rank at most 4, so the extra rank only adds "
    "parameters"
)


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_rank_noticed", set())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_rank_above_n_ctx_loads_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedpgp"):
        cfg = load_config(None, ["n_ctx=4", "fedpgp.rank=12"])
        load_config(None, ["n_ctx=4", "fedpgp.rank=12", "seed=3"])
    assert (cfg.n_ctx, cfg.fedpgp.rank) == (4, 12)
    assert _warnings(caplog) == [NOTICE]


@pytest.mark.parametrize(
    "overrides",
    [
        ["n_ctx=4", "fedpgp.rank=4"],
        ["n_ctx=16", "fedpgp.rank=8"],
        ["n_ctx=4", "fedpgp.rank=12", "method=promptfl"],
    ],
)
def test_no_warning_when_the_rank_fits_or_the_method_is_another(
    caplog: pytest.LogCaptureFixture, overrides: list[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedpgp"):
        load_config(None, overrides)
    assert _warnings(caplog) == []
