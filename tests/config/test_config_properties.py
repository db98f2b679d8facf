"""Property tests of the config parser (hypothesis, fixed seed, bounded examples): random valid
configs validate and survive config.yaml and --set round trips; random invalid ones (unknown
keys, wrong types, out-of-range values, arbitrary YAML text) raise ConfigError and never another
exception. Keys, types, choices and ranges are read from fedpgp.config itself, so new keys are
covered without editing this file."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpgp.config import CHOICES, RANGES, RunConfig, config_from_dict, load_config
from fedpgp.errors import ConfigError

PROPERTY = settings(derandomize=True, max_examples=50, deadline=None)
BOUNDS = {key: (low, high, inclusive) for key, low, high, inclusive in RANGES}


def _leaves(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type annotation, for every scalar key of the config."""
    hints = typing.get_type_hints(cls)
    found: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.update(_leaves(tp, f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = tp
    return found


LEAVES = _leaves()
SECTIONS = sorted({key.split(".")[0] for key in LEAVES if "." in key})


def _base(tp: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


# Printable text only: a control character cannot be given on a command line as --set text.
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


def valid_value(key: str) -> st.SearchStrategy:
    tp, optional = _base(LEAVES[key])
    if key in CHOICES:
        values: st.SearchStrategy = st.sampled_from(CHOICES[key])
    elif tp is bool:
        values = st.booleans()
    elif typing.get_origin(tp) is dict:
        values = st.dictionaries(TEXT, PLAIN, max_size=3)
    elif tp is str:
        values = TEXT
    else:
        low, high, inclusive = BOUNDS.get(key, (None, None, True))
        if tp is int:
            first = None if low is None else (low if inclusive else math.floor(low) + 1)
            values = st.integers(min_value=first, max_value=high)
        else:
            values = st.floats(
                min_value=low,
                max_value=high,
                exclude_min=low is not None and not inclusive,
                allow_nan=False,
                allow_infinity=False,
            )
    return st.none() | values if optional else values


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A nested dict of a random subset of keys, each valid, meeting the cross-key rules."""
    keys = draw(st.lists(st.sampled_from(sorted(LEAVES)), unique=True, max_size=len(LEAVES)))
    flat = {key: draw(valid_value(key)) for key in keys}
    # min_clients <= clients sampled per round (round 0 samples all of them)
    clients = flat.get("num_clients", RunConfig.num_clients)
    per_round = max(int(flat.get("frac", RunConfig.frac) * clients), 1)
    if flat.get("min_clients", 1) > per_round:
        flat["min_clients"] = draw(st.integers(1, per_round))
    return _nest(flat)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return nested


def _lookup(cfg: RunConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in LEAVES:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@PROPERTY
@given(data=valid_configs())
def test_valid_configs_validate_and_round_trip(data: dict[str, Any]) -> None:
    cfg = config_from_dict(data)
    for key, value in _flat(data).items():
        assert _lookup(cfg, key) == value, key
    # config.yaml, as a run writes it, reads back to the same config and digest
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.digest() == cfg.digest()
    # so do --set overrides, one per key, with the values written as JSON
    overrides = [
        f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in _flat(cfg.to_dict()).items()
    ]
    assert load_config(None, overrides) == cfg


def invalid_value(key: str) -> st.SearchStrategy:
    """Values of ``key`` that must be refused: another type, outside the range, not a choice."""
    tp, optional = _base(LEAVES[key])
    wrong: list[st.SearchStrategy] = [st.lists(st.integers(), max_size=2)]
    if tp is not str:
        wrong.append(st.text(min_size=1, max_size=6))
    if tp is int:
        wrong.append(st.floats())  # no float is an int, not even 2.0
    elif tp is not float:
        wrong.append(st.integers() | st.floats())
    if tp is not bool:
        wrong.append(st.booleans())
    if not optional:
        wrong.append(st.none())
    if typing.get_origin(tp) is dict:
        wrong.append(st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2))
        wrong.append(st.dictionaries(st.text(max_size=3), st.sets(st.integers()), min_size=1))
    if key in CHOICES:
        wrong.append(st.text(max_size=10).filter(lambda v: v not in CHOICES[key]))
    low, high, inclusive = BOUNDS.get(key, (None, None, True))
    if tp is int:
        if low is not None:
            wrong.append(st.integers(max_value=low - 1 if inclusive else low))
        if high is not None:
            wrong.append(st.integers(min_value=high + 1))
    elif tp is float:
        wrong.append(st.sampled_from([math.nan, math.inf, -math.inf]))
        if low is not None:
            wrong.append(st.floats(max_value=low, exclude_max=inclusive, allow_nan=False))
        if high is not None:
            wrong.append(st.floats(min_value=high, exclude_min=True, allow_nan=False))
    return st.one_of(wrong)


@st.composite
def invalid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with one thing broken: an unknown key, or one bad value."""
    data = draw(valid_configs())
    if draw(st.booleans()):
        section = draw(st.sampled_from(["", *SECTIONS]))
        prefix = f"{section}." if section else ""
        known = {k.removeprefix(prefix).split(".")[0] for k in LEAVES if k.startswith(prefix)}
        name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in known))
        node = data.setdefault(section, {}) if section else data
        node[name] = draw(PLAIN)
    else:
        key = draw(st.sampled_from(sorted(LEAVES)))
        data = _nest({**_flat(data), key: draw(invalid_value(key))})
    return data


@PROPERTY
@given(data=invalid_configs())
def test_invalid_configs_raise_config_error_only(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        config_from_dict(data)


@PROPERTY
@given(
    text=st.text(alphabet=st.sampled_from(list("ab:-[]{}!,'\"&*?|>#%@ \n019.eE+_")), max_size=60)
    | st.sampled_from(
        [
            "lr: 2001-13-01",
            "seed: !!timestamp x",
            "lr: !!float x",
            "rounds: .inf",
            "lr: .nan",
            "dataset: {options: {1: 2}}",
            "seed: 99999999999999999999999",
        ]
    )
)
def test_any_yaml_text_is_a_config_or_a_config_error(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text)
    try:
        cfg = load_config(path)
    except ConfigError as error:
        assert str(path) in str(error) or ":" in str(error)
    else:
        cfg.digest()


@PROPERTY
@given(items=st.lists(st.text(max_size=20), max_size=3))
def test_any_set_override_is_a_config_or_a_config_error(items: list[str]) -> None:
    try:
        load_config(None, items).digest()
    except ConfigError:
        pass


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lr=1e-5", None),
        ("lr=.nan", "lr: expected a finite number"),
        ("client_timeout=0", "client_timeout: expected a value > 0"),
        ("checkpoint_every=0", "checkpoint_every: expected a value >= 1"),
        ("seed=9223372036854775808", "seed: expected a value >= 0 and <= 9223372036854775807"),
        ("lr=2001-13-01", "lr: expected float, got '2001-13-01'"),
        ("dataset.options={1: 2}", "dataset.options: expected a mapping with string keys"),
    ],
)
def test_examples_the_properties_found(override: str, needle: str | None) -> None:
    """Inputs that once passed validation or raised something else than ConfigError."""
    if needle is None:
        assert load_config(None, [override]).lr == 1e-5
        return
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert needle in str(error.value)
