"""Image metadata: one small interface, two backends (SQLite and MongoDB).

Every backend translates its driver's errors at this boundary: a missing or malformed id is
`NotFound`, a lost optimistic-concurrency race is `Conflict`, and anything that means "the
database cannot answer now" is `BackendUnavailable`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
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
    # "pending" from the insert until the blob is written, then "active". Clients see only
    # active records; a pending one left by a crash is swept by `repair`.
    status: str = "active"


#: A position in the newest-first order: (uploaded_at, id) of the last item seen.
Cursor = tuple[datetime, str]


@dataclass(frozen=True)
class Filters:
    """Which active records a list or count covers."""

    content_type: str | None = None
    uploaded_after: datetime | None = None  # inclusive
    uploaded_before: datetime | None = None  # exclusive


NO_FILTERS = Filters()


@dataclass(frozen=True)
class Claim:
    """An idempotency key as stored: who used it for what, and the response once known."""

    key: str
    fingerprint: str
    response: dict | None  # None while the first request is still running
    expires_at: datetime


class Repository(Protocol):
    """Where image metadata lives.

    - `insert(record)` stores a new record (pending or active).
    - `get(image_id)` returns the active record; `NotFound` if absent, pending or malformed.
    - `activate(image_id, moment)` makes a pending record active, stamped `moment`;
      `NotFound` if there is no such pending record.
    - `list_page(limit, after, filters)` returns up to `limit` active records newest first
      (by `uploaded_at`, then id), strictly after the cursor `after` when given;
      `count(filters)` counts them.
    - `update(record, expected_version)` replaces the active record only if its version is
      still `expected_version`: `Conflict` if it changed, `NotFound` if it is gone.
    - `delete(image_id, expected_version=None, status="active")` removes a record in that
      status (and at that version, when given) and returns it; `NotFound` / `Conflict`.
    - `all()` yields every record, pending ones included (for repair).
    - Idempotency keys: `claim(key, fingerprint, expires_at)` stores a new key and returns
      None, or returns the live `Claim` already stored; `finish(key, response)` records the
      response; `release(key)` forgets the key (the request failed, a retry may run).
    - `ping()` checks the database answers; `create()` makes tables and indexes
      (idempotent); `close()` releases connections.
    """

    name: str

    def create(self) -> None: ...

    def insert(self, record: ImageRecord) -> None: ...

    def get(self, image_id: str) -> ImageRecord: ...

    def activate(self, image_id: str, moment: datetime) -> ImageRecord: ...

    def list_page(
        self, limit: int, after: Cursor | None = None, filters: Filters = NO_FILTERS
    ) -> list[ImageRecord]: ...

    def count(self, filters: Filters = NO_FILTERS) -> int: ...

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord: ...

    def delete(
        self, image_id: str, expected_version: int | None = None, status: str = "active"
    ) -> ImageRecord: ...

    def all(self) -> Iterator[ImageRecord]: ...

    def claim(self, key: str, fingerprint: str, expires_at: datetime) -> Claim | None: ...

    def finish(self, key: str, response: dict) -> None: ...

    def release(self, key: str) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


_FIELDS = [field.name for field in dataclasses.fields(ImageRecord)]


# --- SQLite ---------------------------------------------------------------------------------

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS images (
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
        updated_at TEXT NOT NULL,
        status TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS images_newest_first ON images (status, uploaded_at DESC, id DESC)",
    """CREATE INDEX IF NOT EXISTS images_by_type
        ON images (status, content_type, uploaded_at DESC, id DESC)""",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        response TEXT,
        expires_at TEXT NOT NULL
    )""",
    # count(*) walks every matching row: `total` would grow with the table. Triggers keep
    # a count per (status, content type) in the same transaction as each write instead.
    """CREATE TABLE IF NOT EXISTS image_counts (
        status TEXT NOT NULL,
        content_type TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (status, content_type)
    )""",
    """CREATE TRIGGER IF NOT EXISTS images_counted_in AFTER INSERT ON images BEGIN
        INSERT OR IGNORE INTO image_counts VALUES (NEW.status, NEW.content_type, 0);
        UPDATE image_counts SET n = n + 1
            WHERE status = NEW.status AND content_type = NEW.content_type;
    END""",
    """CREATE TRIGGER IF NOT EXISTS images_counted_out AFTER DELETE ON images BEGIN
        UPDATE image_counts SET n = n - 1
            WHERE status = OLD.status AND content_type = OLD.content_type;
    END""",
    """CREATE TRIGGER IF NOT EXISTS images_counted_again
        AFTER UPDATE OF status, content_type ON images BEGIN
        UPDATE image_counts SET n = n - 1
            WHERE status = OLD.status AND content_type = OLD.content_type;
        INSERT OR IGNORE INTO image_counts VALUES (NEW.status, NEW.content_type, 0);
        UPDATE image_counts SET n = n + 1
            WHERE status = NEW.status AND content_type = NEW.content_type;
    END""",
]


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


_ID = re.compile(r"[0-9a-f]{24}")


def _valid_id(image_id: str) -> bool:
    """Whether `image_id` is an id this service makes (lower-case ObjectId hex)."""
    return isinstance(image_id, str) and _ID.fullmatch(image_id) is not None


def _sql_filters(filters: Filters) -> tuple[list[str], list]:
    clauses, params = ["status = 'active'"], []
    if filters.content_type:
        clauses.append("content_type = ?")
        params.append(filters.content_type)
    if filters.uploaded_after:
        clauses.append("uploaded_at >= ?")
        params.append(_to_text(filters.uploaded_after))
    if filters.uploaded_before:
        clauses.append("uploaded_at < ?")
        params.append(_to_text(filters.uploaded_before))
    return clauses, params


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

    def _execute(self, query: str, params=()) -> sqlite3.Cursor:
        with _sqlite_errors():
            return self._connection().execute(query, params)

    def create(self) -> None:
        with _sqlite_errors():
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    db.execute(statement)
                # Recount from scratch, in the same transaction as any new trigger: cheap,
                # and right even for a database made before the counts existed.
                db.execute("DELETE FROM image_counts")
                db.execute(
                    "INSERT INTO image_counts"
                    " SELECT status, content_type, count(*) FROM images GROUP BY 1, 2"
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def insert(self, record: ImageRecord) -> None:
        columns = ", ".join(_FIELDS)
        marks = ", ".join(f":{name}" for name in _FIELDS)
        self._execute(f"INSERT INTO images ({columns}) VALUES ({marks})", _to_row(record))

    def _find(self, image_id: str, status: str) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        row = self._execute(
            "SELECT * FROM images WHERE id = ? AND status = ?", (image_id, status)
        ).fetchone()
        if row is None:
            raise NotFound()
        return _from_row(row)

    def get(self, image_id: str) -> ImageRecord:
        return self._find(image_id, "active")

    def activate(self, image_id: str, moment: datetime) -> ImageRecord:
        stamp = _to_text(moment)
        row = self._execute(
            "UPDATE images SET status = 'active', uploaded_at = ?, updated_at = ?"
            " WHERE id = ? AND status = 'pending' RETURNING *",
            (stamp, stamp, image_id),
        ).fetchone()
        if row is None:
            raise NotFound()
        return _from_row(row)

    def list_page(
        self, limit: int, after: Cursor | None = None, filters: Filters = NO_FILTERS
    ) -> list[ImageRecord]:
        clauses, params = _sql_filters(filters)
        if after is not None:
            # Row-value comparison walks the (status, uploaded_at DESC, id DESC) index.
            clauses.append("(uploaded_at, id) < (?, ?)")
            params += [_to_text(after[0]), after[1]]
        query = (
            f"SELECT * FROM images WHERE {' AND '.join(clauses)}"
            " ORDER BY uploaded_at DESC, id DESC LIMIT ?"
        )
        rows = self._execute(query, [*params, limit]).fetchall()
        return [_from_row(row) for row in rows]

    def count(self, filters: Filters = NO_FILTERS) -> int:
        if filters.uploaded_after is None and filters.uploaded_before is None:
            query, params = "SELECT sum(n) FROM image_counts WHERE status = 'active'", []
            if filters.content_type:
                query += " AND content_type = ?"
                params.append(filters.content_type)
            return self._execute(query, params).fetchone()[0] or 0
        clauses, params = _sql_filters(filters)
        return self._execute(
            f"SELECT count(*) FROM images WHERE {' AND '.join(clauses)}", params
        ).fetchone()[0]

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord:
        assignments = ", ".join(f"{name} = :{name}" for name in _FIELDS if name != "id")
        cursor = self._execute(
            f"UPDATE images SET {assignments}"
            " WHERE id = :id AND version = :expected AND status = 'active'",
            {**_to_row(record), "expected": expected_version},
        )
        if cursor.rowcount == 1:
            return record
        self.get(record.id)  # raises NotFound if it is gone
        raise Conflict()

    def delete(
        self, image_id: str, expected_version: int | None = None, status: str = "active"
    ) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        query, params = "DELETE FROM images WHERE id = ? AND status = ?", [image_id, status]
        if expected_version is not None:
            query += " AND version = ?"
            params.append(expected_version)
        row = self._execute(query + " RETURNING *", params).fetchone()
        if row is not None:
            return _from_row(row)
        self._find(image_id, status)  # raises NotFound if it is gone
        raise Conflict()

    def all(self) -> Iterator[ImageRecord]:
        rows = self._execute("SELECT * FROM images ORDER BY id").fetchall()
        return iter([_from_row(row) for row in rows])

    def claim(self, key: str, fingerprint: str, expires_at: datetime) -> Claim | None:
        now = _to_text(datetime.now(UTC))
        # One statement: an expired key is taken over, a live one is left as it is.
        cursor = self._execute(
            "INSERT INTO idempotency_keys (key, fingerprint, response, expires_at)"
            " VALUES (?, ?, NULL, ?) ON CONFLICT (key) DO UPDATE SET"
            " fingerprint = excluded.fingerprint, response = NULL,"
            " expires_at = excluded.expires_at WHERE idempotency_keys.expires_at <= ?",
            (key, fingerprint, _to_text(expires_at), now),
        )
        if cursor.rowcount == 1:
            return None
        row = self._execute("SELECT * FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
        if row is None:  # released between the two statements: try again
            return self.claim(key, fingerprint, expires_at)
        return Claim(
            key=row["key"],
            fingerprint=row["fingerprint"],
            response=json.loads(row["response"]) if row["response"] else None,
            expires_at=datetime.fromisoformat(row["expires_at"]),
        )

    def finish(self, key: str, response: dict) -> None:
        self._execute(
            "UPDATE idempotency_keys SET response = ? WHERE key = ?", (json.dumps(response), key)
        )

    def release(self, key: str) -> None:
        self._execute("DELETE FROM idempotency_keys WHERE key = ? AND response IS NULL", (key,))

    def ping(self) -> None:
        self._execute("SELECT 1").fetchone()

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


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _from_document(document: dict) -> ImageRecord:
    values = {name: document[name] for name in _FIELDS if name != "id"}
    values["id"] = str(document["_id"])
    values["uploaded_at"] = _aware(values["uploaded_at"])
    values["updated_at"] = _aware(values["updated_at"])
    return ImageRecord(**values)


def _mongo_filters(filters: Filters) -> dict:
    query: dict = {"status": "active"}
    if filters.content_type:
        query["content_type"] = filters.content_type
    moment = {}
    if filters.uploaded_after:
        moment["$gte"] = filters.uploaded_after
    if filters.uploaded_before:
        moment["$lt"] = filters.uploaded_before
    if moment:
        query["uploaded_at"] = moment
    return query


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
        # AutoReconnect, NetworkTimeout, write concern errors...: the write may have landed.
        raise BackendUnavailable() from error


_NEWEST_FIRST = [("uploaded_at", -1), ("_id", -1)]


class MongoRepository:
    """Metadata in MongoDB collections, through a ready-made database handle.

    MongoDB keeps datetimes to the millisecond; the service makes its timestamps at that
    precision so every backend returns what it was given.
    """

    name = "mongodb"

    def __init__(self, database, write_concern: str | int = "majority", probe_timeout=2.0):
        from pymongo import WriteConcern

        self.database = database
        self.probe_timeout = probe_timeout
        concern = WriteConcern(w=write_concern)
        self.images = database.get_collection("images", write_concern=concern)
        self.keys = database.get_collection("idempotency_keys", write_concern=concern)

    def create(self) -> None:
        with _mongo_errors():
            self.images.create_index([("status", 1), *_NEWEST_FIRST], name="images_newest_first")
            self.images.create_index(
                [("status", 1), ("content_type", 1), *_NEWEST_FIRST], name="images_by_type"
            )
            # MongoDB deletes expired keys itself (within about a minute); `claim` also
            # treats an expired key as free, so the exact moment does not matter.
            self.keys.create_index("expires_at", expireAfterSeconds=0, name="keys_expire")

    def insert(self, record: ImageRecord) -> None:
        with _mongo_errors():
            self.images.insert_one(_to_document(record))

    def _find(self, image_id: str, status: str) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        with _mongo_errors():
            document = self.images.find_one({"_id": ObjectId(image_id), "status": status})
        if document is None:
            raise NotFound()
        return _from_document(document)

    def get(self, image_id: str) -> ImageRecord:
        return self._find(image_id, "active")

    def activate(self, image_id: str, moment: datetime) -> ImageRecord:
        from pymongo import ReturnDocument

        with _mongo_errors():
            document = self.images.find_one_and_update(
                {"_id": ObjectId(image_id), "status": "pending"},
                {"$set": {"status": "active", "uploaded_at": moment, "updated_at": moment}},
                return_document=ReturnDocument.AFTER,
            )
        if document is None:
            raise NotFound()
        return _from_document(document)

    def list_page(
        self, limit: int, after: Cursor | None = None, filters: Filters = NO_FILTERS
    ) -> list[ImageRecord]:
        query = _mongo_filters(filters)
        if after is not None:
            moment, last_id = after[0], ObjectId(after[1])
            query["$or"] = [
                {"uploaded_at": {"$lt": moment}},
                {"uploaded_at": moment, "_id": {"$lt": last_id}},
            ]
        with _mongo_errors():
            documents = list(self.images.find(query).sort(_NEWEST_FIRST).limit(limit))
        return [_from_document(document) for document in documents]

    def count(self, filters: Filters = NO_FILTERS) -> int:
        with _mongo_errors():
            return self.images.count_documents(_mongo_filters(filters))

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord:
        document = _to_document(record)
        with _mongo_errors():
            result = self.images.replace_one(
                {"_id": document["_id"], "version": expected_version, "status": "active"},
                document,
            )
        if result.matched_count == 1:
            return record
        self.get(record.id)  # raises NotFound if it is gone
        raise Conflict()

    def delete(
        self, image_id: str, expected_version: int | None = None, status: str = "active"
    ) -> ImageRecord:
        if not _valid_id(image_id):
            raise NotFound()
        query = {"_id": ObjectId(image_id), "status": status}
        if expected_version is not None:
            query["version"] = expected_version
        with _mongo_errors():
            document = self.images.find_one_and_delete(query)
        if document is not None:
            return _from_document(document)
        self._find(image_id, status)  # raises NotFound if it is gone
        raise Conflict()

    def all(self) -> Iterator[ImageRecord]:
        with _mongo_errors():
            documents = list(self.images.find({}).sort("_id", 1))
        return iter([_from_document(document) for document in documents])

    def claim(self, key: str, fingerprint: str, expires_at: datetime) -> Claim | None:
        from pymongo.errors import DuplicateKeyError

        fresh = {"fingerprint": fingerprint, "response": None, "expires_at": expires_at}
        with _mongo_errors():
            try:
                # Matches an expired key (taken over) or none (inserted by the upsert); a
                # live key makes the upsert collide on _id instead.
                self.keys.update_one(
                    {"_id": key, "expires_at": {"$lte": datetime.now(UTC)}},
                    {"$set": fresh},
                    upsert=True,
                )
                return None
            except DuplicateKeyError:
                pass
            document = self.keys.find_one({"_id": key})
        if document is None:  # released in between: try again
            return self.claim(key, fingerprint, expires_at)
        return Claim(
            key=key,
            fingerprint=document["fingerprint"],
            response=document["response"],
            expires_at=_aware(document["expires_at"]),
        )

    def finish(self, key: str, response: dict) -> None:
        with _mongo_errors():
            self.keys.update_one({"_id": key}, {"$set": {"response": response}})

    def release(self, key: str) -> None:
        with _mongo_errors():
            self.keys.delete_one({"_id": key, "response": None})

    def ping(self) -> None:
        import pymongo

        # pymongo.timeout bounds the whole call, server selection included.
        with _mongo_errors(), pymongo.timeout(self.probe_timeout):
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
            make_mongo_database(settings),
            _write_concern(settings.mongodb_write_concern),
            probe_timeout=settings.probe_timeout,
        )
    return SqliteRepository(settings.data_dir / "images.sqlite3")
