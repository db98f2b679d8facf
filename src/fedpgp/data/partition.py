"""Client partitions (docs/method.md section 4), written down as a `PartitionManifest`.

Every kind draws all its randomness from one `np.random.default_rng(seed)` and produces sorted
index lists: train indices into `splits.train`, test indices into `splits.test`. The manifest is
the record of a run's data: saved to the run directory, it reproduces the same clients later.

Kinds and their parameters (besides num_clients, shots and seed):

- pathological: the training classes shuffled, chunks of round(B/K) classes per client (the last
  takes the remainder), `shots` images per owned class; local test = all test images of the
  client's classes.
- dirichlet(beta=0.3, min_samples=10, max_retries=100): per class, proportions over clients
  ~ Dir(beta) split that class's training images and, with the same proportions, its test
  images; drawn again until every client has >= min_samples train and test images.
- hierarchical(beta=0.3, beta_fine=10.0, min_samples, max_retries): per coarse class,
  q ~ Dir(beta) over clients; per client and coarse class, r ~ Dir(beta_fine) over its fine
  classes; fine class c of coarse class g is split in proportion to q[k] * r[k, c].
- domain(clients_per_domain=1, beta=0.3, min_samples, max_retries): the clients of a domain
  hold only its images; several clients of one domain split it with the Dirichlet rule.

Every kind takes `classes`: "base" (default: train on the base classes, as the paper does) or
"all" (train on every class; then there are no novel classes).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from fedpgp.atomic import write_text_atomic
from fedpgp.data.datasets import DatasetSplits
from fedpgp.data.splits import base_novel_split, sample_shots
from fedpgp.errors import ConfigError, DatasetError

CLASS_SETS = ("base", "all")


@dataclass
class ClientPart:
    """One client's data: indices into splits.train and splits.test, and its classes."""

    id: int
    train: list[int]
    test: list[int]
    classes: list[int]
    domain: str | None = None


@dataclass
class PartitionManifest:
    """Which images every client holds, with the seed and parameters that chose them."""

    kind: str
    seed: int
    params: dict
    dataset: str
    dataset_fingerprint: str
    base_classes: list[int]
    novel_classes: list[int]
    base_test: list[int]
    novel_test: list[int]
    clients: list[ClientPart] = field(default_factory=list)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, compact): equal manifests give equal bytes."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")) + "\n"

    def sample_counts(self) -> dict[int, int]:
        """Client id -> its number of training samples (the n_i the server weighs by)."""
        return {client.id: len(client.train) for client in self.clients}

    def digest(self) -> str:
        """sha256 hex of `to_json()`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PartitionManifest:
        """Read a manifest; a missing file or a malformed key is a DatasetError naming both."""
        source = Path(path)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DatasetError(
                f"partition manifest {source}: expected a file, found nothing"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"partition manifest {source}: cannot be read ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"partition manifest {source}: expected valid JSON, found an error at line "
                f"{exc.lineno} column {exc.colno}: {exc.msg}"
            ) from exc
        return _manifest_from_dict(data, source)

    @classmethod
    def from_json(cls, text: str, source: str) -> PartitionManifest:
        """A manifest sent as text (``source`` names the sender); DatasetError if malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"partition manifest from {source}: invalid JSON ({exc.msg})"
            ) from exc
        return _manifest_from_dict(data, source)

    def check_matches(self, splits: DatasetSplits) -> None:
        """Raise DatasetError unless this manifest was made from exactly this dataset."""
        where = f"partition manifest ({self.kind}, seed {self.seed})"
        if self.dataset != splits.name:
            raise DatasetError(
                f"{where}: key 'dataset': expected '{splits.name}', found '{self.dataset}'"
            )
        if self.dataset_fingerprint != splits.fingerprint():
            raise DatasetError(
                f"{where}: key 'dataset_fingerprint': the dataset '{splits.name}' on disk has "
                f"fingerprint {splits.fingerprint()[:16]}..., the manifest was made from "
                f"{self.dataset_fingerprint[:16]}... (files, labels or class names changed)"
            )
        limits = {"train": len(splits.train), "test": len(splits.test)}
        lists = {"base_test": ("test", self.base_test), "novel_test": ("test", self.novel_test)}
        for client in self.clients:
            lists[f"clients[{client.id}].train"] = ("train", client.train)
            lists[f"clients[{client.id}].test"] = ("test", client.test)
        for key, (split, values) in lists.items():
            if values and (values[0] < 0 or values[-1] >= limits[split]):
                raise DatasetError(
                    f"{where}: key '{key}': expected indices in [0, {limits[split]}) of "
                    f"splits.{split}, found {values[0]}..{values[-1]}"
                )
        for key, classes in (
            ("base_classes", self.base_classes),
            ("novel_classes", self.novel_classes),
        ):
            if classes and (classes[0] < 0 or classes[-1] >= splits.num_classes):
                raise DatasetError(
                    f"{where}: key '{key}': expected labels in [0, {splits.num_classes}), "
                    f"found {classes[0]}..{classes[-1]}"
                )


def _sorted_ints(value: object) -> bool:
    return (
        isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and all(a < b for a, b in itertools.pairwise(value))
    )


def _manifest_from_dict(data: object, source: Path | str) -> PartitionManifest:
    def bad(key: str, expected: str, found: object) -> DatasetError:
        return DatasetError(
            f"partition manifest {source}: key '{key}': expected {expected}, "
            f"found {json.dumps(found)[:60] if found is not None else 'nothing'}"
        )

    if not isinstance(data, dict):
        raise bad("(top level)", "a JSON object", data)
    expected_keys = {f.name for f in fields(PartitionManifest)}
    unknown = sorted(set(data) - expected_keys)
    if unknown:
        raise bad(
            unknown[0],
            "no such key (known: " + ", ".join(sorted(expected_keys)) + ")",
            data[unknown[0]],
        )
    checks: dict[str, tuple[str, Callable[[object], bool]]] = {
        "kind": ("a partition kind", lambda v: v in KINDS),
        "seed": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        "params": ("an object", lambda v: isinstance(v, dict)),
        "dataset": ("a dataset name", lambda v: isinstance(v, str) and bool(v)),
        "dataset_fingerprint": (
            "a sha256 hex string",
            lambda v: isinstance(v, str) and len(v) == 64,
        ),
        "base_classes": ("a sorted list of distinct integers", _sorted_ints),
        "novel_classes": ("a sorted list of distinct integers", _sorted_ints),
        "base_test": ("a sorted list of distinct integers", _sorted_ints),
        "novel_test": ("a sorted list of distinct integers", _sorted_ints),
        "clients": ("a non-empty list of clients", lambda v: isinstance(v, list) and bool(v)),
    }
    for key, (expected, valid) in checks.items():
        if key not in data or not valid(data[key]):
            raise bad(key, expected, data.get(key))
    clients = [
        _client_from_dict(item, position, bad) for position, item in enumerate(data["clients"])
    ]
    return PartitionManifest(**{**data, "clients": clients})


def _client_from_dict(
    item: object, position: int, bad: Callable[[str, str, object], DatasetError]
) -> ClientPart:
    prefix = f"clients[{position}]"
    if not isinstance(item, dict):
        raise bad(prefix, "an object", item)
    expected_keys = {f.name for f in fields(ClientPart)}
    unknown = sorted(set(item) - expected_keys)
    if unknown:
        raise bad(f"{prefix}.{unknown[0]}", "no such key", item[unknown[0]])
    if item.get("id") != position:
        raise bad(f"{prefix}.id", f"{position}", item.get("id"))
    for key in ("train", "test", "classes"):
        if key not in item or not _sorted_ints(item[key]):
            raise bad(f"{prefix}.{key}", "a sorted list of distinct integers", item.get(key))
    domain = item.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise bad(f"{prefix}.domain", "a domain name or null", domain)
    return ClientPart(item["id"], item["train"], item["test"], item["classes"], domain)


@dataclass(frozen=True)
class ParamSpec:
    """One partition parameter: its default, whether it is an integer, its smallest value."""

    default: float
    integer: bool
    minimum: float


_DIRICHLET_PARAMS = {
    "beta": ParamSpec(0.3, integer=False, minimum=1e-6),
    "min_samples": ParamSpec(10, integer=True, minimum=0),
    "max_retries": ParamSpec(100, integer=True, minimum=1),
}
KIND_PARAMS: dict[str, dict[str, ParamSpec]] = {
    "pathological": {},
    "dirichlet": _DIRICHLET_PARAMS,
    "hierarchical": {
        **_DIRICHLET_PARAMS,
        "beta_fine": ParamSpec(10.0, integer=False, minimum=1e-6),
    },
    "domain": {"clients_per_domain": ParamSpec(1, integer=True, minimum=1), **_DIRICHLET_PARAMS},
}


def resolve_params(kind: str, params: Mapping[str, object]) -> dict[str, object]:
    """The parameters of partition `kind`, validated, with defaults filled in.

    Needs no data, so a config can be validated before any dataset is read. An unknown kind,
    an unknown key or a value of the wrong type or range is a ConfigError naming the key.
    """
    if kind not in KIND_PARAMS:
        raise ConfigError(f"partition.kind: unknown kind '{kind}'; known: {', '.join(KIND_PARAMS)}")
    specs = KIND_PARAMS[kind]
    unknown = sorted(set(params) - set(specs) - {"classes"})
    if unknown:
        raise ConfigError(
            f"partition.{unknown[0]}: not a parameter of partition kind '{kind}' "
            f"(known: {', '.join(['classes', *specs])})"
        )
    resolved: dict[str, object] = {"classes": params.get("classes", "base")}
    if resolved["classes"] not in CLASS_SETS:
        raise ConfigError(
            f"partition.classes: expected one of {', '.join(CLASS_SETS)}, "
            f"found {resolved['classes']!r}"
        )
    for key, spec in specs.items():
        value = params.get(key, spec.default)
        type_ok = isinstance(value, int) if spec.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not type_ok or not value >= spec.minimum:
            expected = f"an integer >= {int(spec.minimum)}" if spec.integer else "a positive number"
            raise ConfigError(f"partition.{key} ({kind}): expected {expected}, found {value!r}")
        resolved[key] = int(value) if spec.integer else float(value)
    return resolved


@dataclass(frozen=True)
class _Options:
    """Parameters shared by the Dirichlet-style kinds."""

    beta: float
    min_samples: int
    max_retries: int

    @classmethod
    def from_params(cls, params: dict) -> _Options:
        return cls(params["beta"], params["min_samples"], params["max_retries"])


def _sorted_list(values: Sequence[int] | np.ndarray) -> list[int]:
    return sorted(int(v) for v in values)


def _pool(
    splits: DatasetSplits,
    classes: Sequence[int],
    shots: int | None,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Training indices of `classes` (within `mask`): `shots` per class, or all when None."""
    labels = splits.train.labels
    within = np.ones(len(labels), dtype=bool) if mask is None else mask
    candidates = np.flatnonzero(within & np.isin(labels, classes))
    if shots is None:
        return candidates
    chosen = sample_shots(labels[candidates], classes, shots, rng, splits.classnames)
    return candidates[chosen]


def _split_by_proportions(
    train_pool: np.ndarray,
    test_pool: np.ndarray,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    classes: Sequence[int],
    num_clients: int,
    proportions: Callable[[np.random.Generator], dict[int, np.ndarray]],
    options: _Options,
    rng: np.random.Generator,
    what: str,
) -> list[tuple[list[int], list[int]]]:
    """Split each class's train and test pool over clients by the same drawn proportions.

    Draws again until every client holds >= min_samples train and test images; after
    max_retries draws that all fail it is a ConfigError.
    """
    by_class = {
        c: (train_pool[train_labels[train_pool] == c], test_pool[test_labels[test_pool] == c])
        for c in classes
    }
    best = -1
    for _ in range(options.max_retries):
        shares = proportions(rng)
        train_parts: list[list[int]] = [[] for _ in range(num_clients)]
        test_parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            cuts = np.cumsum(shares[c])[:-1]
            for pool, parts in zip(by_class[c], (train_parts, test_parts), strict=True):
                shuffled = rng.permutation(pool)
                for client, chunk in enumerate(np.split(shuffled, (cuts * len(pool)).astype(int))):
                    parts[client].extend(chunk.tolist())
        smallest = min(min(map(len, train_parts)), min(map(len, test_parts)))
        if smallest >= options.min_samples:
            return [
                (sorted(tr), sorted(te)) for tr, te in zip(train_parts, test_parts, strict=True)
            ]
        best = max(best, smallest)
    raise ConfigError(
        f"partition ({what}): no draw in {options.max_retries} gave every one of the "
        f"{num_clients} clients >= {options.min_samples} train and test images (best draw: "
        f"{best}); use fewer clients, a larger partition.beta or a smaller partition.min_samples"
    )


def _client_classes(splits: DatasetSplits, train: list[int], test: list[int]) -> list[int]:
    present = np.concatenate([splits.train.labels[train], splits.test.labels[test]])
    return _sorted_list(np.unique(present))


def _pathological(
    splits: DatasetSplits,
    classes: list[int],
    num_clients: int,
    shots: int | None,
    rng: np.random.Generator,
    params: dict,
) -> list[ClientPart]:
    count = len(classes)
    if num_clients > count:
        raise ConfigError(
            f"num_clients: a pathological partition gives every client its own classes, so "
            f"expected at most {count} clients (the number of training classes), "
            f"found {num_clients}"
        )
    # round(B/K) classes each, but never so many that a client would be left without any.
    size = int(np.floor(count / num_clients + 0.5))
    if num_clients > 1:
        size = min(size, (count - 1) // (num_clients - 1))
    order = [int(c) for c in rng.permutation(classes)]
    pool = _pool(splits, classes, shots, rng)
    clients = []
    for client in range(num_clients):
        owned = sorted(
            order[client * size :]
            if client == num_clients - 1
            else order[client * size : (client + 1) * size]
        )
        train = pool[np.isin(splits.train.labels[pool], owned)]
        test = np.flatnonzero(np.isin(splits.test.labels, owned))
        clients.append(ClientPart(client, _sorted_list(train), _sorted_list(test), owned))
    return clients


def _dirichlet(
    splits: DatasetSplits,
    classes: list[int],
    num_clients: int,
    shots: int | None,
    rng: np.random.Generator,
    params: dict,
) -> list[ClientPart]:
    options = _Options.from_params(params)
    pool = _pool(splits, classes, shots, rng)
    test_pool = np.flatnonzero(np.isin(splits.test.labels, classes))

    def proportions(generator: np.random.Generator) -> dict[int, np.ndarray]:
        return {c: generator.dirichlet(np.full(num_clients, options.beta)) for c in classes}

    parts = _split_by_proportions(
        pool,
        test_pool,
        splits.train.labels,
        splits.test.labels,
        classes,
        num_clients,
        proportions,
        options,
        rng,
        "dirichlet",
    )
    return [
        ClientPart(k, tr, te, _client_classes(splits, tr, te)) for k, (tr, te) in enumerate(parts)
    ]


def _hierarchical(
    splits: DatasetSplits,
    classes: list[int],
    num_clients: int,
    shots: int | None,
    rng: np.random.Generator,
    params: dict,
) -> list[ClientPart]:
    if splits.coarse_labels is None:
        raise ConfigError(
            f"partition.kind: 'hierarchical' needs coarse class labels (CIFAR-100), "
            f"dataset '{splits.name}' has none"
        )
    options = _Options.from_params(params)
    beta_fine = params["beta_fine"]
    groups: dict[int, list[int]] = {}
    for c in classes:
        groups.setdefault(int(splits.coarse_labels[c]), []).append(c)
    pool = _pool(splits, classes, shots, rng)
    test_pool = np.flatnonzero(np.isin(splits.test.labels, classes))

    def proportions(generator: np.random.Generator) -> dict[int, np.ndarray]:
        shares = {}
        for group in sorted(groups):
            members = groups[group]
            coarse = generator.dirichlet(np.full(num_clients, options.beta))
            fine = generator.dirichlet(np.full(len(members), beta_fine), size=num_clients)
            for position, c in enumerate(members):
                weight = coarse * fine[:, position]
                total = weight.sum()
                # A tiny beta_fine can underflow every weight; fall back to the coarse split.
                shares[c] = weight / total if total > 0 else coarse
        return shares

    parts = _split_by_proportions(
        pool,
        test_pool,
        splits.train.labels,
        splits.test.labels,
        classes,
        num_clients,
        proportions,
        options,
        rng,
        "hierarchical",
    )
    return [
        ClientPart(k, tr, te, _client_classes(splits, tr, te)) for k, (tr, te) in enumerate(parts)
    ]


def _domain(
    splits: DatasetSplits,
    classes: list[int],
    num_clients: int,
    shots: int | None,
    rng: np.random.Generator,
    params: dict,
) -> list[ClientPart]:
    if splits.domain_names is None or splits.train.domains is None or splits.test.domains is None:
        raise ConfigError(
            f"partition.kind: 'domain' needs a domain dataset (office_caltech10, domainnet), "
            f"dataset '{splits.name}' has no domains"
        )
    per_domain = params["clients_per_domain"]
    options = _Options.from_params(params)
    expected = len(splits.domain_names) * per_domain
    if num_clients != expected:
        raise ConfigError(
            f"num_clients: a domain partition of '{splits.name}' ({len(splits.domain_names)} "
            f"domains x partition.clients_per_domain={per_domain}) expects {expected} clients, "
            f"found {num_clients}"
        )
    clients: list[ClientPart] = []
    for domain_id, domain in enumerate(splits.domain_names):
        pool = _pool(splits, classes, shots, rng, mask=splits.train.domains == domain_id)
        test_pool = np.flatnonzero(
            (splits.test.domains == domain_id) & np.isin(splits.test.labels, classes)
        )
        if per_domain == 1:
            parts = [(_sorted_list(pool), _sorted_list(test_pool))]
        else:

            def proportions(generator: np.random.Generator) -> dict[int, np.ndarray]:
                return {c: generator.dirichlet(np.full(per_domain, options.beta)) for c in classes}

            parts = _split_by_proportions(
                pool,
                test_pool,
                splits.train.labels,
                splits.test.labels,
                classes,
                per_domain,
                proportions,
                options,
                rng,
                f"domain '{domain}'",
            )
        for train, test in parts:
            clients.append(
                ClientPart(len(clients), train, test, _client_classes(splits, train, test), domain)
            )
    return clients


Partitioner = Callable[
    [DatasetSplits, list[int], int, "int | None", np.random.Generator, dict],
    list[ClientPart],
]
KINDS: dict[str, Partitioner] = {
    "pathological": _pathological,
    "dirichlet": _dirichlet,
    "hierarchical": _hierarchical,
    "domain": _domain,
}


def make_partition(
    splits: DatasetSplits,
    kind: str,
    num_clients: int,
    shots: int | None,
    seed: int,
    **params: object,
) -> PartitionManifest:
    """Partition `splits` over `num_clients` clients; every random choice comes from `seed`.

    `shots` images per training class (None: all of them). `params` are the kind's
    parameters (module docstring); an unknown kind or parameter is a ConfigError.
    """
    resolved = resolve_params(kind, params)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients: expected a positive integer, found {num_clients!r}")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ConfigError(f"shots: expected a positive integer or null, found {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: expected an integer, found {seed!r}")
    if resolved["classes"] == "base":
        base, novel = base_novel_split(splits.num_classes)
    else:
        base, novel = list(range(splits.num_classes)), []
    rng = np.random.default_rng(seed)
    clients = KINDS[kind](splits, base, num_clients, shots, rng, resolved)
    recorded = {**resolved, "num_clients": num_clients, "shots": shots}
    return PartitionManifest(
        kind=kind,
        seed=seed,
        params=recorded,
        dataset=splits.name,
        dataset_fingerprint=splits.fingerprint(),
        base_classes=base,
        novel_classes=novel,
        base_test=_sorted_list(np.flatnonzero(np.isin(splits.test.labels, base))),
        novel_test=_sorted_list(np.flatnonzero(np.isin(splits.test.labels, novel))),
        clients=clients,
    )


def load_or_make_partition(
    splits: DatasetSplits,
    kind: str,
    num_clients: int,
    shots: int | None,
    seed: int,
    file: str | Path | None = None,
    **params: object,
) -> PartitionManifest:
    """The manifest in `file` (checked against `splits`) if given, else a new partition."""
    if file is None:
        return make_partition(splits, kind, num_clients, shots, seed, **params)
    manifest = PartitionManifest.load(file)
    manifest.check_matches(splits)
    if manifest.kind != kind or len(manifest.clients) != num_clients:
        raise ConfigError(
            f"partition.file {file}: holds a '{manifest.kind}' partition over "
            f"{len(manifest.clients)} clients, but the run asks for '{kind}' over "
            f"{num_clients}; make the config match the manifest"
        )
    return manifest
