"""Helpers the test modules share."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
from PIL import Image
from werkzeug.datastructures import FileStorage

from bench.processes import free_port
from image_api.errors import BackendUnavailable
from image_api.records import utc_now
from image_api.repository import scan_all
from image_api.storage import s3

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
MONGO_URL = "mongodb://mongo.test:27017/imagedb"
#: SECRET_KEY where MongoDB needs one (on SQLite the first start makes one).
TEST_SECRET = "test-secret-that-signs-download-urls"


GPS_IFD = 0x8825


def decoded_frames(data: bytes) -> list[bytes]:
    """Every frame's pixels, as RGBA: what "the same picture" means."""
    with Image.open(io.BytesIO(data)) as image:
        frames = []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(image.convert("RGBA").tobytes())
        return frames


def exif_of(data: bytes) -> Image.Exif:
    with Image.open(io.BytesIO(data)) as image:
        return image.getexif()


def unsigned(url: str) -> str:
    """A URL without its query: an imageUrl without the signature API keys add."""
    return url.partition("?")[0]


def samples(kind: str) -> list[Path]:
    """The shared sample images of one kind (valid, tricky, hostile).

    Without ../shared the list is empty and pytest skips the tests it parametrizes.
    """
    folder = SAMPLES / kind
    return sorted(folder.iterdir()) if folder.is_dir() else []


#: The media type of each accepted format, as the README documents them (not read from the
#: service, so that a wrong entry in its table shows).
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "AVIF": "image/avif",
}

#: What each hostile sample must get: (status, code). A new sample needs a line here.
HOSTILE_OUTCOMES = {
    "broken.png": (422, "invalid_image"),
    "broken_data_stream.png": (422, "invalid_image"),
    "crash-0c7e0e8e11ce787078f00b5b0ca409a167f070e0.tif": (415, "unsupported_media_type"),
    "crash-465703f71a0f0094873a3e0e82c9f798161171b8.sgi": (415, "unsupported_media_type"),
    "crash-4fb027452e6988530aa5dabee76eecacb3b79f8a.j2k": (415, "unsupported_media_type"),
    "crash-5762152299364352.fli": (415, "unsupported_media_type"),
    "cross_scan_line_truncated.tga": (415, "unsupported_media_type"),
    "decompression_bomb.gif": (422, "image_too_large"),
    "decompression_bomb.ico": (415, "unsupported_media_type"),
    "oom-225817ca0f8c663be7ab4b9e717b02c661e66834.tif": (415, "unsupported_media_type"),
    "truncated_end_chunk.png": (422, "invalid_image"),
    "truncated_image.png": (422, "invalid_image"),
    "truncated_jpeg.jpg": (422, "invalid_image"),
}


#: Tricky samples a limit refuses over HTTP: (status, code); every other one is accepted.
#: Every frame is decoded, and this GIF's second frame claims 4.3 billion pixels.
TRICKY_REFUSED_OUTCOMES = {"decompression_bomb_extents.gif": (422, "image_too_large")}


def sample_format(path: Path) -> str:
    """The format Pillow reads in a sample file (JPEG, PNG, TIFF...)."""
    with Image.open(path) as image:
        return image.format


def make_image(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color="teal", **save) -> bytes:
    """A small real image, made on the spot."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt, **save)
    return out.getvalue()


class ImagesClient:
    """Drives the images API through a test client, as flaskr's `AuthActions` drives login.

    The `images` fixture wraps the `client` fixture; wrap any other client (one from
    `make_app`, or one per thread) with `ImagesClient(app.test_client())`.
    """

    def __init__(self, client):
        self.client = client

    def upload(
        self,
        data: bytes | None = None,
        filename: str = "a.png",
        field: str = "image",
        content_type: str | None = None,
        headers: dict | None = None,
    ):
        """POST `data` (a small PNG made on the spot if None) in multipart `field`."""
        file = _file(data, filename, content_type)
        return self.client.post("/api/images/upload", data={field: file}, headers=headers)

    def create(self, data: bytes | None = None, filename: str = "a.png", **options) -> dict:
        """Upload, assert 201, and return the image's JSON."""
        response = self.upload(data, filename, **options)
        assert response.status_code == 201, response.get_data(as_text=True)
        return response.get_json()["image"]

    def replace(
        self,
        image_id: str,
        data: bytes | None = None,
        filename: str = "b.png",
        headers: dict | None = None,
    ):
        """PUT `data` (a small PNG made on the spot if None) as the image's new file."""
        file = _file(data, filename, None)
        return self.client.put(f"/api/images/{image_id}", data={"image": file}, headers=headers)

    def replaced(self, image_id: str, data: bytes | None = None, **options) -> dict:
        """Replace, assert 200, and return the image's JSON."""
        response = self.replace(image_id, data, **options)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["image"]


def _file(data: bytes | None, filename: str, content_type: str | None) -> FileStorage:
    data = make_image() if data is None else data
    return FileStorage(io.BytesIO(data), filename=filename, content_type=content_type)


@contextlib.contextmanager
def one_s3_attempt():
    """S3 calls in the block get one attempt and no back-off: a fault test waits on one
    timeout, not three and the back-off between them (test_faults checks the retries)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3, "ATTEMPTS", 1)
        yield


def assert_replaced(service, image_id: str, old_key: str) -> None:
    """After a replace: the record uses a new blob; the old one is kept, retired (deleted
    once no download can still want it); and there is no other blob."""
    new_key = service.repository.get(image_id).key
    assert new_key != old_key
    assert sorted(b.key for b in service.storage.list()) == sorted([new_key, old_key])
    assert service.repository.retired_until(old_key) is not None
    assert service.repository.retired_until(new_key) is None


def exact_match(service) -> bool:
    """Every record is active with its blob, and every blob belongs to a record."""
    records = list(scan_all(service.repository))
    blobs = sorted(blob.key for blob in service.storage.list())
    return all(r.status == "active" for r in records) and sorted(r.key for r in records) == blobs


class FakeClock:
    """A clock for the service that moves only when told to, and by one millisecond per
    reading, so that every timestamp it gives is distinct and ordered without depending on
    how fast the machine is.

    It starts a second into the current hour: signed URLs made by one test share an expiry
    (rounded to a tenth of SIGNED_URL_TTL) unless the test moves the clock on.
    """

    def __init__(self, start: datetime | None = None):
        self.now = start or utc_now().replace(minute=0, second=1, microsecond=0)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += timedelta(milliseconds=1)
            return self.now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self.now += delta


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


class Service:
    """gunicorn serving wsgi:app as `make run` starts it: on the embedded default, or on
    what `env` (variables set over the defaults below) names."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None):
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
            "RATE_LIMIT_READ": "1000000/minute",
            "RATE_LIMIT_WRITE": "1000000/minute",
            **(env or {}),
        }
        self.process = None
        self.key: str | None = None
        #: Requests with the service's admin key (when it has one).
        self.http = requests.Session()

    @property
    def auth_header(self) -> bytes:
        """The Authorization header line, for raw-socket requests."""
        return f"Authorization: Bearer {self.key}\r\n".encode() if self.key else b""

    def init(self):
        """`flask init` on the service's environment (the bucket, tables and indexes)."""
        self.flask("init")

    def flask(self, *args: str) -> str:
        """`flask --app image_api ARGS` on the service's environment, as an operator runs
        it beside the service; its output, once it has succeeded."""
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "image_api", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def start(self):
        gunicorn = Path(sys.executable).with_name("gunicorn")
        with self.log.open("ab") as log:  # a file, not a pipe nobody drains
            self.process = subprocess.Popen(
                [str(gunicorn), "--config", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=self.env,
                stdout=log,  # the access log: complete once gunicorn has stopped
                stderr=log,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # never leave a gunicorn running behind a failed start
            raise
        # The admin key the first start made (none with AUTH=off or a key made before).
        key_file = Path(self.env["DATA_DIR"]) / "admin-key"
        if key_file.exists():
            self.key = key_file.read_text().strip()
            self.http.headers["Authorization"] = f"Bearer {self.key}"

    def wait_ready(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited: {self.log.read_text()}")
            try:
                # Longer than PROBE_TIMEOUT: a worker's first probe of S3 also builds its
                # boto3 client, which can take over a second on a busy machine.
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.1)
        pytest.fail("gunicorn did not become ready")

    def stop(self):
        # Pooled keep-alive connections would hold a stopping worker for its grace period.
        self.http.close()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                # A worker still booting when TERM came can sit out gunicorn's whole graceful
                # timeout (30 s); QUIT is gunicorn's quick shutdown.
                self.process.send_signal(signal.SIGQUIT)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()


class Nginx:
    """Debian's nginx in front of a `Service`, with deploy/nginx.conf as `flask nginx-config`
    renders it for the service's settings. As root, its workers run as `nobody` in the
    service's group (as the README tells operators to set up), so blob files nginx may not
    read fail the tests."""

    def __init__(self, service: Service, prefix: Path):
        self.service = service
        self.prefix = prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        for name in ("logs", "tmp"):
            (self.prefix / name).mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "flask", "--app", "image_api", "nginx-config",
            "--listen", f"127.0.0.1:{self.port}",
            "--upstream", f"127.0.0.1:{self.service.port}",
            "--output", str(self.prefix / "nginx.conf"),
        ]  # fmt: skip
        if os.geteuid() == 0:
            import grp

            command += ["--user", f"nobody {grp.getgrgid(os.getgid()).gr_name}"]
        result = subprocess.run(
            command, cwd=ROOT, env=self.service.env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        with (self.prefix / "logs" / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                ["nginx", "-p", str(self.prefix), "-c", "nginx.conf", "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.error_log()
            try:
                requests.get(f"{self.url}/healthz", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        pytest.fail(f"nginx did not start: {self.error_log()}")

    def error_log(self) -> str:
        logs = self.prefix / "logs"
        return "".join(p.read_text() for p in logs.glob("*.log") if p.exists())

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def assert_error(response, status: int, code: str) -> None:
    """A JSON error of the service's shape: `status`, `code` and a message."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(call):
    """`call()`'s result and how many seconds it took."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def image_form(filename: str = "a.png") -> dict:
    """A multipart form with a small PNG in field `image`, for the test client."""
    return {"image": (io.BytesIO(make_image()), filename)}


#: The user and group `unprivileged` reads and writes files as (Debian's `nobody`).
NOBODY = 65534


@contextlib.contextmanager
def unprivileged():
    """This process touches files as user `nobody` inside (its effective ids; root's pass
    over file modes is off), so a file's mode decides as it does for a service user. As
    is for a test that does not run as root: its own files' modes decide already."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def shared_directory():
    """A new directory anyone may enter and read (test directories are the owner's only),
    removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="image-api-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
