"""Image metadata: one small interface, two backends (SQLite and MongoDB).

Every backend translates its driver's errors at this boundary: a missing or malformed id is
`NotFound`, a lost optimistic-concurrency race is `Conflict`, and anything that means "the
database cannot answer now" is `BackendUnavailable`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from bson import ObjectId

from .errors import BackendUnavailable, Conflict, NotFound


def new_id() -> str:
    """A fresh image id: a 24-hex ObjectId string, on every backend."""
    return str(ObjectId())


@dataclass(frozen=True)
class ImageRecord:
    """One image's metadata. `key` names its blob in storage."""

    id: str
    key: str
    filename: str
    content_type: str
    size: int
    width: int
    height: int
    sha256: str
    version: int
    uploaded_at: datetime
    updated_at: datetime


#: A position in the newest-first order: (uploaded_at, id) of the last item seen.
Cursor = tuple[datetime, str]


class Repository(Protocol):
    """Where image metadata lives.

    - `insert(record)` stores a new record.
    - `get(image_id)` returns it; `NotFound` if absent or if the id is malformed.
    - `list_page(limit, after)` returns up to `limit` records newest first (by `uploaded_at`,
      then id), strictly after the cursor `after` when given; `count()` counts them all.
    - `update(record, expected_version)` replaces the stored record only if its version is
      still `expected_version`: `Conflict` if it changed, `NotFound` if it is gone.
    - `delete(image_id)` removes the record and returns it; `NotFound` if absent.
    - `all()` yields every record (for repair); `ping()` checks the database answers.
    - `create()` makes tables and indexes; it is idempotent. `close()` releases connections.
    """

    name: str

    def create(self) -> None: ...

    def insert(self, record: ImageRecord) -> None: ...

    def get(self, image_id: str) -> ImageRecord: ...

    def list_page(self, limit: int, after: Cursor | None = None) -> list[ImageRecord]: ...

    def count(self) -> int: ...

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord: ...

    def delete(self, image_id: str) -> ImageRecord: ...

    def all(self) -> Iterator[ImageRecord]: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


_FIELDS = [field.name for field in dataclasses.fields(ImageRecord)]


# --- SQLite ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    version INTEGER NOT NULL,
    uploaded_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_newest_first ON images (uploaded_at DESC, id DESC);
"""


def _to_text(moment: datetime) -> str:
    # Fixed-width UTC text sorts in time order.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _from_row(row: sqlite3.Row) -> ImageRecord:
    values = dict(row)
    values["uploaded_at"] = datetime.fromisoformat(values["uploaded_at"])
    values["updated_at"] = datetime.fromisoformat(values["updated_at"])
    return ImageRecord(**values)


def _to_row(record: ImageRecord) -> dict:
    values = dataclasses.asdict(record)
    values["uploaded_at"] = _to_text(record.uploaded_at)
    values["updated_at"] = _to_text(record.updated_at)
    return values


def _valid_id(image_id: str) -> bool:
    return isinstance(image_id, str) and len(image_id) == 24 and ObjectId.is_valid(image_id)


@contextlib.contextmanager
def _sqlite_errors():
    try:
        yield
    except sqlite3.IntegrityError as error:
        raise Conflict() from error
    except sqlite3.Error as error:
        # "database is locked" past the busy timeout, disk I/O errors, a vanished file...
        # SQLite commits locally and atomically: a failed statement did not take effect.
        raise BackendUnavailable(in_doubt=False) from error


class SqliteRepository:
    """Metadata in one SQLite file, in WAL mode so several gunicorn workers share it."""

    name = "sqlite"

    def __init__(self, path: Path, busy_timeout: float = 5.0):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        # sqlite3 connections belong to one thread and must not cross a fork: one per
        # thread, remade if the process id changes.
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, not only a process crash; metadata writes
            # are few and small, so the extra fsync is cheap.
            connection.execute("PRAGMA synchronous=FULL")
            self._local.connection, self._local.pid = connection, pid
            with self._lock:
                self._opened.append(connection)
        return self._local.connection

    def create(self) -> None:
        with _sqlite_errors():
            self._connection().executescript(_SCHEMA)

    def insert(self, record: ImageRecord) -> None:
        columns = ", ".join(_FIELDS)
        marks = ", ".join(f":{name}" for name in _FIELDS)
        with _sqlite_errors():
            self._connection().execute(
                f"INSERT INTO images ({columns}) VALUES ({marks})", _to_row(record)
            )

    def get(self, image_id: str) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        with _sqlite_errors():
            row = (
                self._connection()
                .execute("SELECT * FROM images WHERE id = ?", (image_id,))
                .fetchone()
            )
        if row is None:
            raise NotFound()
        return _from_row(row)

    def list_page(self, limit: int, after: Cursor | None = None) -> list[ImageRecord]:
        query, params = "SELECT * FROM images", []
        if after is not None:
            # Row-value comparison walks the (uploaded_at DESC, id DESC) index.
            query += " WHERE (uploaded_at, id) < (?, ?)"
            params += [_to_text(after[0]), after[1]]
        query += " ORDER BY uploaded_at DESC, id DESC LIMIT ?"
        params.append(limit)
        with _sqlite_errors():
            rows = self._connection().execute(query, params).fetchall()
        return [_from_row(row) for row in rows]

    def count(self) -> int:
        with _sqlite_errors():
            return self._connection().execute("SELECT count(*) FROM images").fetchone()[0]

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord:
        assignments = ", ".join(f"{name} = :{name}" for name in _FIELDS if name != "id")
        with _sqlite_errors():
            cursor = self._connection().execute(
                f"UPDATE images SET {assignments} WHERE id = :id AND version = :expected",
                {**_to_row(record), "expected": expected_version},
            )
        if cursor.rowcount == 1:
            return record
        self.get(record.id)  # raises NotFound if it is gone
        raise Conflict()

    def delete(self, image_id: str) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        with _sqlite_errors():
            row = (
                self._connection()
                .execute("DELETE FROM images WHERE id = ? RETURNING *", (image_id,))
                .fetchone()
            )
        if row is None:
            raise NotFound()
        return _from_row(row)

    def all(self) -> Iterator[ImageRecord]:
        with _sqlite_errors():
            rows = self._connection().execute("SELECT * FROM images ORDER BY id").fetchall()
        return iter([_from_row(row) for row in rows])

    def ping(self) -> None:
        with _sqlite_errors():
            self._connection().execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            # Closing from another thread is refused by sqlite3; those die with their thread.
            with contextlib.suppress(sqlite3.ProgrammingError):
                connection.close()
        self._local = threading.local()


# --- MongoDB --------------------------------------------------------------------------------


def _to_document(record: ImageRecord) -> dict:
    document = dataclasses.asdict(record)
    document["_id"] = ObjectId(document.pop("id"))
    return document


def _from_document(document: dict) -> ImageRecord:
    values = {name: document[name] for name in _FIELDS if name != "id"}
    values["id"] = str(document["_id"])
    for name in ("uploaded_at", "updated_at"):
        moment = values[name]
        values[name] = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return ImageRecord(**values)


@contextlib.contextmanager
def _mongo_errors():
    from pymongo.errors import DuplicateKeyError, PyMongoError, ServerSelectionTimeoutError

    try:
        yield
    except DuplicateKeyError as error:
        raise Conflict() from error
    except ServerSelectionTimeoutError as error:
        # No server was reachable, so the operation was never sent.
        raise BackendUnavailable(in_doubt=False) from error
    except PyMongoError as error:
        # AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError, write concern errors...
        raise BackendUnavailable() from error


_NEWEST_FIRST = [("uploaded_at", -1), ("_id", -1)]


class MongoRepository:
    """Metadata in one MongoDB collection, through a ready-made database handle.

    MongoDB keeps datetimes to the millisecond; the service makes its timestamps at that
    precision so every backend returns what it was given.
    """

    name = "mongodb"

    def __init__(self, database, write_concern: str | int = "majority"):
        from pymongo import WriteConcern

        self.database = database
        self.images = database.get_collection("images", write_concern=WriteConcern(w=write_concern))

    def create(self) -> None:
        with _mongo_errors():
            self.images.create_index(_NEWEST_FIRST, name="images_newest_first")

    def insert(self, record: ImageRecord) -> None:
        with _mongo_errors():
            self.images.insert_one(_to_document(record))

    def get(self, image_id: str) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        with _mongo_errors():
            document = self.images.find_one({"_id": ObjectId(image_id)})
        if document is None:
            raise NotFound()
        return _from_document(document)

    def list_page(self, limit: int, after: Cursor | None = None) -> list[ImageRecord]:
        query = {}
        if after is not None:
            moment, last_id = after[0], ObjectId(after[1])
            query = {
                "$or": [
                    {"uploaded_at": {"$lt": moment}},
                    {"uploaded_at": moment, "_id": {"$lt": last_id}},
                ]
            }
        with _mongo_errors():
            documents = list(self.images.find(query).sort(_NEWEST_FIRST).limit(limit))
        return [_from_document(document) for document in documents]

    def count(self) -> int:
        with _mongo_errors():
            return self.images.count_documents({})

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord:
        document = _to_document(record)
        with _mongo_errors():
            result = self.images.replace_one(
                {"_id": document["_id"], "version": expected_version}, document
            )
        if result.matched_count == 1:
            return record
        self.get(record.id)  # raises NotFound if it is gone
        raise Conflict()

    def delete(self, image_id: str) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        with _mongo_errors():
            document = self.images.find_one_and_delete({"_id": ObjectId(image_id)})
        if document is None:
            raise NotFound()
        return _from_document(document)

    def all(self) -> Iterator[ImageRecord]:
        with _mongo_errors():
            documents = list(self.images.find({}).sort("_id", 1))
        return iter([_from_document(document) for document in documents])

    def ping(self) -> None:
        with _mongo_errors():
            self.database.command("ping")

    def close(self) -> None:
        self.database.client.close()


def make_mongo_database(settings):
    """A pymongo database handle with explicit timeouts; the database is named in the URL,
    else by NAME."""
    from pymongo import MongoClient

    timeout_ms = int(settings.backend_connect_timeout * 1000)
    client = MongoClient(
        settings.mongodb_url,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=int(settings.backend_read_timeout * 1000),
        tz_aware=True,
        appname=settings.name,
    )
    return client.get_default_database(default=settings.name)


def _write_concern(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def repository_from_settings(settings) -> Repository:
    """The metadata backend the settings choose."""
    if settings.mongodb_url:
        return MongoRepository(
            make_mongo_database(settings), _write_concern(settings.mongodb_write_concern)
        )
    return SqliteRepository(settings.data_dir / "images.sqlite3")
