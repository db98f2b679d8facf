"""A run tells the terminal what it is doing as it goes: progress lines on stderr (loading,
encoding with counts, every evaluated round when it is evaluated), the tables on stdout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny import tiny_overrides

from fedpgp.cli import main
from fedpgp.rundir import RunDir


def _run_args(out: Path, data: Path) -> list[str]:
    args = ["run", "--out", str(out)]
    for item in tiny_overrides(data, rounds=3, eval_every=1):
        args += ["--set", item]
    return args


def test_a_run_prints_its_progress_on_stderr_while_it_runs(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FEDPGP_CACHE", str(tmp_path / "cache"))  # nothing cached yet
    # What the terminal had got when each checkpoint (rounds 0 to 3) was written.
    at_checkpoint: list[tuple[int, str, str]] = []
    save = RunDir.save_checkpoint

    def saving(self: RunDir, state, *args: object) -> None:
        captured = capsys.readouterr()
        at_checkpoint.append((state.round, captured.out, captured.err))
        save(self, state, *args)

    monkeypatch.setattr(RunDir, "save_checkpoint", saving)
    assert main(_run_args(tmp_path / "run", tiny_data)) == 0
    end = capsys.readouterr()

    assert all(out == "" for _, out, _ in at_checkpoint), "the tables come at the end"
    assert "final (dtd, seed 0):" in end.out and end.err == ""
    setup = at_checkpoint[0][2].splitlines()
    assert setup[0] == "run: fedpgp on dtd, 2 clients, 3 rounds"
    assert setup[1].startswith("dataset dtd: 60 train / 40 test images, 10 classes;")
    assert setup[2] == "loading backbone fedpgp-tiny (random weights, seed 0) on cpu"
    assert re.fullmatch(r"image features: encoding \d+ test images \(none cached\)", setup[3])
    assert re.fullmatch(r"image features: encoding \d+ train images \(none cached\)", setup[4])
    assert len(setup) == 5
    number = re.compile(r"\d+\.\d")
    for round, _, err in at_checkpoint[1:]:
        # Each round's line was printed when it was evaluated, before its checkpoint.
        (line,) = err.splitlines()
        assert line.startswith(f"round {round}/3: local ")
        assert len(number.findall(line)) == 4, line
    assert [r for r, _, _ in at_checkpoint] == [0, 1, 2, 3]

    # Run again: the features now come from the cache, and the progress lines say so.
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    assert main(_run_args(tmp_path / "again", tiny_data)) == 0
    again = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"image features: all \d+ test images cached", again[3])
    assert re.fullmatch(r"image features: all \d+ train images cached", again[4])


def test_run_log_keeps_every_line_the_terminal_got(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(_run_args(tmp_path / "run", tiny_data)) == 0
    rounds = [line for line in capsys.readouterr().err.splitlines() if line.startswith("round ")]
    log = (tmp_path / "run" / "run.log").read_text()
    assert len(rounds) == 3 and all(line in log for line in rounds)
    assert "run directory" in log  # the details that the terminal does not get
