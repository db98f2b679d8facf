"""Atomic file writes: a temp file in the same folder, fsynced, then renamed over the target,
so a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import WriteError


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new empty file next to the target, opened for writing. Created with mode 0o666 so
    that the kernel applies the umask (and default ACLs) exactly as for a plain open();
    tempfile.mkstemp would force 0o600."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step; WriteError naming ``path`` if the system
    refuses (full disk, no permission, ...), leaving the previous file as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = _create_temp(path.parent, path.name)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    write_bytes_atomic(path, text.encode("utf-8"))
