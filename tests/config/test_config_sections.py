"""Method sections: FedPGP's and FedProx's keys live in ``fedpgp:`` and ``fedprox:``; the old
flat keys still load, once with a deprecation line, and config validation reads the registry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedpgp.config import MOVED_KEYS, load_config
from fedpgp.errors import ConfigError
from fedpgp.methods.registry import METHOD_NAMES


def test_flat_keys_load_into_their_sections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(
        "method: fedprox\nrank: 3\nmu: 0.25\ntau: 0.7\nanchor: official\nprox_mu: 0.2\n"
    )
    with caplog.at_level(logging.WARNING, logger="fedpgp"):
        cfg = load_config(path)
    assert (cfg.fedpgp.rank, cfg.fedpgp.mu, cfg.fedpgp.tau) == (3, 0.25, 0.7)
    assert cfg.fedpgp.anchor == "official" and cfg.fedprox.mu == 0.2
    assert "rank" not in cfg.to_dict() and cfg.to_dict()["fedpgp"]["rank"] == 3
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert all(len(line.splitlines()) == 1 for line in warned)
    assert set(MOVED_KEYS) == {"rank", "mu", "tau", "anchor", "prox_mu"}


def test_a_key_given_both_ways_is_refused() -> None:
    with pytest.raises(ConfigError, match="given both as 'rank' and as 'fedpgp.rank'"):
        load_config(None, ["rank=2", "fedpgp.rank=4"])


def test_method_names_come_from_the_registry() -> None:
    for name in METHOD_NAMES:
        assert load_config(None, [f"method={name}"]).method == name
    with pytest.raises(ConfigError, match=", ".join(METHOD_NAMES)):
        load_config(None, ["method=nosuch"])
