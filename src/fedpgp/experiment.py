"""Everything a run needs, built once from a validated config: the frozen backbone, the dataset
and its partition manifest, the frozen features, the prompt banks and each client's data.

Both runtimes build an Experiment; a Flower node builds it for its own partition only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .backbone import BackboneSpec, FrozenCLIP
from .config import RunConfig
from .data import load_dataset
from .data.datasets import DatasetSplits
from .data.features import encode_images, encode_views
from .data.partition import PartitionManifest, make_partition
from .errors import ConfigError
from .evaluation import EvalSet
from .federation.client import ClientData
from .methods import Method, Tensors, create_method
from .prompts import PromptBank
from .seeding import torch_generator

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def backbone_spec(cfg: RunConfig) -> BackboneSpec:
    b = cfg.backbone
    return BackboneSpec(b.name, b.pretrained, b.file, b.init_seed, b.allow_torchscript)


def build_manifest(cfg: RunConfig, splits: DatasetSplits) -> PartitionManifest:
    """The partition named by ``partition.file``, or a new one drawn from the run seed."""
    if cfg.partition.file:
        manifest = PartitionManifest.load(cfg.partition.file)
        manifest.check_matches(splits)
    else:
        p = cfg.partition
        skew = {"beta": p.beta, "min_samples": p.min_samples}
        options = {
            "pathological": {},
            "dirichlet": skew,
            "hierarchical": skew,
            "domain": {"clients_per_domain": p.clients_per_domain, **skew},
        }[p.kind]
        manifest = make_partition(
            splits, p.kind, cfg.num_clients, cfg.shots, cfg.seed, classes=p.classes, **options
        )
    if len(manifest.clients) != cfg.num_clients:
        raise ConfigError(
            f"num_clients: {cfg.num_clients}, but the partition has {len(manifest.clients)} clients"
        )
    return manifest


def _positions(classes: Sequence[int]) -> dict[int, int]:
    return {label: position for position, label in enumerate(classes)}


def _relabel(labels: np.ndarray, positions: dict[int, int]) -> Tensor:
    return torch.tensor([positions[int(label)] for label in labels], dtype=torch.long)


@dataclass
class Experiment:
    """The frozen world of one run. ``client_data[i]`` exists for every client built."""

    cfg: RunConfig
    backbone: FrozenCLIP
    method: Method
    splits: DatasetSplits
    manifest: PartitionManifest
    base: EvalSet
    novel: EvalSet | None
    client_data: dict[int, ClientData] = field(default_factory=dict)

    def initial_global(self) -> Tensors:
        """The server's starting GLOBAL tensors, from the run seed."""
        generator = torch_generator(self.cfg.seed, "init", "global")
        tensors = self.method.init_global(self.backbone.text_width, generator)
        return {k: v.to(self.backbone.device) for k, v in tensors.items()}

    def initial_personal(self, client_id: int) -> Tensors:
        """Client ``client_id``'s starting PERSONAL tensors, from the run seed."""
        generator = torch_generator(self.cfg.seed, "init", "client", client_id)
        tensors = self.method.init_personal(self.backbone.text_width, generator)
        return {k: v.to(self.backbone.device) for k, v in tensors.items()}


def build_experiment(cfg: RunConfig, clients: Sequence[int] | None = None) -> Experiment:
    """Load, partition and encode everything ``cfg`` needs; ``clients`` limits which clients'
    data is built (all by default)."""
    device = resolve_device(cfg.device)
    backbone = FrozenCLIP.load(backbone_spec(cfg)).to(device)
    splits = load_dataset(cfg.dataset.name, cfg.dataset.root, **cfg.dataset.options)
    manifest = build_manifest(cfg, splits)
    method = create_method(cfg, backbone.logit_scale)
    wanted = list(range(len(manifest.clients))) if clients is None else list(clients)

    names = splits.classnames
    base_bank = PromptBank(backbone, [names[c] for c in manifest.base_classes], cfg.n_ctx)
    base_pos = _positions(manifest.base_classes)

    test_indices = sorted(
        set(manifest.base_test)
        | set(manifest.novel_test)
        | {i for c in wanted for i in manifest.clients[c].test}
    )
    test_row = {index: row for row, index in enumerate(test_indices)}
    encoder = backbone.encode_images
    test_features = encode_images(
        encoder, splits.test.images, test_indices, backbone.test_transform()
    ).to(device)

    def test_set(indices: Sequence[int], bank: PromptBank, positions: dict[int, int]) -> EvalSet:
        rows = torch.tensor([test_row[i] for i in indices], dtype=torch.long)
        labels = _relabel(splits.test.labels[list(indices)], positions)
        return EvalSet(test_features[rows.to(device)], labels.to(device), bank)

    base = test_set(manifest.base_test, base_bank, base_pos)
    novel = None
    if manifest.novel_classes:
        novel_bank = PromptBank(backbone, [names[c] for c in manifest.novel_classes], cfg.n_ctx)
        novel = test_set(manifest.novel_test, novel_bank, _positions(manifest.novel_classes))

    train_indices = sorted({i for c in wanted for i in manifest.clients[c].train})
    train_row = {index: row for row, index in enumerate(train_indices)}
    if cfg.augment == "views":
        train_features = encode_views(
            encoder,
            splits.train.images,
            train_indices,
            backbone.train_transform(),
            cfg.num_views,
        )
    else:
        train_features = encode_images(
            encoder, splits.train.images, train_indices, backbone.test_transform()
        ).unsqueeze(0)
    train_features = train_features.to(device)

    experiment = Experiment(cfg, backbone, method, splits, manifest, base, novel)
    for client_id in wanted:
        part = manifest.clients[client_id]
        if cfg.label_space == "client":
            bank = PromptBank(backbone, [names[c] for c in part.classes], cfg.n_ctx)
            positions = _positions(part.classes)
        else:
            bank, positions = base_bank, base_pos
        local = test_set(part.test, bank, positions)
        rows = torch.tensor([train_row[i] for i in part.train], dtype=torch.long, device=device)
        experiment.client_data[client_id] = ClientData(
            train_features=train_features[:, rows],
            train_labels=_relabel(splits.train.labels[part.train], positions).to(device),
            local=local,
        )
    log.info(
        "experiment: %d train images, %d test images encoded, backbone %s",
        len(train_indices),
        len(test_indices),
        backbone.identity,
    )
    return experiment


def write_manifest(experiment: Experiment, out_dir: Path) -> Path:
    """Save the partition manifest in the run directory, for exact re-runs."""
    path = out_dir / "partition.json"
    experiment.manifest.save(path)
    return path
