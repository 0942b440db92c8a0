"""Faults: a backend fails mid-operation, times out or is unreachable."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest

from image_api.errors import BackendUnavailable
from image_api.repository import scan_all
from tests.helpers import make_image


class Faulty:
    """Wraps a backend; the named methods raise `error` (after running, if `after`)."""

    def __init__(self, inner, *methods, error=None, after=False):
        self.inner, self.methods, self.after = inner, set(methods), after
        self.error = error or BackendUnavailable()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in self.methods:
            return attr

        def failing(*args, **kwargs):
            if self.after:
                attr(*args, **kwargs)
            raise self.error

        return failing


def upload(client, data):
    return client.post("/api/images/upload", data={"image": (io.BytesIO(data), "a.png")})


def replace(client, image_id, data):
    return client.put(f"/api/images/{image_id}", data={"image": (io.BytesIO(data), "b.png")})


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


def test_metadata_insert_failure_removes_the_new_blob(client, service):
    service.repository = Faulty(service.repository, "insert")
    assert_unavailable(upload(client, make_image()))
    assert state(service) == ({}, [])


def test_blob_write_failure_on_upload_stores_nothing(client, service):
    service.storage = Faulty(service.storage, "put", after=True)
    assert_unavailable(upload(client, make_image()))
    assert state(service) == ({}, [])


def test_blob_write_failure_on_replace_keeps_the_old_image(client, service):
    data = make_image(color="red")
    image_id = upload(client, data).get_json()["image"]["_id"]
    before = state(service)
    service.storage = Faulty(service.storage, "put", after=True)
    assert_unavailable(replace(client, image_id, make_image(color="blue")))
    assert state(service) == before
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 1
    assert client.get(f"/api/images/{image_id}/download").data == data


def assert_every_record_has_its_blob(service):
    records, blobs = state(service)
    assert set(records.values()) <= set(blobs)


def test_metadata_update_failure_on_replace_keeps_the_old_image(client, service):
    data = make_image(color="red")
    image_id = upload(client, data).get_json()["image"]["_id"]
    before = state(service)
    service.repository = Faulty(service.repository, "update")
    assert_unavailable(replace(client, image_id, make_image(color="blue")))
    assert state(service) == before
    assert client.get(f"/api/images/{image_id}/download").data == data


def test_pending_insert_in_doubt_leaves_nothing_visible(client, service):
    service.repository = Faulty(service.repository, "insert", after=True)
    assert_unavailable(upload(client, make_image()))
    assert state(service) == ({}, [])
    assert client.get("/api/images").get_json()["total"] == 0


def test_activation_that_landed_despite_an_error_is_a_success(client, service):
    service.repository = Faulty(service.repository, "activate", after=True)
    response = upload(client, make_image())
    assert response.status_code == 201
    records, blobs = state(service)
    assert list(records) == [response.get_json()["image"]["_id"]]
    assert list(records.values()) == blobs
    assert pending(service) == []


def test_update_that_landed_despite_an_error_is_a_success(client, service):
    image_id = upload(client, make_image(color="red")).get_json()["image"]["_id"]
    service.repository = Faulty(service.repository, "update", after=True)
    new = make_image(color="blue")
    response = replace(client, image_id, new)
    assert response.status_code == 200 and response.get_json()["image"]["version"] == 2
    records, blobs = state(service)
    assert [records[image_id]] == blobs  # the old blob is gone, the new one is live
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
    client, service, operation
):
    image_id = upload(client, make_image(color="red")).get_json()["image"]["_id"]
    real = service.repository
    service.repository = DownAfter(real, operation)
    if operation == "activate":
        response = upload(client, make_image(color="blue"))
    else:
        response = replace(client, image_id, make_image(color="blue"))
    assert_unavailable(response)
    service.repository = real
    assert_every_record_has_its_blob(service)
    records, blobs = state(service)
    # The blob the service could not account for is kept, for `repair` to judge.
    assert len(blobs) == len(records) + (1 if operation == "update" else 0)


def test_blob_delete_failure_after_the_record_is_gone_still_deletes(client, service):
    image_id = upload(client, make_image()).get_json()["image"]["_id"]
    service.storage = Faulty(service.storage, "delete")
    assert client.delete(f"/api/images/{image_id}").status_code == 200
    assert client.get(f"/api/images/{image_id}").status_code == 404
    # The blob is left for `repair`; no record points at it.
    assert state(service)[0] == {}


def test_concurrent_replaces_leave_no_orphan(client, service):
    image_id = upload(client, make_image()).get_json()["image"]["_id"]
    real = service.repository
    both_read = threading.Barrier(2, timeout=10)

    class RaceToUpdate(Faulty):
        def update(self, record, expected_version):
            both_read.wait()  # both requests have read version 1 and written a blob
            return real.update(record, expected_version)

    service.repository = RaceToUpdate(real)
    statuses = []

    def put(color):
        response = replace(client.application.test_client(), image_id, make_image(color=color))
        statuses.append(response.status_code)

    threads = [threading.Thread(target=put, args=(c,)) for c in ("red", "blue")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    service.repository = real
    assert sorted(statuses) == [200, 409]
    records, blobs = state(service)
    assert blobs == [records[image_id]]
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 2


# --- unreachable and stalled backends, with the real drivers -------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stalled_server():
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted, stop = [], threading.Event()

    def serve():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


FAST = {"BACKEND_CONNECT_TIMEOUT": "0.3", "BACKEND_READ_TIMEOUT": "0.3", "PROBE_TIMEOUT": "0.5"}
AWS = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@pytest.mark.parametrize("kind", ["refused", "stalled"])
def test_unreachable_s3_is_503_within_bounded_time(make_app, tmp_path, stalled_server, kind):
    address = f"127.0.0.1:{closed_port()}" if kind == "refused" else stalled_server
    env = {"DATA_DIR": str(tmp_path), "S3_BUCKET_NAME": "b", "S3_ENDPOINT_URL": f"http://{address}"}
    app = make_app({**env, **AWS, **FAST})
    client = app.test_client()
    response, seconds = timed(lambda: upload(client, make_image()))
    assert_unavailable(response)
    # Three attempts of 0.3 s each plus backoff: far below gunicorn's worker timeout.
    assert seconds < 10
    assert list(scan_all(app.extensions["image_api"].repository)) == []
    ready, seconds = timed(lambda: client.get("/readyz"))
    assert ready.status_code == 503 and "s3" in ready.get_json()["message"]
    assert seconds < 2  # one attempt within PROBE_TIMEOUT, no retries


@pytest.mark.parametrize("kind", ["refused", "stalled"])
def test_unreachable_mongodb_is_503_within_bounded_time(make_app, tmp_path, stalled_server, kind):
    address = f"127.0.0.1:{closed_port()}" if kind == "refused" else stalled_server
    url = f"mongodb://{address}/images?directConnection=true"
    app = make_app({"DATA_DIR": str(tmp_path), "MONGODB_URL": url, **FAST})
    client = app.test_client()
    response, seconds = timed(lambda: upload(client, make_image()))
    assert_unavailable(response)
    assert seconds < 10
    # The pending record could not be written, so no blob was either.
    assert list(app.extensions["image_api"].storage.list()) == []
    assert_unavailable(client.get("/api/images"))
    ready, seconds = timed(lambda: client.get("/readyz"))
    assert ready.status_code == 503 and "mongodb" in ready.get_json()["message"]
    assert seconds < 2


def test_locked_sqlite_is_503(make_app, tmp_path):
    import sqlite3

    app = make_app({"DATA_DIR": str(tmp_path)})
    app.extensions["image_api"].repository.busy_timeout = 0.2
    app.extensions["image_api"].repository._local = threading.local()
    locker = sqlite3.connect(tmp_path / "images.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert_unavailable(upload(app.test_client(), make_image()))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert list(app.extensions["image_api"].storage.list()) == []


@pytest.mark.parametrize("after", [False, True], ids=["before-write", "after-write"])
@pytest.mark.parametrize("operation", ["insert", "activate", "update", "delete"])
def test_repository_faults_then_repair_leave_an_exact_match(
    client, service, clock, operation, after
):
    from datetime import timedelta

    from image_api.repair import repair

    data = make_image(color="red")
    image_id = upload(client, data).get_json()["image"]["_id"]
    real = service.repository
    service.repository = Faulty(real, operation, after=after)
    if operation in ("insert", "activate"):
        response = upload(client, make_image(color="blue"))
    elif operation == "update":
        response = replace(client, image_id, make_image(color="blue"))
    else:
        response = client.delete(f"/api/images/{image_id}")
    service.repository = real
    # A write that landed despite its error is read back and reported as done.
    landed_ok = after and operation in ("activate", "update", "delete")
    assert response.status_code in ((200, 201) if landed_ok else (503,))

    # Repair runs a day later on the service's clock: everything left is old enough for a
    # grace of 0, however fast this machine is.
    clock.advance(timedelta(days=1))
    repair(service, timedelta(0), apply=True)
    records = list(scan_all(service.repository))
    assert all(r.status == "active" for r in records)
    assert sorted(r.key for r in records) == sorted(b.key for b in service.storage.list())
    if operation != "delete":
        assert client.get(f"/api/images/{image_id}/download").status_code == 200
