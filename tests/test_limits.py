"""Rate limits: per key (per client address when anonymous), reads and writes apart, in
memory and in a real Redis shared by several workers, and what a forged X-Forwarded-For
can do (nothing, unless PROXY_HOPS trusts a proxy)."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time

import pytest

from bench.processes import free_port
from image_api.config import ConfigError
from tests.helpers import ImagesClient, image_form, make_image

LIMITS = {"RATE_LIMIT_READ": "3/minute", "RATE_LIMIT_WRITE": "2/minute"}


@pytest.fixture
def limited(make_app, tmp_path):
    return make_app({"DATA_DIR": str(tmp_path), **LIMITS})


def test_over_the_limit_is_a_json_429_with_retry_after_and_ratelimit_headers(limited):
    client = limited.test_client()
    answers = [client.get("/api/images") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["RateLimit-Remaining"] for r in answers[:3]] == ["2", "1", "0"]
    assert all(r.headers["RateLimit-Limit"] == "3" for r in answers)
    assert 0 < int(answers[0].headers["RateLimit-Reset"]) <= 61
    assert "Retry-After" not in answers[0].headers  # only where it means something
    refused = answers[3]
    assert refused.get_json()["code"] == "rate_limited"
    assert "3 per 1 minute" in refused.get_json()["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 60


def test_reads_and_writes_have_their_own_budgets_across_endpoints(limited):
    client = limited.test_client()
    image_id = client.post("/api/images/upload", data=image_form()).get_json()["image"]["_id"]
    assert client.put(f"/api/images/{image_id}", data=image_form()).status_code == 200
    assert client.delete(f"/api/images/{image_id}").status_code == 429  # third write
    # Reads still have their budget, spent across routes.
    assert client.get("/api/images").status_code == 200
    assert client.get(f"/api/images/{image_id}").status_code == 200
    assert client.head(f"/api/images/{image_id}/download").status_code == 200
    assert client.get("/api/images").status_code == 429
    # Public routes check no key: their budget is the client address's.
    assert client.get("/api/openapi.json").status_code == 200


def test_each_key_has_its_own_budget_and_probes_are_never_limited(limited):
    service = limited.extensions["image_api"]
    other = limited.test_client(key=service.keys.create("other", "bob", ["read"])[1])
    client = limited.test_client()
    for _ in range(3):
        client.get("/api/images")
    assert client.get("/api/images").status_code == 429
    assert other.get("/api/images").status_code == 200
    for _ in range(10):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_guessing_keys_or_signatures_spends_the_address_budget(limited):
    """A refused key or signature is answered after the limit is checked: a guesser gets
    429s, not unlimited 401s and 403s. A real key keeps its own budget."""
    guesser = limited.test_client(key="iak_000000000000_guess")
    image_id = ImagesClient(limited.test_client()).create()["_id"]
    answers = [guesser.get("/api/images").status_code for _ in range(2)]
    answers.append(
        guesser.get(f"/api/images/{image_id}/download?expires=1&signature=x").status_code
    )
    answers.append(guesser.get("/api/images").status_code)
    assert answers == [401, 401, 403, 429]
    assert limited.test_client().get("/api/images").status_code == 200


def test_signed_urls_keep_a_budget_no_other_anonymous_request_spends(limited):
    """Any web page can make a browser send keyless requests (or made-up signatures) from
    its visitor's address: they use up that address's budget, never what the signed URLs
    in the visitor's <img> need. Signed URLs still have a limit of their own."""
    image = ImagesClient(limited.test_client()).create()
    anonymous = limited.test_client(key=None)
    junk = [anonymous.get(f"/api/images/{image['_id']}/download?expires=1&signature=x")]
    junk += [anonymous.get("/api/images") for _ in range(3)]
    assert [r.status_code for r in junk] == [403, 401, 401, 429]
    signed = [anonymous.get(image["imageUrl"]) for _ in range(4)]
    assert [r.status_code for r in signed] == [200, 200, 200, 429]
    assert [r.headers["RateLimit-Remaining"] for r in signed[:3]] == ["2", "1", "0"]
    assert anonymous.get("/api/openapi.json").status_code == 429  # the address's, still spent
    # Per image: a page looping a signed URL of its own uses up that image's budget only.
    other = ImagesClient(limited.test_client()).create(make_image(color="blue"))
    assert anonymous.get(other["imageUrl"]).status_code == 200


def test_a_preflight_spends_nothing(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), **LIMITS, "CORS_ORIGINS": "https://a.example"})
    client = app.test_client(key=None)
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "GET"}
    for _ in range(5):
        assert client.options("/api/images", headers=preflight).status_code == 200


@pytest.mark.parametrize("hops", [0, 1])
def test_a_forged_x_forwarded_for_changes_nothing_without_a_trusted_proxy(make_app, tmp_path, hops):
    """Anonymous budgets go by client address: with PROXY_HOPS=0 that is the peer's, so a
    client cannot get a fresh budget per forged header; behind one trusted proxy it is the
    address that proxy appended."""
    app = make_app({"DATA_DIR": str(tmp_path), **LIMITS, "PROXY_HOPS": str(hops)})
    client = app.test_client(key=None)
    answers = [
        client.get("/api/openapi.json", headers={"X-Forwarded-For": f"10.0.0.{n}"})
        for n in range(4)
    ]
    statuses = [r.status_code for r in answers]
    assert statuses == ([200, 200, 200, 429] if hops == 0 else [200, 200, 200, 200])


def test_rates_are_checked_at_start(make_app, tmp_path):
    for name in ("RATE_LIMIT_READ", "RATE_LIMIT_WRITE"):
        with pytest.raises(ConfigError, match=name):
            make_app({"DATA_DIR": str(tmp_path), name: "lots"})
    with pytest.raises(ConfigError, match="RATE_LIMIT_STORAGE_URI"):
        make_app({"DATA_DIR": str(tmp_path), "RATE_LIMIT_STORAGE_URI": "memcached://x"})


# --- in a real Redis ---------------------------------------------------------------------------

REDIS = shutil.which("redis-server")


@pytest.fixture
def redis_url(tmp_path):
    if REDIS is None:
        pytest.skip(
            "REDIS-SERVER IS NOT INSTALLED: the shared rate-limit store was not tested "
            "(`make test` installs Debian's redis-server when it runs as root)"
        )
    port = free_port()
    server = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(timeout=10)


def test_workers_share_one_budget_in_redis(make_app, tmp_path, redis_url):
    """Two apps on one DATA_DIR and one Redis stand for two gunicorn workers."""
    env = {"DATA_DIR": str(tmp_path), **LIMITS, "RATE_LIMIT_STORAGE_URI": redis_url}
    first, second = make_app(env).test_client(), make_app(env).test_client()
    statuses = [client.get("/api/images").status_code for client in (first, second, first)]
    assert statuses == [200, 200, 200]
    refused = second.get("/api/images")
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert refused.headers["RateLimit-Remaining"] == "0"


def test_with_redis_down_requests_are_served_with_one_warning(make_app, tmp_path, caplog):
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = make_app({"DATA_DIR": str(tmp_path), **LIMITS, "RATE_LIMIT_STORAGE_URI": closed})
    client = app.test_client()
    with caplog.at_level(logging.WARNING):
        statuses = [client.get("/api/images").status_code for _ in range(6)]
    assert statuses == [200] * 6  # no limit, no 500
    warnings = [r for r in caplog.records if "storage unavailable" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert not any(r.exc_info for r in caplog.records)  # no traceback in the log
