"""Bad input: one FedPGPError subclass naming the key or file; the CLI exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_overrides

from fedpgp.cli import main
from fedpgp.config import load_config
from fedpgp.errors import BackboneError, ConfigError, DatasetError, FedPGPError
from fedpgp.runner import execute


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("no_such_key=1", "unknown config key 'no_such_key'"),
        ("backbone.nmae=x", "unknown config key 'backbone.nmae'"),
        ("rounds=two", "rounds: expected int"),
        ("rounds=2.5", "rounds: expected int"),
        ("lr=fast", "lr: expected float"),
        ("fedpgp.rank=0", "fedpgp.rank: expected a value >= 1"),
        ("frac=0", "frac: expected a value > 0"),
        ("frac=1.5", "frac: expected a value > 0 and <= 1"),
        ("shots=0", "shots: expected a value >= 1"),
        ("method=fedavg", "method: expected one of"),
        ("fedpgp.anchor=other", "fedpgp.anchor: expected one of"),
        ("backbone=3", "backbone: expected a mapping"),
        ("fedpgp.tau=0", "fedpgp.tau: expected a value > 0"),
        ("rounds", "expected key=value"),
    ],
)
def test_bad_config_values(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert needle in str(error.value)


def test_bad_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing)


def test_unknown_backbone_and_dataset_and_missing_weights(tiny_data: Path, tmp_path: Path) -> None:
    cases = [
        (["backbone.name=ViT-Q-99"], BackboneError, "ViT-Q-99"),
        (["dataset.name=imagenet-9000"], ConfigError, "imagenet-9000"),
        ([f"backbone.file={tmp_path / 'nope.pt'}"], BackboneError, "nope.pt"),
        (["dataset.root=" + str(tmp_path / "nowhere")], DatasetError, "nowhere"),
    ]
    for extra, error, needle in cases:
        overrides = tiny_overrides(tiny_data) + extra
        with pytest.raises(error, match=needle):
            execute(load_config(None, overrides), tmp_path / "run")
        assert not (tmp_path / "run").exists(), "nothing may be written before validation"


def test_cli_reports_one_line_and_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--set", "fedpgp.rank=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedpgp: error: fedpgp.rank: expected a value >= 1, got 0"]


def test_cli_subprocess_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedpgp.cli", "run", "--config", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fedpgp: error: config file")


def test_every_error_is_a_fedpgp_error() -> None:
    for cls in (ConfigError, DatasetError, BackboneError):
        assert issubclass(cls, FedPGPError)
