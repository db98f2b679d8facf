"""Checkpoint files: what they hold, and a CheckpointError naming the file and the mismatch for
every kind of bad checkpoint; --resume never starts over and never mixes states."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from runkit import checkpoint_files, interrupted_run, start_personal, tiny_config
from tiny import write_tiny_dtd

from fedpgp.checkpoint import RunState, load_checkpoint, save_checkpoint
from fedpgp.config import RELOCATABLE, RunConfig, run_digest
from fedpgp.errors import CheckpointError
from fedpgp.experiment import build_experiment
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.runner import execute, resume

JSON = "round-000002.json"
TENSORS = "round-000002.safetensors"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    """A run (on its own copy of the tiny dataset) stopped after its 2nd of 3 rounds."""
    root = tmp_path_factory.mktemp("stopped")
    data = write_tiny_dtd(root / "data")
    cfg = tiny_config(data, optimizer_state="shared")
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupted_run(monkeypatch, cfg, root / "run", 2)
    return root / "run", cfg


@pytest.fixture(scope="module")
def uninterrupted(
    stopped: tuple[Path, RunConfig], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The stopped run's config run without a stop, on the same data."""
    out = tmp_path_factory.mktemp("whole") / "run"
    execute(stopped[1], out)
    return out


@pytest.fixture
def run_dir(stopped: tuple[Path, RunConfig], tmp_path: Path) -> Path:
    """A fresh copy of the stopped run, for one test to damage."""
    return Path(shutil.copytree(stopped[0], tmp_path / "run"))


def test_round_trip_keeps_every_tensor_row_and_rng_state(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, optimizer_state="shared", rounds=2)
    experiment = build_experiment(cfg)
    states: list[RunState] = []

    def save(state: RunState) -> None:
        save_checkpoint(tmp_path, state, cfg, experiment.manifest.digest())
        states.append(state)

    rows, _, server = run_inprocess(experiment, save=save)
    assert [s.round for s in states] == [0, 1, 2]
    written = states[-1]
    trained = experiment.method.trained_keys()
    loaded = load_checkpoint(tmp_path, cfg, trained)
    assert loaded.path.name == "round-000002.json" and checkpoint_files(tmp_path) == [
        "round-000002.json",
        "round-000002.safetensors",
    ]
    width = experiment.backbone.text_width
    personal = {cid: experiment.method.initial_personal(width, cid) for cid in (0, 1)}
    loaded.check_fits(
        experiment.method.initial_global(width), personal, experiment.manifest.digest()
    )
    state = loaded.state
    assert state.round == 2
    assert torch.equal(state.global_tensors["sigma"], server.global_tensors["sigma"])
    assert state.personal.keys() == {0, 1}
    for cid in (0, 1):
        assert state.personal[cid].keys() == {"U", "V"}
        for key in ("U", "V"):
            assert torch.equal(state.personal[cid][key], written.personal[cid][key])
    # U and V of client 0 trained away from their initial values
    assert not torch.equal(state.personal[0]["U"], start_personal(experiment, 0)["U"])
    # The shared optimizer's momentum, by the name of the tensor it belongs to.
    assert set(state.optimizer) == {
        "sigma/momentum_buffer",
        "U/momentum_buffer",
        "V/momentum_buffer",
    }
    assert all(torch.equal(state.optimizer[k], written.optimizer[k]) for k in state.optimizer)
    assert state.rows == rows
    assert state.zeroshot == written.zeroshot and state.zeroshot is not None
    assert torch.equal(state.rng["torch"], written.rng["torch"])
    assert state.rng["numpy"] == written.rng["numpy"]
    assert state.rng["python"] == written.rng["python"]


def test_stopped_run_holds_only_its_newest_checkpoint(stopped: tuple[Path, RunConfig]) -> None:
    run_dir, cfg = stopped
    assert checkpoint_files(run_dir) == [JSON, TENSORS]
    document = json.loads((run_dir / "checkpoint" / JSON).read_text())
    assert document["format"] == "fedpgp-checkpoint" and document["version"] == 2
    body = document["body"]
    assert body["round"] == 2 and body["config_digest"] == run_digest(cfg)
    assert [row["round"] for row in body["rows"]] == [1, 2]
    assert body["tensor_bytes"] == (run_dir / "checkpoint" / TENSORS).stat().st_size


def _rewrite_json(run_dir: Path, change: Callable[[dict], None], rehash: bool = True) -> None:
    """Edit the checkpoint JSON; with ``rehash`` its own sha256 is recomputed, so only the
    edited value can be what is caught."""
    from fedpgp.checkpoint import _canonical

    path = run_dir / "checkpoint" / JSON
    document = json.loads(path.read_text())
    change(document)
    if rehash:
        import hashlib

        document["sha256"] = hashlib.sha256(_canonical(document["body"])).hexdigest()
    path.write_text(json.dumps(document))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(data))


def _set_row_value(document: dict) -> None:
    document["body"]["rows"][0]["local"] = 99.0


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated json": (
        lambda d: _truncate(d / "checkpoint" / JSON),
        rf"{JSON}: truncated or not JSON",
    ),
    "truncated tensors": (
        lambda d: _truncate(d / "checkpoint" / TENSORS),
        rf"{TENSORS}: \d+ bytes, expected \d+ \(truncated",
    ),
    "corrupted tensors": (
        lambda d: _flip_byte(d / "checkpoint" / TENSORS),
        rf"{TENSORS}: sha256 [0-9a-f]+\.\.\., expected [0-9a-f]+\.\.\. \(corrupted\)",
    ),
    "missing tensors": (
        lambda d: (d / "checkpoint" / TENSORS).unlink(),
        rf"{TENSORS}: cannot be read",
    ),
    "corrupted json": (
        lambda d: _rewrite_json(d, _set_row_value, rehash=False),
        rf"{JSON}: content does not match its recorded sha256",
    ),
    "incompatible version": (
        lambda d: _rewrite_json(d, lambda doc: doc.update(version=3)),
        rf"{JSON}: format version 3, but this fedpgp reads versions 1, 2",
    ),
    "not a checkpoint": (
        lambda d: (d / "checkpoint" / JSON).write_text("[1, 2]"),
        rf"{JSON}: not a fedpgp checkpoint",
    ),
    "another config": (
        lambda d: (d / "config.yaml").write_text(
            (d / "config.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
        ),
        rf"{JSON}: written for another config \(lr: 0\.01 -> 0\.02\)",
    ),
    "malformed body": (
        lambda d: _rewrite_json(d, lambda doc: doc["body"].pop("rows")),
        rf"{JSON}: malformed \(KeyError\('rows'\)\)",
    ),
    "bad rng state": (
        lambda d: _rewrite_json(d, lambda doc: doc["body"]["rng"]["numpy"].__setitem__(1, [1])),
        rf"{JSON}: malformed",
    ),
    "not a run directory": (
        lambda d: (d / "config.yaml").unlink(),
        r"config\.yaml; not a fedpgp run directory",
    ),
    "finished run": (
        lambda d: [(d / name).write_text("{}") for name in ("results.json", "results.csv")],
        r"the run is finished \(results\.json exists\)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_a_checkpoint_error_naming_file_and_mismatch(
    case: str, run_dir: Path
) -> None:
    damage, message = CASES[case]
    damage(run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(CheckpointError, match=message):
        resume(run_dir)
    # never started over: nothing was written or removed (run.log says why it stopped)
    after = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert after == before
    assert not (run_dir / "results.json").exists() or case == "finished run"


def test_checkpoint_of_another_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same config, but the dataset changed under it: the partition drawn again differs from
    the checkpoint's; nothing is written."""
    data = write_tiny_dtd(tmp_path / "data")
    interrupted_run(monkeypatch, tiny_config(data), tmp_path / "run", 1)
    write_tiny_dtd(data, test=3)
    (tmp_path / "run" / "partition.json").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"round-000001\.json: written for partition [0-9a-f]+\.\.\., but this run's "
        r"partition is [0-9a-f]+\.\.\. \(the dataset or partition\.file changed\)",
    ):
        resume(tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "partition.json").exists()


def test_a_partition_json_of_another_run_is_refused(run_dir: Path) -> None:
    path = run_dir / "partition.json"
    manifest = json.loads(path.read_text())
    manifest["seed"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError,
        match=r"partition\.json: holds partition [0-9a-f]+\.\.\., but this run's is "
        r"[0-9a-f]+\.\.\. \(a partition\.json of another run\?\); refusing to mix them",
    ):
        resume(run_dir)
    assert json.loads(path.read_text()) == manifest


def test_a_resume_writes_a_deleted_partition_json_again(run_dir: Path, uninterrupted: Path) -> None:
    (run_dir / "partition.json").unlink()
    resume(run_dir)
    for name in ("partition.json", "results.json"):
        assert (run_dir / name).read_bytes() == (uninterrupted / name).read_bytes()


def test_checkpoint_with_tensors_the_method_does_not_have(run_dir: Path) -> None:
    """A checkpoint whose tensors do not fit the method (e.g. written by other code) is refused
    before anything runs."""
    from safetensors.torch import load_file, save

    path = run_dir / "checkpoint" / TENSORS
    tensors = load_file(path)
    tensors["client/1/personal/U"] = torch.zeros(3, 3)
    blob = save(tensors)
    path.write_bytes(blob)

    def point_at_new_file(document: dict) -> None:
        import hashlib

        document["body"]["tensor_bytes"] = len(blob)
        document["body"]["tensor_sha256"] = hashlib.sha256(blob).hexdigest()

    _rewrite_json(run_dir, point_at_new_file)
    with pytest.raises(CheckpointError, match=rf"{JSON}: personal/1/U is torch.float32 \(3, 3\)"):
        resume(run_dir)


def test_debris_of_an_interrupted_write_is_ignored_then_removed(run_dir: Path) -> None:
    folder = run_dir / "checkpoint"
    # a crash while writing round 3: a half temp JSON, and a tensor file without its JSON
    (folder / ".round-000003.json.x1.tmp").write_text('{"format": "fedpgp-chec')
    (folder / "round-000003.safetensors").write_bytes(b"half a tensor file")
    results = resume(run_dir)
    assert [row["round"] for row in results["rounds"]] == [1, 2, 3]
    assert checkpoint_files(run_dir) == ["round-000003.json", "round-000003.safetensors"]


def test_relocatable_keys_are_config_keys() -> None:
    """Only where files lie may change on resume; each such key must exist in the config."""
    data = RunConfig().to_dict()
    for key in RELOCATABLE:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        assert name in node, key


@pytest.mark.parametrize(
    "kill",
    [
        # killed while the round-0 checkpoint was written: config and partition, a temp file
        lambda d: [
            shutil.rmtree(d / "checkpoint"),
            (d / ".round-000000.json.x.tmp").write_text("{"),
        ],
        # killed between a checkpoint's tensor file and its JSON (the commit mark)
        lambda d: (d / "checkpoint" / JSON).unlink(),
    ],
    ids=["before the first checkpoint", "no complete checkpoint"],
)
def test_a_run_without_a_complete_checkpoint_resumes_from_round_0(
    kill: Callable[[Path], None], run_dir: Path, uninterrupted: Path
) -> None:
    kill(run_dir)
    resume(run_dir)
    for name in ("results.json", "results.csv", "partition.json"):
        assert (run_dir / name).read_bytes() == (uninterrupted / name).read_bytes()
    assert not list(run_dir.glob(".*.tmp"))


def test_a_run_killed_while_writing_its_results_writes_them_on_resume(
    stopped: tuple[Path, RunConfig], uninterrupted: Path, tmp_path: Path
) -> None:
    run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    # results.json is written last: a kill before it leaves the final checkpoint and no mark.
    for name in ("results.json", "results.csv", "curves.png"):
        (run_dir / name).unlink()
    resume(run_dir)
    for name in ("results.json", "results.csv", "curves.png", "global.safetensors"):
        assert (run_dir / name).read_bytes() == (uninterrupted / name).read_bytes()
