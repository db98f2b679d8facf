"""Partitions: pathological, Dirichlet, hierarchical and domain, and the manifest file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpgp.data import (
    DatasetSplits,
    PartitionManifest,
    load_or_make_partition,
    make_partition,
    resolve_params,
)
from fedpgp.errors import ConfigError, DatasetError

Factory = Callable[..., DatasetSplits]


def mean_entropy(splits: DatasetSplits, manifest: PartitionManifest) -> float:
    """Mean over clients of the entropy of the client's training label distribution."""
    values = []
    for client in manifest.clients:
        counts = np.bincount(splits.train.labels[client.train], minlength=splits.num_classes)
        share = counts[counts > 0] / counts.sum()
        values.append(float(-(share * np.log(share)).sum()))
    return float(np.mean(values))


def assert_well_formed(splits: DatasetSplits, manifest: PartitionManifest) -> None:
    """Sorted index lists in range, each index at most once per split, base classes only."""
    base = set(manifest.base_classes)
    seen_train: list[int] = []
    for client in manifest.clients:
        for values, limit in ((client.train, len(splits.train)), (client.test, len(splits.test))):
            assert values == sorted(set(values))
            assert all(0 <= v < limit for v in values)
        assert set(splits.train.labels[client.train].tolist()) <= base
        assert set(splits.test.labels[client.test].tolist()) <= base
        seen_train += client.train
    assert len(seen_train) == len(set(seen_train))
    assert manifest.base_test == np.flatnonzero(np.isin(splits.test.labels, list(base))).tolist()


# ---------------------------------------------------------------- pathological


def test_pathological_disjoint_classes_cover_the_base(splits_factory: Factory) -> None:
    splits = splits_factory(20, 20, 5)
    manifest = make_partition(splits, "pathological", num_clients=3, shots=4, seed=0)
    owned = [c for client in manifest.clients for c in client.classes]
    assert sorted(owned) == manifest.base_classes == list(range(10))
    assert [len(c.classes) for c in manifest.clients] == [3, 3, 4]  # round(10/3), rest last
    for client in manifest.clients:
        counts = np.bincount(splits.train.labels[client.train], minlength=20)
        assert counts[client.classes].tolist() == [4] * len(client.classes)
        expected_test = np.flatnonzero(np.isin(splits.test.labels, client.classes)).tolist()
        assert client.test == expected_test
    assert manifest.novel_classes == list(range(10, 20))
    assert len(manifest.novel_test) == 50
    assert_well_formed(splits, manifest)


def test_pathological_is_seeded(splits_factory: Factory) -> None:
    splits = splits_factory(20, 20, 5)
    first = make_partition(splits, "pathological", 5, 4, seed=1)
    assert first.to_json() == make_partition(splits, "pathological", 5, 4, seed=1).to_json()
    other = make_partition(splits, "pathological", 5, 4, seed=2)
    assert [c.classes for c in first.clients] != [c.classes for c in other.clients]


def test_pathological_never_leaves_a_client_empty(splits_factory: Factory) -> None:
    splits = splits_factory(18, 3, 1)  # 9 base classes over 6 clients: round(1.5) would be 2
    manifest = make_partition(splits, "pathological", 6, None, seed=0)
    assert [len(c.classes) for c in manifest.clients] == [1, 1, 1, 1, 1, 4]


def test_pathological_more_clients_than_classes_is_a_config_error(
    splits_factory: Factory,
) -> None:
    splits = splits_factory(10, 4, 2)
    with pytest.raises(ConfigError, match=r"num_clients.*at most 5 clients.*found 6"):
        make_partition(splits, "pathological", 6, 2, seed=0)


def test_pathological_shots_beyond_the_data_names_the_class(splits_factory: Factory) -> None:
    splits = splits_factory(4, [5, 3, 5, 5], 2)
    with pytest.raises(DatasetError, match=r"shots=4: class 1 \('class 1'\) has only 3"):
        make_partition(splits, "pathological", 2, 4, seed=0)


# ---------------------------------------------------------------- dirichlet


def test_dirichlet_meets_the_minimum_and_skews_labels(splits_factory: Factory) -> None:
    splits = splits_factory(10, 200, 60)
    manifest = make_partition(splits, "dirichlet", 8, None, seed=0, beta=0.3)
    assert all(len(c.train) >= 10 and len(c.test) >= 10 for c in manifest.clients)
    # shots=None: every base training image goes to exactly one client.
    assert sum(len(c.train) for c in manifest.clients) == 5 * 200
    shares = [
        np.bincount(splits.train.labels[c.train], minlength=5) / len(c.train)
        for c in manifest.clients
    ]
    assert max(np.abs(a - b).max() for a in shares for b in shares) > 0.3
    assert manifest.params == {
        "beta": 0.3,
        "classes": "base",
        "max_retries": 100,
        "min_samples": 10,
        "num_clients": 8,
        "shots": None,
    }
    assert_well_formed(splits, manifest)


def test_dirichlet_test_split_follows_the_train_proportions(splits_factory: Factory) -> None:
    splits = splits_factory(10, 300, 300)
    manifest = make_partition(splits, "dirichlet", 4, None, seed=5, beta=0.5)
    for client in manifest.clients:
        train = np.bincount(splits.train.labels[client.train], minlength=5)
        test = np.bincount(splits.test.labels[client.test], minlength=5)
        assert np.abs(train - test).max() <= 1  # same proportions, same pool sizes


def test_larger_beta_is_more_even(splits_factory: Factory) -> None:
    splits = splits_factory(20, 100, 40)
    skewed = [
        mean_entropy(splits, make_partition(splits, "dirichlet", 5, None, s, beta=0.1))
        for s in range(3)
    ]
    even = [
        mean_entropy(splits, make_partition(splits, "dirichlet", 5, None, s, beta=10.0))
        for s in range(3)
    ]
    assert np.mean(even) > np.mean(skewed) + 0.5
    assert np.mean(even) > 0.9 * np.log(10)


def test_dirichlet_with_shots_takes_shots_first(splits_factory: Factory) -> None:
    splits = splits_factory(6, 50, 30)
    manifest = make_partition(splits, "dirichlet", 2, 16, seed=0, beta=1.0, min_samples=1)
    train = [i for c in manifest.clients for i in c.train]
    assert np.bincount(splits.train.labels[train]).tolist() == [16, 16, 16]


def test_dirichlet_gives_up_after_bounded_retries(splits_factory: Factory) -> None:
    splits = splits_factory(4, 10, 10)
    with pytest.raises(ConfigError, match=r"no draw in 7 .* 30 clients >= 10"):
        make_partition(splits, "dirichlet", 30, None, seed=0, max_retries=7)


def test_classes_all_trains_on_every_class(splits_factory: Factory) -> None:
    splits = splits_factory(6, 40, 20)
    manifest = make_partition(splits, "dirichlet", 2, None, 0, classes="all", min_samples=1)
    assert manifest.base_classes == list(range(6)) and manifest.novel_classes == []
    assert manifest.novel_test == []
    assert sum(len(c.train) for c in manifest.clients) == 6 * 40


# ---------------------------------------------------------------- hierarchical


def test_hierarchical_skews_coarse_classes(splits_factory: Factory) -> None:
    coarse = [c % 5 for c in range(40)]  # 5 coarse classes, 4 base fine classes each
    splits = splits_factory(40, 60, 20, coarse=coarse)
    manifest = make_partition(splits, "hierarchical", 6, None, seed=0, beta=0.1)
    assert all(len(c.train) >= 10 and len(c.test) >= 10 for c in manifest.clients)
    assert sum(len(c.train) for c in manifest.clients) == 20 * 60
    assert_well_formed(splits, manifest)

    def coarse_entropy(beta: float) -> float:
        values = []
        for seed in range(3):
            m = make_partition(splits, "hierarchical", 6, None, seed, beta=beta)
            for client in m.clients:
                groups = np.bincount(np.asarray(coarse)[splits.train.labels[client.train]], None, 5)
                share = groups[groups > 0] / groups.sum()
                values.append(-(share * np.log(share)).sum())
        return float(np.mean(values))

    assert coarse_entropy(10.0) > coarse_entropy(0.1) + 0.5


def test_hierarchical_needs_coarse_labels(splits_factory: Factory) -> None:
    with pytest.raises(ConfigError, match="coarse"):
        make_partition(splits_factory(10, 20, 20), "hierarchical", 2, None, seed=0)


# ---------------------------------------------------------------- domain


def test_one_client_per_domain(splits_factory: Factory) -> None:
    splits = splits_factory(6, 10, 4, domains=3)
    manifest = make_partition(splits, "domain", 3, 5, seed=0)
    for domain_id, client in enumerate(manifest.clients):
        assert client.domain == f"domain{domain_id}"
        assert set(splits.train.domains[client.train].tolist()) == {domain_id}
        assert np.bincount(splits.train.labels[client.train]).tolist() == [5, 5, 5]
        expected = np.flatnonzero(
            (splits.test.domains == domain_id) & (splits.test.labels < 3)
        ).tolist()
        assert client.test == expected
    assert_well_formed(splits, manifest)


def test_several_clients_per_domain(splits_factory: Factory) -> None:
    splits = splits_factory(6, 60, 30, domains=2)
    manifest = make_partition(splits, "domain", 4, None, 0, clients_per_domain=2, beta=0.5)
    assert [c.domain for c in manifest.clients] == ["domain0", "domain0", "domain1", "domain1"]
    for client in manifest.clients:
        domain_id = int(client.domain[-1])
        assert set(splits.train.domains[client.train].tolist()) == {domain_id}
        assert len(client.train) >= 10 and len(client.test) >= 10
    assert_well_formed(splits, manifest)


def test_domain_partition_checks_client_count_and_dataset(splits_factory: Factory) -> None:
    splits = splits_factory(6, 10, 4, domains=3)
    with pytest.raises(ConfigError, match=r"expects 6 clients, found 3"):
        make_partition(splits, "domain", 3, None, 0, clients_per_domain=2)
    with pytest.raises(ConfigError, match="no domains"):
        make_partition(splits_factory(6, 10, 4), "domain", 1, None, 0)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("kind", "params", "key"),
    [
        ("shuffle", {}, "partition.kind"),
        ("pathological", {"beta": 0.3}, "partition.beta"),
        ("dirichlet", {"beta": 0}, "partition.beta"),
        ("dirichlet", {"beta": "high"}, "partition.beta"),
        ("dirichlet", {"min_samples": 2.5}, "partition.min_samples"),
        ("domain", {"clients_per_domain": 0}, "partition.clients_per_domain"),
        ("dirichlet", {"classes": "novel"}, "partition.classes"),
    ],
)
def test_bad_parameters_name_the_key(kind: str, params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        resolve_params(kind, params)


def test_bad_run_arguments(splits_factory: Factory) -> None:
    splits = splits_factory(4, 5, 5)
    with pytest.raises(ConfigError, match="num_clients"):
        make_partition(splits, "pathological", 0, 1, 0)
    with pytest.raises(ConfigError, match="shots"):
        make_partition(splits, "pathological", 1, 0, 0)


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip_is_byte_identical(splits_factory: Factory, tmp_path: Path) -> None:
    splits = splits_factory(10, 30, 10)
    manifest = make_partition(splits, "dirichlet", 3, 8, seed=4, beta=0.5, min_samples=2)
    path = tmp_path / "run" / "partition.json"
    manifest.save(path)
    loaded = PartitionManifest.load(path)
    assert loaded.to_json() == manifest.to_json() == path.read_text()
    assert loaded.digest() == manifest.digest()
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["partition.json"]  # no temp file left
    loaded.check_matches(splits)
    assert loaded.clients[1].train == manifest.clients[1].train
    assert loaded.clients[1].test == manifest.clients[1].test


def test_a_manifest_reproduces_the_partition(splits_factory: Factory, tmp_path: Path) -> None:
    splits = splits_factory(10, 30, 10)
    made = load_or_make_partition(splits, "pathological", 5, 4, 3)
    made.save(tmp_path / "p.json")
    again = load_or_make_partition(splits, "pathological", 5, 4, 99, file=tmp_path / "p.json")
    assert again.to_json() == made.to_json()
    with pytest.raises(ConfigError, match=r"partition\.file"):
        load_or_make_partition(splits, "pathological", 4, 4, 3, file=tmp_path / "p.json")


def test_check_matches_rejects_a_changed_dataset(splits_factory: Factory) -> None:
    manifest = make_partition(splits_factory(10, 30, 10), "pathological", 5, 4, 0)
    changed = splits_factory(10, 30, 11)
    with pytest.raises(DatasetError, match="dataset_fingerprint"):
        manifest.check_matches(changed)
    with pytest.raises(DatasetError, match="key 'dataset'"):
        manifest.check_matches(splits_factory(10, 30, 10, name="other"))


def test_check_matches_rejects_indices_out_of_range(splits_factory: Factory) -> None:
    splits = splits_factory(10, 30, 10)
    manifest = make_partition(splits, "pathological", 5, 4, 0)
    manifest.clients[2].train = [*manifest.clients[2].train, len(splits.train)]
    with pytest.raises(DatasetError, match=r"clients\[2\].train"):
        manifest.check_matches(splits)


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.pop("seed"), "seed"),
        (lambda d: d.update(kind="random"), "kind"),
        (lambda d: d.update(base_test=[3, 1]), "base_test"),
        (lambda d: d["clients"][1].update(train="all"), r"clients\[1\].train"),
        (lambda d: d["clients"][0].update(id=7), r"clients\[0\].id"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_malformed_manifest_names_file_and_key(
    splits_factory: Factory, tmp_path: Path, mutate: Callable[[dict], object], key: str
) -> None:
    data = json.loads(make_partition(splits_factory(6, 4, 2), "pathological", 2, 2, 0).to_json())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"bad\.json: key '{key}'"):
        PartitionManifest.load(path)


def test_manifest_that_is_not_json_or_absent(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad\.json: expected valid JSON"):
        PartitionManifest.load(tmp_path / "bad.json")
    with pytest.raises(DatasetError, match=r"missing\.json: expected a file"):
        PartitionManifest.load(tmp_path / "missing.json")


# ---------------------------------------------------------------- properties

PROPERTY = settings(max_examples=30, derandomize=True, deadline=None)


@PROPERTY
@given(
    num_classes=st.integers(2, 30),
    clients=st.integers(1, 15),
    shots=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 2**32 - 1),
)
def test_pathological_properties(
    splits_factory: Factory, num_classes: int, clients: int, shots: int | None, seed: int
) -> None:
    splits = splits_factory(num_classes, 4, 2)
    base = (num_classes + 1) // 2
    if clients > base:
        with pytest.raises(ConfigError):
            make_partition(splits, "pathological", clients, shots, seed)
        return
    manifest = make_partition(splits, "pathological", clients, shots, seed)
    assert_well_formed(splits, manifest)
    owned = [c for client in manifest.clients for c in client.classes]
    assert sorted(owned) == list(range(base))  # disjoint and covering
    assert all(client.classes for client in manifest.clients)
    tests = [i for client in manifest.clients for i in client.test]
    assert sorted(tests) == manifest.base_test  # every base test image, once


@PROPERTY
@given(
    num_classes=st.integers(2, 12),
    clients=st.integers(1, 6),
    beta=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_properties(
    splits_factory: Factory, num_classes: int, clients: int, beta: float, seed: int
) -> None:
    splits = splits_factory(num_classes, 12, 6)
    manifest = make_partition(
        splits, "dirichlet", clients, None, seed, beta=beta, min_samples=0, max_retries=1
    )
    assert_well_formed(splits, manifest)
    train = sorted(i for client in manifest.clients for i in client.train)
    test = sorted(i for client in manifest.clients for i in client.test)
    assert train == np.flatnonzero(np.isin(splits.train.labels, manifest.base_classes)).tolist()
    assert test == manifest.base_test


@PROPERTY
@given(
    domains=st.integers(1, 4),
    per_domain=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_domain_properties(
    splits_factory: Factory, domains: int, per_domain: int, seed: int
) -> None:
    splits = splits_factory(4, 8, 4, domains=domains)
    manifest = make_partition(
        splits,
        "domain",
        domains * per_domain,
        None,
        seed,
        clients_per_domain=per_domain,
        min_samples=0,
    )
    assert_well_formed(splits, manifest)
    for client in manifest.clients:
        domain_id = splits.domain_names.index(client.domain)
        assert set(splits.train.domains[client.train].tolist()) <= {domain_id}
        assert set(splits.test.domains[client.test].tolist()) <= {domain_id}
    test = sorted(i for client in manifest.clients for i in client.test)
    assert test == manifest.base_test
