"""Every file in configs/ validates, names a registered dataset and a partition that its
dataset (at its real class and image counts, synthesised) can satisfy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedpgp.config import load_config, method_lr
from fedpgp.data import DatasetSplits, dataset_names, make_partition, resolve_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (classes, train images per class, test images per class, domains) of the real datasets,
# rounded down: partitions that work at these sizes work on the real data.
REAL_SIZES = {
    "caltech101": (100, 20, 10, 0),
    "oxford_pets": (37, 80, 80, 0),
    "oxford_flowers": (102, 20, 20, 0),
    "food101": (101, 200, 100, 0),
    "dtd": (47, 60, 30, 0),
    "cifar10": (10, 5000, 1000, 0),
    "cifar100": (100, 500, 100, 0),
    "office_caltech10": (10, 6, 2, 4),
    "domainnet": (10, 40, 15, 6),
}


def config_files() -> list[pytest.param]:
    return [pytest.param(path, id=path.name) for path in sorted(CONFIGS.glob("*.yaml"))]


def test_configs_cover_the_paper() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    clip = ["caltech101", "oxford_pets", "oxford_flowers", "food101", "dtd"]
    expected = {*clip, *(f"{n}_8shot" for n in clip), "cifar10", "cifar100"}
    expected |= {"cifar100_hierarchical", "office_caltech10", "domainnet"}
    assert expected <= names


@pytest.mark.parametrize("path", config_files())
def test_config_validates_and_its_partition_is_feasible(
    path: Path, splits_factory: Callable[..., DatasetSplits]
) -> None:
    cfg = load_config(path)
    assert cfg.dataset.name in dataset_names()
    raw = yaml.safe_load(path.read_text())["partition"]
    params = {k: v for k, v in raw.items() if k not in ("kind", "file")}
    resolve_params(cfg.partition.kind, params)

    classes, train, test, domains = REAL_SIZES[cfg.dataset.name]
    coarse = list(np.random.default_rng(0).permutation(np.arange(classes) % 20))
    splits = splits_factory(
        classes,
        train,
        test,
        domains=domains,
        coarse=coarse if cfg.dataset.name == "cifar100" else None,
        name=cfg.dataset.name,
    )
    manifest = make_partition(
        splits, cfg.partition.kind, cfg.num_clients, cfg.shots, cfg.seed, **params
    )
    assert len(manifest.clients) == cfg.num_clients


@pytest.mark.parametrize("path", config_files())
def test_config_uses_the_papers_optimizer(path: Path) -> None:
    # The defaults are the offline world's protocol; a paper experiment must not inherit them.
    cfg = load_config(path)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip) == (0.001, 0.9, 5e-4, None)
    # Nor FedOTP's own learning rate on the world (fedotp.lr).
    assert method_lr(cfg, "fedotp") == 0.001
    assert (cfg.rounds, cfg.local_epochs) == (25, 2)
