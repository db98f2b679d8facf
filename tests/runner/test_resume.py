"""Exact resume: a run stopped after any round and resumed gives the bytes of a run that never
stopped; in process (Ctrl-C between rounds) and as a real process killed with SIGKILL, in the
middle of a round and in the middle of a checkpoint write."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from runkit import checkpoint_files, interrupted_run, tiny_config
from safetensors.torch import load_file
from tiny import tiny_overrides, write_tiny_dtd

from fedpgp.cli import main
from fedpgp.errors import ConfigError, DatasetError
from fedpgp.runner import execute, resume

RESULT_FILES = ("results.json", "results.csv")


def read_results(run_dir: Path) -> dict[str, bytes]:
    """The result files, and every tensor of the final checkpoint: the GLOBAL and PERSONAL
    tensors and the optimizer's buffers. (The global RNG states are left out: they start from
    each process's own entropy.)"""
    results = {name: (run_dir / name).read_bytes() for name in RESULT_FILES}
    (final,) = (run_dir / "checkpoint").glob("*.safetensors")
    tensors = load_file(final)
    results.update({k: v.numpy().tobytes() for k, v in tensors.items() if k != "rng/torch"})
    return results


@pytest.mark.parametrize(
    ("extra", "stop_at"),
    [
        ({"rounds": 3}, 2),
        # Shared momentum must come back from the checkpoint; one client sampled per round; rows
        # every 2nd round (the faults of the others wait in the checkpoint); checkpoints every
        # 2nd round (so the run repeats round 3).
        (
            {
                "rounds": 5,
                "optimizer_state": "shared",
                "frac": 0.5,
                "eval_every": 2,
                "checkpoint_every": 2,
            },
            3,
        ),
        ({"rounds": 2, "method": "promptfl"}, 1),
        # Groups drawn, uploaded and written back; one client sampled per round, so the other
        # keeps the slots of its last draw.
        ({"rounds": 4, "method": "fedmgp", "frac": 0.5, "eval_every": 1}, 2),
        ({"rounds": 2, "method": "pfedmma"}, 1),
    ],
)
def test_stopped_and_resumed_run_is_byte_identical(
    extra: dict, stop_at: int, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lr 0.05: every round moves the numbers, so a state not restored would show
    cfg = tiny_config(tiny_data, lr=0.05, **extra)
    execute(cfg, tmp_path / "whole")
    interrupted_run(monkeypatch, cfg, tmp_path / "resumed", stop_at)
    assert not (tmp_path / "resumed" / "results.json").exists()
    every = cfg.checkpoint_every
    newest = stop_at // every * every
    assert checkpoint_files(tmp_path / "resumed") == [
        f"round-{newest:06d}.json",
        f"round-{newest:06d}.safetensors",
    ]
    resume(tmp_path / "resumed")
    assert read_results(tmp_path / "resumed") == read_results(tmp_path / "whole")


def test_resume_keeps_the_config_and_refuses_changes(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_data)
    run_dir = tmp_path / "run"
    interrupted_run(monkeypatch, cfg, run_dir, 1)
    with pytest.raises(ConfigError, match=r"rounds: 3 -> 5.*config\.yaml unchanged"):
        resume(run_dir, None, ["rounds=5"])
    with pytest.raises(ConfigError, match=r"lr: 0\.01 -> 0\.5"):
        resume(run_dir, None, ["rounds=3", "lr=0.5"])
    changed = tmp_path / "changed.yaml"
    changed.write_text("seed: 7\n")
    with pytest.raises(ConfigError, match=r"--config/--set would change.*seed: 0 -> 7"):
        resume(run_dir, changed, tiny_overrides(tiny_data))
    # repeating the original --set values is allowed
    results = resume(run_dir, None, tiny_overrides(tiny_data))
    assert [row["round"] for row in results["rounds"]] == [1, 2, 3]


def test_a_run_resumes_after_its_data_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dataset.root may change on resume (the partition digest still checks the data); the
    numbers are those of a run that never stopped, and config.yaml records the new place."""
    old_root = write_tiny_dtd(tmp_path / "old")
    interrupted_run(monkeypatch, tiny_config(old_root, lr=0.05), tmp_path / "run", 2)
    new_root = Path(shutil.move(old_root, tmp_path / "new"))
    execute(tiny_config(new_root, lr=0.05), tmp_path / "whole")
    with pytest.raises(DatasetError, match=rf"data root {old_root}: expected a folder"):
        resume(tmp_path / "run")
    resume(tmp_path / "run", None, [f"dataset.root={new_root}"])
    assert read_results(tmp_path / "run") == read_results(tmp_path / "whole")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["dataset"]["root"] == str(new_root)


def test_a_new_run_refuses_an_interrupted_run_directory(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config(tiny_data)
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 1)
    with pytest.raises(ConfigError, match=r"holds an interrupted run.*--resume"):
        execute(cfg, tmp_path / "run")
    args = ["run", "--resume", str(tmp_path / "run"), "--out", str(tmp_path / "other")]
    assert main(args) == 2
    assert "--out cannot be given too" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "run")]) == 0
    assert "results in" in capsys.readouterr().out
    assert main(["run", "--resume", str(tmp_path / "run")]) == 2
    assert "the run is finished" in capsys.readouterr().err


# ------------------------------------------------------------- real processes, SIGKILL

# Enough rounds that the run is still going when the kill comes, however fast the machine.
ROUNDS = 40


def cli_args(data_root: Path, run_dir: Path) -> list[str]:
    args = ["run", "--out", str(run_dir)]
    for item in tiny_overrides(data_root, rounds=ROUNDS, lr=0.05):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def whole_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The results of the SIGKILL tests' run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    assert main(cli_args(tiny_data, run_dir)) == 0
    return read_results(run_dir)


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_round_then_resume(
    whole_run: dict[str, bytes], tiny_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    process = start(
        "import sys; from fedpgp.cli import main; main(sys.argv[1:])", *cli_args(tiny_data, run_dir)
    )
    try:
        marker = run_dir / "checkpoint" / "round-000002.json"
        deadline = time.monotonic() + 60
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert marker.exists(), process.stderr.read() if process.poll() is not None else ""
        # Somewhere inside one of the next rounds: rounds take tens to hundreds of ms.
        time.sleep(random.Random(0).uniform(0.02, 0.15))
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    newest = checkpoint_files(run_dir)[-1]
    assert newest.startswith("round-") and newest < f"round-{ROUNDS:06d}"
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert read_results(run_dir) == whole_run


# Runs the CLI with the checkpoint writer of fedpgp.checkpoint wrapped: when it is about to
# commit file argv[1] (a name in the checkpoint folder), it writes half of it to the temp file
# the real writer would use, then the process SIGKILLs itself: a crash in the middle of the
# checkpoint write, at a chosen moment.
KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import fedpgp.checkpoint as checkpoint
    target = sys.argv[1]

    def wrap(write):
        def crashing(path, data):
            path = Path(path)
            if path.name == target:
                blob = data.encode() if isinstance(data, str) else data
                (path.parent / f".{path.name}.crash.tmp").write_bytes(blob[: len(blob) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, data)
        return crashing

    checkpoint.write_bytes_atomic = wrap(checkpoint.write_bytes_atomic)
    checkpoint.write_text_atomic = wrap(checkpoint.write_text_atomic)
    from fedpgp.cli import main
    main(sys.argv[2:])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "left_behind"),
    [
        # killed while writing the tensor file: only its temp file exists
        ("round-000002.safetensors", [".round-000002.safetensors.crash.tmp"]),
        # killed while committing the JSON: the new tensor file exists, its JSON does not
        ("round-000002.json", [".round-000002.json.crash.tmp", "round-000002.safetensors"]),
    ],
)
def test_sigkill_during_the_checkpoint_write_then_resume(
    target: str,
    left_behind: list[str],
    whole_run: dict[str, bytes],
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    process = start(KILL_DURING_WRITE, target, *cli_args(tiny_data, run_dir))
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, err
    # the previous checkpoint is still complete beside the debris of the interrupted write
    assert checkpoint_files(run_dir) == sorted(
        [*left_behind, "round-000001.json", "round-000001.safetensors"]
    )
    assert main(["run", "--resume", str(run_dir)]) == 0
    # equal files, and the debris is gone: only the final checkpoint is left
    assert read_results(run_dir) == whole_run
