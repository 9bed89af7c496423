"""Durable writes without importing torch: a file or a whole folder appears complete or not at all, even after a
power cut. The data layer, the converters and the checkpoints all write through these.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so readers see the old content or the new, never a part, even after a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes the file private; results are for every reader
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


@contextmanager
def atomic_folder(folder: Path, tmp_prefix: str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``folder``; on success flush it and rename it to ``folder``.

    On any error (or a signal) the temporary folder is removed and ``folder`` is untouched. ``folder`` must not
    exist when the block ends.
    """
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=tmp_prefix or f".{folder.name}.tmp-"))
    try:
        yield tmp
        for written in tmp.iterdir():
            fsync(written)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; what is written is for every reader
        os.rename(tmp, folder)
        fsync(folder.parent)  # the rename survives a power cut
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """Return the process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
