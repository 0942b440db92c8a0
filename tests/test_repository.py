"""The repository contract, run against every metadata backend."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import mongomock
import pymongo
import pytest
from bson import ObjectId

from image_api.errors import BackendUnavailable, Conflict, NotFound
from image_api.records import (
    RECORD_FIELDS,
    Filters,
    ImageRecord,
    Variant,
    new_id,
    new_key,
    utc_now,
)
from image_api.repository import scan_all
from image_api.repository.mongodb import MongoRepository
from image_api.repository.sqlite import SqliteRepository
from tests.helpers import closed_port, shared_directory, unprivileged

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def make_record(uploaded_at: datetime = T0, **changes) -> ImageRecord:
    values = dict(
        id=new_id(),
        key="ab" * 16,
        filename="cat é.png",
        content_type="image/png",
        size=123,
        width=4,
        height=3,
        sha256="0" * 64,
        version=1,
        uploaded_at=uploaded_at,
        updated_at=uploaded_at,
    )
    values.update(changes)
    return ImageRecord(**values)


def test_insert_then_get_returns_the_same_record(repository):
    record = make_record()
    repository.insert(record)
    assert repository.get(record.id) == record
    turned = make_record(orientation=8, placeholder="#a0b1c2")
    repository.insert(turned)
    assert repository.get(turned.id) == turned


def test_get_missing_or_malformed_id_is_not_found(repository):
    for image_id in (new_id(), "nope", "", "z" * 24, "../../etc/passwd"):
        with pytest.raises(NotFound):
            repository.get(image_id)


def test_list_is_newest_first_with_ties_broken_by_id(repository):
    older = make_record(T0)
    same_a, same_b = sorted(
        [make_record(T0 + timedelta(seconds=1)), make_record(T0 + timedelta(seconds=1))],
        key=lambda r: r.id,
    )
    newest = make_record(T0 + timedelta(seconds=2))
    for record in (same_a, older, newest, same_b):
        repository.insert(record)
    assert [r.id for r in repository.list_page(10)] == [newest.id, same_b.id, same_a.id, older.id]
    assert repository.count() == 4


def test_list_page_after_a_cursor_continues_without_gaps_or_repeats(repository):
    records = [make_record(T0 + timedelta(milliseconds=i // 2)) for i in range(7)]
    for record in records:
        repository.insert(record)
    seen, after = [], None
    while page := repository.list_page(3, after):
        seen += page
        after = (page[-1].uploaded_at, page[-1].id)
    expected = sorted(records, key=lambda r: (r.uploaded_at, r.id), reverse=True)
    assert seen == expected


def test_update_applies_only_on_the_expected_version(repository):
    record = make_record()
    repository.insert(record)
    changed = dataclasses.replace(record, key="cd" * 16, version=2, size=999)
    assert repository.update(changed, expected_version=1) == changed
    assert repository.get(record.id) == changed
    stale = dataclasses.replace(record, key="ef" * 16, version=2)
    with pytest.raises(Conflict):
        repository.update(stale, expected_version=1)
    assert repository.get(record.id) == changed


def test_update_of_a_missing_record_is_not_found(repository):
    with pytest.raises(NotFound):
        repository.update(make_record(), expected_version=1)


def test_delete_returns_the_record_and_removes_it(repository):
    record = make_record()
    repository.insert(record)
    assert repository.delete(record.id) == record
    with pytest.raises(NotFound):
        repository.get(record.id)
    with pytest.raises(NotFound):
        repository.delete(record.id)
    assert repository.count() == 0


def test_all_yields_every_record(repository):
    records = [make_record() for _ in range(3)]
    for record in records:
        repository.insert(record)
    assert sorted(scan_all(repository), key=lambda r: r.id) == sorted(records, key=lambda r: r.id)


def test_ping_answers_when_the_database_does(repository):
    assert repository.ping() is None


def test_a_new_sqlite_database_and_its_wal_are_readable_by_their_owner_only(tmp_path):
    """It holds every filename, owner and API key hash: not for other local users."""
    repository = SqliteRepository(tmp_path / "images.sqlite3")
    repository.create()
    repository.insert(make_record())
    for name in ("images.sqlite3", "images.sqlite3-wal", "images.sqlite3-shm"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    repository.close()


def test_a_database_writable_again_takes_writes_again_on_every_thread():
    """A thread that first opened the database while it was read-only (a restore, before
    its chmod) kept a read-only connection: its writes failed until a restart, while
    /healthz said all was well (found by the second outside attack)."""
    with shared_directory() as directory:
        path = directory / "images.sqlite3"
        owner = SqliteRepository(path)
        owner.create()
        owner.insert(make_record())
        names = ("images.sqlite3", "images.sqlite3-wal", "images.sqlite3-shm")
        try:
            with unprivileged():
                worker = SqliteRepository(path)
            for name in names:
                (directory / name).chmod(0o444)
            with unprivileged(), pytest.raises(BackendUnavailable):
                worker.insert(make_record())
            for name in names:
                (directory / name).chmod(0o666)
            with unprivileged():
                worker.insert(make_record())
                worker.ping()
                assert worker.count() == 2
                worker.close()
        finally:
            owner.close()


def test_a_database_moved_away_while_serving_is_unavailable_not_made_again(tmp_path):
    """Each new thread made an empty database at the old path, so /readyz said ready on
    it while uploads failed (found by the second outside attack)."""
    repository = SqliteRepository(tmp_path / "data" / "images.sqlite3")
    repository.create()
    repository.insert(make_record())
    (tmp_path / "data").rename(tmp_path / "moved")
    answers = []

    def new_thread():
        try:
            repository.ping()
            answers.append("ready")
        except BackendUnavailable:
            answers.append("unavailable")

    thread = threading.Thread(target=new_thread)
    thread.start()
    thread.join(10)
    assert answers == ["unavailable"] and not (tmp_path / "data").exists()
    repository.close()


def test_a_database_made_readable_by_others_is_made_owner_only_at_start(tmp_path, caplog):
    """Releases before the one above left the umask's 0644 on the database and its WAL."""
    path = tmp_path / "images.sqlite3"
    path.touch()
    path.chmod(0o644)
    older = sqlite3.connect(path, isolation_level=None)  # open: its WAL files stay
    older.execute("PRAGMA journal_mode=WAL")
    older.execute("CREATE TABLE t (x)")
    names = ("images.sqlite3", "images.sqlite3-wal", "images.sqlite3-shm")
    assert [(tmp_path / name).stat().st_mode & 0o777 for name in names] == [0o644] * 3
    repository = SqliteRepository(path)
    with caplog.at_level("WARNING", logger="image_api"):
        repository.create()
    assert [(tmp_path / name).stat().st_mode & 0o777 for name in names] == [0o600] * 3
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / name} was readable by other users; now by its owner only" for name in names
    ]
    repository.insert(make_record())
    assert repository.count() == 1
    repository.close()
    older.close()


def test_ping_raises_backend_unavailable_when_the_database_cannot_answer(repository, tmp_path):
    if isinstance(repository, SqliteRepository):
        broken = SqliteRepository(tmp_path)  # a directory, not a database file
    else:
        # mongomock cannot fail: the same class on the real driver, with no server there.
        client = pymongo.MongoClient(
            f"mongodb://127.0.0.1:{closed_port()}/?directConnection=true",
            serverSelectionTimeoutMS=200,
            connectTimeoutMS=200,
        )
        broken = MongoRepository(client["test"], probe_timeout=0.2)
    try:
        with pytest.raises(BackendUnavailable):
            broken.ping()
    finally:
        broken.close()
    assert repository.ping() is None  # the working database next to it is unaffected


def test_ping_says_a_database_this_process_may_only_read_takes_no_writes():
    """A database file the service's user may not write (its mode or owner after a restore,
    a read-only mount) answers reads and refuses every write: not ready, unless the
    service is READ_ONLY (`writes=False`). SELECT 1 said ready."""
    with shared_directory() as directory:
        path = directory / "images.sqlite3"
        owner = SqliteRepository(path)
        owner.create()
        owner.insert(make_record())  # its WAL files stay, as while the service runs
        for name in ("images.sqlite3", "images.sqlite3-wal", "images.sqlite3-shm"):
            (directory / name).chmod(0o444)
        try:
            with unprivileged():
                reader = SqliteRepository(path)
                try:
                    reader.ping(writes=False)
                    assert reader.count() == 1
                    with pytest.raises(BackendUnavailable):
                        reader.ping()
                    with pytest.raises(BackendUnavailable):
                        reader.insert(make_record())
                    assert reader.count() == 1  # the probe left the connection usable
                finally:
                    reader.close()
        finally:
            owner.close()


# --- pending records ---------------------------------------------------------------------


def test_pending_records_are_invisible_until_activated(repository):
    record = make_record(status="pending")
    repository.insert(record)
    with pytest.raises(NotFound):
        repository.get(record.id)
    assert repository.list_page(10) == [] and repository.count() == 0
    with pytest.raises(NotFound):
        repository.update(dataclasses.replace(record, version=2), expected_version=1)
    with pytest.raises(NotFound):
        repository.delete(record.id)
    assert [r.id for r in scan_all(repository)] == [record.id]

    later = T0 + timedelta(minutes=5)
    active = repository.activate(record.id, later)
    assert active == dataclasses.replace(
        record, status="active", uploaded_at=later, updated_at=later
    )
    assert repository.get(record.id) == active
    with pytest.raises(NotFound):
        repository.activate(record.id, later)  # only a pending record can be activated


def test_delete_by_status_and_version(repository):
    pending = make_record(status="pending")
    active = make_record(version=3)
    repository.insert(pending)
    repository.insert(active)
    assert repository.delete(pending.id, status="pending") == pending
    with pytest.raises(NotFound):
        repository.delete(active.id, status="pending")
    with pytest.raises(Conflict):
        repository.delete(active.id, expected_version=2)
    assert repository.delete(active.id, expected_version=3) == active


# --- filters -------------------------------------------------------------------------------


def test_filters_narrow_lists_and_counts(repository):
    png = make_record(T0, content_type="image/png")
    jpeg = make_record(T0 + timedelta(hours=1), content_type="image/jpeg")
    late_png = make_record(T0 + timedelta(hours=2), content_type="image/png")
    for record in (png, jpeg, late_png):
        repository.insert(record)
    pngs = Filters(content_type="image/png")
    assert repository.list_page(10, filters=pngs) == [late_png, png]
    assert repository.count(pngs) == 2
    window = Filters(uploaded_after=jpeg.uploaded_at, uploaded_before=late_png.uploaded_at)
    assert repository.list_page(10, filters=window) == [jpeg]  # after inclusive, before not
    assert repository.count(window) == 1
    after_cursor = (late_png.uploaded_at, late_png.id)
    assert repository.list_page(10, after_cursor, pngs) == [png]


# --- idempotency keys ----------------------------------------------------------------------


def test_claim_finish_and_replay(repository):
    # Real time: MongoDB's TTL index (and mongomock's) deletes expired keys by the wall clock.
    now = utc_now()
    expires = now + timedelta(hours=1)
    assert repository.claim("k1", "fp-a", "img-1", now, expires) is None
    in_flight = repository.claim("k1", "fp-a", "img-1", now, expires)
    assert (in_flight.fingerprint, in_flight.resource, in_flight.response) == (
        "fp-a",
        "img-1",
        None,
    )
    assert in_flight.expires_at == expires
    repository.finish("k1", {"id": "abc", "n": 1})
    done = repository.claim("k1", "fp-b", "img-2", now, expires)
    assert (done.fingerprint, done.resource, done.response) == (
        "fp-a",
        "img-1",
        {"id": "abc", "n": 1},
    )
    repository.release("k1")  # a finished key is kept
    assert repository.claim("k1", "fp-a", "img-1", now, expires).response == {"id": "abc", "n": 1}


def test_claims_are_listed_in_key_order(repository):
    now = utc_now()
    for key in ("b", "a", "c"):
        assert repository.claim(key, f"fp-{key}", None, now, now + timedelta(hours=1)) is None
    repository.finish("a", {"status": 201})
    listed = repository.scan_claims(None, 10)
    assert [claim.key for claim in listed] == ["a", "b", "c"]
    assert listed[0].response == {"status": 201} and listed[1].response is None
    assert [claim.key for claim in repository.scan_claims("a", 1)] == ["b"]


def test_release_frees_a_key_and_expired_keys_are_free(repository):
    now = utc_now()
    expires = now + timedelta(hours=1)
    assert repository.claim("k2", "fp", None, now, expires) is None
    repository.release("k2")
    assert repository.claim("k2", "fp-new", None, now, expires) is None
    assert repository.claim("k3", "old", None, now, now) is None
    # A key that expires at `now` is expired at `now`: it is taken over.
    assert repository.claim("k3", "new", None, now, expires) is None
    assert repository.claim("k3", "other", None, now, expires).fingerprint == "new"
    # ...and a live one is not, up to the moment it expires.
    later = expires - timedelta(milliseconds=1)
    assert repository.claim("k3", "other", None, later, expires).fingerprint == "new"
    assert repository.claim("k3", "other", None, expires, expires + timedelta(hours=1)) is None


def make_variant(image_id: str, version: int = 1, key: str | None = None, **changes) -> Variant:
    values = dict(
        key=key or new_key(),
        image_id=image_id,
        version=version,
        params="64x32;box=0.000,0.000,200.000,100.000;webp;q=80",
        content_type="image/webp",
        size=99,
        width=64,
        height=32,
        sha256="1" * 64,
        created_at=T0,
    )
    values.update(changes)
    return Variant(**values)


def test_variants_are_stored_found_listed_and_forgotten(repository):
    image = make_record()
    repository.insert(image)
    first, second = make_variant(image.id), make_variant(image.id, version=2)
    other = make_variant(new_id())
    for variant in (first, second, other):
        assert repository.insert_variant(variant) == variant
    assert repository.get_variant(first.key) == first
    assert repository.get_variant(new_key()) is None
    assert repository.find_variant(image.id, 1, first.params) == first
    assert repository.find_variant(image.id, 2, first.params) == second
    assert repository.find_variant(image.id, 3, first.params) is None
    assert repository.find_variant(image.id, 1, "64x32;other") is None
    assert repository.variants_of(image.id) == sorted([first, second], key=lambda v: v.key)
    assert repository.variants_of(new_id()) == []
    # Another worker's render of the same variant (its own blob key), recorded second, is
    # not recorded: the first is returned, for that worker to send and its blob to go.
    late = dataclasses.replace(first, key=new_key(), sha256="2" * 64)
    assert repository.insert_variant(late) == first
    assert repository.get_variant(late.key) is None
    assert repository.find_variant(image.id, 1, first.params) == first
    assert repository.insert_variant(first) == first  # the same one again (a migration rerun)
    everything = sorted([first, second, other], key=lambda v: v.key)
    assert repository.scan_variants(None, 10) == everything
    assert repository.scan_variants(everything[0].key, 1) == [everything[1]]
    repository.delete_variant(first.key)
    repository.delete_variant(first.key)  # a missing one is success
    assert repository.get_variant(first.key) is None
    assert repository.variants_of(image.id) == [second]


def test_sqlite_upgrades_a_database_an_older_release_made(tmp_path):
    """The first release kept no schema version, no counters and no claim resource."""
    import sqlite3

    path = tmp_path / "images.sqlite3"
    columns = ", ".join(f"{name} TEXT" for name in FIRST_RELEASE_FIELDS)
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE images ({columns})")
        db.execute(
            "CREATE TABLE idempotency_keys"
            " (key TEXT PRIMARY KEY, fingerprint TEXT, response TEXT, expires_at TEXT)"
        )
    old = SqliteRepository(path)
    records = [make_record(content_type=t) for t in ("image/png", "image/png", "image/gif")]
    with sqlite3.connect(path) as db:
        for record in [*records, make_record(status="pending")]:
            db.execute(
                f"INSERT INTO images VALUES ({', '.join('?' * len(FIRST_RELEASE_FIELDS))})",
                [str(v) if not isinstance(v, int) else v for v in _row(record)],
            )
    old.create()
    assert old.count() == 3
    assert old.count(Filters(content_type="image/png")) == 2
    now = utc_now()
    assert old.claim("k", "fp", "img", now, now + timedelta(hours=1)) is None
    assert old.claim("k", "fp", "img", now, now + timedelta(hours=1)).resource == "img"
    old.create()  # idempotent: counts are not redone or doubled
    old.insert(make_record(content_type="image/gif"))
    assert old.count(Filters(content_type="image/gif")) == 2
    # Images stored before owners existed belong to the first admin key's owner; before
    # stripping, they had orientation 1 and no placeholder.
    assert {old.get(record.id).owner for record in records} == {"admin"}
    assert old.count(Filters(owner="admin")) == 4
    assert {(old.get(r.id).orientation, old.get(r.id).placeholder) for r in records} == {(1, None)}
    turned = make_record(orientation=6, placeholder="#102030")
    old.insert(turned)
    stored = old.get(turned.id)
    assert (stored.orientation, stored.placeholder) == (6, "#102030")
    variant = make_variant(turned.id)  # variants came later still
    old.insert_variant(variant)
    assert old.variants_of(turned.id) == [variant]
    old.close()


def test_mongodb_gives_images_stored_before_owners_to_the_admin_owner():
    database = mongomock.MongoClient(tz_aware=True)["old"]
    record = make_record()
    document = {
        name: value
        for name, value in dataclasses.asdict(record).items()
        if name not in ("owner", "orientation", "placeholder")
    }
    document["_id"] = ObjectId(document.pop("id"))
    document["status"] = "active"
    database["images"].insert_one(document)  # as the release before owners wrote it
    repository = MongoRepository(database)
    repository.create()
    assert database["images"].find_one({"_id": document["_id"]})["owner"] == "admin"
    assert repository.get(record.id).owner == "admin"
    assert (repository.get(record.id).orientation, repository.get(record.id).placeholder) == (
        1,
        None,
    )
    assert [r.id for r in repository.list_page(10, None, Filters(owner="admin"))] == [record.id]
    assert repository.list_page(10, None, Filters(owner="bob")) == []


def _variant_of_the_release_before(image_id: str, params: str) -> Variant:
    """A variant as releases before a blob key per render stored it: under a key made from
    the image id, version and params."""
    named = hashlib.sha256(f"{image_id}/1/{params}".encode()).hexdigest()[:32]
    return make_variant(image_id, key=named, params=params)


def test_sqlite_finds_the_variants_the_release_before_stored(tmp_path):
    import sqlite3

    from image_api.repository import sqlite as module

    path = tmp_path / "images.sqlite3"
    with sqlite3.connect(path) as db:  # the schema of the release before
        for statements in module._MIGRATIONS[:-1]:
            for statement in statements:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {len(module._MIGRATIONS) - 1}")
    old = SqliteRepository(path)
    image = make_record()
    old.insert(image)
    variant = _variant_of_the_release_before(image.id, "64x32;webp")
    old.insert_variant(variant)
    old.create()
    assert old.find_variant(image.id, 1, "64x32;webp") == variant
    late = dataclasses.replace(variant, key=new_key())
    assert old.insert_variant(late) == variant  # one variant per spec from now on
    indexes = {row[1] for row in old._execute("PRAGMA index_list(variants)")}
    assert "variants_by_spec" in indexes and "variants_by_image" not in indexes
    old.close()


def test_mongodb_finds_the_variants_the_release_before_stored():
    database = mongomock.MongoClient(tz_aware=True)["old"]
    database["variants"].create_index("image_id", name="variants_by_image")
    variant = _variant_of_the_release_before(new_id(), "64x32;webp")
    document = dataclasses.asdict(variant)
    document["_id"] = document.pop("key")
    database["variants"].insert_one(document)
    repository = MongoRepository(database)
    repository.create()
    repository.create()  # idempotent: the old index is gone already
    assert repository.find_variant(variant.image_id, 1, "64x32;webp") == variant
    late = dataclasses.replace(variant, key=new_key())
    assert repository.insert_variant(late) == variant
    assert set(database["variants"].index_information()) == {"_id_", "variants_by_spec"}


#: The columns of the first release's images table (before owners).
FIRST_RELEASE_FIELDS = [
    name for name in RECORD_FIELDS if name not in ("owner", "orientation", "placeholder")
]


def _row(record: ImageRecord) -> list:
    values = dataclasses.asdict(record)
    values["uploaded_at"] = record.uploaded_at.isoformat(timespec="microseconds")
    values["updated_at"] = record.updated_at.isoformat(timespec="microseconds")
    return [values[name] for name in FIRST_RELEASE_FIELDS]


def test_sqlite_schema_creation_is_safe_when_many_processes_start_at_once(tmp_path):
    """Every gunicorn worker creates the schema as it boots: on a new file, all at once."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(10):
        path = tmp_path / f"race-{attempt}.sqlite3"
        start, results = context.Event(), context.Queue()
        workers = [
            context.Process(target=_create_schema, args=(str(path), start, results))
            for _ in range(6)
        ]
        for worker in workers:
            worker.start()
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in workers)
        for worker in workers:
            worker.join()
        assert outcomes == ["ok"] * 6
        repository = SqliteRepository(path)
        repository.insert(make_record())
        assert repository.count() == 1
        repository.close()


def _create_schema(path: str, start, results) -> None:
    start.wait()
    try:
        repository = SqliteRepository(path)
        repository.create()
        repository.close()
        results.put("ok")
    except Exception as error:  # noqa: BLE001 - reported to the parent, which fails
        results.put(repr(error))
