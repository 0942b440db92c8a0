"""`flask backup`: a copy of the embedded default (database, blobs, secret and admin key)
taken while the service serves, that a service started on it serves as it was."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .config import Settings
from .repository.sqlite import SqliteRepository
from .storage.filesystem import HOLD_STALE, FilesystemStorage, directory_mode, fsync_dir

#: How often the copy tells other processes it is alive (see FilesystemStorage.HOLD).
_REFRESH_EVERY = 5.0


@dataclasses.dataclass
class Report:
    images: int = 0
    blobs: int = 0
    bytes: int = 0


def backup(
    settings: Settings,
    storage: FilesystemStorage,
    repository: SqliteRepository,
    destination: Path,
    copied: Callable[[str], None] = lambda key: None,
    monotonic: Callable[[], float] = time.monotonic,
) -> Report:
    """Copy the store into `destination`, a new (or empty) directory, as a DATA_DIR.

    The database first, at one moment; then every blob, with deletions held meanwhile: a
    replace or delete since that moment would otherwise remove a blob the copied database
    names (the old README's `.backup` then `cp -r blobs` lost such images). Blobs written
    since are copied too, as orphans for `repair`. `copied` is called with each blob's key.
    """
    try:
        destination.mkdir(mode=0o700, parents=True)
        # As DATA_DIR is made: the group passes through when BLOB_FILE_MODE lets it read.
        destination.chmod(directory_mode(storage.file_mode))
    except FileExistsError:
        if not destination.is_dir() or any(destination.iterdir()):
            raise FileExistsError(f"{destination} is not an empty directory") from None
        if destination.stat().st_mode & 0o002:
            # The keys would go where every user may swap them (and no service would
            # start on it: DATA_DIR refuses the same).
            raise FileExistsError(f"{destination} may be written by every user") from None
    report = Report()
    blobs = FilesystemStorage(destination / "blobs", storage.file_mode)
    with storage.deletions_held() as refresh:
        blobs.create()  # not before: a copy refused (another one running) leaves nothing
        held = _Hold(refresh, monotonic)
        database = destination / settings.sqlite_path.name
        repository.backup_to(database, progress=held.keep)
        shards: set[Path] = set()
        for blob in storage.list():
            target = blobs.path(blob.key)
            if target.parent not in shards:
                target.parent.mkdir(mode=blobs.dir_mode, exist_ok=True)
                shards.add(target.parent)
            _copy(storage.path(blob.key), target, storage.file_mode)
            report.blobs += 1
            report.bytes += blob.size
            copied(blob.key)
            held.keep()
        held.keep()
    for name in (settings.secret_key_path, settings.admin_key_path):
        if name.exists():
            _copy(name, destination / name.name, 0o600)
    for directory in (*shards, blobs.root, destination):
        fsync_dir(directory)
    copy = SqliteRepository(database)
    try:
        report.images = copy.count()
    finally:
        copy.close()
    return report


class _Hold:
    """Keeps the hold on deletions fresh, and fails the copy if it ever went stale (the
    process stopped, a disk stalled): deletions then resumed, and blobs the copied
    database names may be missing from the copy."""

    def __init__(self, refresh: Callable[[], None], monotonic: Callable[[], float]):
        self.refresh, self.monotonic = refresh, monotonic
        self.at = monotonic()

    def keep(self, *progress) -> None:
        now = self.monotonic()
        if now - self.at >= HOLD_STALE:
            raise BackupStalled(
                f"the copy paused for {now - self.at:.0f} s, longer than deletions are held "
                f"({HOLD_STALE:.0f} s): some blobs may be missing from it; copy again"
            )
        if now - self.at >= _REFRESH_EVERY:
            self.refresh()
            self.at = now


class BackupStalled(RuntimeError):
    """The hold on deletions went stale during the copy."""


def _copy(source: Path, target: Path, mode: int) -> None:
    """`source`'s bytes into a new file `target` with `mode`, on disk when this returns."""
    with open(source, "rb") as reading:
        descriptor = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        with os.fdopen(descriptor, "wb") as writing:
            shutil.copyfileobj(reading, writing, 1024 * 1024)
            writing.flush()
            os.fsync(writing.fileno())
