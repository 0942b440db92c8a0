"""Helpers the test modules share."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

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
