"""The data dir's files: the dir itself and secrets owner-only, and the locks that make one
process the owner of something (the model server's key file, the embedded Redis)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def prepare_data_dir(path: Path) -> None:
    """Create the data dir owner-only; everything the appliance persists lives in it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_private(path: Path, text: str) -> None:
    """Create or replace a file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def hold_lock(path: Path) -> int | None:
    """An exclusive flock on path (created owner-only), or None if another process holds it.
    The lock lasts as long as the returned descriptor stays open, in any process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
