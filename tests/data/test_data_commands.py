"""`fedpgp data check` and `fedpgp data download` (no network: only what needs none)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedpgp.data.commands import add_data_commands, check_dataset
from fedpgp.data.download import relocate, still_needed
from fedpgp.errors import ConfigError

Copy = Callable[[str], Path]


def run(argv: list[str]) -> int:
    """Parse `argv` the way the CLI does and call the chosen command."""
    parser = argparse.ArgumentParser(prog="fedpgp")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_check_prints_counts(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["data", "check", "caltech101", "--root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "dataset 'caltech101'" in out and "5 classes" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["class", "train", "val", "test"] in rows
    assert ["total", "20", "5", "10"] in rows
    assert ["2", "motor", "bike", "4", "1", "2"] in rows
    assert out.rstrip().endswith("OK")


def test_check_prints_domain_counts(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["data", "check", "office_caltech10", "--root", str(data_root)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["domain", "train", "test"] in rows
    assert ["webcam", "12", "3"] in rows


def test_check_reports_every_problem(
    copy_dataset: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_dataset("oxford_pets")
    split_file = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    data = json.loads(split_file.read_text())
    data["train"][0][1] = 4  # 'face' image labelled as class 4 ('air_plane')
    split_file.write_text(json.dumps(data))
    missing = [data["test"][1][0], data["val"][2][0]]
    for relpath in missing:
        (root / "oxford_pets" / "images" / relpath).unlink()
    assert run(["data", "check", "oxford_pets", "--root", str(root)]) == 2
    out = capsys.readouterr().out
    assert "problem(s) in 'oxford_pets'" in out
    assert "3 problem(s) in 'oxford_pets'" in out
    assert "train[0]: label 4 with class 'face', but elsewhere label 4 is 'air_plane'" in out
    for relpath in missing:
        assert f"{relpath}: listed in" in out


def test_check_verify_images_finds_truncated_files(
    copy_dataset: Copy, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_dataset("food-101")
    images = sorted((root / "food-101" / "images").rglob("*.jpg"))
    for path in images[:2]:
        path.write_bytes(path.read_bytes()[:30])
    assert run(["data", "check", "food101", "--root", str(root)]) == 0
    capsys.readouterr()
    assert run(["data", "check", "food101", "--root", str(root), "--verify-images"]) == 2
    out = capsys.readouterr().out
    assert all(f"image {path}: expected a readable image" in out for path in images[:2])


def test_check_of_a_missing_root(tmp_path: Path) -> None:
    report = check_dataset("cifar10", tmp_path / "absent")
    assert not report.ok and str(tmp_path / "absent") in report.problems[0]


def test_unknown_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        run(["data", "check", "mnist", "--root", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        run(["data", "download", "mnist", "--root", str(tmp_path)])


@pytest.mark.parametrize(("name", "where"), [("office_caltech10", "FedBN"), ("domainnet", "M3SDA")])
def test_download_explains_manual_datasets(
    tmp_path: Path, name: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["data", "download", name, "--root", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "cannot be downloaded automatically" in out and where in out
    assert str(tmp_path) in out


def test_download_skips_a_valid_dataset(
    data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["data", "download", "cifar10", "--root", str(data_root)]) == 0
    assert "already present and valid" in capsys.readouterr().out


def test_download_names_the_missing_coop_split_file(tmp_path: Path) -> None:
    (lines,) = still_needed("oxford_flowers", tmp_path)
    assert str(tmp_path / "oxford_flowers" / "split_zhou_OxfordFlowers.json") in lines
    assert "drive.google.com" in lines and "CoOp" in lines
    assert still_needed("cifar10", tmp_path) == []


def test_relocate_moves_torchvision_folders_into_coop_places(tmp_path: Path) -> None:
    (tmp_path / "dtd" / "dtd" / "images" / "banded").mkdir(parents=True)
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    (tmp_path / "oxford-iiit-pet" / "images").mkdir(parents=True)
    done = relocate(
        tmp_path,
        (("dtd/dtd/images", "dtd/images"), ("oxford-iiit-pet/images", "oxford_pets/images")),
    )
    assert (tmp_path / "dtd" / "images" / "banded").is_dir()
    assert len(done) == 1  # the existing oxford_pets/images is never replaced
    assert (tmp_path / "oxford-iiit-pet" / "images").is_dir()


def test_cli_turns_errors_into_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpgp.cli import main

    assert main(["data", "download", "mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedpgp: error: NAME: unknown dataset 'mnist'")
    assert main(["data", "check", "dtd", "--root", str(tmp_path / "absent")]) == 2
    assert f"data root {tmp_path / 'absent'}" in capsys.readouterr().out
