"""Everything a run needs, built once from a validated config: the frozen backbone, the dataset
and its partition manifest, the frozen features, the prompt banks and each client's data.

Both runtimes build an Experiment; a Flower node builds it for its own partition only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .backbone import BackboneSpec, FrozenCLIP
from .config import RunConfig, validate
from .data import load_dataset
from .data.datasets import DatasetSplits, ImageSource
from .data.features import FeatureCache, OnlineViews, Transform
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
class FeatureSets:
    """The test sets and every client's data, with one kind of image feature."""

    base: EvalSet
    novel: EvalSet | None
    client_data: dict[int, ClientData]


@dataclass
class Experiment:
    """The frozen world of one run. ``client_data[i]`` exists for every client built.

    ``base``, ``novel`` and ``client_data`` hold the features ``method`` reads: pooled image
    features, or patch features for a method that ``needs_patches``. An experiment built with
    patches keeps both kinds in ``feature_sets`` ("pooled", "patches"), so that
    :meth:`with_method` can hand it to any method.
    """

    cfg: RunConfig
    backbone: FrozenCLIP
    method: Method
    splits: DatasetSplits
    manifest: PartitionManifest
    base: EvalSet
    novel: EvalSet | None
    client_data: dict[int, ClientData] = field(default_factory=dict)
    feature_sets: dict[str, FeatureSets] = field(default_factory=dict)

    def with_method(self, name: str) -> Experiment:
        """The same frozen experiment driven by method ``name`` (the config re-validated), with
        the kind of features that method reads."""
        cfg = validate(dataclasses.replace(self.cfg, method=name))
        method = create_method(cfg, self.backbone.logit_scale)
        sets = self.feature_sets.get("patches" if method.needs_patches else "pooled")
        if sets is None:
            if method.needs_patches:
                raise ConfigError(
                    f"method: {name} needs patch features, and this experiment was built "
                    f"without them (build_experiment(..., patches=True))"
                )
            return dataclasses.replace(self, cfg=cfg, method=method)
        return dataclasses.replace(
            self,
            cfg=cfg,
            method=method,
            base=sets.base,
            novel=sets.novel,
            client_data=sets.client_data,
        )

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


def build_experiment(
    cfg: RunConfig, clients: Sequence[int] | None = None, patches: bool | None = None
) -> Experiment:
    """Load, partition and encode everything ``cfg`` needs; ``clients`` limits which clients'
    data is built (all by default). ``patches`` adds patch features (by default when the
    config's method needs them)."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    backbone = FrozenCLIP.load(backbone_spec(cfg)).to(device)
    if cfg.precision == "auto":
        backbone.autocast_dtype = torch.bfloat16
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
    cache = FeatureCache(cfg.cache_dir)
    encoder, encoder_id = backbone.encode_images, feature_identity(backbone)
    # One encoding of every test image the run needs, shared by all clients and metrics.
    test_features = cache.features(
        encoder, encoder_id, splits.test.images, test_indices, backbone.test_transform()
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
    train_images = splits.train.images
    if cfg.augment == "views":
        train_features = cache.views(
            encoder,
            encoder_id,
            train_images,
            train_indices,
            backbone.train_transform(),
            cfg.num_views,
        )
    elif cfg.augment == "none":
        train_features = cache.features(
            encoder, encoder_id, train_images, train_indices, backbone.test_transform()
        ).unsqueeze(0)
    else:
        # augment: online encodes every batch afresh in the step; nothing is stored.
        train_features = torch.empty(0, len(train_indices), backbone.embed_dim)
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
            online=OnlineViews(encoder, train_images, part.train, backbone.train_transform())
            if cfg.augment == "online"
            else None,
        )
    with_patches = method.needs_patches if patches is None else patches
    if with_patches:
        _add_patch_sets(experiment, cache, test_indices, train_indices)
    log.info(
        "experiment: %d train images, %d test images encoded, backbone %s",
        len(train_indices),
        len(test_indices),
        backbone.identity,
    )
    return experiment


def _add_patch_sets(
    experiment: Experiment,
    cache: FeatureCache,
    test_indices: Sequence[int],
    train_indices: Sequence[int],
) -> None:
    """Give ``experiment`` a second view of its test sets and clients with patch features
    (n, P, E), kept in float16, from cache entries of their own; make it the active view when
    the experiment's method reads patches."""
    cfg, backbone, splits = experiment.cfg, experiment.backbone, experiment.splits
    device, width = backbone.device, backbone.embed_dim
    encoder_id = f"{feature_identity(backbone)}/patches"

    def encoder(images: Tensor) -> Tensor:
        return backbone.encode_images_with_patches(images)[1]

    def encoded(
        images: ImageSource, indices: Sequence[int], transform: Transform, view: int | None = None
    ) -> Tensor:
        if not indices:
            return torch.empty(0, 0, width, dtype=torch.float16, device=device)
        # The cache stores (n, E) rows: one image's patches flattened into a row.
        flat = cache.features(
            lambda x: encoder(x).flatten(1), encoder_id, images, indices, transform, view
        )
        return flat.view(len(indices), -1, width).to(device, torch.float16)

    test = encoded(splits.test.images, test_indices, backbone.test_transform())
    test_row = {index: row for row, index in enumerate(test_indices)}

    def swap(pooled: EvalSet, indices: Sequence[int]) -> EvalSet:
        rows = torch.tensor([test_row[i] for i in indices], dtype=torch.long, device=device)
        return dataclasses.replace(pooled, features=test[rows])

    train_images = splits.train.images
    if cfg.augment == "views":
        transform = backbone.train_transform()
        train = torch.stack(
            [encoded(train_images, train_indices, transform, v) for v in range(cfg.num_views)]
        )
    elif cfg.augment == "none":
        train = encoded(train_images, train_indices, backbone.test_transform()).unsqueeze(0)
    else:
        train = torch.empty(0, len(train_indices), 0, width, device=device)
    train_row = {index: row for row, index in enumerate(train_indices)}

    manifest = experiment.manifest
    client_data = {}
    for cid, data in experiment.client_data.items():
        part = manifest.clients[cid]
        rows = torch.tensor([train_row[i] for i in part.train], dtype=torch.long, device=device)
        online = None
        if data.online is not None:
            online = OnlineViews(encoder, train_images, part.train, backbone.train_transform())
        client_data[cid] = dataclasses.replace(
            data, train_features=train[:, rows], local=swap(data.local, part.test), online=online
        )
    novel = experiment.novel
    experiment.feature_sets = {
        "pooled": FeatureSets(experiment.base, novel, experiment.client_data),
        "patches": FeatureSets(
            swap(experiment.base, manifest.base_test),
            None if novel is None else swap(novel, manifest.novel_test),
            client_data,
        ),
    }
    if experiment.method.needs_patches:
        active = experiment.feature_sets["patches"]
        experiment.base, experiment.novel = active.base, active.novel
        experiment.client_data = active.client_data


def feature_identity(backbone: FrozenCLIP) -> str:
    """What image features depend on besides the transform and the images: the weights, and
    the precision they were computed in (bf16 autocast on CUDA gives other numbers)."""
    autocast = backbone.autocast_dtype is not None and backbone.device.type == "cuda"
    precision = str(backbone.autocast_dtype).removeprefix("torch.") if autocast else "float32"
    return f"{backbone.identity}/{precision}"


def write_manifest(experiment: Experiment, out_dir: Path) -> Path:
    """Save the partition manifest in the run directory, for exact re-runs."""
    path = out_dir / "partition.json"
    experiment.manifest.save(path)
    return path
