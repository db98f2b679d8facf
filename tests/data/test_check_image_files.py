"""The cheap existence check of `fedpgp data check` (no --verify-images) wants a regular file
where a split or list file names an image: a folder of that name is reported, not accepted."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny import write_tiny_dtd

from fedpgp.data.commands import add_data_commands, check_dataset


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedpgp")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _replace_by_folder(path: Path) -> None:
    """The image becomes a folder of the same name, holding the image (as an unzip gone wrong
    leaves it)."""
    data = path.read_bytes()
    path.unlink()
    path.mkdir()
    (path / path.name).write_bytes(data)


def test_a_folder_named_like_an_image_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_tiny_dtd(tmp_path, classes=["red", "green"], train=2, test=1)
    assert _run(["data", "check", "dtd", "--root", str(root)]) == 0
    capsys.readouterr()
    image = root / "dtd" / "images" / "green" / "green_001.jpg"
    _replace_by_folder(image)
    assert _run(["data", "check", "dtd", "--root", str(root)]) == 2
    out = capsys.readouterr().out
    assert "1 problem(s) in 'dtd'" in out
    assert (
        f"image {image}: listed in train of split_zhou_DescribableTextures.json; "
        "expected an image file, found a folder"
    ) in out


def test_a_broken_link_is_reported_and_a_link_to_a_file_accepted(tmp_path: Path) -> None:
    root = write_tiny_dtd(tmp_path, classes=["red", "green"], train=2, test=1)
    images = root / "dtd" / "images" / "red"
    (tmp_path / "elsewhere.jpg").write_bytes((images / "red_000.jpg").read_bytes())
    (images / "red_000.jpg").unlink()
    (images / "red_000.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    assert check_dataset("dtd", root).ok
    (tmp_path / "elsewhere.jpg").unlink()
    report = check_dataset("dtd", root)
    assert report.problems == [
        f"image {images / 'red_000.jpg'}: listed in train of "
        "split_zhou_DescribableTextures.json; expected an image file, found a broken link or "
        "a special file"
    ]


def test_a_folder_named_like_a_listed_domain_image_is_reported(
    copy_dataset: Callable[[str], Path],
) -> None:
    root = copy_dataset("domainnet")
    folder = root / "domainnet"
    relpath = (folder / "sketch_test.txt").read_text().splitlines()[0].split()[0]
    _replace_by_folder(folder / relpath)
    report = check_dataset("domainnet", root)
    assert report.problems == [
        f"image {folder / relpath}: listed in sketch_test.txt; expected an image file, "
        "found a folder"
    ]
