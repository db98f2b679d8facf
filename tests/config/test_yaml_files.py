"""Config files as YAML: a key given twice is refused (at any depth) with both lines, and a
syntax error is one line naming the file, the line, the column and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpgp.cli import main
from fedpgp.config import load_config, read_yaml
from fedpgp.errors import ConfigError

PROPERTY = settings(derandomize=True, max_examples=50, deadline=None)


def _write(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds: 2\nseed: 1\n\nrounds: 3\n", "key 'rounds' given twice (lines 1 and 4)"),
        ("backbone:\n  name: a\n  file: x\n  name: b\n", "key 'name' given twice (lines 2 and 4)"),
        ("backbone: {}\nseed: 1\nbackbone: {}\n", "key 'backbone' given twice (lines 1 and 3)"),
        (
            "dataset:\n  options: {domains: [amazon], domains: [dslr]}\n",
            "key 'domains' given twice (line 2, columns 13 and 32)",
        ),
    ],
)
def test_a_key_given_twice_is_refused_with_both_lines(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"config file {path}: {message}"


def test_merges_and_equal_keys_in_different_mappings_still_load(tmp_path: Path) -> None:
    text = "backbone: {name: fedpgp-tiny}\nfedpgp: {rank: 2}\nfedprox: {mu: 0.5}\n"
    cfg = load_config(_write(tmp_path, text), ["rounds=2", "fedpgp.rank=3"])
    assert (cfg.backbone.name, cfg.fedpgp.rank, cfg.fedprox.mu, cfg.rounds) == (
        "fedpgp-tiny",
        3,
        0.5,
        2,
    )
    merged = read_yaml(_write(tmp_path, "base: &b {rounds: 1, seed: 4}\nx:\n  <<: *b\n  seed: 5\n"))
    assert merged["x"] == {"rounds": 1, "seed": 5}


def test_a_set_override_with_a_key_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["dataset.options={a: 1, a: 2}"])
    assert str(caught.value) == "--set 'dataset.options={a: 1, a: 2}': key 'a' given twice"


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("rounds: [1, 2\n", "line 2, column 1", "expected ',' or ']', but got '<stream end>'"),
        ("seed: 1\nrounds: 2: 3\n", "line 2, column 10", "mapping values are not allowed here"),
        ("seed: 1\nlr: 0.1\tx: \x07\n", "line 2, column 12", "character #x0007 is not allowed"),
    ],
)
def test_a_syntax_error_is_one_line_with_file_line_and_problem(
    tmp_path: Path, text: str, where: str, problem: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"config file {path}: not valid YAML at {where}: {problem}")


def test_the_cli_prints_a_syntax_error_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "rounds: [1, 2\n")
    assert main(["run", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"fedpgp: error: config file {path}: not valid YAML at line 2")


def test_the_cli_prints_a_key_given_twice_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "rounds: 2\nrounds: 3\n")
    assert main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"fedpgp: error: config file {path}: key 'rounds' given twice (lines 1 and 2)\n"
    )


@PROPERTY
@given(
    text=st.text(alphabet=st.sampled_from(list("ab:-[]{}!,'\"&*?|>#%@ \n\t\x07019.eE+_<")))
    | st.sampled_from(["? |\n a\n: 1\n", "a: 1\na: 2\n", "? [1]\n: 2\n", "\ufeff\x85: 1"])
)
def test_any_text_is_a_config_or_a_one_line_config_error(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path).digest()
    except ConfigError as error:
        assert len(str(error).splitlines()) == 1, str(error)
