"""Conditional (If-Match) and idempotent (Idempotency-Key) writes over HTTP, and the
preconditions of a metadata read."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from werkzeug.http import http_date

from image_api.repository import scan_all
from tests.helpers import ImagesClient, assert_replaced, make_image


def keyed(key: str) -> dict:
    return {"Idempotency-Key": key}


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


def test_metadata_and_writes_carry_the_etag(client, images):
    created = images.upload()
    etag = created.headers["ETag"]
    # The sha256, and (with signed URLs) the expiry of the imageUrl in the JSON.
    assert etag.startswith(f'"{created.get_json()["image"]["sha256"]}')
    image_id = created.get_json()["image"]["_id"]
    assert client.get(f"/api/images/{image_id}").headers["ETag"] == etag


def test_a_replace_with_the_same_bytes_changes_the_metadata_etag(client, images):
    """A new filename with the same bytes is a new version: a cached copy is stale, and a
    write conditional on the old metadata ETag is a lost update."""
    data = make_image(color="red")
    image_id = images.create(data, filename="first.png")["_id"]
    url = f"/api/images/{image_id}"
    first = client.get(url).headers["ETag"]
    replaced = images.replace(image_id, data, filename="second.png")
    assert replaced.get_json()["image"]["filename"] == "second.png"
    again = client.get(url, headers={"If-None-Match": first})
    assert again.status_code == 200 and again.get_json()["version"] == 2
    assert images.replace(image_id, data, headers={"If-Match": first}).status_code == 412
    assert client.delete(url, headers={"If-Match": first}).status_code == 412
    # The download's ETag names only the bytes, which did not change.
    download_tag = client.get(f"{url}/download").headers["ETag"]
    assert client.delete(url, headers={"If-Match": download_tag}).status_code == 200


def test_a_metadata_get_honours_if_match_and_if_unmodified_since(client, images):
    """RFC 9110 13.1.1: a GET whose If-Match fails is a 412, as writes are; so is one whose
    If-Unmodified-Since is before the image's last change (when there is no If-Match)."""
    image_id = images.create(make_image(color="red"))["_id"]
    url = f"/api/images/{image_id}"
    first = client.get(url)
    download_tag = client.get(f"{url}/download").headers["ETag"]
    modified = first.headers["ETag"]
    for tag in (modified, download_tag, "*", f'"stale", {modified}'):
        assert client.get(url, headers={"If-Match": tag}).status_code == 200, tag
    stale = client.get(url, headers={"If-Match": '"stale"'})
    assert stale.status_code == 412 and stale.get_json()["code"] == "precondition_failed"
    # A metadata ETag names the version: another signed URL expiry in it still matches.
    version = modified.strip('"').rsplit(".", 1)[0]
    assert client.get(url, headers={"If-Match": f'"{version}.1"'}).status_code == 200
    assert client.get(url, headers={"If-Match": "not quoted"}).status_code == 400
    last_modified = client.get(f"{url}/download").last_modified
    later = http_date(last_modified + timedelta(seconds=5))
    earlier = http_date(last_modified - timedelta(seconds=5))
    assert client.get(url, headers={"If-Unmodified-Since": later}).status_code == 200
    assert client.get(url, headers={"If-Unmodified-Since": earlier}).status_code == 412
    # If-Match decides alone; a date that is not one is ignored.
    both = {"If-Match": modified, "If-Unmodified-Since": earlier}
    assert client.get(url, headers=both).status_code == 200
    assert client.get(url, headers={"If-Unmodified-Since": "yesterday"}).status_code == 200
    images.replace(image_id, make_image(color="blue"))
    assert client.get(url, headers={"If-Match": modified}).status_code == 412


def test_put_and_delete_honour_if_unmodified_since(client, images):
    """RFC 9110 13.1.4: a write dated before the image's last change is a lost update, a
    412 that changes nothing; If-Match, when sent too, decides alone."""
    original = make_image(color="red")
    image_id = images.create(original)["_id"]
    url = f"/api/images/{image_id}"
    last_modified = client.get(f"{url}/download").last_modified
    earlier = http_date(last_modified - timedelta(seconds=5))
    stale = images.replace(
        image_id, make_image(color="blue"), headers={"If-Unmodified-Since": earlier}
    )
    assert stale.status_code == 412 and stale.get_json()["code"] == "precondition_failed"
    assert client.delete(url, headers={"If-Unmodified-Since": earlier}).status_code == 412
    assert client.get(f"{url}/download").data == original
    assert client.get(url).get_json()["version"] == 1
    etag = client.get(url).headers["ETag"]
    both = {"If-Match": etag, "If-Unmodified-Since": earlier}
    assert images.replace(image_id, make_image(color="green"), headers=both).status_code == 200
    replaced = client.get(f"{url}/download").last_modified
    after = {"If-Unmodified-Since": http_date(replaced + timedelta(seconds=5))}
    assert images.replace(image_id, make_image(color="white"), headers=after).status_code == 200
    # A value that is not an HTTP date is ignored, as RFC 9110 has it.
    assert client.delete(url, headers={"If-Unmodified-Since": "not a date"}).status_code == 200


@pytest.mark.parametrize("tag", ['""', 'W/""', '"", W/""'])
def test_an_empty_entity_tag_matches_no_image(client, images, tag):
    """Werkzeug reads an empty tag as None (schemathesis found a 500 there)."""
    image_id = images.create()["_id"]
    assert images.replace(image_id, headers={"If-Match": tag}).status_code == 412
    assert client.delete(f"/api/images/{image_id}", headers={"If-Match": tag}).status_code == 412
    assert (
        client.delete(f"/api/images/{image_id}", headers={"If-None-Match": tag}).status_code == 200
    )


def test_put_with_a_stale_if_match_is_412_and_changes_nothing(client, images):
    original = make_image(color="red")
    image_id = images.create(original)["_id"]
    response = images.replace(image_id, make_image(color="blue"), headers={"If-Match": '"0000"'})
    assert response.status_code == 412
    assert response.get_json()["code"] == "precondition_failed"
    assert client.get(f"/api/images/{image_id}/download").data == original
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 1


def test_put_and_delete_with_the_current_etag_succeed(client, images):
    created = images.upload(make_image(color="red"))
    image_id, etag = created.get_json()["image"]["_id"], created.headers["ETag"]
    replaced = images.replace(image_id, make_image(color="blue"), headers={"If-Match": etag})
    assert replaced.status_code == 200
    new_etag = replaced.headers["ETag"]
    assert new_etag.startswith(f'"{replaced.get_json()["image"]["sha256"]}') and new_etag != etag
    stale = client.delete(f"/api/images/{image_id}", headers={"If-Match": etag})
    assert stale.status_code == 412
    assert client.get(f"/api/images/{image_id}").status_code == 200
    assert (
        client.delete(f"/api/images/{image_id}", headers={"If-Match": new_etag}).status_code == 200
    )
    assert client.get(f"/api/images/{image_id}").status_code == 404


def test_if_match_star_matches_any_current_image(client, images):
    image_id = images.create()["_id"]
    response = images.replace(image_id, make_image(color="blue"), headers={"If-Match": "*"})
    assert response.status_code == 200
    assert response.get_json()["image"]["version"] == 2
    missing = client.put("/api/images/0123456789abcdef01234567", headers={"If-Match": "*"}, data={})
    assert missing.status_code == 404


def test_concurrent_puts_with_one_if_match_let_exactly_one_through(app, images, service):
    created = images.upload()
    image_id, etag = created.get_json()["image"]["_id"], created.headers["ETag"]
    old_key = service.repository.get(image_id).key

    def put(i):
        own_client = ImagesClient(app.test_client())
        data = make_image(color=(i, 9, 9))
        return own_client.replace(image_id, data, headers={"If-Match": etag}).status_code

    statuses = in_threads(4, put)
    assert sorted(statuses) == [200, 412, 412, 412]
    [record] = scan_all(service.repository)
    assert record.version == 2
    assert_replaced(service, image_id, old_key)  # the three losers' blobs are gone


# --- Idempotency-Key -----------------------------------------------------------------------


def test_a_retried_upload_returns_the_first_response(images, service):
    data = make_image()
    first = images.upload(data, headers=keyed("order-42"))
    retry = images.upload(data, headers=keyed("order-42"))
    assert first.status_code == retry.status_code == 201
    assert retry.get_json() == first.get_json()
    assert retry.headers["Location"] == first.headers["Location"]
    assert len(list(scan_all(service.repository))) == len(list(service.storage.list())) == 1


def test_a_key_reused_with_other_bytes_is_422(images, service):
    images.create(make_image(color="red"), headers=keyed("k"))
    response = images.upload(make_image(color="blue"), headers=keyed("k"))
    assert response.status_code == 422
    assert response.get_json()["code"] == "idempotency_key_reused"
    assert len(list(scan_all(service.repository))) == 1


def test_concurrent_retries_with_one_key_make_one_image(app, service):
    data = make_image()
    responses = in_threads(
        5, lambda i: ImagesClient(app.test_client()).upload(data, headers=keyed("same"))
    )
    assert [r.status_code for r in responses] == [201] * 5
    assert len({r.get_json()["image"]["_id"] for r in responses}) == 1
    assert len(list(scan_all(service.repository))) == len(list(service.storage.list())) == 1


def test_a_failed_request_frees_its_key(images):
    bad = images.upload(b"not an image", headers=keyed("retry-me"))
    assert bad.status_code == 415
    assert images.upload(headers=keyed("retry-me")).status_code == 201


def test_a_retried_replace_is_applied_once(client, images, service):
    image_id = images.create(make_image(color="red"))["_id"]
    data = make_image(color="blue")
    first = images.replace(image_id, data, headers=keyed("put-1"))
    retry = images.replace(image_id, data, headers=keyed("put-1"))
    assert first.status_code == retry.status_code == 200
    assert retry.get_json() == first.get_json()
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 2
    other = images.replace("0123456789abcdef01234567", data, headers=keyed("put-1"))
    assert other.status_code == 404


def test_a_retried_conditional_replace_gets_the_first_response_not_412(images):
    created = images.upload(make_image(color="red"))
    image_id, etag = created.get_json()["image"]["_id"], created.headers["ETag"]
    data = make_image(color="blue")
    headers = {"If-Match": etag, **keyed("cas-1")}
    first = images.replace(image_id, data, headers=headers)
    retry = images.replace(image_id, data, headers=headers)
    assert first.status_code == retry.status_code == 200
    assert retry.get_json() == first.get_json()
    stale = images.replace(image_id, make_image(color="green"), headers={"If-Match": etag})
    assert stale.status_code == 412


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_idempotency_keys_are_400(images, service, key):
    bad = images.upload(headers=keyed(key))
    assert bad.status_code == 400 and bad.get_json()["code"] == "bad_request"
    assert list(scan_all(service.repository)) == []
