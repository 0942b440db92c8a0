"""Metadata in one SQLite file (the embedded default), shared by every gunicorn worker."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from .. import deadline
from ..access import ApiKey, Scope
from ..errors import BackendUnavailable, Conflict, NotFound
from ..records import (
    NO_FILTERS,
    RECORD_FIELDS,
    VARIANT_FIELDS,
    Claim,
    Cursor,
    Filters,
    ImageRecord,
    Status,
    Variant,
    valid_id,
)

log = logging.getLogger(__name__)

# Each entry brings the schema from version i to i + 1 (`PRAGMA user_version`), in one
# transaction. Statements are idempotent, because databases made before the schema was
# versioned are at version 0 with some of these tables already in place.
_MIGRATIONS: list[list[str]] = [
    [
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
        """CREATE INDEX IF NOT EXISTS images_newest_first
            ON images (status, uploaded_at DESC, id DESC)""",
        """CREATE INDEX IF NOT EXISTS images_by_type
            ON images (status, content_type, uploaded_at DESC, id DESC)""",
        """CREATE TABLE IF NOT EXISTS idempotency_keys (
            key TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            response TEXT,
            expires_at TEXT NOT NULL
        )""",
        # count(*) walks every matching row: `total` would grow with the table. Triggers
        # keep a count per (status, content type) in the same transaction as each write.
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
        # Counted once, in the same transaction as the triggers: right even for a database
        # an older release made before the counts existed.
        "DELETE FROM image_counts",
        """INSERT INTO image_counts
            SELECT status, content_type, count(*) FROM images GROUP BY 1, 2""",
    ],
    [
        # Repair walks records in blob-key order beside the blobs.
        "CREATE INDEX IF NOT EXISTS images_by_key ON images (key)",
        # The image an idempotent request writes, so a retry can find its result.
        "ALTER TABLE idempotency_keys ADD COLUMN resource TEXT",
    ],
    [
        """CREATE TABLE IF NOT EXISTS retired_blobs (
            key TEXT PRIMARY KEY,
            delete_after TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS retired_blobs_due ON retired_blobs (delete_after)",
        # Expired idempotency keys are deleted a few at a time by later claims.
        "CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at)",
    ],
    [
        """CREATE TABLE IF NOT EXISTS api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            scopes TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            last_used_at TEXT,
            revoked_at TEXT
        )""",
    ],
    [
        # Images stored before owners existed belong to the first admin key's owner.
        "ALTER TABLE images ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin'",
        """CREATE INDEX IF NOT EXISTS images_by_owner
            ON images (owner, status, uploaded_at DESC, id DESC)""",
    ],
    [
        # What metadata stripping keeps: the orientation, and a placeholder colour.
        "ALTER TABLE images ADD COLUMN orientation INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE images ADD COLUMN placeholder TEXT",
    ],
    [
        # Rendered variants, cached in the blob storage (repair tells them from orphans).
        """CREATE TABLE IF NOT EXISTS variants (
            key TEXT PRIMARY KEY,
            image_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            params TEXT NOT NULL,
            content_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS variants_by_image ON variants (image_id)",
    ],
    [
        # Each render has a blob key of its own (a retired one is never used again); a
        # variant is found by what it shows, one per image, version and params.
        """CREATE UNIQUE INDEX IF NOT EXISTS variants_by_spec
            ON variants (image_id, version, params)""",
        "DROP INDEX IF EXISTS variants_by_image",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)


#: What a client is told when this backend cannot answer now.
UNAVAILABLE = "The metadata store (SQLite) is unavailable; retry later"


def _to_text(moment: datetime) -> str:
    # Fixed-width UTC text sorts in time order.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _from_row(row: sqlite3.Row) -> ImageRecord:
    values = dict(row)
    values["uploaded_at"] = datetime.fromisoformat(values["uploaded_at"])
    values["updated_at"] = datetime.fromisoformat(values["updated_at"])
    values["status"] = Status(values["status"])
    return ImageRecord(**values)


def _to_row(record: ImageRecord) -> dict:
    # Its fields are flat values: asdict's deep copy of each would only cost time.
    values = {name: getattr(record, name) for name in RECORD_FIELDS}
    values["uploaded_at"] = _to_text(record.uploaded_at)
    values["updated_at"] = _to_text(record.updated_at)
    values["status"] = str(record.status)
    return values


def _claim_from_row(row: sqlite3.Row) -> Claim:
    return Claim(
        key=row["key"],
        fingerprint=row["fingerprint"],
        resource=row["resource"],
        response=json.loads(row["response"]) if row["response"] else None,
        expires_at=datetime.fromisoformat(row["expires_at"]),
    )


def _variant_from_row(row: sqlite3.Row) -> Variant:
    values = dict(row)
    values["created_at"] = datetime.fromisoformat(values["created_at"])
    return Variant(**values)


def _key_from_row(row: sqlite3.Row) -> ApiKey:
    values = dict(row)
    values["scopes"] = tuple(Scope(scope) for scope in values["scopes"].split(","))
    for name in ("created_at", "last_used_at", "revoked_at"):
        if values[name] is not None:
            values[name] = datetime.fromisoformat(values[name])
    return ApiKey(**values)


def _where(filters: Filters) -> tuple[list[str], list]:
    clauses, params = ["status = 'active'"], []
    if filters.owner is not None:
        clauses.append("owner = ?")
        params.append(filters.owner)
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
        raise BackendUnavailable(UNAVAILABLE, in_doubt=False) from error


class _Rows:
    """A statement's rows, every one fetched inside `_sqlite_errors`: SQLite runs an
    UPDATE ... RETURNING (and a SELECT) a step per row, so a full disk or a lock can fail
    the fetch after `execute` succeeded, and that is a 503 like any other."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, cursor: sqlite3.Cursor):
        self.rows = cursor.fetchall()
        self.rowcount = cursor.rowcount

    def fetchone(self) -> sqlite3.Row | None:
        return self.rows[0] if self.rows else None

    def __iter__(self):
        return iter(self.rows)


_COLUMNS = ", ".join(RECORD_FIELDS)
_VARIANT_COLUMNS = ", ".join(VARIANT_FIELDS)
_VARIANT_MARKS = ", ".join(f":{name}" for name in VARIANT_FIELDS)
_MARKS = ", ".join(f":{name}" for name in RECORD_FIELDS)
_ASSIGNMENTS = ", ".join(f"{name} = :{name}" for name in RECORD_FIELDS if name != "id")


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
        self._opened_once = False

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            if self._opened_once:
                # The file this process opened, not a new one: a database moved or deleted
                # while serving is an error (503, /readyz), not an empty store per thread.
                target = f"{self.path.resolve().as_uri()}?mode=rw"
            else:
                self._make_file()
                target = str(self.path)
            connection = sqlite3.connect(
                target, timeout=self.busy_timeout, isolation_level=None, uri=self._opened_once
            )
            connection.row_factory = sqlite3.Row
            # FULL: a commit survives power loss, not only a process crash.
            connection.execute("PRAGMA synchronous=FULL")
            self._local.connection, self._local.pid = connection, pid
            self._local.busy_ms = int(self.busy_timeout * 1000)
            with self._lock:
                self._opened.append(connection)
            self._opened_once = True
        return self._local.connection

    def _make_file(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Owner only: it holds every filename, owner and key hash. SQLite gives its
            # -wal and -shm files the database's own mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        except OSError as error:
            raise sqlite3.OperationalError(f"cannot create {self.path}") from error

    def _forget_connection(self) -> None:
        """This thread's next call opens the database again: one opened while the file was
        read-only stays read-only after it is writable again (a restore's chmod)."""
        connection = getattr(self._local, "connection", None)
        self._local.pid = None
        if connection is not None:
            with self._lock:
                if connection in self._opened:
                    self._opened.remove(connection)
            connection.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """`_sqlite_errors`, and a connection that found the database read-only is not
        used again (see `_forget_connection`)."""
        try:
            with _sqlite_errors():
                yield
        except BackendUnavailable as error:
            if getattr(error.__cause__, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY:
                self._forget_connection()
            raise

    def _execute(self, query: str, params=()) -> _Rows:
        with self._errors():
            db = self._connection()
            # A locked database waits at most what is left of the request's budget.
            busy_ms = int(deadline.time_left(self.busy_timeout) * 10) * 100
            if busy_ms != self._local.busy_ms:
                db.execute(f"PRAGMA busy_timeout = {max(busy_ms, 10)}")
                self._local.busy_ms = busy_ms
            return _Rows(db.execute(query, params))

    def create(self) -> None:
        """Switch to WAL and bring the schema to `SCHEMA_VERSION`.

        Safe when every gunicorn worker does it at once on a new file, and cheap on an
        existing one (it reads the version and stops).
        """
        with _sqlite_errors():
            db = self._connection()
            self._use_wal(db)
            self._owner_only()
            if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return
            db.execute("BEGIN IMMEDIATE")  # waits for the busy timeout, unlike the above
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for statements in _MIGRATIONS[version:]:
                    for statement in statements:
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _owner_only(self) -> None:
        """The database and its WAL files as new ones are made (0600): a file made by a
        release before that kept the umask's mode (0644, readable by every local user)."""
        for path in (self.path, *(Path(f"{self.path}{end}") for end in ("-wal", "-shm"))):
            try:
                status = path.stat()
                if status.st_mode & 0o077 and status.st_uid == os.geteuid():
                    path.chmod(status.st_mode & 0o700)
                    log.warning("%s was readable by other users; now by its owner only", path)
            except FileNotFoundError:
                pass
            except OSError as error:
                log.warning("could not make %s readable by its owner only: %s", path, error)

    def _use_wal(self, db: sqlite3.Connection) -> None:
        # Changing the journal mode does not wait on the busy timeout: when several
        # processes open a new file at once, all but one get "database is locked" at once.
        # WAL is a property of the file, so retry until someone has switched it.
        waited, pause = 0.0, 0.005
        while True:
            try:
                if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                    return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or waited >= self.busy_timeout:
                    raise
            time.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.1)

    def insert(self, record: ImageRecord) -> None:
        query = f"INSERT INTO images ({_COLUMNS}) VALUES ({_MARKS})"
        if record.status is not Status.PENDING:
            self._execute(query, _to_row(record))
            return
        # A pending record need not survive a power cut by itself: if it is lost, so is the
        # claim on its blob, which repair then collects as an orphan. So its commit skips
        # the WAL fsync; the activation's commit (synchronous=FULL) fsyncs the WAL up to
        # and including it, since a WAL is written in order. One fsync per upload saved.
        self._execute("PRAGMA synchronous=NORMAL")
        try:
            self._execute(query, _to_row(record))
        finally:
            self._execute("PRAGMA synchronous=FULL")

    def _find(self, image_id: str, status: Status) -> ImageRecord:
        if not valid_id(image_id):
            raise NotFound()
        row = self._execute(
            "SELECT * FROM images WHERE id = ? AND status = ?", (image_id, str(status))
        ).fetchone()
        if row is None:
            raise NotFound()
        return _from_row(row)

    def get(self, image_id: str) -> ImageRecord:
        return self._find(image_id, Status.ACTIVE)

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
        clauses, params = _where(filters)
        if after is not None:
            # Row-value comparison walks the (status, uploaded_at DESC, id DESC) index.
            clauses.append("(uploaded_at, id) < (?, ?)")
            params += [_to_text(after[0]), after[1]]
        query = (
            f"SELECT * FROM images WHERE {' AND '.join(clauses)}"
            " ORDER BY uploaded_at DESC, id DESC LIMIT ?"
        )
        return [_from_row(row) for row in self._execute(query, [*params, limit])]

    def count(self, filters: Filters = NO_FILTERS) -> int:
        # The kept counts are per content type; one owner's images are counted on the
        # (owner, status, uploaded_at) index.
        plain = filters.uploaded_after is None and filters.uploaded_before is None
        if plain and filters.owner is None:
            query, params = "SELECT sum(n) FROM image_counts WHERE status = 'active'", []
            if filters.content_type:
                query += " AND content_type = ?"
                params.append(filters.content_type)
            return self._execute(query, params).fetchone()[0] or 0
        clauses, params = _where(filters)
        query = f"SELECT count(*) FROM images WHERE {' AND '.join(clauses)}"
        return self._execute(query, params).fetchone()[0]

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord:
        cursor = self._execute(
            f"UPDATE images SET {_ASSIGNMENTS}"
            " WHERE id = :id AND version = :expected AND status = 'active'",
            {**_to_row(record), "expected": expected_version},
        )
        if cursor.rowcount == 1:
            return record
        self.get(record.id)  # raises NotFound if it is gone
        raise Conflict()

    def delete(
        self, image_id: str, expected_version: int | None = None, status: Status = Status.ACTIVE
    ) -> ImageRecord:
        if not valid_id(image_id):
            raise NotFound()
        query = "DELETE FROM images WHERE id = ? AND status = ?"
        params: list = [image_id, str(status)]
        if expected_version is not None:
            query += " AND version = ?"
            params.append(expected_version)
        row = self._execute(query + " RETURNING *", params).fetchone()
        if row is not None:
            return _from_row(row)
        self._find(image_id, status)  # raises NotFound if it is gone
        raise Conflict()

    def scan(self, after_key: str | None, limit: int) -> list[ImageRecord]:
        rows = self._execute(
            "SELECT * FROM images WHERE key > ? ORDER BY key LIMIT ?", (after_key or "", limit)
        )
        return [_from_row(row) for row in rows]

    def find_key(self, key: str) -> ImageRecord | None:
        row = self._execute("SELECT * FROM images WHERE key = ?", (key,)).fetchone()
        return None if row is None else _from_row(row)

    def retire(self, key: str, delete_after: datetime) -> None:
        self._execute(
            "INSERT INTO retired_blobs (key, delete_after) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET delete_after = excluded.delete_after",
            (key, _to_text(delete_after)),
        )

    def retired_until(self, key: str) -> datetime | None:
        row = self._execute("SELECT delete_after FROM retired_blobs WHERE key = ?", (key,))
        found = row.fetchone()
        return None if found is None else datetime.fromisoformat(found[0])

    def due_retired(self, now: datetime, limit: int) -> list[str]:
        rows = self._execute(
            "SELECT key FROM retired_blobs WHERE delete_after <= ? ORDER BY delete_after LIMIT ?",
            (_to_text(now), limit),
        )
        return [row[0] for row in rows]

    def forget_retired(self, key: str) -> None:
        self._execute("DELETE FROM retired_blobs WHERE key = ?", (key,))

    def insert_variant(self, variant: Variant) -> Variant:
        values = {**dataclasses.asdict(variant), "created_at": _to_text(variant.created_at)}
        inserted = self._execute(
            f"INSERT INTO variants ({_VARIANT_COLUMNS}) VALUES ({_VARIANT_MARKS})"
            " ON CONFLICT DO NOTHING",
            values,
        ).rowcount
        if inserted:
            return variant
        # Another worker's render of the same variant came first: it stays. (The same
        # variant again, a migration's rerun, is found the same way: its params are its.)
        found = self.find_variant(variant.image_id, variant.version, variant.params)
        return found or variant

    def find_variant(self, image_id: str, version: int, params: str) -> Variant | None:
        row = self._execute(
            "SELECT * FROM variants WHERE image_id = ? AND version = ? AND params = ?",
            (image_id, version, params),
        ).fetchone()
        return None if row is None else _variant_from_row(row)

    def get_variant(self, key: str) -> Variant | None:
        row = self._execute("SELECT * FROM variants WHERE key = ?", (key,)).fetchone()
        return None if row is None else _variant_from_row(row)

    def variants_of(self, image_id: str) -> list[Variant]:
        rows = self._execute("SELECT * FROM variants WHERE image_id = ? ORDER BY key", (image_id,))
        return [_variant_from_row(row) for row in rows]

    def delete_variant(self, key: str) -> None:
        self._execute("DELETE FROM variants WHERE key = ?", (key,))

    def scan_variants(self, after_key: str | None, limit: int) -> list[Variant]:
        rows = self._execute(
            "SELECT * FROM variants WHERE key > ? ORDER BY key LIMIT ?", (after_key or "", limit)
        )
        return [_variant_from_row(row) for row in rows]

    def claim(
        self,
        key: str,
        fingerprint: str,
        resource: str | None,
        now: datetime,
        expires_at: datetime,
    ) -> Claim | None:
        # One statement: an expired key is taken over, a live one is left as it is.
        cursor = self._execute(
            "INSERT INTO idempotency_keys (key, fingerprint, resource, response, expires_at)"
            " VALUES (?, ?, ?, NULL, ?) ON CONFLICT (key) DO UPDATE SET"
            " fingerprint = excluded.fingerprint, resource = excluded.resource,"
            " response = NULL, expires_at = excluded.expires_at"
            " WHERE idempotency_keys.expires_at <= ?",
            (key, fingerprint, resource, _to_text(expires_at), _to_text(now)),
        )
        if cursor.rowcount == 1:
            return None
        row = self._execute("SELECT * FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
        if row is None:  # released between the two statements: try again
            return self.claim(key, fingerprint, resource, now, expires_at)
        return _claim_from_row(row)

    def scan_claims(self, after_key: str | None, limit: int) -> list[Claim]:
        rows = self._execute(
            "SELECT * FROM idempotency_keys WHERE key > ? ORDER BY key LIMIT ?",
            (after_key or "", limit),
        )
        return [_claim_from_row(row) for row in rows]

    def purge_expired_keys(self, now: datetime, limit: int) -> int:
        cursor = self._execute(
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys"
            " WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
            (_to_text(now), limit),
        )
        return cursor.rowcount

    def finish(self, key: str, response: dict) -> None:
        self._execute(
            "UPDATE idempotency_keys SET response = ? WHERE key = ?", (json.dumps(response), key)
        )

    def release(self, key: str) -> None:
        self._execute("DELETE FROM idempotency_keys WHERE key = ? AND response IS NULL", (key,))

    def insert_api_key(self, key: ApiKey) -> None:
        self._execute(
            "INSERT INTO api_keys (id, name, owner, scopes, secret_hash, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                key.id,
                key.name,
                key.owner,
                ",".join(key.scopes),
                key.secret_hash,
                _to_text(key.created_at),
            ),
        )

    def get_api_key(self, key_id: str) -> ApiKey | None:
        row = self._execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _key_from_row(row)

    def list_api_keys(self) -> list[ApiKey]:
        return [_key_from_row(row) for row in self._execute("SELECT * FROM api_keys ORDER BY name")]

    def revoke_api_key(self, name: str, moment: datetime) -> ApiKey:
        row = self._execute(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING *",
            (_to_text(moment), name),
        ).fetchone()
        if row is None:
            raise NotFound(f"No active API key named {name!r}")
        return _key_from_row(row)

    def touch_api_key(self, key_id: str, moment: datetime) -> None:
        self._execute(
            "UPDATE api_keys SET last_used_at = ? WHERE id = ?", (_to_text(moment), key_id)
        )

    def backup_to(self, path: Path, progress=None) -> None:
        """A consistent copy of the database at `path`, a new file (SQLite's online backup:
        writers go on meanwhile, and the copy is the database at one moment). `progress` is
        called after each step of 1024 pages."""
        with _sqlite_errors():
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            copy = sqlite3.connect(path)
            try:
                self._connection().backup(copy, pages=1024, progress=progress)
            finally:
                copy.close()

    def ping(self, writes: bool = True) -> None:
        # `SELECT 1` answers without opening the file; the schema version is read from it.
        version = self._execute("PRAGMA user_version").fetchone()[0]
        if not writes:
            return
        # A database this process may only read (its mode, its owner, a read-only mount)
        # still grants a write lock when its WAL files exist: the first page written is
        # what is refused. The schema version, set to itself and rolled back, is one.
        with self._errors():
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(f"PRAGMA user_version = {int(version)}")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            # Closing from another thread is refused by sqlite3; those die with their thread.
            with contextlib.suppress(sqlite3.ProgrammingError):
                connection.close()
        self._local = threading.local()
