"""Helpers the test modules share."""

from __future__ import annotations

import io
import threading
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image

from image_api.records import utc_now

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
MONGO_URL = "mongodb://mongo.test:27017/imagedb"


def samples(kind: str) -> list[Path]:
    """The shared sample images of one kind (valid, tricky, hostile).

    Without ../shared the list is empty and pytest skips the tests it parametrizes.
    """
    folder = SAMPLES / kind
    return sorted(folder.iterdir()) if folder.is_dir() else []


def make_image(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color="teal", **save) -> bytes:
    """A small real image, made on the spot."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt, **save)
    return out.getvalue()


class FakeClock:
    """A clock for the service that moves only when told to, and by one millisecond per
    reading, so that every timestamp it gives is distinct and ordered without depending on
    how fast the machine is."""

    def __init__(self, start: datetime | None = None):
        self.now = start or utc_now()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += timedelta(milliseconds=1)
            return self.now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self.now += delta
