"""The five CLIP datasets in CoOp's layout: an image folder plus a `split_zhou_*.json` file.

Each split file is a JSON object with `train`, `val` and `test` lists of
`[image path relative to the image folder, label, class name]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedpgp.data.datasets import (
    DatasetSplits,
    FileImages,
    LabeledSet,
    Problems,
    check_listed_files,
    check_relative,
    register,
    require_root,
)
from fedpgp.errors import DatasetError

SPLITS = ("train", "val", "test")
COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class CoOpLayout:
    """Where one CoOp dataset lives under the data root, and where its split file comes from."""

    name: str
    folder: str
    image_dir: str
    split_file: str
    split_url: str

    def describe(self) -> str:
        """The expected layout, for error messages."""
        return f"{self.folder}/{self.image_dir}/ and {self.folder}/{self.split_file}"


LAYOUTS = {
    layout.name: layout
    for layout in (
        CoOpLayout(
            "caltech101",
            "caltech-101",
            "101_ObjectCategories",
            "split_zhou_Caltech101.json",
            "https://drive.google.com/file/d/1hyarUivQE36mY6jSomru6Fjd-JzwcCzN/view?usp=sharing",
        ),
        CoOpLayout(
            "oxford_pets",
            "oxford_pets",
            "images",
            "split_zhou_OxfordPets.json",
            "https://drive.google.com/file/d/1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs/view?usp=sharing",
        ),
        CoOpLayout(
            "oxford_flowers",
            "oxford_flowers",
            "jpg",
            "split_zhou_OxfordFlowers.json",
            "https://drive.google.com/file/d/1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT/view?usp=sharing",
        ),
        CoOpLayout(
            "food101",
            "food-101",
            "images",
            "split_zhou_Food101.json",
            "https://drive.google.com/file/d/1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl/view?usp=sharing",
        ),
        CoOpLayout(
            "dtd",
            "dtd",
            "images",
            "split_zhou_DescribableTextures.json",
            "https://drive.google.com/file/d/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x/view?usp=sharing",
        ),
    )
}


def read_split_file(path: Path) -> dict[str, list]:
    """Parse a CoOp split file; a missing file, bad JSON or a missing key is a DatasetError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetError(f"split file {path}: expected a CoOp split file, found nothing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"split file {path}: cannot be read ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"split file {path}: expected valid JSON, found an error at line {exc.lineno} "
            f"column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise DatasetError(
            f"split file {path}: expected a JSON object with keys {', '.join(SPLITS)}, "
            f"found a {type(data).__name__}"
        )
    for key in SPLITS:
        if key not in data:
            raise DatasetError(
                f"split file {path}: missing key '{key}' (expected keys {', '.join(SPLITS)}, "
                f"found {', '.join(sorted(map(str, data))) or 'none'})"
            )
        if not isinstance(data[key], list):
            raise DatasetError(
                f"split file {path}: key '{key}' must be a list of [path, label, class name], "
                f"found a {type(data[key]).__name__}"
            )
    return data


def _parse_entries(
    path: Path, split: str, entries: list, problems: Problems
) -> list[tuple[str, int, str]]:
    parsed = []
    for position, entry in enumerate(entries):
        where = f"split file {path}: {split}[{position}]"
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
            and isinstance(entry[2], str)
        ):
            problems.add(
                f"{where}: expected [image path, integer label, class name], "
                f"found {json.dumps(entry)[:80]}"
            )
            continue
        if not check_relative(entry[0]):
            problems.add(
                f"{where}: expected a path relative to the image folder, found '{entry[0]}'"
            )
            continue
        parsed.append((entry[0], entry[1], entry[2]))
    return parsed


def _majorities(votes: dict[object, dict[object, int]]) -> dict[object, object]:
    """For every key, its most frequent value (ties: the value seen first)."""
    return {key: max(counts, key=counts.__getitem__) for key, counts in votes.items()}


def _class_table(
    path: Path, entries: dict[str, list[tuple[str, int, str]]], problems: Problems
) -> list[str]:
    """Class names by label. An entry whose label and name disagree with the other entries
    (a label with two names, or a name with two labels) is one problem."""
    names_of: dict[int, dict[str, int]] = {}
    labels_of: dict[str, dict[int, int]] = {}
    for items in entries.values():
        for _, label, name in items:
            names_of.setdefault(label, {}).setdefault(name, 0)
            names_of[label][name] += 1
            labels_of.setdefault(name, {}).setdefault(label, 0)
            labels_of[name][label] += 1
    usual_name, usual_label = _majorities(names_of), _majorities(labels_of)
    for split, items in entries.items():
        for position, (_, label, name) in enumerate(items):
            if name != usual_name[label] or label != usual_label[name]:
                problems.add(
                    f"split file {path}: {split}[{position}]: label {label} with class "
                    f"'{name}', but elsewhere label {label} is '{usual_name[label]}' and class "
                    f"'{name}' is label {usual_label[name]} (label / class-name mismatch)"
                )
    labels = sorted(names_of)
    if labels != list(range(len(labels))):
        problems.add(
            f"split file {path}: expected labels 0..{len(labels) - 1} each used at least once, "
            f"found {labels[:10]}{'...' if len(labels) > 10 else ''}"
        )
        return []
    return [str(usual_name[label]) for label in labels]


def load_coop(layout: CoOpLayout, root: Path) -> DatasetSplits:
    """Load one CoOp dataset under the data root `root`, reporting every problem at once."""
    require_root(root, layout.name)
    folder = root / layout.folder
    if not folder.is_dir():
        raise DatasetError(
            f"dataset '{layout.name}': expected folder {folder} holding {layout.describe()} "
            f"(CoOp layout, see {COOP_DATASETS_URL}), found nothing"
        )
    split_path = folder / layout.split_file
    if not split_path.is_file():
        raise DatasetError(
            f"split file {split_path}: expected CoOp's {layout.split_file}, found nothing; "
            f"get it from {layout.split_url} (listed in {COOP_DATASETS_URL})"
        )
    data = read_split_file(split_path)
    problems = Problems(layout.name, folder)
    entries = {split: _parse_entries(split_path, split, data[split], problems) for split in SPLITS}
    classnames = _class_table(split_path, entries, problems)
    image_dir = folder / layout.image_dir
    if not image_dir.is_dir():
        problems.add(
            f"image folder {image_dir}: expected the images of '{layout.name}', found nothing"
        )
    else:
        for split in SPLITS:
            listed_in = f"{split} of {split_path.name}"
            check_listed_files(image_dir, (e[0] for e in entries[split]), listed_in, problems)
    for split in ("train", "test"):
        if not data[split]:
            problems.add(f"split file {split_path}: key '{split}' is an empty list")
    problems.raise_if_any()

    def labeled(split: str) -> LabeledSet:
        items = entries[split]
        return LabeledSet(FileImages(image_dir, [e[0] for e in items]), [e[1] for e in items])

    return DatasetSplits(
        name=layout.name,
        classnames=classnames,
        train=labeled("train"),
        test=labeled("test"),
        val=labeled("val") if entries["val"] else None,
    )


def _register(layout: CoOpLayout) -> None:
    def loader(root: Path) -> DatasetSplits:
        return load_coop(layout, root)

    loader.__doc__ = f"{layout.name}: CoOp layout, {layout.describe()}."
    register(layout.name)(loader)


for _layout in LAYOUTS.values():
    _register(_layout)
