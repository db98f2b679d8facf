"""Atomic writes: the final file's mode follows the umask as a plain open() does, and a refused
write (full disk, no permission) is one WriteError naming the file, leaving the old file."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpgp.atomic import write_bytes_atomic, write_text_atomic
from fedpgp.errors import FedPGPError, WriteError


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the process umask a test sets."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


@pytest.mark.parametrize(
    ("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"]
)
def test_the_mode_follows_the_umask(tmp_path: Path, umask: None, mask: int, mode: int) -> None:
    os.umask(mask)
    write_bytes_atomic(tmp_path / "new.bin", b"data")
    write_text_atomic(tmp_path / "replaced.txt", "old")
    write_text_atomic(tmp_path / "replaced.txt", "new")
    for name in ("new.bin", "replaced.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert stat.S_IMODE(plain.stat().st_mode) == mode


def _full_disk(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_full_disk_is_one_error_naming_the_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "results.json"
    target.write_text("previous")
    monkeypatch.setattr(os, failing, _full_disk)
    with pytest.raises(WriteError) as caught:
        write_text_atomic(target, "next")
    assert str(caught.value) == f"cannot write {target}: No space left on device"
    assert isinstance(caught.value, FedPGPError)
    assert isinstance(caught.value.__cause__, OSError)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failing_stream_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fdopen = os.fdopen

    class FullStream:
        def __init__(self, handle: int, mode: str) -> None:
            self.stream = real_fdopen(handle, mode)

        def __enter__(self) -> FullStream:
            return self

        def __exit__(self, *exc: object) -> None:
            self.stream.close()

        def write(self, data: bytes) -> None:
            _full_disk()

    monkeypatch.setattr(os, "fdopen", FullStream)
    with pytest.raises(WriteError, match=r"cannot write .*new\.bin: No space left on device"):
        write_bytes_atomic(tmp_path / "new.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_at_the_target_or_a_file_as_its_folder_is_a_write_error(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'taken'}: Is a directory"):
        write_bytes_atomic(tmp_path / "taken", b"data")
    (tmp_path / "file").write_text("kept")
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'file' / 'x'}: "):
        write_bytes_atomic(tmp_path / "file" / "x", b"data")
    assert (tmp_path / "file").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]
    assert list((tmp_path / "taken").iterdir()) == []
