"""Conditional (If-Match) and idempotent (Idempotency-Key) writes over HTTP."""

from __future__ import annotations

import io
import threading

import pytest

from image_api.repository import scan_all
from tests.helpers import make_image


def post(client, data, key=None):
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(
        "/api/images/upload", data={"image": (io.BytesIO(data), "a.png")}, headers=headers
    )


def put(client, image_id, data, **headers):
    return client.put(
        f"/api/images/{image_id}",
        data={"image": (io.BytesIO(data), "b.png")},
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


def in_threads(count, call):
    """Run `call(i)` in `count` threads started together; return their results in order."""
    results, start = [None] * count, threading.Barrier(count)

    def run(i):
        start.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# --- If-Match ----------------------------------------------------------------------------


def test_metadata_and_writes_carry_the_etag(client):
    created = post(client, make_image())
    etag = created.headers["ETag"]
    assert etag == f'"{created.get_json()["image"]["sha256"]}"'
    image_id = created.get_json()["image"]["_id"]
    assert client.get(f"/api/images/{image_id}").headers["ETag"] == etag


def test_put_with_a_stale_if_match_is_412_and_changes_nothing(client):
    original = make_image(color="red")
    image_id = post(client, original).get_json()["image"]["_id"]
    response = put(client, image_id, make_image(color="blue"), If_Match='"0000"')
    assert response.status_code == 412
    assert response.get_json()["code"] == "precondition_failed"
    assert client.get(f"/api/images/{image_id}/download").data == original


def test_put_and_delete_with_the_current_etag_succeed(client):
    created = post(client, make_image(color="red"))
    image_id, etag = created.get_json()["image"]["_id"], created.headers["ETag"]
    replaced = put(client, image_id, make_image(color="blue"), If_Match=etag)
    assert replaced.status_code == 200
    new_etag = replaced.headers["ETag"]
    stale = client.delete(f"/api/images/{image_id}", headers={"If-Match": etag})
    assert stale.status_code == 412
    assert client.get(f"/api/images/{image_id}").status_code == 200
    assert (
        client.delete(f"/api/images/{image_id}", headers={"If-Match": new_etag}).status_code == 200
    )
    assert client.get(f"/api/images/{image_id}").status_code == 404


def test_if_match_star_matches_any_current_image(client):
    image_id = post(client, make_image()).get_json()["image"]["_id"]
    assert put(client, image_id, make_image(color="blue"), If_Match="*").status_code == 200


def test_concurrent_puts_with_one_if_match_let_exactly_one_through(app, client, service):
    created = post(client, make_image())
    image_id, etag = created.get_json()["image"]["_id"], created.headers["ETag"]
    statuses = in_threads(
        4,
        lambda i: (
            put(app.test_client(), image_id, make_image(color=(i, 9, 9)), If_Match=etag).status_code
        ),
    )
    assert sorted(statuses) == [200, 412, 412, 412]
    [record] = scan_all(service.repository)
    assert record.version == 2
    assert [b.key for b in service.storage.list()] == [record.key]


# --- Idempotency-Key -----------------------------------------------------------------------


def test_a_retried_upload_returns_the_first_response(client, service):
    data = make_image()
    first = post(client, data, key="order-42")
    retry = post(client, data, key="order-42")
    assert first.status_code == retry.status_code == 201
    assert retry.get_json() == first.get_json()
    assert retry.headers["Location"] == first.headers["Location"]
    assert len(list(scan_all(service.repository))) == len(list(service.storage.list())) == 1


def test_a_key_reused_with_other_bytes_is_422(client, service):
    post(client, make_image(color="red"), key="k")
    response = post(client, make_image(color="blue"), key="k")
    assert response.status_code == 422
    assert response.get_json()["code"] == "idempotency_key_reused"
    assert len(list(scan_all(service.repository))) == 1


def test_concurrent_retries_with_one_key_make_one_image(app, service):
    data = make_image()
    responses = in_threads(5, lambda i: post(app.test_client(), data, key="same"))
    assert [r.status_code for r in responses] == [201] * 5
    assert len({r.get_json()["image"]["_id"] for r in responses}) == 1
    assert len(list(scan_all(service.repository))) == len(list(service.storage.list())) == 1


def test_a_failed_request_frees_its_key(client):
    bad = post(client, b"not an image", key="retry-me")
    assert bad.status_code == 415
    assert post(client, make_image(), key="retry-me").status_code == 201


def test_a_retried_replace_is_applied_once(client, service):
    image_id = post(client, make_image(color="red")).get_json()["image"]["_id"]
    data = make_image(color="blue")
    first = put(client, image_id, data, Idempotency_Key="put-1")
    retry = put(client, image_id, data, Idempotency_Key="put-1")
    assert first.status_code == retry.status_code == 200
    assert retry.get_json() == first.get_json()
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 2
    other = put(client, "0123456789abcdef01234567", data, Idempotency_Key="put-1")
    assert other.status_code == 404


def test_a_retried_conditional_replace_gets_the_first_response_not_412(client):
    created = post(client, make_image(color="red"))
    image_id, etag = created.get_json()["image"]["_id"], created.headers["ETag"]
    data = make_image(color="blue")
    first = put(client, image_id, data, If_Match=etag, Idempotency_Key="cas-1")
    retry = put(client, image_id, data, If_Match=etag, Idempotency_Key="cas-1")
    assert first.status_code == retry.status_code == 200
    assert retry.get_json() == first.get_json()
    stale = put(client, image_id, make_image(color="green"), If_Match=etag)
    assert stale.status_code == 412


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_idempotency_keys_are_400(client, key):
    bad = client.post(
        "/api/images/upload",
        data={"image": (io.BytesIO(make_image()), "a.png")},
        headers={"Idempotency-Key": key},
    )
    assert bad.status_code == 400 and bad.get_json()["code"] == "bad_request"
