"""The real service under gunicorn, driven over HTTP, restarted with its data kept."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT, make_image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """gunicorn serving wsgi:app on the embedded default, as `make run` starts it."""

    def __init__(self, data_dir: Path):
        self.log = data_dir.parent / "gunicorn.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": str(data_dir),
            "WEB_CONCURRENCY": "2",
            # Empty wins over a developer's .env: force the embedded default.
            "S3_BUCKET_NAME": "",
            "MONGODB_URL": "",
        }
        self.process = None

    def start(self):
        gunicorn = Path(sys.executable).with_name("gunicorn")
        with self.log.open("ab") as log:  # a file, not a pipe nobody drains
            self.process = subprocess.Popen(
                [str(gunicorn), "--config", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.wait_ready()

    def wait_ready(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited: {self.log.read_text()}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        pytest.fail("gunicorn did not become ready")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def service(tmp_path):
    running = Service(tmp_path / "data")
    running.start()
    yield running
    running.stop()


def test_upload_list_download_replace_delete_and_restart(service):
    api = f"{service.url}/api/images"
    payloads = [make_image("PNG", (20 + i, 20), color=(i * 20, 0, 0)) for i in range(8)]

    def upload(data):
        return requests.post(f"{api}/upload", files={"image": ("pic.png", data)}, timeout=10)

    # Concurrent uploads across two workers sharing one SQLite file.
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(upload, payloads))
    assert [r.status_code for r in responses] == [201] * len(payloads)
    images = [r.json()["image"] for r in responses]
    for image, data in zip(images, payloads, strict=True):
        download = requests.get(image["imageUrl"], timeout=10)
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == image["sha256"]
        assert download.headers["Content-Length"] == str(len(data))
    listing = requests.get(api, timeout=10).json()
    assert listing["total"] == len(payloads)

    # Through gunicorn's sendfile(): a range starts at the right offset and stops in time.
    image, data = images[0], payloads[0]
    ranged = requests.get(image["imageUrl"], headers={"Range": "bytes=7-20"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == data[7:21]
    etag = ranged.headers["ETag"]
    cached = requests.get(image["imageUrl"], headers={"If-None-Match": etag}, timeout=10)
    assert cached.status_code == 304 and cached.content == b""

    first, second = images[0]["_id"], images[1]["_id"]
    new = make_image("JPEG", (33, 44))
    replaced = requests.put(f"{api}/{first}", files={"image": ("n.jpg", new)}, timeout=10)
    assert replaced.status_code == 200 and replaced.json()["image"]["version"] == 2
    assert requests.delete(f"{api}/{second}", timeout=10).status_code == 200

    bad = requests.post(f"{api}/upload", files={"image": ("x.png", b"nope")}, timeout=10)
    assert bad.status_code == 415 and bad.json()["code"] == "unsupported_media_type"
    assert requests.get(f"{service.url}/missing", timeout=10).json()["code"] == "not_found"

    service.stop()
    service.start()

    listing = requests.get(api, timeout=10).json()
    assert listing["total"] == len(payloads) - 1
    assert requests.get(f"{api}/{second}", timeout=10).status_code == 404
    download = requests.get(f"{api}/{first}/download", timeout=10)
    assert download.content == new
    assert download.headers["Content-Type"] == "image/jpeg"


def worker_pids(master: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            pids.append(int(stat.parent.name))
    return pids


def noisy_png(seed: int) -> bytes:
    """About 1 MB that does not compress, so writes take long enough to be interrupted."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((640, 480), 40 + seed % 50).convert("RGB").save(out, "PNG")
    return out.getvalue()


def test_workers_killed_mid_write_leave_nothing_broken_after_repair(service):
    import threading

    api = f"{service.url}/api/images"
    payloads = [noisy_png(i) for i in range(4)]
    acknowledged: dict[str, str] = {}
    stop = threading.Event()

    def load(worker: int):
        n = worker
        while not stop.is_set():
            n += 1
            data = payloads[n % len(payloads)]
            try:
                if acknowledged and n % 3 == 0:
                    image_id = sorted(acknowledged)[n % len(acknowledged)]
                    requests.put(f"{api}/{image_id}", files={"image": ("r.png", data)}, timeout=10)
                else:
                    response = requests.post(
                        f"{api}/upload", files={"image": ("u.png", data)}, timeout=10
                    )
                    if response.status_code == 201:
                        acknowledged[response.json()["image"]["_id"]] = "acked"
            except requests.RequestException:
                time.sleep(0.05)  # the worker died under us, or is restarting

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(8):
            time.sleep(0.3)
            for pid in worker_pids(service.process.pid):
                os.kill(pid, signal.SIGKILL)
    finally:
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
    service.wait_ready()
    assert acknowledged, "no upload got through"

    def run_repair(*flags):
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "image_api", "repair", "--json", *flags],
            cwd=ROOT,
            env=service.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    run_repair("--grace", "0", "--apply")
    assert run_repair("--grace", "0")["findings"] == []

    listed = requests.get(f"{api}?limit=1000", timeout=10).json()["images"]
    assert set(acknowledged) <= {image["_id"] for image in listed}
    for image in listed:
        download = requests.get(image["imageUrl"], timeout=10)
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == image["sha256"]
