"""`fedpgp predict`, `fedpgp export` and fedpgp.load_classifier: a trained prompt used on image
files, agreeing with the evaluation of the same run; and the README's example, run as written."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tiny import tiny_overrides

import fedpgp
from fedpgp.classifier import load_classifier
from fedpgp.cli import main
from fedpgp.config import load_config
from fedpgp.errors import ConfigError
from fedpgp.experiment import build_experiment
from fedpgp.runner import execute
from fedpgp.trained import TrainedRun, eval_config

README = Path(__file__).resolve().parents[2] / "README.md"


def _trained(tiny_data: Path, out: Path, method: str) -> Path:
    execute(load_config(None, tiny_overrides(tiny_data, method=method, lr=0.05)), out)
    return out


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runs")
    methods = ("fedpgp", "fedotp", "pfedmoap", "fedmgp", "pfedmma")
    return {m: _trained(tiny_data, folder / m, m) for m in methods}


def _base_images(run_dir: Path) -> list[Path]:
    """The image files of the run's Base test set, in its order."""
    experiment = build_experiment(eval_config(TrainedRun.open(run_dir)))
    images = experiment.splits.test.images
    return [images.path(i) for i in experiment.manifest.base_test]


def test_predict_agrees_with_evals_per_image_predictions(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = runs["fedpgp"]
    assert main(["eval", str(run_dir), "--per-image", "--out", str(tmp_path / "e")]) == 0
    with (tmp_path / "e" / "predictions.csv").open() as handle:
        rows = [
            r for r in csv.DictReader(handle) if (r["prompt"], r["client"]) == ("personal", "1")
        ]
    by_file = {r["file"]: r["predicted"] for r in rows if r["set"] == "base"}
    files = _base_images(run_dir)
    capsys.readouterr()
    assert (
        main(["predict", str(run_dir), "--client", "1", *map(str, files), "--format", "json"]) == 0
    )
    predicted = json.loads(capsys.readouterr().out)
    assert [entry["file"] for entry in predicted] == [str(f) for f in files]
    assert {e["file"]: e["predictions"][0]["class"] for e in predicted} == by_file
    assert len(set(by_file.values())) > 1


def _odd_images(folder: Path) -> list[Path]:
    """The same picture as grayscale, CMYK, 16-bit, RGBA and large files."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    folder.mkdir()
    paths = {
        "grey.png": Image.fromarray(rgb).convert("L"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "alpha.png": Image.fromarray(rgb).convert("RGBA"),
        "large.jpg": Image.fromarray(rgb).resize((3000, 2200)),
    }
    for name, image in paths.items():
        image.save(folder / name)
    return [folder / name for name in paths]


def test_predict_reads_any_image_and_reports_the_files_that_are_not(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _odd_images(tmp_path / "images")
    assert Image.open(images[2]).mode.startswith("I")
    (tmp_path / "images" / "notes.png").write_text("not an image")
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\n\nblue\n")
    code = main(
        [
            "predict",
            str(runs["fedpgp"]),
            "--global",
            str(tmp_path / "images"),
            "--classes",
            str(classes),
            "--top-k",
            "3",
            "--format",
            "csv",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "notes.png" in errors[0]
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert {Path(r["file"]).name for r in rows} == {p.name for p in images}
    assert {r["class"] for r in rows} == {"red", "green", "blue"}
    for name in {r["file"] for r in rows}:
        mine = [float(r["probability"]) for r in rows if r["file"] == name]
        assert len(mine) == 3 and mine == sorted(mine, reverse=True)
        assert sum(mine) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("content", ["", "\n\n", "red\nblue\nred\n"])
def test_a_class_file_empty_or_with_duplicates_is_refused(
    runs: dict[str, Path], tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text(content)
    image = _odd_images(tmp_path / "images")[0]
    assert (
        main(
            ["predict", str(runs["fedpgp"]), "--client", "0", str(image), "--classes", str(classes)]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(classes) in err and ("no class name" in err or "repeated: ['red']" in err)


@pytest.mark.parametrize("method", ["fedpgp", "fedotp", "pfedmoap", "fedmgp", "pfedmma"])
def test_an_exported_prompt_gives_the_runs_logits(
    runs: dict[str, Path], tmp_path: Path, method: str
) -> None:
    run_dir = runs[method]
    out = tmp_path / "client0.safetensors"
    assert main(["export", str(run_dir), "--client", "0", "--out", str(out)]) == 0
    with safe_open(out, framework="pt") as handle:
        meta = handle.metadata()
    config = json.loads(meta["config"])
    assert (meta["method"], meta["client"], config["method"]) == (method, "0", method)
    assert meta["backbone"].startswith("fedpgp-tiny@random-")
    from_file = load_classifier(out)
    from_run = fedpgp.load_classifier(run_dir, client=0)
    assert from_file.classes == from_run.classes == json.loads(meta["classes"])
    files = _base_images(run_dir)
    features = from_file.features(files)
    assert torch.equal(from_file.logits(features), from_run.logits(features))
    # The same images' features as the run cached them, and the run's own logits of them.
    run = TrainedRun.open(run_dir)
    experiment = build_experiment(eval_config(run))
    run.bind(experiment.method, experiment.backbone.text_width)
    cached = experiment.base.features
    params = run.client_params(experiment.method, 0)
    expected = experiment.method.image_logits(params, experiment.base.bank, cached)
    torch.testing.assert_close(from_file.logits(features), expected, rtol=1e-4, atol=1e-4)
    assert from_file.predict(files) == [from_file.classes[i] for i in expected.argmax(-1)]


def test_export_refuses_a_personal_prompt_of_a_method_without_one(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _trained(tiny_data, tmp_path / "run", "promptfl")
    out = tmp_path / "p.safetensors"
    assert main(["export", str(run_dir), "--client", "0", "--out", str(out)]) == 2
    assert "has no personal prompt" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(run_dir), "--global", "--out", str(out)]) == 0
    with pytest.raises(ConfigError, match="holds the global prompt"):
        load_classifier(out, client=1)


def test_the_readme_example_runs_as_written(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = README.read_text()
    section = text[text.index("## Using a trained prompt") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 5
    files = _base_images(runs["fedpgp"])
    code = code.replace("runs/my-run", str(runs["fedpgp"]))
    code = code.replace('"cat.jpg", "dog.png"', ", ".join(f'"{f}"' for f in files[:2]))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    classifier = load_classifier(runs["fedpgp"], client=0)
    assert printed == [str(classifier.classes), str(classifier.predict(files[:2]))]
