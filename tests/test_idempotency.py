"""Idempotency keys whose first request could not record its result, or never finished."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta

from image_api.errors import BackendUnavailable
from image_api.records import new_id
from image_api.repository import scan_all
from tests.helpers import make_image


class FinishFails:
    """The repository, except that recording an idempotent request's result fails."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def finish(self, key, response):
        raise BackendUnavailable()


def post(client, data, key):
    return client.post(
        "/api/images/upload",
        data={"image": (io.BytesIO(data), "a.png")},
        headers={"Idempotency-Key": key},
    )


def put(client, image_id, data, key):
    return client.put(
        f"/api/images/{image_id}",
        data={"image": (io.BytesIO(data), "b.png")},
        headers={"Idempotency-Key": key},
    )


def after_the_first_request(service, clock):
    """Move past the point where the first request's budget has surely run out."""
    clock.advance(timedelta(seconds=service.settings.request_timeout + 2))


def test_an_upload_whose_result_was_not_recorded_succeeds_and_a_retry_finds_it(
    client, service, clock
):
    data = make_image(color="red")
    real = service.repository
    service.repository = FinishFails(real)
    first = post(client, data, "upload-1")
    service.repository = real
    assert first.status_code == 201, first.get_json()
    after_the_first_request(service, clock)
    retry = post(client, data, "upload-1")
    assert retry.status_code == 201
    assert retry.get_json()["image"] == first.get_json()["image"]
    again = post(client, data, "upload-1")  # now replayed from the recorded result
    assert again.get_json()["image"] == first.get_json()["image"]
    assert len(list(scan_all(service.repository))) == len(list(service.storage.list())) == 1


def test_a_replace_whose_result_was_not_recorded_is_not_applied_twice(client, service, clock):
    image_id = client.post(
        "/api/images/upload", data={"image": (io.BytesIO(make_image()), "a.png")}
    ).get_json()["image"]["_id"]
    data = make_image(color="blue")
    real = service.repository
    service.repository = FinishFails(real)
    first = put(client, image_id, data, "replace-1")
    service.repository = real
    assert first.status_code == 200 and first.get_json()["image"]["version"] == 2
    after_the_first_request(service, clock)
    retry = put(client, image_id, data, "replace-1")
    assert retry.status_code == 200
    assert retry.get_json()["image"] == first.get_json()["image"]
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 2
    # The current blob, and the first version's, retired by the one replace that ran.
    blobs = {blob.key for blob in service.storage.list()}
    retired = {key for key in blobs if service.repository.retired_until(key) is not None}
    assert blobs - retired == {service.repository.get(image_id).key} and len(retired) == 1


def test_a_key_whose_first_request_died_is_run_again_once_that_request_is_over(
    client, service, clock
):
    # A claim with no record behind it: the first request died before writing anything.
    now = clock()
    expires = now + timedelta(seconds=service.settings.idempotency_ttl)
    data = make_image(color="green")
    fingerprint = f"create {hashlib.sha256(data).hexdigest()}"
    assert service.repository.claim("died-1", fingerprint, new_id(), now, expires) is None
    after_the_first_request(service, clock)
    response = post(client, data, "died-1")
    assert response.status_code == 201
    assert post(client, data, "died-1").get_json()["image"] == response.get_json()["image"]
    assert len(list(scan_all(service.repository))) == 1
