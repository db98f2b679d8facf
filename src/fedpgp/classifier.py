"""A trained prompt as an image classifier: one client's personalized prompt or a run's global
prompt, with the frozen CLIP it was trained on, over any list of class names (a prompt is a
context, so it classifies whatever names it is given). Read from a run directory or from a file
that ``fedpgp export`` wrote (docs/using.md)::

    import fedpgp
    clf = fedpgp.load_classifier("runs/my-run", client=0)
    print(clf.classes)
    print(clf.predict(["cat.jpg", "dog.png"]))

An exported file is a safetensors file of the tensors the prompt predicts with; its metadata
holds the format, the predicting method, the backbone's identity (name and weights hash), the
class names and the run's config, so the file alone rebuilds the classifier.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from . import __version__
from .atomic import write_bytes_atomic
from .config import RunConfig, config_from_dict
from .errors import BackboneError, CheckpointError, ConfigError
from .experiment import POOLED, image_encoder, load_backbone, resolve_device
from .methods.base import Method, Tensors, method_for
from .prompts import PromptBank
from .trained import TrainedRun

if TYPE_CHECKING:
    from .backbone import FrozenCLIP

FORMAT, VERSION = "fedpgp-prompt", "1"
# Images encoded, and logits computed, per call: bounds memory for any number of images.
BATCH = 64


def read_class_file(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines skipped); ConfigError naming the file when it
    cannot be read, is empty or repeats a name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--classes {path}: cannot be read ({exc})") from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"--classes {path}: no class name in it (expected one per line)")
    return check_classes(names, f"--classes {path}")


def check_classes(names: Sequence[str], what: str = "classes") -> list[str]:
    """``names`` as a list; ConfigError when it is empty or repeats a name."""
    names = [str(name) for name in names]
    if not names:
        raise ConfigError(f"{what}: expected at least one class name")
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if repeated:
        raise ConfigError(f"{what}: class names repeated: {sorted(set(repeated))[:5]}")
    return names


@dataclass
class Prompt:
    """What a classifier predicts with: the method that predicts, its tensors, the run's config,
    where it comes from (``client`` an id, or None for the global prompt) and the identity of
    the backbone it was trained on (None: whatever the config builds)."""

    method: str
    tensors: Tensors
    cfg: RunConfig
    client: int | None
    source: str
    backbone_identity: str | None = None


class Classifier:
    """Classifies images with a trained prompt over ``classes``."""

    def __init__(
        self, prompt: Prompt, classes: Sequence[str], backbone: FrozenCLIP | None = None
    ) -> None:
        cfg = prompt.cfg
        self.prompt = prompt
        self.backbone = (
            load_backbone(cfg, resolve_device(cfg.device)) if backbone is None else backbone
        )
        found = self.backbone.identity
        if prompt.backbone_identity is not None and found != prompt.backbone_identity:
            raise BackboneError(
                f"{prompt.source}: trained on backbone {prompt.backbone_identity}, but the "
                f"config's backbone loads as {found} (other weights)"
            )
        self.method: Method = method_for(cfg, self.backbone, prompt.method)
        device = self.backbone.device
        self.params = {k: v.to(device) for k, v in prompt.tensors.items()}
        self.classes = check_classes(classes)
        self.bank = PromptBank(self.backbone, self.classes, *self.method.template)
        self._transform = self.backbone.test_transform()

    def with_classes(self, classes: Sequence[str]) -> Classifier:
        """The same prompt over other class names."""
        return Classifier(self.prompt, classes, self.backbone)

    def features(self, images: Iterable[Image.Image | str | Path]) -> Tensor:
        """The image features :meth:`logits` reads (its method's ``image_kind``), as a run
        computes them: RGB, the test transform."""
        from .data.datasets import read_image, to_rgb

        pictures = [
            to_rgb(image) if isinstance(image, Image.Image) else read_image(Path(image))
            for image in images
        ]
        chunks = []
        kind = self.method.image_kind
        encoder, _ = image_encoder(self.backbone, kind)
        with torch.no_grad():
            for start in range(0, len(pictures), BATCH):
                batch = torch.stack([self._transform(p) for p in pictures[start : start + BATCH]])
                features = encoder(batch)
                # Token kinds in half precision, as a run keeps them.
                chunks.append(features if kind == POOLED else features.to(torch.float16))
        if not chunks:
            return torch.empty(0, self.backbone.embed_dim, device=self.backbone.device)
        return torch.cat(chunks)

    def logits(self, features: Tensor) -> Tensor:
        """Logits (N, C) over :attr:`classes` of image features (see :meth:`features`)."""
        features = features.to(self.backbone.device)
        if not len(features):
            return torch.empty(0, len(self.classes), device=self.backbone.device)
        with torch.no_grad():
            chunks = features.split(BATCH)
            return torch.cat([self.method.image_logits(self.params, self.bank, c) for c in chunks])

    def probabilities(self, images: Iterable[Image.Image | str | Path]) -> Tensor:
        """Class probabilities (N, C): the softmax of the logits."""
        return self.logits(self.features(images)).softmax(dim=-1)

    def predict(self, images: Iterable[Image.Image | str | Path]) -> list[str]:
        """The most probable class name of each image (PIL images or image file paths)."""
        logits = self.logits(self.features(images))
        return [self.classes[i] for i in logits.argmax(dim=-1).tolist()]


# -- from a run directory --------------------------------------------------------------------


def run_prompt(run: TrainedRun, client: int | None, backbone: FrozenCLIP) -> Prompt:
    """Client ``client``'s personalized prompt of ``run``, or its global prompt for None
    (ConfigError where the method has no such prompt), on the run's ``backbone``."""
    cfg = run.cfg
    method = method_for(cfg, backbone)
    run.bind(method, backbone.text_width)
    if client is None:
        name, tensors = run.global_predictor(method)
    else:
        run.check_client(method, client)
        name, tensors = cfg.method, run.client_params(method, client)
    where = f"RUN {run.path}" + ("" if client is None else f" client {client}")
    return Prompt(name, tensors, cfg, client, where, backbone.identity)


def run_classes(cfg: RunConfig, run_path: Path) -> list[str]:
    """The run's base classes by name, from its dataset (read, not its images) and its
    partition.json; an error says to give the names instead when the dataset is not here."""
    from .data import load_dataset
    from .data.partition import PartitionManifest

    try:
        splits = load_dataset(cfg.dataset.name, cfg.dataset.root, **cfg.dataset.options)
    except Exception as exc:
        raise ConfigError(
            f"the class names of RUN {run_path} come from its dataset {cfg.dataset.name} at "
            f"{cfg.dataset.root}, which cannot be read here ({exc}); give them with --classes FILE"
        ) from exc
    manifest = PartitionManifest.load(run_path / "partition.json")
    return [splits.classnames[c] for c in manifest.base_classes]


# -- exported files ----------------------------------------------------------------------------


def export_prompt(prompt: Prompt, classes: Sequence[str], out: str | Path) -> Path:
    """Write ``prompt`` and its metadata to the safetensors file ``out`` (atomically)."""
    from safetensors.torch import save

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder, expected a file name (.safetensors)")
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "fedpgp_version": __version__,
        "method": prompt.method,
        "trained_method": prompt.cfg.method,
        "client": "global" if prompt.client is None else str(prompt.client),
        "backbone": str(prompt.backbone_identity),
        "classes": json.dumps(check_classes(classes)),
        "config": json.dumps(prompt.cfg.to_dict()),
    }
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in prompt.tensors.items()}
    write_bytes_atomic(out, save(tensors, metadata=metadata))
    return out


def read_exported(path: str | Path) -> tuple[Prompt, list[str]]:
    """The prompt and class names of a file ``fedpgp export`` wrote; CheckpointError naming the
    file for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"prompt file {path}: not a readable safetensors file ({exc})"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"prompt file {path}: not a prompt exported by fedpgp (no '{FORMAT}')"
        )
    if metadata.get("version") != VERSION:
        raise CheckpointError(
            f"prompt file {path}: format version {metadata.get('version')!r}, this fedpgp reads "
            f"{VERSION}"
        )
    try:
        cfg = config_from_dict(json.loads(metadata["config"]))
        classes = check_classes(json.loads(metadata["classes"]), f"prompt file {path}: classes")
        client = None if metadata["client"] == "global" else int(metadata["client"])
        name, identity = metadata["method"], metadata["backbone"]
    except (KeyError, ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"prompt file {path}: malformed metadata ({exc})") from exc
    return Prompt(name, tensors, cfg, client, f"prompt file {path}", identity), classes


def load_classifier(
    source: str | Path, client: int | None = None, classes: Sequence[str] | None = None
) -> Classifier:
    """A classifier from a run directory (client ``client``'s personalized prompt, or the global
    prompt for None) or from a file ``fedpgp export`` wrote (whose own prompt; ``client``, when
    given, must be the file's). ``classes`` replaces the class names (by default the run's base
    classes, or the file's)."""
    path = Path(source)
    if path.is_dir():
        run = TrainedRun.open(path)
        backbone = load_backbone(run.cfg, resolve_device(run.cfg.device))
        prompt = run_prompt(run, client, backbone)
        names = list(classes) if classes is not None else run_classes(run.cfg, path)
        return Classifier(prompt, names, backbone)
    if not path.is_file():
        raise CheckpointError(f"{path}: neither a run directory nor an exported prompt file")
    prompt, names = read_exported(path)
    if client is not None and client != prompt.client:
        held = "the global prompt" if prompt.client is None else f"client {prompt.client}'s prompt"
        raise ConfigError(f"client {client}: prompt file {path} holds {held}")
    return Classifier(prompt, names if classes is None else classes)
