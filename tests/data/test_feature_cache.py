"""The on-disk feature cache: equal to fresh encoding, keyed by everything features depend on,
never trusting a damaged file; and the augmentation modes that use it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_overrides
from torch import Tensor

from fedpgp import atomic
from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.backbone.prompted import PromptedImageTower
from fedpgp.config import load_config
from fedpgp.data import ArrayImages, FileImages
from fedpgp.data.features import FeatureCache, default_cache_dir, encode_images
from fedpgp.errors import DatasetError
from fedpgp.experiment import (
    build_experiment,
    feature_identity,
    features_cached,
    load_backbone,
    load_data,
)
from fedpgp.runner import execute


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))


@pytest.fixture(scope="module")
def images() -> ArrayImages:
    rng = np.random.default_rng(0)
    return ArrayImages(rng.integers(0, 256, size=(12, 40, 48, 3), dtype=np.uint8))


class CountingEncoder:
    """The backbone's image encoder, counting the images it encodes."""

    def __init__(self, backbone: FrozenCLIP) -> None:
        self.backbone = backbone
        self.images = 0

    def __call__(self, batch: Tensor) -> Tensor:
        self.images += batch.shape[0]
        return self.backbone.encode_images(batch)


def test_cached_features_equal_fresh_ones_and_are_reused(
    tiny: FrozenCLIP, images: ArrayImages, tmp_path: Path
) -> None:
    cache, encoder = FeatureCache(tmp_path), CountingEncoder(tiny)
    transform = tiny.test_transform()
    fresh = encode_images(tiny.encode_images, images, [5, 1, 7], transform)
    first = cache.features(encoder, tiny.identity, images, [5, 1, 7], transform)
    assert torch.allclose(first, fresh, atol=1e-6) and encoder.images == 3
    # Another run asking for more images encodes only the new ones, in the order it asks.
    second = cache.features(encoder, tiny.identity, images, [7, 2, 5, 9, 1], transform)
    assert encoder.images == 5
    assert torch.allclose(second[[0, 2, 4]], fresh[[2, 0, 1]], atol=1e-6)
    expected = encode_images(tiny.encode_images, images, [2, 9], transform)
    assert torch.allclose(second[[1, 3]], expected, atol=1e-6)
    again = FeatureCache(tmp_path).features(encoder, tiny.identity, images, [9, 5], transform)
    assert encoder.images == 5
    assert torch.equal(again, second[[3, 2]])


def test_random_views_are_fixed_per_image_and_view(
    tiny: FrozenCLIP, images: ArrayImages, tmp_path: Path
) -> None:
    """View v of image i is the same augmentation whichever images are encoded with it, so
    stored views are shared across runs; different views are different crops."""
    cache, transform = FeatureCache(tmp_path), tiny.train_transform()
    views = cache.views(tiny.encode_images, tiny.identity, images, [3, 4], transform, 3)
    alone = encode_images(tiny.encode_images, images, [4], transform, view=1)
    assert views.shape == (3, 2, tiny.embed_dim)
    assert torch.allclose(views[1, 1], alone[0], atol=1e-6)
    assert (views[0] - views[1]).abs().max() > 1e-3


def test_cache_key_changes_with_backbone_transform_dataset_and_view(
    tiny: FrozenCLIP, images: ArrayImages
) -> None:
    key = FeatureCache.key(tiny.identity, tiny.test_transform(), images, None)
    other_weights = FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None, init_seed=1))
    other_images = ArrayImages(images.array[::-1].copy())
    changed = {
        "backbone": FeatureCache.key(other_weights.identity, tiny.test_transform(), images, None),
        "transform": FeatureCache.key(tiny.identity, tiny.train_transform(), images, None),
        "dataset": FeatureCache.key(tiny.identity, tiny.test_transform(), other_images, None),
        "view": FeatureCache.key(tiny.identity, tiny.test_transform(), images, 0),
    }
    assert other_weights.identity != tiny.identity
    assert all(value != key for value in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    assert FeatureCache.key(tiny.identity, tiny.test_transform(), images, None) == key


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _bad_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:16] + b"{not json" + data[25:])


def _wrong_key(path: Path) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16 : 16 + length])
    header["key"] = "0" * 64
    text = json.dumps(header, sort_keys=True).encode().ljust(length)
    path.write_bytes(data[:16] + text + data[16 + length :])


@pytest.mark.parametrize("damage", [_flip_last_byte, _truncate, _bad_header, _wrong_key])
def test_a_damaged_cache_file_is_detected_and_rebuilt(
    tiny: FrozenCLIP, images: ArrayImages, tmp_path: Path, damage, caplog
) -> None:
    cache, encoder = FeatureCache(tmp_path), CountingEncoder(tiny)
    transform = tiny.test_transform()
    good = cache.features(encoder, tiny.identity, images, [0, 1, 2], transform)
    path = cache.path(cache.key(tiny.identity, transform, images, None))
    damage(path)
    rebuilt = cache.features(encoder, tiny.identity, images, [0, 1, 2], transform)
    assert encoder.images == 6, "the damaged file must not be used"
    assert torch.allclose(rebuilt, good, atol=1e-6)
    assert "unusable" in caplog.text
    # The rebuilt file is sound: a third call encodes nothing.
    cache.features(encoder, tiny.identity, images, [2, 0], transform)
    assert encoder.images == 6


def test_default_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPGP_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FEDPGP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedpgp"


def test_runs_reuse_the_cache_across_methods_and_seeds(tiny_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_data, cache_dir=tmp_path / "cache")
    first = build_experiment(load_config(overrides=overrides))
    cache = FeatureCache(tmp_path / "cache")
    backbone, splits = first.backbone, first.splits
    test_file = cache.path(
        cache.key(feature_identity(backbone), backbone.test_transform(), splits.test.images, None)
    )
    train_file = cache.path(
        cache.key(feature_identity(backbone), backbone.test_transform(), splits.train.images, None)
    )
    stamps = {path: path.stat().st_mtime_ns for path in (test_file, train_file)}
    # Another method: nothing is encoded again.
    second = build_experiment(load_config(overrides=[*overrides, "method=promptfl"]))
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert torch.equal(first.base.features, second.base.features)
    # Another seed draws other shots: the test features are still reused.
    third = build_experiment(load_config(overrides=[*overrides, "seed=5"]))
    assert test_file.stat().st_mtime_ns == stamps[test_file]
    assert torch.equal(first.base.features, third.base.features)


def test_views_mode_stores_one_view_per_epoch(tiny_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_data, augment="views", rounds=2, local_epochs=2)
    experiment = build_experiment(load_config(overrides=overrides))
    data = experiment.client_data[0]
    assert data.train_features.shape[:2] == (4, data.num_train)
    assert (data.train_features[0] - data.train_features[1]).abs().max() > 1e-3


def _check_recorded(results: dict, out_dir: Path, augment: str) -> None:
    assert results["augment"] == augment
    assert json.loads((out_dir / "results.json").read_text())["augment"] == augment
    assert f"augment: {augment}" in (out_dir / "config.yaml").read_text()
    assert results["final"]["local"] is not None


@pytest.mark.parametrize("augment", ["views", "none"])
def test_augment_mode_runs_and_is_recorded(tiny_data: Path, tmp_path: Path, augment: str) -> None:
    cfg = load_config(overrides=tiny_overrides(tiny_data, augment=augment, rounds=1))
    _check_recorded(execute(cfg, tmp_path / "run"), tmp_path / "run", augment)


def test_online_mode_runs_is_recorded_and_reproducible(tiny_data: Path, tmp_path: Path) -> None:
    cfg = load_config(overrides=tiny_overrides(tiny_data, augment="online", rounds=2))
    first = execute(cfg, tmp_path / "a")
    _check_recorded(first, tmp_path / "a", "online")
    assert execute(cfg, tmp_path / "b")["rounds"] == first["rounds"]


def _write_pngs(folder: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


def test_an_image_changed_at_the_same_path_is_encoded_again(
    tiny: FrozenCLIP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = FileImages(tmp_path / "images", _write_pngs(tmp_path / "images", 4))
    cache, encoder = FeatureCache(tmp_path / "cache"), CountingEncoder(tiny)
    transform = tiny.test_transform()
    before = cache.features(encoder, tiny.identity, images, [0, 1, 2, 3], transform)
    assert encoder.images == 4
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(images.path(2))
    after = cache.features(encoder, tiny.identity, images, [0, 1, 2, 3], transform)
    assert encoder.images == 5, "only the changed image is encoded again"
    assert "changed on disk" in caplog.text
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])
    assert (after[2] - before[2]).abs().max() > 1e-3
    fresh = encode_images(tiny.encode_images, images, [2], transform)
    assert torch.allclose(after[2], fresh[0], atol=1e-6)
    # The new content is what the cache holds now.
    cache.features(encoder, tiny.identity, images, [2], transform)
    assert encoder.images == 5


def test_a_touched_image_with_the_same_content_is_not_encoded_again(
    tiny: FrozenCLIP, tmp_path: Path
) -> None:
    images = FileImages(tmp_path / "images", _write_pngs(tmp_path / "images", 3))
    cache, encoder = FeatureCache(tmp_path / "cache"), CountingEncoder(tiny)
    transform = tiny.test_transform()
    before = cache.features(encoder, tiny.identity, images, [0, 1, 2], transform)
    path = images.path(1)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    after = cache.features(encoder, tiny.identity, images, [0, 1, 2], transform)
    assert encoder.images == 3
    assert torch.equal(after, before)
    entry_path = cache.path(cache.key(tiny.identity, transform, images, None))
    written = entry_path.stat().st_mtime_ns
    # The new time is recorded: the next run does not hash the file again or rewrite the entry.
    cache.features(encoder, tiny.identity, images, [0, 1, 2], transform)
    assert entry_path.stat().st_mtime_ns == written


def test_a_warm_cache_does_not_hide_a_blackened_dataset(tiny_data: Path, tmp_path: Path) -> None:
    """The same paths with every image black must give other numbers than the real images."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    overrides = tiny_overrides(data, cache_dir=tmp_path / "cache", rounds=1)
    real = execute(load_config(overrides=overrides), tmp_path / "real")
    for image in (data / "dtd" / "images").rglob("*.jpg"):
        Image.new("RGB", Image.open(image).size).save(image, quality=95)
    black = execute(load_config(overrides=overrides), tmp_path / "black")
    assert black["clients"] != real["clients"]
    assert black["zeroshot"] != real["zeroshot"]


def test_a_corrupted_image_behind_a_warm_cache_is_named(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    overrides = tiny_overrides(data, cache_dir=tmp_path / "cache", rounds=1)
    build_experiment(load_config(overrides=overrides))
    # A test image: every test image is encoded (Local, Base and Novel sets).
    victim = sorted((data / "dtd" / "images").rglob("*_009.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(DatasetError, match=victim.name):
        build_experiment(load_config(overrides=overrides))


def _cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("feature cache:")
    ]


def _features_as_fresh(cache: FeatureCache, tiny: FrozenCLIP, images: ArrayImages) -> int:
    """Two calls through ``cache`` give the features fresh encoding gives; the number of images
    the encoder saw."""
    encoder, transform = CountingEncoder(tiny), tiny.test_transform()
    for indices in ([5, 1, 7], [7, 2, 5]):
        got = cache.features(encoder, tiny.identity, images, indices, transform)
        fresh = encode_images(tiny.encode_images, images, indices, transform)
        assert torch.allclose(got, fresh, atol=1e-6)
    return encoder.images


def test_a_cache_dir_that_is_a_file_warns_once_and_computes(
    tiny: FrozenCLIP, images: ArrayImages, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = tmp_path / "cache"
    taken.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        assert _features_as_fresh(FeatureCache(taken), tiny, images) == 6
    (warning,) = _cache_warnings(caplog)
    assert str(taken / "features") in warning and "Not a directory" in warning
    assert taken.read_text() == "not a folder"


def test_a_read_only_cache_dir_warns_once_and_computes(
    tiny: FrozenCLIP, images: ArrayImages, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        with caplog.at_level(logging.WARNING):
            assert _features_as_fresh(FeatureCache(folder), tiny, images) == 6
    finally:
        folder.chmod(0o755)
    (warning,) = _cache_warnings(caplog)
    assert f"cannot write {folder / 'features'}" in warning and "Permission denied" in warning
    assert list(folder.iterdir()) == []


def test_a_refused_write_warns_once_and_computes(
    tiny: FrozenCLIP,
    images: ArrayImages,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read-only folder of the test above, as root sees one (a read-only mount)."""

    def refuse(folder: Path, name: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / name))

    monkeypatch.setattr(atomic, "_create_temp", refuse)
    cache = FeatureCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        assert _features_as_fresh(cache, tiny, images) == 6
    entry = cache.path(cache.key(tiny.identity, tiny.test_transform(), images, None))
    assert _cache_warnings(caplog) == [
        f"feature cache: cannot write {entry}: Permission denied; going on without storing "
        "what cannot be stored"
    ]
    assert not entry.exists()


def test_a_folder_at_an_entry_path_warns_once_and_computes(
    tiny: FrozenCLIP, images: ArrayImages, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, transform = FeatureCache(tmp_path / "cache"), tiny.test_transform()
    cache.features(tiny.encode_images, tiny.identity, images, [0], transform)
    entry = cache.path(cache.key(tiny.identity, transform, images, None))
    entry.unlink()
    (entry / "something").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert _features_as_fresh(FeatureCache(tmp_path / "cache"), tiny, images) == 6
    (warning,) = _cache_warnings(caplog)
    assert warning.startswith(f"feature cache: cannot read {entry} (Is a directory)")
    assert (entry / "something").is_dir()


def test_a_run_with_a_file_as_cache_dir_gives_the_features_of_a_cached_run(
    tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    cached = build_experiment(load_config(overrides=tiny_overrides(tiny_data)))
    with caplog.at_level(logging.WARNING):
        uncached = build_experiment(
            load_config(overrides=tiny_overrides(tiny_data, cache_dir=taken))
        )
    assert torch.equal(cached.base.features, uncached.base.features)
    assert len(_cache_warnings(caplog)) == 1


def test_holds_tells_whether_features_would_encode_nothing(
    tiny: FrozenCLIP, tmp_path: Path
) -> None:
    images = FileImages(tmp_path / "images", _write_pngs(tmp_path / "images", 3))
    cache, transform = FeatureCache(tmp_path / "cache"), tiny.test_transform()
    assert not cache.holds(tiny.identity, images, [0, 1], transform)
    cache.features(tiny.encode_images, tiny.identity, images, [0, 1], transform)
    stored = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.feat")}
    assert cache.holds(tiny.identity, images, [1, 0], transform)
    assert not cache.holds(tiny.identity, images, [0, 1, 2], transform)
    assert not cache.holds(tiny.identity, images, [0], transform, view=0)
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(images.path(1))
    assert not cache.holds(tiny.identity, images, [0, 1], transform)
    assert {p: p.stat().st_mtime_ns for p in stored} == stored, "holds writes nothing"


def test_features_cached_covers_every_view_and_patches(tiny_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tiny_data, augment="views", rounds=2, local_epochs=1, cache_dir=tmp_path
    )
    cfg = load_config(overrides=overrides)
    splits, manifest = load_data(cfg)
    backbone = load_backbone(cfg)
    assert not features_cached(cfg, backbone, splits, manifest, [])
    build_experiment(cfg)
    assert features_cached(cfg, backbone, splits, manifest, [])
    assert not features_cached(cfg, backbone, splits, manifest, ["patches"])
    longer = load_config(overrides=[*overrides, "rounds=3"])
    assert not features_cached(longer, backbone, splits, manifest, [])
    build_experiment(cfg, kinds=["patches"])
    assert features_cached(cfg, backbone, splits, manifest, ["patches"])


def test_the_stem_is_cached_and_equals_the_recomputed_stem(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokens entering the image tower's first block (the prompted towers' frozen part)
    are a feature kind like the others: float16, equal to a fresh computation, reused."""
    cfg = load_config(overrides=tiny_overrides(tiny_data, cache_dir=tmp_path))
    splits, manifest = load_data(cfg)
    experiment = build_experiment(cfg, kinds=["stem"])
    tower = PromptedImageTower(experiment.backbone)
    stem = experiment.feature_sets[("stem", "all")]
    tokens = (experiment.backbone.image_size // 8) ** 2 + 1
    assert stem.base.features.shape[1:] == (tokens, tower.width)
    assert stem.base.features.dtype == torch.float16
    assert stem.client_data[0].train_features.shape[2:] == (tokens, tower.width)
    images = torch.stack(
        [experiment.backbone.test_transform()(splits.test.images[i]) for i in manifest.base_test]
    )
    torch.testing.assert_close(stem.base.features.float(), tower.stem(images), atol=1e-2, rtol=1e-3)
    assert features_cached(cfg, experiment.backbone, splits, manifest, ["stem"])

    def no_encoding(self: PromptedImageTower, images: Tensor, block: int = 0) -> None:
        raise AssertionError("the stem was encoded again")

    monkeypatch.setattr(PromptedImageTower, "stem", no_encoding)
    again = build_experiment(cfg, kinds=["stem"]).feature_sets[("stem", "all")]
    assert torch.equal(again.base.features, stem.base.features)


def test_a_stem_entering_a_later_block_is_its_own_cached_kind(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pFedMMA's frozen part ends before its first adapted block (block 1 of the tiny CLIP's
    2): its features are the tokens entering that block, cached under their own key."""
    cfg = load_config(overrides=tiny_overrides(tiny_data, method="pfedmma", cache_dir=tmp_path))
    splits, manifest = load_data(cfg)
    experiment = build_experiment(cfg, kinds=["stem"])
    assert experiment.method.image_kind == "stem@1"
    tower = PromptedImageTower(experiment.backbone)
    images = torch.stack(
        [experiment.backbone.test_transform()(splits.test.images[i]) for i in manifest.base_test]
    )
    later = experiment.feature_sets[("stem@1", "all")].base.features
    assert torch.equal(experiment.base.features, later)
    torch.testing.assert_close(later.float(), tower.stem(images, 1), atol=1e-2, rtol=1e-3)
    first = experiment.feature_sets[("stem", "all")].base.features
    assert (later.float() - first.float()).abs().max() > 0.1
    assert features_cached(cfg, experiment.backbone, splits, manifest, ["stem@1"])

    def no_encoding(self: PromptedImageTower, images: Tensor, block: int = 0) -> None:
        raise AssertionError("the stem was encoded again")

    monkeypatch.setattr(PromptedImageTower, "stem", no_encoding)
    assert torch.equal(build_experiment(cfg).base.features, later)


@pytest.mark.parametrize("kind", ["stem@0", "stem@x", "stem@-1", "tokens"])
def test_an_unknown_feature_kind_is_refused(tiny_data: Path, kind: str) -> None:
    with pytest.raises(ValueError, match="unknown image feature kind"):
        build_experiment(load_config(overrides=tiny_overrides(tiny_data)), kinds=[kind])
