"""Domain datasets: Office-Caltech10 and the 10-class DomainNet subset (feature skew).

Both keep one folder per domain and one sub-folder per class. Labels are the positions of the
class folder names in sorted order; the domain id of an item is the position of its domain in
the loader's domain list.

Office-Caltech10 (`office_caltech10/` or FedBN's `office_caltech_10/`): if every domain has
`<domain>_train.txt` and `<domain>_test.txt` next to the domain folders, those lists define the
split; otherwise a fixed, seed-free rule does: in each domain/class folder, files sorted by
name, every fifth file (positions 4, 9, 14, ...) is a test image and the rest are training
images (an 80/20 split spread over the whole folder).

DomainNet (`domainnet/` or `DomainNet/`): the official `<domain>_train.txt` / `<domain>_test.txt`
lists of `<domain>/<class>/<file> <label>`, restricted to the 10 classes of the FedBN subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpgp.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetSplits,
    FileImages,
    LabeledSet,
    Problems,
    check_listed_files,
    check_relative,
    register,
    require_root,
)
from fedpgp.errors import ConfigError, DatasetError

OFFICE_DOMAINS = ("amazon", "caltech", "dslr", "webcam")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = (
    "bird",
    "feather",
    "headphones",
    "ice_cream",
    "teapot",
    "tiger",
    "whale",
    "windmill",
    "wine_glass",
    "zebra",
)
OFFICE_TEST_EVERY = 5  # every fifth file of a class folder is a test image
OFFICE_URL = "https://github.com/med-air/FedBN (README, 'Office-Caltech10')"
DOMAINNET_URL = "http://ai.bu.edu/M3SDA/ (images and the <domain>_train.txt / _test.txt lists)"


@dataclass(frozen=True)
class ListEntry:
    """One line of a `<domain>_<split>.txt` list file."""

    relpath: str
    label: int
    classname: str
    where: str


def _select_domains(
    name: str, domains: str | Sequence[str] | None, known: Sequence[str]
) -> list[str]:
    if domains is None:
        return list(known)
    # `--set dataset.options.domains=amazon` gives a string: one domain, not its letters.
    if isinstance(domains, str):
        domains = [domains]
    if not isinstance(domains, (list, tuple)) or not all(isinstance(d, str) for d in domains):
        raise ConfigError(
            f"dataset.options.domains of '{name}': expected a domain name or a list of them "
            f"(of {', '.join(known)}), found {domains!r}"
        )
    unknown = [d for d in domains if d not in known]
    if unknown or not domains:
        raise ConfigError(
            f"dataset.options.domains of '{name}': expected a non-empty subset of "
            f"{', '.join(known)}, found {list(domains)}"
        )
    return [d for d in known if d in domains]


def _find_folder(root: Path, names: Sequence[str], dataset: str, layout: str, url: str) -> Path:
    require_root(root, dataset)
    for folder_name in names:
        if (root / folder_name).is_dir():
            return root / folder_name
    raise DatasetError(
        f"dataset '{dataset}': expected folder {root / names[0]} holding {layout}, "
        f"found nothing; get it from {url}"
    )


def read_list(path: Path, domain: str, problems: Problems) -> list[ListEntry]:
    """Parse a list file of `<domain>/<class>/<file> <label>` lines, recording bad lines."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        problems.add(f"list file {path}: expected lines '<path> <label>', found nothing")
        return []
    except (OSError, UnicodeDecodeError) as exc:
        problems.add(f"list file {path}: cannot be read ({exc})")
        return []
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"list file {path}:{number}"
        fields = line.rsplit(maxsplit=1)
        parts = fields[0].split("/") if fields else []
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit() or len(parts) < 3:
            problems.add(f"{where}: expected '<domain>/<class>/<file> <label>', found '{line}'")
            continue
        if parts[0] != domain or not check_relative(fields[0]):
            problems.add(f"{where}: expected a path under '{domain}/', found '{fields[0]}'")
            continue
        entries.append(ListEntry(fields[0], int(fields[1]), parts[1], where))
    return entries


def _check_list_labels(entries: Sequence[ListEntry], problems: Problems) -> None:
    """One label per class name and one class name per label, across every list file."""
    label_of: dict[str, ListEntry] = {}
    name_of: dict[int, ListEntry] = {}
    for entry in entries:
        first = label_of.setdefault(entry.classname, entry)
        if first.label != entry.label:
            problems.add(
                f"{entry.where}: class '{entry.classname}' has label {entry.label} but "
                f"{first.label} at {first.where} (label / class-name mismatch)"
            )
        first = name_of.setdefault(entry.label, entry)
        if first.classname != entry.classname:
            problems.add(
                f"{entry.where}: label {entry.label} is class '{entry.classname}' but "
                f"'{first.classname}' at {first.where} (label / class-name mismatch)"
            )


class _SplitBuilder:
    """Accumulates (relative path, label, domain id) triples of one split."""

    def __init__(self) -> None:
        self.relpaths: list[str] = []
        self.labels: list[int] = []
        self.domains: list[int] = []

    def add(self, relpath: str, label: int, domain: int) -> None:
        self.relpaths.append(relpath)
        self.labels.append(label)
        self.domains.append(domain)

    def build(self, folder: Path) -> LabeledSet:
        return LabeledSet(FileImages(folder, self.relpaths), self.labels, self.domains)


def _image_files(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _add_from_lists(
    folder: Path,
    domains: list[str],
    classes: list[str],
    splits: dict[str, _SplitBuilder],
    problems: Problems,
) -> None:
    """Fill `splits` from `<domain>_<split>.txt` files, keeping only the classes in `classes`."""
    entries: dict[tuple[str, str], list[ListEntry]] = {}
    for domain in domains:
        for split in splits:
            entries[domain, split] = [
                e
                for e in read_list(folder / f"{domain}_{split}.txt", domain, problems)
                if e.classname in classes
            ]
    _check_list_labels([e for items in entries.values() for e in items], problems)
    for (domain, split), items in entries.items():
        listed_in = f"{domain}_{split}.txt"
        check_listed_files(folder, (e.relpath for e in items), listed_in, problems)
        present = {e.classname for e in items}
        for classname in classes:
            if classname not in present and (folder / f"{domain}_{split}.txt").is_file():
                problems.add(
                    f"list file {folder / f'{domain}_{split}.txt'}: expected images "
                    f"of class '{classname}', found none"
                )
        for entry in items:
            splits[split].add(entry.relpath, classes.index(entry.classname), domains.index(domain))


@register("office_caltech10")
def load_office_caltech10(root: Path, domains: str | Sequence[str] | None = None) -> DatasetSplits:
    """Office-Caltech10 under `root/office_caltech10/<domain>/<class>/*.jpg`."""
    selected = _select_domains("office_caltech10", domains, OFFICE_DOMAINS)
    folder = _find_folder(
        root,
        ("office_caltech10", "office_caltech_10"),
        "office_caltech10",
        "<domain>/<class>/*.jpg for domains " + ", ".join(OFFICE_DOMAINS),
        OFFICE_URL,
    )
    problems = Problems("office_caltech10", folder)
    per_domain: dict[str, list[str]] = {}
    for domain in selected:
        if (folder / domain).is_dir():
            per_domain[domain] = _class_folders(folder / domain)
        else:
            problems.add(
                f"domain folder {folder / domain}: expected one folder per class, found nothing"
            )
    classes = sorted({c for found in per_domain.values() for c in found})
    for domain, found in per_domain.items():
        for classname in classes:
            if classname not in found:
                problems.add(
                    f"class folder {folder / domain / classname}: expected (every "
                    f"domain has the same classes), found nothing"
                )
    splits = {"train": _SplitBuilder(), "test": _SplitBuilder()}
    lists = [folder / f"{d}_{s}.txt" for d in selected for s in splits]
    if any(p.is_file() for p in lists):
        for path in lists:
            if not path.is_file():
                problems.add(
                    f"list file {path}: expected (list files are used only when every "
                    f"domain has both), found nothing"
                )
        _add_from_lists(folder, selected, classes, splits, problems)
    else:
        _add_by_rule(folder, per_domain, classes, selected, splits, problems)
    problems.raise_if_any()
    return DatasetSplits(
        name="office_caltech10",
        classnames=list(classes),
        train=splits["train"].build(folder),
        test=splits["test"].build(folder),
        domain_names=selected,
    )


def _add_by_rule(
    folder: Path,
    per_domain: dict[str, list[str]],
    classes: list[str],
    selected: list[str],
    splits: dict[str, _SplitBuilder],
    problems: Problems,
) -> None:
    """The seed-free Office split: every fifth file (sorted by name) of a class is a test image."""
    for domain, found in per_domain.items():
        for classname in found:
            files = _image_files(folder / domain / classname)
            if len(files) < OFFICE_TEST_EVERY:
                problems.add(
                    f"class folder {folder / domain / classname}: expected at least "
                    f"{OFFICE_TEST_EVERY} images, found {len(files)}"
                )
                continue
            for position, filename in enumerate(files):
                split = "test" if position % OFFICE_TEST_EVERY == OFFICE_TEST_EVERY - 1 else "train"
                splits[split].add(
                    f"{domain}/{classname}/{filename}",
                    classes.index(classname),
                    selected.index(domain),
                )


@register("domainnet")
def load_domainnet(root: Path, domains: str | Sequence[str] | None = None) -> DatasetSplits:
    """DomainNet's 10-class subset under `root/domainnet/` with the official list files."""
    selected = _select_domains("domainnet", domains, DOMAINNET_DOMAINS)
    folder = _find_folder(
        root,
        ("domainnet", "DomainNet"),
        "domainnet",
        "<domain>/<class>/<file> and <domain>_train.txt / <domain>_test.txt for domains "
        + ", ".join(DOMAINNET_DOMAINS),
        DOMAINNET_URL,
    )
    problems = Problems("domainnet", folder)
    for domain in selected:
        if not (folder / domain).is_dir():
            problems.add(
                f"domain folder {folder / domain}: expected one folder per class, found nothing"
            )
    classes = sorted(DOMAINNET_CLASSES)
    splits = {"train": _SplitBuilder(), "test": _SplitBuilder()}
    _add_from_lists(folder, selected, classes, splits, problems)
    problems.raise_if_any()
    return DatasetSplits(
        name="domainnet",
        classnames=list(classes),
        train=splits["train"].build(folder),
        test=splits["test"].build(folder),
        domain_names=selected,
    )
