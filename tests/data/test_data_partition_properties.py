"""Property test of the hierarchical Dirichlet partition (the other kinds have theirs in
test_data_partition.py): random sizes, every base training image once, every base test image
once, each client inside the base classes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_partition import assert_well_formed

from fedpgp.data import make_partition
from fedpgp.data.datasets import DatasetSplits


@settings(max_examples=30, derandomize=True, deadline=None)
@given(
    groups=st.integers(1, 5),
    per_group=st.integers(1, 4),
    clients=st.integers(1, 6),
    beta=st.floats(0.05, 20.0),
    beta_fine=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_hierarchical_properties(
    splits_factory: Callable[..., DatasetSplits],
    groups: int,
    per_group: int,
    clients: int,
    beta: float,
    beta_fine: float,
    seed: int,
) -> None:
    num_classes = groups * per_group
    coarse = [c % groups for c in range(num_classes)]
    splits = splits_factory(num_classes, 6, 3, coarse=coarse)
    manifest = make_partition(
        splits,
        "hierarchical",
        clients,
        None,
        seed,
        beta=beta,
        beta_fine=beta_fine,
        min_samples=0,
        max_retries=1,
    )
    assert_well_formed(splits, manifest)
    assert len(manifest.clients) == clients
    base = manifest.base_classes
    train = sorted(i for client in manifest.clients for i in client.train)
    test = sorted(i for client in manifest.clients for i in client.test)
    assert train == np.flatnonzero(np.isin(splits.train.labels, base)).tolist()
    assert test == manifest.base_test
    for client in manifest.clients:
        held = set(splits.train.labels[client.train].tolist())
        assert held <= set(client.classes) <= set(base)
