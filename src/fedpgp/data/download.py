"""`fedpgp data download`: fetch what torchvision can, into the layout the loaders read.

torchvision downloads CIFAR-10/100, Flowers102, Food101, DTD, OxfordIIITPet and Caltech101.
Its folder names differ from CoOp's for some of them, so the downloaded folders are moved into
CoOp's places. CoOp's split files, Office-Caltech10 and DomainNet cannot be fetched this way:
for them the command says which file is needed and where to get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedpgp.data.coop import COOP_DATASETS_URL, LAYOUTS
from fedpgp.data.domains import DOMAINNET_URL, OFFICE_URL
from fedpgp.errors import DatasetError


@dataclass(frozen=True)
class TorchvisionSource:
    """A torchvision dataset class, the arguments that download it, and folders to move."""

    class_name: str
    kwargs: tuple[tuple[str, object], ...]
    moves: tuple[tuple[str, str], ...] = ()


TORCHVISION_SOURCES = {
    "cifar10": TorchvisionSource("CIFAR10", (("train", True),)),
    "cifar100": TorchvisionSource("CIFAR100", (("train", True),)),
    "food101": TorchvisionSource("Food101", (("split", "train"),)),
    "oxford_flowers": TorchvisionSource(
        "Flowers102",
        (("split", "train"),),
        (
            ("flowers-102/jpg", "oxford_flowers/jpg"),
            ("flowers-102/imagelabels.mat", "oxford_flowers/imagelabels.mat"),
        ),
    ),
    "dtd": TorchvisionSource(
        "DTD",
        (("split", "train"),),
        (("dtd/dtd/images", "dtd/images"), ("dtd/dtd/labels", "dtd/labels")),
    ),
    "oxford_pets": TorchvisionSource(
        "OxfordIIITPet",
        (("split", "trainval"),),
        (
            ("oxford-iiit-pet/images", "oxford_pets/images"),
            ("oxford-iiit-pet/annotations", "oxford_pets/annotations"),
        ),
    ),
    "caltech101": TorchvisionSource(
        "Caltech101",
        (),
        (("caltech101/101_ObjectCategories", "caltech-101/101_ObjectCategories"),),
    ),
}

MANUAL_INSTRUCTIONS = {
    "office_caltech10": (
        "Office-Caltech10 cannot be downloaded automatically. Get it from "
        f"{OFFICE_URL} and unpack it so that <root>/office_caltech10/<domain>/<class>/*.jpg "
        "exists for the domains amazon, caltech, dslr and webcam (FedBN's folder name "
        "office_caltech_10 is accepted too)."
    ),
    "domainnet": (
        "DomainNet cannot be downloaded automatically. Get the images of the domains clipart, "
        "infograph, painting, quickdraw, real and sketch and their <domain>_train.txt / "
        f"<domain>_test.txt lists from {DOMAINNET_URL}, and unpack them so that "
        "<root>/domainnet/<domain>/<class>/<file> and <root>/domainnet/<domain>_train.txt exist "
        "(only the 10 classes of the FedBN subset are read)."
    ),
}


def relocate(root: Path, moves: tuple[tuple[str, str], ...]) -> list[str]:
    """Move torchvision's folders to CoOp's places (never over an existing one); report moves."""
    done = []
    for source, target in moves:
        src, dst = root / source, root / target
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            done.append(f"moved {src} -> {dst}")
    return done


def torchvision_download(name: str, root: Path) -> list[str]:
    """Download dataset `name` with torchvision into `root`; lines saying what was done."""
    import torchvision.datasets

    source = TORCHVISION_SOURCES[name]
    dataset_class = getattr(torchvision.datasets, source.class_name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        dataset_class(str(root), download=True, **dict(source.kwargs))
    # Network and archive failures surface as many exception types; all mean "not downloaded".
    except Exception as exc:
        raise DatasetError(
            f"download of '{name}' with torchvision.datasets.{source.class_name} into {root} "
            f"failed: {exc}"
        ) from exc
    lines = [f"downloaded '{name}' with torchvision.datasets.{source.class_name} into {root}"]
    return lines + relocate(root, source.moves)


def still_needed(name: str, root: Path) -> list[str]:
    """What the user must still fetch by hand for `name` (CoOp split files); empty if nothing."""
    layout = LAYOUTS.get(name)
    if layout is None:
        return []
    split_path = root / layout.folder / layout.split_file
    if split_path.is_file():
        return []
    message = (
        f"still needed: {split_path} (CoOp's fixed train/val/test split); download "
        f"{layout.split_file} from {layout.split_url} (listed in {COOP_DATASETS_URL}) "
        f"and put it there"
    )
    return [message]
