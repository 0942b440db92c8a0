"""Blobs as files in a local directory (the embedded default)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from ..errors import BackendUnavailable, NotFound
from ..records import valid_key
from . import ACCEL_FILES, Partial, StoredBlob, checked_key

_WRITE_CHUNK = 1024 * 1024
_TMP_PREFIX = ".tmp-"
_PARTIAL = re.compile(r"[0-9a-f]{2}/\.tmp-[A-Za-z0-9_]+")
#: While `flask backup` copies the blobs, this file in the root holds their deletion: every
#: blob the copied database names must still be there when the copy reaches it. The backup
#: touches it as it goes; one untouched for HOLD_STALE seconds (a backup that died) holds
#: nothing.
HOLD = ".backup-hold"
HOLD_STALE = 60.0


def directory_mode(file_mode: int) -> int:
    """The mode of the directories above blob files of `file_mode`: r on a file needs x on
    every directory on its way to be reached (nginx's group, in accel mode)."""
    return file_mode | ((file_mode & 0o444) >> 2) | 0o700


class FilesystemStorage:
    """Blobs as files under `root`, sharded by the first two characters of the key.

    Files get `file_mode` (0600 by default: the service's user alone; 0640 lets a group,
    nginx's in accel mode, read them), and the directories the same rights plus the
    matching search bits, whatever the umask.
    """

    name = "filesystem"

    def __init__(self, root: Path, file_mode: int = 0o600):
        self.root = Path(root)
        self.file_mode = file_mode
        self.dir_mode = directory_mode(file_mode)

    def create(self) -> None:
        """Create the root directory (idempotent)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, self.dir_mode)
        except OSError as error:
            raise BackendUnavailable(f"Cannot create blob directory {self.root}") from error

    def path(self, key: str) -> Path:
        key = checked_key(key)
        return self.root / key[:2] / key

    def put(self, key: str, stream: BinaryIO, content_type: str) -> None:
        target = self.path(key)
        try:
            # Write a temporary file beside the target, fsync it, rename it into place and
            # fsync the directory: after a crash the blob is either whole or absent.
            try:
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
            except FileNotFoundError:
                # The shard's first blob (a mkdir on every put costs a metadata operation).
                # The new directory's own entry must survive a power cut too.
                # Not the root: one that vanished (DATA_DIR moved away) is an error, not a
                # new, empty store beside the database.
                target.parent.mkdir(exist_ok=True)
                os.chmod(target.parent, self.dir_mode)
                fsync_dir(self.root)
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
            try:
                if self.file_mode != 0o600:  # what mkstemp makes
                    os.fchmod(fd, self.file_mode)
                with os.fdopen(fd, "wb") as out:
                    while chunk := stream.read(_WRITE_CHUNK):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            fsync_dir(target.parent)
        except OSError as error:
            raise BackendUnavailable("Cannot write to the blob directory") from error

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        try:
            file = open(self.path(key), "rb")  # noqa: SIM115 - the WSGI server closes it
        except FileNotFoundError:
            raise NotFound("The image's file is missing") from None
        except OSError as error:
            raise BackendUnavailable("Cannot read from the blob directory") from error
        # A real file (or a window on one that keeps its fileno) lets gunicorn sendfile().
        return file if byte_range is None else FileRange(file, *byte_range)

    def presigned_url(
        self, key: str, ttl: int, content_type: str, disposition: str, cache_control: str = ""
    ) -> None:
        return None

    def accel_path(self, key, byte_range, ttl, content_type, disposition) -> str:
        # The range nginx sends is the client's, which the service has checked to be the
        # single satisfiable range it would have sent itself.
        key = checked_key(key)
        return f"{ACCEL_FILES[byte_range is not None]}{key[:2]}/{key}"

    def delete(self, key: str) -> None:
        if self.held():
            return  # kept for a backup: an orphan, which `repair` collects afterwards
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as error:
            raise BackendUnavailable("Cannot delete from the blob directory") from error

    def held(self) -> bool:
        """Whether a backup holds deletions now (`deletions_held`, in any process)."""
        try:
            return time.time() - os.stat(self.root / HOLD).st_mtime < HOLD_STALE
        except OSError:
            return False

    @contextlib.contextmanager
    def deletions_held(self) -> Iterator[Callable[[], None]]:
        """No blob is deleted, by any process, until this ends; yields the call that keeps
        the hold from going stale (at least every HOLD_STALE seconds)."""
        hold = self.root / HOLD
        try:
            with open(hold, "x"):
                pass
        except FileExistsError:
            if self.held():
                raise BackendUnavailable("Another backup is copying the blobs") from None
            os.utime(hold)  # a backup that died left it
        try:
            yield lambda: os.utime(hold)
        finally:
            hold.unlink(missing_ok=True)

    def list(self) -> Iterator[StoredBlob]:
        for _, name, stat in self._entries():
            if valid_key(name):  # not the temporary files of writes in progress
                modified = datetime.fromtimestamp(stat.st_mtime, UTC)
                yield StoredBlob(name, stat.st_size, modified)

    def list_partial(self) -> Iterator[Partial]:
        # Writes go to ".tmp-*" beside their target and are renamed when whole; a process
        # killed mid-write leaves the temporary file.
        for shard, name, stat in self._entries():
            if name.startswith(_TMP_PREFIX):
                yield Partial(f"{shard}/{name}", datetime.fromtimestamp(stat.st_mtime, UTC))

    def _entries(self) -> Iterator[tuple[str, str, os.stat_result]]:
        """(shard, name, stat) of every regular file, in name order. Shards are the keys'
        first two characters, so shard by shard in name order is key order. Nothing else
        there is the service's: a directory or a symlink named like a key is neither
        listed nor deleted (repair stopped at a directory, and followed a symlink out)."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir():
                continue
            for name in sorted(os.listdir(shard)):
                with contextlib.suppress(FileNotFoundError):  # deleted since the listing
                    status = os.lstat(shard / name)
                    if S_ISREG(status.st_mode):
                        yield shard.name, name, status

    def delete_partial(self, ref: str) -> None:
        if not _PARTIAL.fullmatch(ref):
            raise ValueError(f"not a partial write: {ref!r}")
        try:
            (self.root / ref).unlink(missing_ok=True)
        except OSError as error:
            raise BackendUnavailable("Cannot delete from the blob directory") from error

    def ping(self, writes: bool = True) -> None:
        try:
            if not writes:
                with os.scandir(self.root) as entries:
                    next(entries, None)
                return
            with tempfile.TemporaryFile(dir=self.root) as probe:
                probe.write(b"ok")
        except OSError as error:
            doing = "write to" if writes else "read"
            raise BackendUnavailable(f"Cannot {doing} the blob directory {self.root}") from error

    def close(self) -> None:
        pass


class FileRange(io.RawIOBase):
    """A window `start <= i < stop` on an open file.

    Reads stop at the window's end, and `fileno()`, `seek()` and `tell()` work on the
    underlying file, so gunicorn can sendfile() from the current offset: `socket.sendfile`
    seeks the file after sending, and a window that refused to seek made gunicorn drop the
    keep-alive connection after every ranged response.
    """

    def __init__(self, file: BinaryIO, start: int, stop: int):
        super().__init__()
        self.file = file
        self.stop = stop
        self.file.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.file.fileno()

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: max(self.stop - self.file.tell(), 0)]
        return self.file.readinto(view) or 0

    def close(self) -> None:
        self.file.close()
        super().close()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a file renamed into it, say) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
