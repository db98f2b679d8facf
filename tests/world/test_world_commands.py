"""`fedpgp world show` and the argument wiring of `fedpgp world pretrain`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

from fedpgp.errors import ConfigError
from fedpgp.world.commands import add_world_commands


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedpgp")
    add_world_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_show_writes_a_grid(tmp_path: Path) -> None:
    out = tmp_path / "grid" / "world.png"
    args = _parse("world", "show", "--out", str(out), "--seed", "2")
    assert args.func(args) == 0
    with Image.open(out) as image:
        assert image.size[0] > 1000 and image.size[1] > 1000


def test_pretrain_arguments(tmp_path: Path) -> None:
    args = _parse("world", "pretrain", "--out", str(tmp_path / "w.safetensors"), "--steps", "0")
    assert (args.seed, args.threads, args.install) == (0, 2, False)
    with pytest.raises(ConfigError, match="--steps"):
        args.func(args)
