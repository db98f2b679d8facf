"""Everything a run needs, built once from a validated config: the frozen backbone, the dataset
and its partition manifest, the frozen features, the prompt banks and each client's data.

Both runtimes build an Experiment; a Flower node builds it for its own partition only. The
cheap checks come first: the config is validated before this is called, the dataset's layout
is read before any weights are loaded or downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .backbone import BackboneSpec, FrozenCLIP
from .backbone.prompted import PromptedImageTower
from .config import RunConfig, validate
from .console import PROGRESS
from .data import load_dataset
from .data.datasets import DatasetSplits, ImageSource
from .data.features import FeatureCache, OnlineViews
from .data.partition import PartitionManifest, load_or_make_partition
from .errors import ConfigError
from .methods.base import Method, method_for
from .prompts import PromptBank, PromptTemplate

log = logging.getLogger(__name__)

# The kinds of image feature (``Method.image_kind``): pooled (n, E), patch tokens (n, P, E),
# and the stem, the tokens entering the image tower's first block (n, 1 + P, D_v); "stem@k"
# is the tokens entering block k.
POOLED, PATCHES, STEM = "pooled", "patches", "stem"
KINDS = (POOLED, PATCHES, STEM)


def stem_block(kind: str) -> int | None:
    """The block a stem kind enters ("stem": 0, "stem@k": k), None for another kind; a
    ValueError for a kind that is none of :data:`KINDS` nor "stem@k" with k >= 1."""
    if kind == STEM:
        return 0
    if kind.startswith(STEM + "@"):
        block = kind[len(STEM) + 1 :]
        if block.isdigit() and str(int(block)) == block and int(block) >= 1:
            return int(block)
    if kind in KINDS:
        return None
    raise ValueError(f"unknown image feature kind {kind!r}, expected one of {KINDS} or 'stem@k'")


@dataclass
class EvalSet:
    """A test set: its rows of the run's test features ``source`` (every test image the run
    needs, encoded once and shared by every set) and its labels as indices into ``bank``."""

    source: Tensor
    rows: Tensor
    labels: Tensor
    bank: PromptBank

    @property
    def features(self) -> Tensor:
        """This set's frozen image features."""
        return self.source[self.rows]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ClientData:
    """Frozen image features of one client. ``train_features`` is (views, n, ...); labels index
    into ``local.bank``, the client's label space (all base classes, or its own). With
    ``online`` set (``augment: online``) every batch is augmented and encoded afresh instead,
    and ``train_features`` holds no view."""

    train_features: Tensor
    train_labels: Tensor
    local: EvalSet
    online: OnlineViews | None = None

    @property
    def bank(self) -> PromptBank:
        return self.local.bank

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])


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


def load_backbone(cfg: RunConfig, device: torch.device | str = "cpu") -> FrozenCLIP:
    """The config's frozen CLIP on ``device``, with bf16 autocast on CUDA for ``precision:
    auto``."""
    backbone = FrozenCLIP.load(backbone_spec(cfg)).to(device)
    if cfg.precision == "auto":
        backbone.autocast_dtype = torch.bfloat16
    return backbone


def describe_backbone(cfg: RunConfig) -> str:
    """The config's backbone and where its weights come from, for a progress line."""
    b = cfg.backbone
    if b.file:
        return f"{b.name} (weights {b.file})"
    if b.pretrained:
        return f"{b.name} (weights {b.pretrained})"
    return f"{b.name} (random weights, seed {b.init_seed})"


def partition_options(cfg: RunConfig) -> dict[str, object]:
    """The partition kind's own parameters from the config's ``partition`` section."""
    p = cfg.partition
    skew = {"beta": p.beta, "min_samples": p.min_samples}
    return {
        "pathological": {},
        "dirichlet": skew,
        "hierarchical": skew,
        "domain": {"clients_per_domain": p.clients_per_domain, **skew},
    }[p.kind]


def load_data(cfg: RunConfig) -> tuple[DatasetSplits, PartitionManifest]:
    """The dataset and the run's partition manifest (``partition.file``, or drawn from the run
    seed); reads no image and loads no model, so a bad dataset is reported before anything
    expensive happens."""
    splits = load_dataset(cfg.dataset.name, cfg.dataset.root, **cfg.dataset.options)
    p = cfg.partition
    manifest = load_or_make_partition(
        splits,
        p.kind,
        cfg.num_clients,
        cfg.shots,
        cfg.seed,
        file=p.file or None,
        classes=p.classes,
        **partition_options(cfg),
    )
    return splits, manifest


def feature_identity(backbone: FrozenCLIP) -> str:
    """What image features depend on besides the transform and the images: the weights, and
    the precision they were computed in (bf16 autocast on CUDA gives other numbers)."""
    autocast = backbone.autocast_dtype is not None and backbone.device.type == "cuda"
    precision = str(backbone.autocast_dtype).removeprefix("torch.") if autocast else "float32"
    return f"{backbone.identity}/{precision}"


@dataclass
class FeatureSets:
    """The test sets and every client's data, with one kind of image feature."""

    base: EvalSet
    novel: EvalSet | None
    client_data: dict[int, ClientData]


@dataclass
class Experiment:
    """The frozen world of one run. ``client_data[i]`` exists for every client built.

    ``base``, ``novel`` and ``client_data`` hold the features ``method`` reads (its
    ``image_kind``), with the labels of the method's label space. ``feature_sets`` holds every
    (kind, label space) that was built (POOLED and the kinds asked for; the label spaces asked
    for), so that :meth:`with_method` can hand the experiment to any of those methods.
    """

    cfg: RunConfig
    backbone: FrozenCLIP
    method: Method
    splits: DatasetSplits
    manifest: PartitionManifest
    base: EvalSet
    novel: EvalSet | None
    client_data: dict[int, ClientData] = field(default_factory=dict)
    feature_sets: dict[tuple[str, str], FeatureSets] = field(default_factory=dict)

    def with_method(self, name: str, label_space: str | None = None) -> Experiment:
        """The same frozen experiment driven by method ``name`` (the config re-validated), with
        the kind of features that method reads, over its label space (or ``label_space``), and
        prompt banks of its template."""
        cfg = validate(dataclasses.replace(self.cfg, method=name))
        method = method_for(cfg, self.backbone)
        kind = method.image_kind
        space = method.label_space if label_space is None else label_space
        if not any(k == kind for k, _ in self.feature_sets):
            raise ConfigError(
                f"method: {name} reads image features of kind {kind!r}, and this experiment "
                f"was built without them (build_experiment(..., methods=[{name!r}]))"
            )
        if (kind, space) not in self.feature_sets:
            raise ConfigError(
                f"method: {name} trains with label_space {space}, and this experiment was "
                f"built without it (build_experiment(..., label_spaces=[{space!r}]))"
            )
        sets = _with_template(self.feature_sets[(kind, space)], method.template, self.backbone)
        return dataclasses.replace(
            self,
            cfg=cfg,
            method=method,
            base=sets.base,
            novel=sets.novel,
            client_data=sets.client_data,
        )


def _with_template(
    sets: FeatureSets, template: PromptTemplate, backbone: FrozenCLIP
) -> FeatureSets:
    """``sets`` with every prompt bank rebuilt with ``template`` (the same class lists; banks
    shared between sets stay shared), or ``sets`` itself when its banks have that template."""
    banks: dict[int, PromptBank] = {}

    def rebuilt(test_set: EvalSet) -> EvalSet:
        bank = test_set.bank
        if bank.template == template:
            return test_set
        if id(bank) not in banks:
            banks[id(bank)] = PromptBank(backbone, bank.classnames, *template)
        return dataclasses.replace(test_set, bank=banks[id(bank)])

    novel = None if sets.novel is None else rebuilt(sets.novel)
    clients = {
        cid: dataclasses.replace(data, local=rebuilt(data.local))
        for cid, data in sets.client_data.items()
    }
    return FeatureSets(rebuilt(sets.base), novel, clients)


def _positions(classes: Sequence[int]) -> dict[int, int]:
    return {label: position for position, label in enumerate(classes)}


def _relabel(labels: np.ndarray, positions: dict[int, int]) -> Tensor:
    return torch.tensor([positions[int(label)] for label in labels], dtype=torch.long)


def image_encoder(backbone: FrozenCLIP, kind: str) -> tuple[Callable[[Tensor], Tensor], int]:
    """The encoder of image feature ``kind`` (transformed images in, features out) and the
    width of its features (of one token, for a token kind)."""
    if kind == PATCHES:
        return (lambda images: backbone.encode_images_with_patches(images)[1]), backbone.embed_dim
    block = stem_block(kind)
    if block is not None:
        tower = PromptedImageTower(backbone)
        return (lambda images: tower.stem(images, block)), tower.width
    return backbone.encode_images, backbone.embed_dim


class _Features:
    """One kind of image feature (:data:`KINDS`; token kinds are kept in float16) of the
    images a run needs, through the feature cache."""

    def __init__(self, backbone: FrozenCLIP, cache: FeatureCache, kind: str) -> None:
        self.backbone, self.cache, self.kind = backbone, cache, kind
        self.identity = feature_identity(backbone) + ("" if kind == POOLED else f"/{kind}")
        self.encoder, self.width = image_encoder(backbone, kind)

    def _stored(self, features: Tensor, count: int) -> Tensor:
        device = self.backbone.device
        if self.kind == POOLED:
            return features.to(device)
        return features.view(count, -1, self.width).to(device, torch.float16)

    def encode(
        self,
        images: ImageSource,
        indices: Sequence[int],
        transform: Callable,
        view: int | None = None,
        what: str = "images",
    ) -> Tensor:
        """Features of ``images[i]`` for i in ``indices``, from the cache where it holds them;
        ``what`` names the images in the progress line."""
        if not indices and self.kind != POOLED:
            return torch.empty(0, 0, self.width, device=self.backbone.device)
        # The cache stores one row per image: a token kind's tokens flattened into it.
        encoder = self.encoder if self.kind == POOLED else lambda x: self.encoder(x).flatten(1)
        if self.kind != POOLED:
            what += f" ({self.kind})"
        flat = self.cache.features(
            encoder, self.identity, images, indices, transform, view, what=what
        )
        return self._stored(flat, len(indices))

    def cached(
        self, images: ImageSource, indices: Sequence[int], transform: Callable, view: int | None
    ) -> bool:
        """Whether :meth:`encode` would take all of these features from the cache."""
        return self.cache.holds(self.identity, images, indices, transform, view)

    def train_views(self, cfg: RunConfig) -> list[tuple[Callable, int | None]]:
        """(transform, view) of each stored training view: ``num_views`` random ones for
        ``augment: views``, the test transform for ``none``, none for ``online``."""
        if cfg.augment == "views":
            transform = self.backbone.train_transform()
            return [(transform, v) for v in range(cfg.num_views)]
        if cfg.augment == "none":
            return [(self.backbone.test_transform(), None)]
        return []

    def train(self, cfg: RunConfig, images: ImageSource, indices: Sequence[int]) -> Tensor:
        """(views, n, ...) training features of :meth:`train_views` (online: no view)."""
        backbone = self.backbone
        views = self.train_views(cfg)
        if views:
            return torch.stack(
                [self.encode(images, indices, t, v, "train images") for t, v in views]
            )
        # augment: online encodes every batch afresh in the step; nothing is stored.
        shape = (0, len(indices), backbone.embed_dim)
        if self.kind != POOLED:
            shape = (0, len(indices), 0, self.width)
        return torch.empty(shape, device=backbone.device)


def _image_indices(
    manifest: PartitionManifest, wanted: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The test images (the Base and Novel test sets, and the local ones of clients
    ``wanted``) and the training images of those clients, each sorted."""
    test = set(manifest.base_test) | set(manifest.novel_test)
    test |= {i for c in wanted for i in manifest.clients[c].test}
    train = {i for c in wanted for i in manifest.clients[c].train}
    return sorted(test), sorted(train)


def features_cached(
    cfg: RunConfig,
    backbone: FrozenCLIP,
    splits: DatasetSplits,
    manifest: PartitionManifest,
    kinds: Sequence[str],
) -> bool:
    """Whether the feature cache holds every image feature that building the experiment of
    ``cfg`` (every client; pooled features and those of ``kinds``) would encode, so that a dry
    run can tell which runs still have images to encode; encodes nothing."""
    cache = FeatureCache(cfg.cache_dir)
    test_indices, train_indices = _image_indices(manifest, range(len(manifest.clients)))
    for kind in _kinds(kinds):
        features = _Features(backbone, cache, kind)
        test = (splits.test.images, test_indices, backbone.test_transform(), None)
        train = [(splits.train.images, train_indices, *view) for view in features.train_views(cfg)]
        if not all(features.cached(*request) for request in [test, *train]):
            return False
    return True


def _kinds(asked: Sequence[str]) -> list[str]:
    """POOLED and the kinds ``asked``, each once, in :data:`KINDS` order, then the later stems
    by block; a ValueError for an unknown kind."""
    later = sorted({kind for kind in asked if stem_block(kind)}, key=stem_block)
    return [kind for kind in KINDS if kind == POOLED or kind in asked] + later


def _feature_sets(
    cfg: RunConfig,
    features: _Features,
    splits: DatasetSplits,
    manifest: PartitionManifest,
    banks: dict[str, PromptBank],
    wanted: Sequence[int],
    label_space: str,
) -> FeatureSets:
    """Base and Novel test sets and the data of clients ``wanted``, with one kind of feature,
    labelled over ``label_space``."""
    backbone, device = features.backbone, features.backbone.device
    base_pos = _positions(manifest.base_classes)
    test_indices, train_indices = _image_indices(manifest, wanted)
    test_row = {index: row for row, index in enumerate(test_indices)}
    # One encoding of every test image the run needs, shared by all clients and metrics.
    test_features = features.encode(
        splits.test.images, test_indices, backbone.test_transform(), what="test images"
    )

    def test_set(indices: Sequence[int], bank: PromptBank, positions: dict[int, int]) -> EvalSet:
        rows = torch.tensor([test_row[i] for i in indices], dtype=torch.long, device=device)
        labels = _relabel(splits.test.labels[list(indices)], positions)
        return EvalSet(test_features, rows, labels.to(device), bank)

    base = test_set(manifest.base_test, banks["base"], base_pos)
    novel = None
    if manifest.novel_classes:
        novel = test_set(manifest.novel_test, banks["novel"], _positions(manifest.novel_classes))
    train_row = {index: row for row, index in enumerate(train_indices)}
    train_images = splits.train.images
    train_features = features.train(cfg, train_images, train_indices).to(device)
    client_data = {}
    for client_id in wanted:
        part = manifest.clients[client_id]
        if label_space == "client":
            bank = banks[f"client/{client_id}"]
            positions = _positions(part.classes)
        else:
            bank, positions = banks["base"], base_pos
        rows = torch.tensor([train_row[i] for i in part.train], dtype=torch.long, device=device)
        online = None
        if cfg.augment == "online":
            online = OnlineViews(
                features.encoder, train_images, part.train, backbone.train_transform()
            )
        client_data[client_id] = ClientData(
            train_features=train_features[:, rows],
            train_labels=_relabel(splits.train.labels[part.train], positions).to(device),
            local=test_set(part.test, bank, positions),
            online=online,
        )
    return FeatureSets(base, novel, client_data)


def _banks(
    template: PromptTemplate,
    backbone: FrozenCLIP,
    splits: DatasetSplits,
    manifest: PartitionManifest,
    wanted: Sequence[int],
    label_spaces: set[str],
) -> dict[str, PromptBank]:
    """One prompt bank per class list the run classifies over, built with ``template``: the
    base classes, the novel ones, and for label space ``client`` each client's own."""
    names = splits.classnames

    def bank(classes: Sequence[int]) -> PromptBank:
        return PromptBank(backbone, [names[c] for c in classes], *template)

    banks = {"base": bank(manifest.base_classes)}
    if manifest.novel_classes:
        banks["novel"] = bank(manifest.novel_classes)
    if "client" in label_spaces:
        for client_id in wanted:
            banks[f"client/{client_id}"] = bank(manifest.clients[client_id].classes)
    return banks


def build_experiment(
    cfg: RunConfig,
    clients: Sequence[int] | None = None,
    kinds: Sequence[str] = (),
    label_spaces: Sequence[str] = (),
    methods: Sequence[str] = (),
) -> Experiment:
    """Load, partition and encode everything ``cfg`` needs; ``clients`` limits which clients'
    data is built (all by default). Pooled features and those of the config's method are
    built, and also the kinds of image feature ``kinds`` (:data:`KINDS`, "stem@k");
    ``label_spaces`` adds client data labelled over those label spaces besides the method's
    own; ``methods`` adds the kind and label space of each of these methods (the config's
    settings), so that :meth:`Experiment.with_method` can hand the experiment to them."""
    torch.set_num_threads(cfg.threads)
    splits, manifest = load_data(cfg)
    log.info(
        "dataset %s: %d train / %d test images, %d classes; partition %s over %d clients",
        splits.name,
        len(splits.train),
        len(splits.test),
        splits.num_classes,
        cfg.partition.kind,
        len(manifest.clients),
        extra=PROGRESS,
    )
    device = resolve_device(cfg.device)
    log.info("loading backbone %s on %s", describe_backbone(cfg), device, extra=PROGRESS)
    backbone = load_backbone(cfg, device)
    method = method_for(cfg, backbone)
    others = [method_for(validate(dataclasses.replace(cfg, method=m)), backbone) for m in methods]
    wanted = list(range(len(manifest.clients))) if clients is None else list(clients)
    spaces = sorted({method.label_space, *label_spaces, *(m.label_space for m in others)})
    banks = _banks(method.template, backbone, splits, manifest, wanted, set(spaces))
    cache = FeatureCache(cfg.cache_dir)
    asked = [method.image_kind, *kinds, *(m.image_kind for m in others)]
    sets = {
        (kind, space): _feature_sets(
            cfg, _Features(backbone, cache, kind), splits, manifest, banks, wanted, space
        )
        for kind in _kinds(asked)
        for space in spaces
    }
    active = sets[(method.image_kind, method.label_space)]
    log.info(
        "experiment: %d clients, %d test images, backbone %s",
        len(wanted),
        len(active.base) + (0 if active.novel is None else len(active.novel)),
        backbone.identity,
    )
    return Experiment(
        cfg,
        backbone,
        method,
        splits,
        manifest,
        active.base,
        active.novel,
        active.client_data,
        sets,
    )
