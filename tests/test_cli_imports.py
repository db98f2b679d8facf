"""The command line answers at once: its help and ``data check`` import none of the heavy
libraries (torch, open_clip, torchvision, Flower), each command in a fresh interpreter."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpgp.cli import build_parser

HEAVY = ("torch", "open_clip", "torchvision", "flwr")

# Runs the command line in-process, then prints which heavy modules it imported.
SCRIPT = f"""
import sys
from fedpgp.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
print("heavy:", ",".join(m for m in {HEAVY!r} if m in sys.modules), "status:", status)
"""


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    """Every command and subcommand of ``parser``, as the words that name it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


COMMANDS = [(), *_commands(build_parser())]


def _run(args: list[str]) -> tuple[str, str]:
    """(stdout, the last line: heavy modules and exit status) of ``fedpgp ARGS``."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, check=True
    )
    *output, last = result.stdout.splitlines()
    return "\n".join(output), last


def test_every_command_of_the_brief_is_checked() -> None:
    wanted = {"run", "compare", "table", "eval", "predict", "export", "data", "world"}
    assert wanted <= {command[0] for command in COMMANDS if command}
    assert ("data", "check") in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fedpgp")
def test_help_imports_no_heavy_library(command: tuple[str, ...]) -> None:
    output, last = _run([*command, "--help"])
    assert output.startswith("usage: fedpgp")
    assert last == "heavy:  status: 0"


def test_data_check_imports_no_heavy_library(tiny_data: Path) -> None:
    output, last = _run(["data", "check", "dtd", "--root", str(tiny_data)])
    assert output.endswith("OK")
    assert last == "heavy:  status: 0"
