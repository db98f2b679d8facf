"""`fedpgp eval`: a trained run's prompts read back and evaluated, on the run's own data (the
run's final numbers exactly) and on another dataset; and every refusal of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_overrides, write_tiny_dtd

from fedpgp.cli import main
from fedpgp.config import load_config
from fedpgp.errors import CheckpointError, ConfigError
from fedpgp.experiment import build_experiment
from fedpgp.methods.registry import METHOD_NAMES, method_class
from fedpgp.runner import execute
from fedpgp.trained import TrainedRun, eval_config, evaluate_run

OTHER_CLASSES = ["cyan", "magenta", "grey", "navy", "olive", "teal", "maroon", "lime", "gold"]


def _trained(tiny_data: Path, out: Path, method: str, **extra: object) -> Path:
    execute(load_config(None, tiny_overrides(tiny_data, method=method, **extra)), out)
    return out


@pytest.fixture(scope="module")
def fedpgp_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trained(tiny_data, tmp_path_factory.mktemp("fedpgp") / "run", "fedpgp", lr=0.05)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_eval_on_the_runs_own_config_gives_its_final_numbers(
    method: str, tiny_data: Path, tmp_path: Path
) -> None:
    run_dir = _trained(tiny_data, tmp_path / "run", method, lr=0.05)
    results = json.loads((run_dir / "results.json").read_text())
    run = TrainedRun.open(run_dir)
    document = evaluate_run(run, eval_config(run), tmp_path / "eval")
    kind = "personal" if method_class(method).personal_keys else "global"
    assert document[kind]["summary"] == results["final"]
    assert document[kind]["clients"] == results["clients"]
    assert document["zeroshot"]["summary"] == results["zeroshot"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == document
    assert (tmp_path / "eval" / "config.yaml").is_file()
    csv_rows = (tmp_path / "eval" / "eval.csv").read_text().splitlines()
    assert csv_rows[0] == "prompt,client,n_train,local,base,novel"
    assert sum(row.startswith(f"{kind},") for row in csv_rows) == 2


def test_the_global_prompt_of_fedpgp_is_sigma_as_a_coop_context(
    fedpgp_run: Path, tmp_path: Path
) -> None:
    run = TrainedRun.open(fedpgp_run)
    cfg = eval_config(run)
    document = evaluate_run(run, cfg, tmp_path / "eval")
    experiment = build_experiment(cfg)
    sigma = run.global_tensors["sigma"]
    # Reference: "[SOS] sigma <name>." as every class's prompt, cosine logits, argmax.
    text = experiment.base.bank.encode(sigma)
    predicted = (experiment.base.features @ text.t()).argmax(dim=-1)
    expected = float((predicted == experiment.base.labels).float().mean()) * 100
    assert document["global"]["predictor"] == "promptfl"
    assert document["global"]["summary"]["base"] == round(expected, 4)
    personal = {k: run.personal[0][k] for k in ("U", "V")}
    assert not torch.equal(personal["U"] @ personal["V"], torch.zeros_like(sigma))


def test_local_coop_has_no_global_prompt(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = _trained(tiny_data, tmp_path / "run", "local")
    run = TrainedRun.open(run_dir)
    document = evaluate_run(run, eval_config(run), tmp_path / "eval")
    assert "global" not in document and "personal" in document
    assert main(["export", str(run_dir), "--global", "--out", str(tmp_path / "g.safetensors")]) == 2
    assert not (tmp_path / "g.safetensors").exists()


def test_an_interrupted_run_is_evaluated_from_its_last_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runkit import interrupted_run

    cfg = load_config(None, tiny_overrides(tiny_data, rounds=3))
    interrupted_run(monkeypatch, cfg, tmp_path / "run", round_index=2)
    run = TrainedRun.open(tmp_path / "run")
    assert (run.round, run.finished) == (2, False)
    document = evaluate_run(run, eval_config(run), tmp_path / "eval")
    assert document["round"] == 2 and not document["finished"]
    # The last checkpoint's rows hold round 2's numbers: the same tensors give them again.
    last_row = run.checkpoint.state.rows[-1]
    assert document["personal"]["summary"]["base"] == round(last_row["base"], 4)


def test_eval_on_another_dataset_runs_and_gives_other_numbers(
    fedpgp_run: Path, tmp_path: Path
) -> None:
    other = write_tiny_dtd(tmp_path / "other", classes=OTHER_CLASSES, seed=7)
    config = tmp_path / "other.yaml"
    # A config file's method keys are another run's: ignored, the run's are kept.
    config.write_text(f"method: promptfl\nn_ctx: 8\ndataset: {{name: dtd, root: {other}}}\n")
    run = TrainedRun.open(fedpgp_run)
    cfg = eval_config(run, config)
    assert (cfg.method, cfg.n_ctx, cfg.dataset.root) == ("fedpgp", 4, str(other))
    assert (
        main(
            [
                "eval",
                str(fedpgp_run),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "e"),
                "--per-image",
            ]
        )
        == 0
    )
    document = json.loads((tmp_path / "e" / "eval.json").read_text())
    results = json.loads((fedpgp_run / "results.json").read_text())
    assert document["personal"]["summary"] != results["final"]
    predictions = (tmp_path / "e" / "predictions.csv").read_text().splitlines()[1:]
    labels = {row.split(",")[5] for row in predictions}
    assert labels <= set(OTHER_CLASSES) and len(labels) > 1


def test_eval_refuses_what_would_change_the_tensors_meaning(
    fedpgp_run: Path, tmp_path: Path
) -> None:
    run = TrainedRun.open(fedpgp_run)
    with pytest.raises(ConfigError, match=r"fedpgp-tiny \(seed 0\).*fedpgp-tiny \(seed 5\)"):
        eval_config(run, overrides=["backbone.init_seed=5"])
    with pytest.raises(ConfigError, match="method"):
        eval_config(run, overrides=["method=promptfl"])
    with pytest.raises(ConfigError, match="fedpgp.rank"):
        eval_config(run, overrides=["fedpgp.rank=3"])
    with pytest.raises(ConfigError, match="num_clients: the run .* has 2 clients"):
        eval_config(run, overrides=["num_clients=3"])


def test_bad_runs_and_clients_are_one_error_each(
    fedpgp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.yaml; not a fedpgp run directory"):
        TrainedRun.open(tmp_path / "empty")
    out = tmp_path / "never"
    assert main(["eval", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert main(["export", str(fedpgp_run), "--client", "2", "--out", str(out / "x")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "clients 0 to 1" in errors[1]
    assert not out.exists()


def test_an_existing_evaluation_is_not_overwritten(fedpgp_run: Path, tmp_path: Path) -> None:
    run = TrainedRun.open(fedpgp_run)
    evaluate_run(run, eval_config(run), tmp_path / "eval")
    before = (tmp_path / "eval" / "eval.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds an evaluation"):
        evaluate_run(run, eval_config(run), tmp_path / "eval")
    assert (tmp_path / "eval" / "eval.json").read_bytes() == before


def _write_office(root: Path) -> Path:
    """Office-Caltech10's layout, four domains of the same six classes: a colour per class,
    shifted per domain."""
    rng = np.random.default_rng(3)
    classes = ["back_pack", "bike", "calculator", "headphones", "keyboard", "mug"]
    colours = {name: rng.integers(0, 200, size=3) for name in classes}
    for shift, domain in enumerate(["amazon", "caltech", "dslr", "webcam"]):
        for name in classes:
            folder = root / "office_caltech10" / domain / name
            folder.mkdir(parents=True)
            for i in range(15):
                noise = rng.normal(0, 20, size=(32, 32, 3))
                pixels = np.clip(colours[name] + 30 * shift + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"frame_{i:04d}.jpg")
    return root


def test_eval_on_a_held_out_domain(tmp_path: Path) -> None:
    root = _write_office(tmp_path / "data")
    office = {
        "dataset.name": "office_caltech10",
        "partition.kind": "domain",
        "num_clients": 3,
        "dataset.options.domains": "[amazon,dslr,webcam]",
        "rounds": 2,
        "lr": 0.05,
    }
    cfg = load_config(None, tiny_overrides(root, **office))
    execute(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    run = TrainedRun.open(tmp_path / "run")
    held_out = ["dataset.options.domains=caltech", "partition.clients_per_domain=3",
                "partition.beta=100", "partition.min_samples=1"]  # fmt: skip
    cfg = eval_config(run, overrides=held_out)
    document = evaluate_run(run, cfg, tmp_path / "eval")
    experiment = build_experiment(cfg)
    assert set(experiment.splits.test.domains.tolist()) == {0}
    assert experiment.splits.domain_names == ["caltech"]
    assert document["personal"]["summary"] != results["final"]
    assert len(document["personal"]["clients"]) == 3
