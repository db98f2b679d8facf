"""Every bad input of issue 3 is a DatasetError / ConfigError naming the path or key."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedpgp.data import load_dataset
from fedpgp.data.coop import LAYOUTS
from fedpgp.data.datasets import DatasetProblemsError, read_image
from fedpgp.errors import DatasetError

Copy = Callable[[str], Path]
DTD = LAYOUTS["dtd"]


def split_path(root: Path) -> Path:
    return root / DTD.folder / DTD.split_file


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"data root {missing}: expected a folder.*nothing"):
        load_dataset("dtd", missing)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=rf"expected folder {tmp_path / 'dtd'} holding"):
        load_dataset("dtd", tmp_path)


def test_missing_split_file_says_where_to_get_it(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    split_path(root).unlink()
    with pytest.raises(DatasetError, match=r"split_zhou_DescribableTextures\.json.*drive\.google"):
        load_dataset("dtd", root)


def test_split_file_that_is_not_json(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    split_path(root).write_text('{"train": [')
    with pytest.raises(DatasetError, match=rf"{split_path(root)}: expected valid JSON.*line 1"):
        load_dataset("dtd", root)


def test_split_file_lacking_a_key(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    data = json.loads(split_path(root).read_text())
    del data["val"]
    split_path(root).write_text(json.dumps(data))
    with pytest.raises(
        DatasetError, match=r"split_zhou_DescribableTextures\.json: missing key 'val'"
    ):
        load_dataset("dtd", root)


def test_malformed_entry_names_its_position(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    data = json.loads(split_path(root).read_text())
    data["test"][3] = ["face/x.jpg", "zero", "face"]
    split_path(root).write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"test\[3\]: expected \[image path, integer label"):
        load_dataset("dtd", root)


def test_image_listed_but_absent(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    relpath = json.loads(split_path(root).read_text())["train"][5][0]
    (root / "dtd" / "images" / relpath).unlink()
    with pytest.raises(DatasetError, match=rf"image .*{relpath}: listed in train.*but absent"):
        load_dataset("dtd", root)


def test_truncated_image_is_named_when_read(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    splits = load_dataset("dtd", root)
    path = splits.train.images.path(2)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetError, match=rf"image {path}: expected a readable image"):
        splits.train.images[2]
    path.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=rf"image {path}: expected a readable image"):
        read_image(path)


def test_label_and_class_name_mismatch(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    data = json.loads(split_path(root).read_text())
    data["val"][0][2] = "leopard"  # label 0 ('face') now also called 'leopard'
    split_path(root).write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"val\[0\]: label 0 with class 'leopard'.*mismatch"):
        load_dataset("dtd", root)


def test_all_problems_are_collected(copy_dataset: Copy) -> None:
    root = copy_dataset("dtd")
    data = json.loads(split_path(root).read_text())
    data["val"][0][2] = "leopard"
    split_path(root).write_text(json.dumps(data))
    for entry in data["test"][:2]:
        (root / "dtd" / "images" / entry[0]).unlink()
    with pytest.raises(DatasetProblemsError) as caught:
        load_dataset("dtd", root)
    assert len(caught.value.problems) == 3  # the mismatched entry + 2 absent images


def test_cifar_pickle_of_the_wrong_shape(tmp_path: Path, formats: SimpleNamespace) -> None:
    folder = formats.write_cifar10(tmp_path)
    path = folder / "data_batch_3"
    formats.write_cifar_batch(path, np.zeros((20, 1024), np.uint8), {"labels": [0] * 20})
    with pytest.raises(
        DatasetError,
        match=rf"{path}: key 'data': expected a uint8 array of shape "
        r"\(N, 3072\), found uint8 of shape \(20, 1024\)",
    ):
        load_dataset("cifar10", tmp_path)


def test_cifar_labels_of_the_wrong_length(tmp_path: Path, formats: SimpleNamespace) -> None:
    folder = formats.write_cifar100(tmp_path)
    data = np.zeros((8, 3072), np.uint8)
    formats.write_cifar_batch(
        folder / "test", data, {"fine_labels": [0] * 8, "coarse_labels": [0] * 5}
    )
    with pytest.raises(DatasetError, match=r"test: key 'coarse_labels': expected 8 integer"):
        load_dataset("cifar100", tmp_path)


def test_cifar_file_that_is_not_a_pickle(tmp_path: Path, formats: SimpleNamespace) -> None:
    folder = formats.write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match=r"test_batch: expected a pickled dict"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_naming_other_code_is_refused(
    tmp_path: Path, formats: SimpleNamespace
) -> None:
    folder = formats.write_cifar10(tmp_path)
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({"label_names": [print]}, handle, protocol=2)
    with pytest.raises(DatasetError, match=r"batches\.meta.*refusing to load \w+\.print"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_coarse_labels_must_be_consistent(
    tmp_path: Path, formats: SimpleNamespace
) -> None:
    folder = formats.write_cifar100(tmp_path)
    fine = [0, 1, 2, 3, 4, 5, 6, 7]
    formats.write_cifar_batch(
        folder / "test",
        np.zeros((8, 3072), np.uint8),
        {"fine_labels": fine, "coarse_labels": [3] * 8},
    )
    with pytest.raises(DatasetError, match=r"fine class 0: expected exactly one coarse label"):
        load_dataset("cifar100", tmp_path)


def test_domainnet_malformed_list_line(copy_dataset: Copy) -> None:
    root = copy_dataset("domainnet")
    path = root / "domainnet" / "sketch_test.txt"
    path.write_text(path.read_text() + "sketch/bird/extra.jpg\n")
    with pytest.raises(DatasetError, match=rf"{path}:\d+: expected '<domain>/<class>/<file> "):
        load_dataset("domainnet", root)


def test_domainnet_label_mismatch_and_missing_list(copy_dataset: Copy) -> None:
    root = copy_dataset("domainnet")
    path = root / "domainnet" / "real_train.txt"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].rsplit(maxsplit=1)[0] + " 999"
    path.write_text("\n".join(lines) + "\n")
    (root / "domainnet" / "clipart_test.txt").unlink()
    with pytest.raises(DatasetProblemsError) as caught:
        load_dataset("domainnet", root)
    text = "\n".join(caught.value.problems)
    assert "clipart_test.txt: expected lines '<path> <label>', found nothing" in text
    assert "class 'bird' has label 999" in text and "mismatch" in text


def test_office_missing_domain_and_class(copy_dataset: Copy) -> None:
    root = copy_dataset("office_caltech10")
    shutil.rmtree(root / "office_caltech10" / "dslr")
    shutil.rmtree(root / "office_caltech10" / "webcam" / "mug")
    with pytest.raises(DatasetProblemsError) as caught:
        load_dataset("office_caltech10", root)
    text = "\n".join(caught.value.problems)
    assert f"domain folder {root / 'office_caltech10' / 'dslr'}" in text
    assert f"class folder {root / 'office_caltech10' / 'webcam' / 'mug'}" in text
