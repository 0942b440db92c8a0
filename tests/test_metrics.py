"""`GET /metrics`: Prometheus counts of requests, bytes, backend calls, variants, decode
waits and rate limits, for admin keys only, summed over every gunicorn worker."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ImagesClient, Service, make_image


def samples(text: str) -> dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(make_app, tmp_path):
    return make_app({"DATA_DIR": str(tmp_path)}).test_client()


def test_metrics_need_an_admin_key(client):
    assert client.application.test_client(key=None).get("/metrics").status_code == 401
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")


def test_requests_backend_calls_and_variants_are_counted(client):
    before = client.get("/metrics").get_data(as_text=True)
    image = ImagesClient(client).create(make_image("PNG", (40, 20)), filename="a.png")
    for _ in range(3):
        client.get(f"/api/images/{image['_id']}")
    client.get(f"/api/images/{image['_id']}/download?w=10")
    client.get(f"/api/images/{image['_id']}/download?w=10")
    after = client.get("/metrics").get_data(as_text=True)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/api/images/<id:image_id>"
    assert grew("image_api_requests_total", route=route, method="GET", status="200") == 3
    assert grew("image_api_request_duration_seconds_count", route=route, method="GET") == 3
    upload = "/api/images/upload"
    assert grew("image_api_request_bytes_total", route=upload) > len(make_image("PNG", (40, 20)))
    assert grew("image_api_response_bytes_total", route=route) > 0
    # Each GET reads its record; the upload inserts and activates one.
    assert (
        grew("image_api_backend_calls_total", backend="sqlite", operation="get", outcome="ok") >= 3
    )
    assert (
        grew("image_api_backend_calls_total", backend="filesystem", operation="put", outcome="ok")
        == 2
    )
    assert grew("image_api_variants_total", source="rendered") == 1
    assert grew("image_api_variants_total", source="cache") == 1
    missing = client.get("/api/images/" + "0" * 24)
    assert missing.status_code == 404
    text = client.get("/metrics").get_data(as_text=True)
    assert (
        value(
            text,
            "image_api_backend_calls_total",
            backend="sqlite",
            operation="get",
            outcome="not_found",
        )
        >= 1
    )


def test_rate_limit_refusals_and_decode_refusals_are_counted(make_app, tmp_path):
    app = make_app(
        {"DATA_DIR": str(tmp_path), "RATE_LIMIT_WRITE": "1/minute", "DECODE_WAIT": "0.01"}
    )
    client, service = app.test_client(), app.extensions["image_api"]
    before = client.get("/metrics").get_data(as_text=True)
    images = ImagesClient(client)
    assert images.upload().status_code == 201
    assert images.upload().status_code == 429
    after = client.get("/metrics").get_data(as_text=True)
    assert (
        value(after, "image_api_rate_limited_total", budget="write")
        - value(before, "image_api_rate_limited_total", budget="write")
        == 1
    )
    image_id = client.get("/api/images").get_json()["images"][0]["_id"]
    with service.decode_budget.reserve(service.decode_budget.capacity):
        assert client.get(f"/api/images/{image_id}/download?w=5").status_code == 503
    last = client.get("/metrics").get_data(as_text=True)
    assert (
        value(last, "image_api_decode_refusals_total")
        - value(after, "image_api_decode_refusals_total")
        == 1
    )
    assert (
        value(last, "image_api_decode_waits_total") - value(after, "image_api_decode_waits_total")
        == 1
    )


def test_every_gunicorn_worker_is_counted_and_a_restart_starts_from_zero(tmp_path):
    service = Service(tmp_path / "data", {"WEB_CONCURRENCY": "2"})
    service.start()
    try:
        missing = f"{service.url}/api/images/{'0' * 24}"
        for _ in range(20):
            assert service.http.get(missing, headers={"Connection": "close"}).status_code == 404
        text = service.http.get(f"{service.url}/metrics").text
        route = "/api/images/<id:image_id>"
        assert (
            value(text, "image_api_requests_total", route=route, method="GET", status="404") == 20
        )
        service.stop()
        service.start()
        text = service.http.get(f"{service.url}/metrics").text
        assert value(text, "image_api_requests_total", route=route, method="GET", status="404") == 0
    finally:
        service.stop()


def test_unknown_methods_do_not_add_series(client):
    for method in ("FOO1", "FOO2", "BAR3"):
        assert client.open("/healthz", method=method).status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    assert "FOO1" not in text and "BAR3" not in text
    assert value(text, "image_api_requests_total", route="none", method="other", status="405") >= 3
