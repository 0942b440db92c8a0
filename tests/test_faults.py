"""Faults: a backend fails mid-operation, times out or is unreachable."""

from __future__ import annotations

import http.server
import json
import logging
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from image_api.errors import BackendUnavailable, Conflict
from image_api.repository import scan_all
from tests.helpers import (
    TEST_SECRET,
    Faulty,
    ImagesClient,
    assert_replaced,
    closed_port,
    exact_match,
    make_image,
    timed,
)


class Recording:
    """Wraps a backend and notes the name of every method called."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


def state(service):
    """({id: key} of the records clients can see, sorted blob keys)."""
    records = {r.id: r.key for r in scan_all(service.repository) if r.status == "active"}
    blobs = sorted(b.key for b in service.storage.list())
    return records, blobs


def pending(service):
    return [r.id for r in scan_all(service.repository) if r.status == "pending"]


def assert_unavailable(response):
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json()["code"] == "backend_unavailable"
    assert int(response.headers["Retry-After"]) > 0


def test_pending_insert_failure_stores_nothing(images, service):
    """The pending record is the first write: when it fails, no blob is ever written."""
    service.repository = Faulty(service.repository, "insert")
    service.storage = Recording(service.storage)
    assert_unavailable(images.upload())
    assert service.storage.calls == []
    service.storage = service.storage.inner
    assert state(service) == ({}, [])
    assert pending(service) == []


def test_blob_write_failure_on_upload_stores_nothing(images, service):
    service.storage = Faulty(service.storage, "put", after=True)
    assert_unavailable(images.upload())
    service.storage = service.storage.inner
    assert state(service) == ({}, [])
    assert pending(service) == []


def test_blob_write_failure_on_replace_keeps_the_old_image(client, images, service):
    data = make_image(color="red")
    image_id = images.create(data)["_id"]
    before = state(service)
    service.storage = Faulty(service.storage, "put", after=True)
    assert_unavailable(images.replace(image_id, make_image(color="blue")))
    assert state(service) == before
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 1
    assert client.get(f"/api/images/{image_id}/download").data == data


def assert_every_record_has_its_blob(service):
    records, blobs = state(service)
    assert set(records.values()) <= set(blobs)


def test_metadata_update_failure_on_replace_keeps_the_old_image(client, images, service):
    data = make_image(color="red")
    image_id = images.create(data)["_id"]
    before = state(service)
    service.repository = Faulty(service.repository, "update")
    assert_unavailable(images.replace(image_id, make_image(color="blue")))
    service.repository = service.repository.inner
    assert state(service) == before
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 1
    assert client.get(f"/api/images/{image_id}/download").data == data


def test_pending_insert_in_doubt_leaves_nothing_visible(client, images, service):
    service.repository = Faulty(service.repository, "insert", after=True)
    assert_unavailable(images.upload())
    assert state(service) == ({}, [])
    assert client.get("/api/images").get_json()["total"] == 0


def test_activation_that_landed_despite_an_error_is_a_success(images, service):
    service.repository = Faulty(service.repository, "activate", after=True)
    response = images.upload()
    assert response.status_code == 201
    records, blobs = state(service)
    assert list(records) == [response.get_json()["image"]["_id"]]
    assert list(records.values()) == blobs
    assert pending(service) == []


def test_update_that_landed_despite_an_error_is_a_success(client, images, service):
    image_id = images.create(make_image(color="red"))["_id"]
    old_key = service.repository.get(image_id).key
    service.repository = Faulty(service.repository, "update", after=True)
    new = make_image(color="blue")
    response = images.replace(image_id, new)
    assert response.status_code == 200 and response.get_json()["image"]["version"] == 2
    service.repository = service.repository.inner
    assert_replaced(service, image_id, old_key)  # the new blob is live, the old one retired
    assert client.get(f"/api/images/{image_id}/download").data == new


class DownAfter:
    """Delegates to a backend until `method` has run; then that call and all later ones fail.

    Models a write that lands just before the database stops answering.
    """

    def __init__(self, inner, method):
        self.inner, self.method, self.down = inner, method, False

    def __getattr__(self, name):
        attr = getattr(self.inner, name)

        def call(*args, **kwargs):
            if self.down:
                raise BackendUnavailable()
            result = attr(*args, **kwargs)
            if name == self.method:
                self.down = True
                raise BackendUnavailable()
            return result

        return call


@pytest.mark.parametrize("operation", ["activate", "update"])
def test_a_write_in_doubt_keeps_the_new_blob_rather_than_risk_a_dangling_record(
    images, service, operation
):
    image_id = images.create(make_image(color="red"))["_id"]
    real = service.repository
    service.repository = DownAfter(real, operation)
    if operation == "activate":
        response = images.upload(make_image(color="blue"))
    else:
        response = images.replace(image_id, make_image(color="blue"))
    assert_unavailable(response)
    service.repository = real
    assert_every_record_has_its_blob(service)
    records, blobs = state(service)
    # The blob the service could not account for is kept, for `repair` to judge.
    assert len(blobs) == len(records) + (1 if operation == "update" else 0)


def test_blob_delete_failure_after_the_record_is_gone_still_deletes(client, images, service):
    image_id = images.create()["_id"]
    key = service.repository.get(image_id).key
    service.storage = Faulty(service.storage, "delete")
    assert client.delete(f"/api/images/{image_id}").status_code == 200
    assert client.get(f"/api/images/{image_id}").status_code == 404
    service.storage = service.storage.inner
    # The blob is left for `repair`; no record points at it.
    assert state(service) == ({}, [key])


def _race_two_replaces(client, service, image_id, headers=None) -> dict[str, int]:
    """Two PUTs of `image_id` that have both read version 1 and stored their bytes before
    either switches the record; the status each colour got."""
    real = service.repository
    both_read = threading.Barrier(2, timeout=10)
    first_tries = threading.local()

    class RaceToUpdate(Faulty):
        def update(self, record, expected_version):
            if not getattr(first_tries, "done", False):
                first_tries.done = True
                both_read.wait()  # both requests have read version 1 and written a blob
            return real.update(record, expected_version)

    service.repository = RaceToUpdate(real)
    statuses = {}

    def put(color):
        own_client = ImagesClient(client.application.test_client())
        response = own_client.replace(image_id, make_image(color=color), headers=headers)
        statuses[color] = response.status_code

    threads = [threading.Thread(target=put, args=(c,)) for c in ("red", "blue")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    service.repository = real
    return statuses


def test_concurrent_unconditional_replaces_both_land_last_writer_wins(client, images, service):
    """A PUT without preconditions replaces whatever version is current: the one that
    lost the race re-reads and lands on top (version 3), and both replaced blobs are
    retired, none orphaned."""
    image_id = images.create()["_id"]
    old_key = service.repository.get(image_id).key
    statuses = _race_two_replaces(client, service, image_id)
    assert statuses == {"red": 200, "blue": 200}
    record = service.repository.get(image_id)
    assert record.version == 3
    keys = sorted(blob.key for blob in service.storage.list())
    assert len(keys) == 3 and old_key in keys and record.key in keys
    middle = next(key for key in keys if key not in (old_key, record.key))
    for replaced in (old_key, middle):
        assert service.repository.retired_until(replaced) is not None
    assert service.repository.retired_until(record.key) is None
    assert client.get(f"/api/images/{image_id}/download").data in (
        make_image(color="red"),
        make_image(color="blue"),
    )


def test_a_replace_that_keeps_losing_races_is_a_409_and_leaves_no_blob(client, images, service):
    image_id = images.create()["_id"]
    old_key = service.repository.get(image_id).key
    real = service.repository
    service.repository = Faulty(real, "update", error=Conflict("another replace won"))
    response = images.replace(image_id, make_image(color="blue"))
    service.repository = real
    assert response.status_code == 409 and response.get_json()["code"] == "conflict"
    assert [blob.key for blob in service.storage.list()] == [old_key]
    assert service.repository.get(image_id).version == 1


def test_concurrent_conditional_replaces_one_wins_and_the_other_is_412(client, images, service):
    image_id = images.create()["_id"]
    old_key = service.repository.get(image_id).key
    etag = client.get(f"/api/images/{image_id}").headers["ETag"]
    statuses = _race_two_replaces(client, service, image_id, headers={"If-Match": etag})
    assert sorted(statuses.values()) == [200, 412]
    assert_replaced(service, image_id, old_key)  # the loser's blob is gone
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 2


# --- unreachable and stalled backends, with the real drivers -------------------------------


#: Short timeouts: every call to these backends fails, so nothing waits on a timeout that
#: could have succeeded, and each failure costs a fraction of a second.
FAST = {"BACKEND_CONNECT_TIMEOUT": "0.1", "BACKEND_READ_TIMEOUT": "0.1", "PROBE_TIMEOUT": "0.1"}
AWS = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
#: Far above what these requests take (well under a second), far below gunicorn's worker
#: timeout: only a request that waits on nothing in particular would exceed it.
BOUNDED = 10


@pytest.mark.parametrize("kind", ["refused", "stalled"])
def test_unreachable_s3_is_503_within_bounded_time(
    make_app, tmp_path, stalled_server, one_attempt, kind
):
    address = f"127.0.0.1:{closed_port()}" if kind == "refused" else stalled_server
    env = {"DATA_DIR": str(tmp_path), "S3_BUCKET_NAME": "b", "S3_ENDPOINT_URL": f"http://{address}"}
    app = make_app({**env, **AWS, **FAST})
    client = app.test_client()
    response, seconds = timed(lambda: ImagesClient(client).upload())
    assert_unavailable(response)
    assert seconds < BOUNDED
    assert list(scan_all(app.extensions["image_api"].repository)) == []
    ready, seconds = timed(lambda: client.get("/readyz"))
    assert ready.status_code == 503 and "s3" in ready.get_json()["message"]
    assert seconds < BOUNDED


@pytest.fixture
def failing_s3():
    """An S3 endpoint that answers every request 503 (retryable), noting its method first:
    by the time a client has its answer, the request is counted."""
    methods = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue` at once

        def fail(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            methods.append(self.command)
            body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = fail

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield f"http://{host}:{port}", methods
    server.shutdown()
    thread.join()
    server.server_close()


def test_s3_retries_a_failing_call_then_gives_503_and_probes_once(make_app, tmp_path, failing_s3):
    url, methods = failing_s3
    env = {"DATA_DIR": str(tmp_path), "S3_BUCKET_NAME": "b", "S3_ENDPOINT_URL": url}
    app = make_app({**env, **AWS, **FAST})
    client = app.test_client()
    assert_unavailable(ImagesClient(client).upload())
    # The put, tried three times (s3.ATTEMPTS); then one attempt to remove whatever part of
    # it landed, as compensations get.
    assert methods == ["PUT", "PUT", "PUT", "DELETE"]
    assert list(scan_all(app.extensions["image_api"].repository)) == []
    methods.clear()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "s3" in ready.get_json()["message"]
    assert methods == ["HEAD"]  # a probe is never retried


@pytest.mark.parametrize("kind", ["refused", "stalled"])
def test_unreachable_mongodb_is_503_within_bounded_time(make_app, tmp_path, stalled_server, kind):
    address = f"127.0.0.1:{closed_port()}" if kind == "refused" else stalled_server
    url = f"mongodb://{address}/images?directConnection=true"
    app = make_app(
        {"DATA_DIR": str(tmp_path), "MONGODB_URL": url, "SECRET_KEY": TEST_SECRET, **FAST}
    )
    client = app.test_client(key="iak_000000000000_someone")  # looked up in MongoDB first
    response, seconds = timed(lambda: ImagesClient(client).upload())
    assert_unavailable(response)
    assert seconds < BOUNDED
    # The pending record could not be written, so no blob was either.
    assert list(app.extensions["image_api"].storage.list()) == []
    assert_unavailable(client.get("/api/images"))
    ready, seconds = timed(lambda: client.get("/readyz"))
    assert ready.status_code == 503 and "mongodb" in ready.get_json()["message"]
    assert seconds < BOUNDED


def impatient(repository, seconds: float = 0.2) -> None:
    """The SQLite repository behind the metrics' wrapper waits `seconds` for a lock, not
    its default 5 s (a locked database fails the same, sooner)."""
    sqlite = repository.inner
    sqlite.busy_timeout = seconds
    sqlite._local = threading.local()  # connections opened from now on take it


def test_locked_sqlite_is_503(make_app, tmp_path):
    import sqlite3

    app = make_app({"DATA_DIR": str(tmp_path)})
    impatient(app.extensions["image_api"].repository)
    locker = sqlite3.connect(tmp_path / "images.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        response = ImagesClient(app.test_client()).upload()
        assert_unavailable(response)
        # Which backend: the metadata store, not the blobs.
        assert response.get_json()["message"] == (
            "The metadata store (SQLite) is unavailable; retry later"
        )
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert list(app.extensions["image_api"].storage.list()) == []


def test_readiness_with_sqlite_locked_by_a_writer_is_503_within_the_probe_timeout(
    make_app, tmp_path
):
    """A writer holding SQLite's lock (a long transaction in another process): writes wait
    and fail, and /readyz said ready (SELECT 1 takes no lock). It is a 503 now, after
    PROBE_TIMEOUT (0.1 s), not the database's 5 s busy timeout."""
    import sqlite3

    app = make_app({"DATA_DIR": str(tmp_path), "PROBE_TIMEOUT": "0.1"})
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    locker = sqlite3.connect(tmp_path / "images.sqlite3", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        ready, seconds = timed(lambda: client.get("/readyz"))
        assert ready.status_code == 503 and "sqlite" in ready.get_json()["message"]
        assert seconds < 3
        assert client.get("/api/images").status_code == 200  # reads go on meanwhile
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert client.get("/readyz").status_code == 200


def test_a_full_disk_under_sqlite_is_503_never_500_and_loses_nothing(tmp_path):
    """SQLite runs UPDATE/DELETE ... RETURNING a step at a time: a full disk failed the
    fetch after `execute`, outside the translation of its errors, and uploads and deletes
    were a 500 with a traceback. Real writes in a process of its own (tests/full_disk_probe)."""
    probe = subprocess.run(
        [sys.executable, "-m", "tests.full_disk_probe", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert probe.returncode == 0, probe.stderr
    assert "Traceback" not in probe.stderr, probe.stderr
    seen = json.loads(probe.stdout)
    assert set(seen["full"]) <= {
        "upload 201 None",  # what still fitted
        "upload 503 backend_unavailable",
        "delete 503 backend_unavailable",
    }, seen
    assert seen["full"]["delete 503 backend_unavailable"] == 3
    assert seen["reads"] == [200, 200, 200]  # a delete that could not land left the image
    assert seen["again"] == [201, 201, 201] and seen["deleted"] == [200, 200, 200]


def test_reads_go_on_when_a_keys_use_cannot_be_noted(make_app, tmp_path, clock, caplog):
    """A key's last use is written once a minute, by the request that uses it: with the
    database locked by a writer (or read-only, or full), that write used to wait out the
    busy timeout and fail every read with a 503. It now waits a quarter of a second at
    most, and the read is served."""
    import sqlite3

    app = make_app({"DATA_DIR": str(tmp_path), "AUTH": "on"})
    service = app.extensions["image_api"]
    key, secret = service.keys.create("reader", "o", ["write"])
    reader = app.test_client(key=secret)
    image_id = ImagesClient(reader).create()["_id"]
    noted = service.repository.get_api_key(key.id).last_used_at
    ticks = [0.0]
    service.keys.monotonic = lambda: ticks[0]  # the reread window's clock, moved by hand
    clock.advance(timedelta(minutes=2))  # a use is due to be noted
    ticks[0] += 10
    locker = sqlite3.connect(tmp_path / "images.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger="image_api.access"):
            assert reader.get(f"/api/images/{image_id}").status_code == 200
            assert reader.get(f"/api/images/{image_id}/download").status_code == 200
        assert [r.getMessage() for r in caplog.records if r.name == "image_api.access"] == [
            "could not note the use of API key 'reader' now; a later use will"
        ]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert service.repository.get_api_key(key.id).last_used_at == noted
    ticks[0] += 10  # the key is read anew: its use is noted then
    assert reader.get(f"/api/images/{image_id}").status_code == 200
    assert service.repository.get_api_key(key.id).last_used_at > noted


def test_write_commands_on_a_locked_database_stop_in_one_line(make_app, tmp_path):
    import sqlite3

    app = make_app({"DATA_DIR": str(tmp_path)})
    service = app.extensions["image_api"]
    runner = app.test_cli_runner()
    assert runner.invoke(args=["keys", "create", "--name", "old", "--owner", "o"]).exit_code == 0
    impatient(service.repository)
    locker = sqlite3.connect(tmp_path / "images.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for args in (
            ["keys", "create", "--name", "new", "--owner", "o"],
            ["keys", "revoke", "old"],
        ):
            result = runner.invoke(args=args)
            assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
            assert result.output == (
                f"Error: {' '.join(args[:2])} stopped: The metadata store (SQLite) is "
                "unavailable; retry later: database is locked\n"
            )
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    listed = runner.invoke(args=["keys", "list"]).output
    assert "old" in listed and "new" not in listed and "revoked" not in listed


class _Down:
    """A metadata store that answers nothing (stopped, full, locked past its timeout)."""

    name = "down"

    def __getattr__(self, name):
        def unavailable(*args, **kwargs):
            raise BackendUnavailable() from OSError("connection refused")

        return unavailable


@pytest.mark.parametrize(
    "args",
    [
        ["init"],
        ["keys", "create", "--name", "k", "--owner", "o"],
        ["keys", "list"],
        ["keys", "revoke", "k"],
        ["strip-metadata"],
        ["repair"],
        ["repair", "--apply"],
    ],
    ids=" ".join,
)
def test_every_command_stops_in_one_line_when_the_metadata_store_is_down(make_app, tmp_path, args):
    app = make_app({"DATA_DIR": str(tmp_path)})
    service = app.extensions["image_api"]
    repository, service.repository = service.repository, _Down()
    try:
        result = app.test_cli_runner().invoke(args=args)
    finally:
        service.repository = repository
    assert isinstance(result.exception, SystemExit), result.exception
    name = " ".join(args[:2]) if args[0] == "keys" else args[0]
    assert result.output.endswith(
        f"Error: {name} stopped: {BackendUnavailable.message}: connection refused\n"
    )


@pytest.mark.parametrize("args", [["strip-metadata"], ["strip-metadata", "--apply"]], ids=" ".join)
def test_strip_metadata_stops_in_one_line_when_the_blob_storage_is_down(make_app, tmp_path, args):
    """It skipped each image with a line of its own and said it had checked them all,
    exit status 0: a cron job saw nothing wrong."""
    app = make_app({"DATA_DIR": str(tmp_path)})
    service = app.extensions["image_api"]
    for _ in range(3):
        ImagesClient(app.test_client()).create()
    storage, service.storage = service.storage, _Down()
    try:
        result = app.test_cli_runner().invoke(args=args)
    finally:
        service.storage = storage
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    assert result.output == (
        f"Error: strip-metadata stopped: {BackendUnavailable.message}: connection refused\n"
    )


@pytest.mark.parametrize("after", [False, True], ids=["before-write", "after-write"])
@pytest.mark.parametrize("operation", ["insert", "activate", "update", "delete"])
def test_repository_faults_then_repair_leave_an_exact_match(
    client, images, service, clock, operation, after
):
    from datetime import timedelta

    from image_api.repair import repair

    data = make_image(color="red")
    image_id = images.create(data)["_id"]
    real = service.repository
    service.repository = Faulty(real, operation, after=after)
    if operation in ("insert", "activate"):
        response = images.upload(make_image(color="blue"))
    elif operation == "update":
        response = images.replace(image_id, make_image(color="blue"))
    else:
        response = client.delete(f"/api/images/{image_id}")
    service.repository = real
    # A write that landed despite its error is read back and reported as done.
    if after and operation in ("activate", "update", "delete"):
        assert response.status_code == (201 if operation == "activate" else 200)
    else:
        assert_unavailable(response)

    # Repair runs a day later on the service's clock: everything left is old enough for a
    # grace of 0, however fast this machine is.
    clock.advance(timedelta(days=1))
    repair(service, timedelta(0), apply=True)
    assert exact_match(service)
    if operation != "delete":
        assert client.get(f"/api/images/{image_id}/download").status_code == 200
