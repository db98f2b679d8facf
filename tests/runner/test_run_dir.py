"""Run directories: refused before any work when they cannot hold a run, one process at a time,
and resumable when written by an earlier fedpgp (and refused by name when by a newer one)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from runkit import error_line, interrupted_run, tiny_config
from tiny import tiny_overrides, write_tiny_dtd

from fedpgp import experiment as experiment_module
from fedpgp.checkpoint import _canonical
from fedpgp.cli import main
from fedpgp.config import RunConfig
from fedpgp.errors import CheckpointError, ConfigError
from fedpgp.rundir import RunDir
from fedpgp.runner import execute, resume


def _never_built(*args: object, **kwargs: object) -> None:
    raise AssertionError("the experiment was built before the run directory was checked")


def below_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "run"


def unwritable(tmp_path: Path) -> Path:
    # /proc takes no new files: what a read-only mount or a missing permission looks like.
    return Path("/proc/fedpgp-test/run")


@pytest.mark.parametrize(
    ("make_out", "needle"),
    [(below_a_file, "is a file"), (unwritable, "cannot write in /proc")],
    ids=["below a file", "unwritable"],
)
def test_an_out_that_cannot_hold_a_run_is_refused_before_any_work(
    make_out, needle: str, tiny_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = make_out(tmp_path)
    monkeypatch.setattr(experiment_module, "build_experiment", _never_built)
    monkeypatch.setattr("fedpgp.runner.build_experiment", _never_built)
    args = ["run", "--out", str(out)]
    for item in tiny_overrides(tiny_data):
        args += ["--set", item]
    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert needle in err and str(out) in err


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    """A run stopped after its first of 3 rounds, with grad_clip off (the behaviour of runs
    written before grad_clip existed)."""
    root = tmp_path_factory.mktemp("stopped")
    data = write_tiny_dtd(root / "data")
    cfg = tiny_config(data, grad_clip="null", lr=0.05)
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupted_run(monkeypatch, cfg, root / "run", 1)
    execute(cfg, root / "whole")
    return root, cfg


@pytest.fixture
def run_dir(stopped: tuple[Path, RunConfig], tmp_path: Path) -> Path:
    return Path(shutil.copytree(stopped[0] / "run", tmp_path / "run"))


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(run_dir: Path) -> None:
    holder = RunDir.open(run_dir)
    try:
        with pytest.raises(
            ConfigError, match=rf"in use by another fedpgp process \(PID {os.getpid()}\)"
        ):
            resume(run_dir)
    finally:
        holder.close()
    # Released: the run can continue now.
    assert [r["round"] for r in resume(run_dir)["rounds"]] == [1, 2, 3]


def test_a_run_of_a_newer_fedpgp_is_refused_by_name(run_dir: Path) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "fedpgp_version": "9.0.0"}))
    with pytest.raises(CheckpointError, match=r"written by fedpgp 9\.0\.0, newer than this fedpgp"):
        resume(run_dir)


def _as_written_by_0_1(run_dir: Path) -> None:
    """What fedpgp 0.1 left: no run.json, flat method keys, no grad_clip key (in config.yaml
    and in the checkpoint's copy of the config)."""

    def old(config: dict) -> dict:
        config = dict(config)
        config.pop("grad_clip")
        fedpgp, fedprox = config.pop("fedpgp"), config.pop("fedprox")
        return {**config, **fedpgp, "prox_mu": fedprox["mu"]}

    (run_dir / "run.json").unlink()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old(saved), sort_keys=False))
    (path,) = (run_dir / "checkpoint").glob("*.json")
    document = json.loads(path.read_text())
    document["body"]["config"] = old(document["body"]["config"])
    document["sha256"] = hashlib.sha256(_canonical(document["body"])).hexdigest()
    path.write_text(json.dumps(document))


def test_a_run_of_an_earlier_version_resumes_as_that_version_would_have(
    run_dir: Path, stopped: tuple[Path, RunConfig]
) -> None:
    _as_written_by_0_1(run_dir)
    resume(run_dir)
    whole = stopped[0] / "whole"
    for name in ("results.json", "results.csv"):
        assert (run_dir / name).read_bytes() == (whole / name).read_bytes()
    assert json.loads((run_dir / "run.json").read_text())["fedpgp_version"] == "0.1.0"


def test_cheap_checks_come_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A missing dataset root is reported before weights that would have to be downloaded."""
    args = ["run", "--out", str(tmp_path / "run"), "--set", "dataset.name=dtd"]
    args += ["--set", f"dataset.root={tmp_path / 'nowhere'}"]
    args += ["--set", "backbone.name=ViT-B-16-quickgelu", "--set", "backbone.pretrained=openai"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "openai" not in err and "download" not in err
    assert not (tmp_path / "run").exists()


def test_a_disk_full_mid_run_stops_with_one_line_and_the_run_resumes_once_freed(
    stopped: tuple[Path, RunConfig], tmp_path: Path, monkeypatch, capsys
) -> None:
    root = stopped[0]
    out = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(handle: int) -> None:
        # The disk fills up while round 2's checkpoint is written.
        if any("round-000002" in p.name for p in (out / "checkpoint").glob(".*.tmp")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    args = ["run", "--out", str(out), "--config", str(root / "whole" / "config.yaml")]
    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert "round-000002" in err and "No space left on device" in err
    assert not (out / "results.json").exists()
    monkeypatch.undo()
    assert main(["run", "--resume", str(out)]) == 0
    for name in ("results.json", "results.csv"):
        assert (out / name).read_bytes() == (root / "whole" / name).read_bytes()
