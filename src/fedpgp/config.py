"""Typed run configuration: dataclasses loaded from YAML plus ``--set key=value`` overrides.

Every key is validated before any work starts; an unknown key, a wrong type or an out-of-range
value is a :class:`ConfigError` that names the key and what was expected. The defaults are the
offline default run (FedPGP on the generated world); ``configs/`` holds the paper's experiments.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods.registry import METHOD_NAMES, REGISTRY

log = logging.getLogger(__name__)

# The methods with hyper-parameters, each a section of the config.
SECTIONS = tuple(info for info in REGISTRY if info.settings is not None)


@dataclass
class BackboneConfig:
    """Which frozen CLIP to use (see :class:`fedpgp.backbone.BackboneSpec`)."""

    name: str = "fedpgp-world"
    pretrained: str | None = "world"
    file: str | None = None
    init_seed: int = 0
    allow_torchscript: bool = False


@dataclass
class DatasetConfig:
    """Which dataset, where it lies on disk, and loader options."""

    name: str = "world"
    root: str = "data"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PartitionConfig:
    """How training data is split over clients (docs/method.md section 4)."""

    kind: str = "pathological"
    classes: str = "base"
    beta: float = 0.3
    min_samples: int = 10
    clients_per_domain: int = 1
    file: str | None = None


@dataclass
class _RunSettings:
    """The keys of every run; :data:`RunConfig` adds one section per method with
    hyper-parameters (``fedpgp``, ``fedprox``, ``fedotp``, ...: fedpgp.methods.registry)."""

    method: str = "fedpgp"
    # The defaults are the world's protocol (docs/world.md, "Training on the world"); the
    # paper's optimizer (lr 0.001, no clipping, 2 local epochs) is pinned in configs/.
    rounds: int = 20
    local_epochs: int = 5
    num_clients: int = 10
    frac: float = 1.0
    shots: int | None = 16
    batch_size: int | None = None
    n_ctx: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Largest L2 norm of one step's gradient over the trained tensors; null: no clipping.
    grad_clip: float | None = 1.0
    seed: int = 0
    # Rounds between evaluations (the final round is always evaluated); null: the method's own
    # default (every round, or the final round only where evaluating costs a test-set encoding
    # per client: docs/method.md).
    eval_every: int | None = None
    augment: str = "none"
    views: int = 0
    optimizer_state: str = "fresh"
    # on: the sampled clients of a round train in lockstep as one computation
    # (fedpgp.federation.batched), or a ConfigError for a method that cannot; auto: so on
    # CUDA where the method can; off: one client after another.
    batch_clients: str = "auto"
    label_space: str = "all"
    device: str = "auto"
    # Prompt-learning steps are small matrix products: one CPU thread avoids OpenMP overhead
    # (and collapse when other processes share the cores); raise it to encode big backbones.
    threads: int = 1
    precision: str = "auto"
    cache_dir: str | None = None
    min_clients: int = 1
    client_timeout: float | None = None
    checkpoint_every: int = 1
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)

    @property
    def train_batch_size(self) -> int:
        """The batch size; by default the shot count, as in the paper's few-shot runs."""
        if self.batch_size is not None:
            return self.batch_size
        return self.shots if self.shots is not None else 32

    @property
    def num_views(self) -> int:
        """Stored training views per image: one per local epoch of the run unless set."""
        if self.augment != "views":
            return 1
        return self.views or self.local_epochs * self.rounds

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every key, in declaration order."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML, as a run directory's config.yaml holds it."""
        # allow_unicode: PyYAML would escape characters beyond the BMP as surrogate pairs it
        # cannot read back, and a resumed run would see another config.
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def digest(self) -> str:
        """sha256 of the resolved configuration, for checkpoints and caches."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    [(info.name, info.settings, field(default_factory=info.settings)) for info in SECTIONS],
    bases=(_RunSettings,),
    namespace={
        "__doc__": "One federated run. Field names are the YAML keys and the ``--set`` keys; "
        "each method with hyper-parameters has its own section."
    },
)
RunConfig.__module__ = __name__

CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHOD_NAMES,
    "augment": ("none", "views", "online"),
    "optimizer_state": ("fresh", "shared"),
    "batch_clients": ("auto", "on", "off"),
    "label_space": ("all", "client"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32"),
    "partition.kind": ("pathological", "dirichlet", "hierarchical", "domain"),
    "partition.classes": ("base", "all"),
    **{
        f"{info.name}.{key}": allowed
        for info in SECTIONS
        for key, allowed in info.settings.choices.items()
    },
}

# torch.manual_seed and numpy take seeds up to 2**64 - 1; derived seeds are 63-bit.
MAX_SEED = 2**63 - 1

# (key, lower bound, upper bound, lower bound inclusive); None means unbounded.
RANGES: tuple[tuple[str, float | None, float | None, bool], ...] = (
    ("rounds", 1, None, True),
    ("local_epochs", 1, None, True),
    ("num_clients", 1, None, True),
    ("frac", 0, 1, False),
    ("shots", 1, None, True),
    ("batch_size", 1, None, True),
    ("n_ctx", 1, None, True),
    ("lr", 0, None, False),
    ("momentum", 0, 1, True),
    ("weight_decay", 0, None, True),
    ("grad_clip", 0, None, False),
    ("seed", 0, MAX_SEED, True),
    ("eval_every", 1, None, True),
    ("views", 0, None, True),
    ("min_clients", 1, None, True),
    ("threads", 1, None, True),
    ("client_timeout", 0, None, False),
    ("checkpoint_every", 1, None, True),
    ("backbone.init_seed", 0, MAX_SEED, True),
    ("partition.beta", 0, None, False),
    ("partition.min_samples", 0, None, True),
    ("partition.clients_per_domain", 1, None, True),
    *(
        (f"{info.name}.{key}", *bounds)
        for info in SECTIONS
        for key, *bounds in info.settings.ranges
    ),
)


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (ints are accepted for floats)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            if arg is not type(None):
                try:
                    return _coerce(key, value, arg)
                except ConfigError:
                    continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict) or not _is_plain(value):
            raise ConfigError(
                f"{key}: expected a mapping with string keys and plain YAML values "
                f"(strings, numbers, booleans, null, lists, mappings), got {value!r}"
            )
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {value!r} is too large for a float") from None
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and {"on", "off"} <= set(CHOICES.get(key, ())):
            # YAML 1.1 reads a bare on / off as a boolean.
            return "on" if value else "off"
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _is_plain(value: Any) -> bool:
    """True for JSON-like data: what a config digest and a dataset loader's keywords accept."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            # repr: a key may hold a newline, and the message must stay one line
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}; known keys here: {', '.join(names)}"
            )
    values = {key: _coerce(f"{prefix}{key}", value, hints[key]) for key, value in data.items()}
    return cls(**values)


def _lookup(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def method_label_space(cfg: RunConfig, method: str | None = None) -> str:
    """The label space ``method`` (the config's by default) trains over: its section's
    ``label_space`` where it has one (FedTPG), else the run's."""
    section = getattr(cfg, cfg.method if method is None else method, None)
    return getattr(section, "label_space", cfg.label_space)


def method_lr(cfg: RunConfig, method: str | None = None) -> float:
    """The learning rate ``method`` (the config's by default) trains with: its section's
    ``lr`` where it has one that is set (FedOTP), else the run's."""
    section = getattr(cfg, cfg.method if method is None else method, None)
    lr = getattr(section, "lr", None)
    return cfg.lr if lr is None else lr


def validate(cfg: RunConfig) -> RunConfig:
    """Check choices and ranges of every key; returns ``cfg`` unchanged or raises ConfigError."""
    for key, allowed in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    for key, low, high, inclusive in RANGES:
        value = _lookup(cfg, key)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        too_low = low is not None and (value < low if inclusive else value <= low)
        too_high = high is not None and value > high
        if too_low or too_high:
            lower = f"{'>=' if inclusive else '>'} {low}" if low is not None else ""
            upper = f"<= {high}" if high is not None else ""
            bounds = " and ".join(b for b in (lower, upper) if b)
            raise ConfigError(f"{key}: expected a value {bounds}, got {value!r}")
    if cfg.min_clients > cfg.num_clients:
        raise ConfigError(
            f"min_clients: expected at most num_clients ({cfg.num_clients}), got {cfg.min_clients}"
        )
    per_round = max(int(cfg.frac * cfg.num_clients), 1)
    if cfg.min_clients > per_round:
        raise ConfigError(
            f"min_clients: expected at most the {per_round} clients sampled per round "
            f"(max(int(frac * num_clients), 1)), got {cfg.min_clients}"
        )
    experts = cfg.pfedmoap.num_experts
    if cfg.method == "pfedmoap" and experts is not None and experts > cfg.num_clients:
        raise ConfigError(
            f"pfedmoap.num_experts: expected at most num_clients ({cfg.num_clients}), got {experts}"
        )
    groups = cfg.fedmgp
    if cfg.method == "fedmgp" and groups.selected > groups.groups:
        raise ConfigError(
            f"fedmgp.selected: expected at most fedmgp.groups ({groups.groups}), got "
            f"{groups.selected}"
        )
    if cfg.batch_clients == "on":
        _check_batchable(cfg)
    _notice_idle_rank(cfg)
    return cfg


def batch_obstacle(cfg: RunConfig) -> str | None:
    """Why the clients of ``cfg`` cannot train in one lockstep computation, or None when they
    can (a method that trains nothing has nothing to batch: None too)."""
    from .methods.registry import method_class

    method = method_class(cfg.method)
    if method.trains and not method.can_batch:
        return f"method {cfg.method} cannot train its clients in one batch"
    if cfg.optimizer_state == "shared":
        return "it needs optimizer_state: fresh (a shared optimizer steps one client after another)"
    if cfg.client_timeout is not None:
        return "clients cannot be timed out one by one (client_timeout)"
    return None


def _check_batchable(cfg: RunConfig) -> None:
    """ConfigError unless the clients of ``cfg`` can train in one batch (batch_clients: on)."""
    obstacle = batch_obstacle(cfg)
    if obstacle is not None:
        raise ConfigError(f"batch_clients: on, but {obstacle}; use auto or off")


# (rank, n_ctx) pairs already warned about: validate runs several times per run.
_rank_noticed: set[tuple[int, int]] = set()


def _notice_idle_rank(cfg: RunConfig) -> None:
    """Warn (once per process) when FedPGP's rank exceeds n_ctx: allowed, but wasted."""
    rank, n_ctx = cfg.fedpgp.rank, cfg.n_ctx
    if cfg.method != "fedpgp" or rank <= n_ctx or (rank, n_ctx) in _rank_noticed:
        return
    _rank_noticed.add((rank, n_ctx))
    log.warning(
        "fedpgp.rank %d > n_ctx %d: U V (%d x D) has rank at most %d, so the extra rank only "
        "adds parameters",
        rank,
        n_ctx,
        n_ctx,
        n_ctx,
    )


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        if first.line == second.line:
            where = f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
        else:
            where = f"lines {first.line + 1} and {second.line + 1}"
        super().__init__(f"key {key!r} given twice ({where})")
        self.key = key


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``, and
    a learning rate written the usual way would otherwise be the string '1e-5'), and refusing a
    key given twice in one mapping (a typo that would otherwise override silently)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                # '<<' merges are overrides by design.
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.get(key)
                except TypeError:
                    continue  # an unhashable key: PyYAML's own error names it
                if earlier is not None:
                    raise DuplicateKeyError(key, earlier.start_mark, key_node.start_mark)
                first[key] = key_node
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set rounds=2")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"--set {item!r}: key {exc.key!r} given twice") from None
    except Exception:
        # Not parseable as YAML (an unbalanced bracket, an impossible date: PyYAML raises
        # ValueError and others besides YAMLError): the text itself is the value.
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``a.b=value`` set; values are parsed as YAML scalars."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _at(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def _yaml_problem(text: str, exc: Exception) -> str:
    """What is wrong with the YAML ``text`` and where, on one line (PyYAML's own message
    spans several, quoting the source)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "malformed"
        where = _at(exc.problem_mark or exc.context_mark)
        during = ""
        if exc.problem and exc.context:
            during = f" ({exc.context} at {_at(exc.context_mark)})"
        return _one_line(f"not valid YAML at {where}: {problem}{during}")
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        return (
            f"not valid YAML at line {line}, column {column}: character "
            f"#x{exc.character:04x} is not allowed ({_one_line(exc.reason)})"
        )
    # PyYAML raises ValueError, AttributeError, ... on malformed scalars (an impossible
    # date), not only YAMLError.
    return _one_line(f"not valid YAML: {exc}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; ConfigError naming the file if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    try:
        data = _load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"config file {path}: {_yaml_problem(text, exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of keys, got {type(data).__name__}"
        )
    return data


# Keys that moved into a method's section: the old flat spelling still loads, with a notice.
MOVED_KEYS = {
    "rank": "fedpgp.rank",
    "mu": "fedpgp.mu",
    "tau": "fedpgp.tau",
    "anchor": "fedpgp.anchor",
    "prox_mu": "fedprox.mu",
}
_noticed: set[str] = set()


def _move_flat_keys(data: dict[str, Any], notice: bool = True) -> dict[str, Any]:
    """``data`` with every key of MOVED_KEYS moved into its section (a ConfigError when both
    spellings are given)."""
    for old, new in MOVED_KEYS.items():
        if old not in data:
            continue
        section, key = new.split(".")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # _build names the malformed section
        if key in target:
            raise ConfigError(f"{old}: given both as '{old}' and as '{new}'; keep only '{new}'")
        target[key] = data.pop(old)
        if notice and old not in _noticed:
            _noticed.add(old)
            log.warning("config key '%s' is deprecated: write '%s' (read as that)", old, new)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``--set`` overrides; validated."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return validate(_build(RunConfig, _move_flat_keys(data)))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a plain nested dict (as RunConfig.to_dict gives it)."""
    return validate(_build(RunConfig, _move_flat_keys(copy.deepcopy(data))))


# Keys added after a run directory could have been written: a config.yaml without one was
# written before the key existed, and gets the value that reproduces what that version did,
# not today's default (which may differ). Keys whose introduction changed nothing are absent.
VALUE_BEFORE_KEY = {
    "grad_clip": None,
    "fedotp.lr": None,
    "batch_clients": "off",
}


def saved_config(data: dict[str, Any]) -> RunConfig:
    """The config of a run directory's config.yaml, written by this or an earlier version: flat
    keys moved into their sections (silently: the file is not the user's to edit) and missing
    keys given the value of the version that wrote it (:data:`VALUE_BEFORE_KEY`)."""
    data = _move_flat_keys(copy.deepcopy(data), notice=False)
    for dotted, value in VALUE_BEFORE_KEY.items():
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node.setdefault(key, value)
    return validate(_build(RunConfig, data))


# Keys that say where files are, not what the run computes: a run moved to another machine may
# resume with other values. (Data identity is still checked, by the partition digest, which holds
# the dataset's fingerprint.)
RELOCATABLE = ("dataset.root", "cache_dir")


def config_changes(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key that differs between config dicts."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key: old -> new; ...`` for an error message."""
    return "; ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in changes.items())


def run_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The changes from ``old`` to ``new`` that make another run (every key but the
    RELOCATABLE ones): what a resume must refuse."""
    changes = config_changes(old.to_dict(), new.to_dict())
    return {key: change for key, change in changes.items() if key not in RELOCATABLE}


def run_digest(cfg: RunConfig) -> str:
    """sha256 of the config without its RELOCATABLE keys: what a checkpoint, a node's personal
    state and a resumed run must agree on."""
    data = cfg.to_dict()
    for key in RELOCATABLE:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node.pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
