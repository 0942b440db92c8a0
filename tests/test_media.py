"""Sniffing, limits and decoding of untrusted image bytes."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from image_api import media
from image_api.config import DEFAULT_FORMATS
from image_api.errors import (
    ApiError,
    EmptyFile,
    FileTooLarge,
    InvalidImage,
    TooManyPixels,
    UnsupportedMediaType,
)
from tests import memory_probe
from tests.helpers import HOSTILE_OUTCOMES, MEDIA_TYPES, make_image, samples

LIMITS = dict(accepted_formats=DEFAULT_FORMATS, max_bytes=25 * 1024 * 1024, max_pixels=50_000_000)


def inspect(data: bytes, **limits) -> media.ImageInfo:
    return media.inspect(io.BytesIO(data), **{**LIMITS, **limits})


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "AVIF"])
def test_accepted_formats_are_described_from_their_bytes(fmt):
    data = make_image(fmt, (40, 30))
    info = inspect(data)
    assert info.format == fmt
    assert info.content_type == MEDIA_TYPES[fmt]
    assert (info.width, info.height, info.size) == (40, 30, len(data))
    assert info.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("path", samples("valid"), ids=lambda p: p.name)
def test_valid_samples_are_accepted_or_refused_as_unsupported(path):
    data = path.read_bytes()
    with Image.open(path) as image:
        expected_format, expected_size = image.format, image.size
    if expected_format in DEFAULT_FORMATS:
        info = inspect(data)
        assert (info.format, (info.width, info.height)) == (expected_format, expected_size)
    else:
        with pytest.raises(UnsupportedMediaType):
            inspect(data)


@pytest.mark.parametrize("path", samples("hostile"), ids=lambda p: p.name)
def test_hostile_samples_are_refused_with_bounded_memory(path):
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as caught:
            inspect(path.read_bytes())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (caught.value.status, caught.value.code) == HOSTILE_OUTCOMES[path.name]
    assert peak < 16 * 1024 * 1024


#: Tricky samples a limit refuses: every frame is decoded, and this GIF's second frame
#: claims 4.3 billion pixels.
TRICKY_REFUSED = {"decompression_bomb_extents.gif": TooManyPixels}


@pytest.mark.parametrize("path", samples("tricky"), ids=lambda p: p.name)
def test_tricky_samples_are_accepted_as_what_they_are_or_refused_by_a_limit(path):
    data = path.read_bytes()
    if path.name in TRICKY_REFUSED:
        with pytest.raises(TRICKY_REFUSED[path.name]):
            inspect(data)
        return
    with Image.open(path) as image:
        expected_format, expected_size = image.format, image.size
    info = inspect(data)
    assert (info.format, (info.width, info.height)) == (expected_format, expected_size)
    assert info.content_type == MEDIA_TYPES[expected_format]
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        b"<!doctype html><html><body>hi</body></html>",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"plain text, not an image",
    ],
    ids=["svg", "html", "pdf", "text"],
)
def test_non_images_are_unsupported(data):
    with pytest.raises(UnsupportedMediaType):
        inspect(data)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP"])
def test_real_images_outside_the_allow_list_are_unsupported(fmt):
    with pytest.raises(UnsupportedMediaType):
        inspect(make_image(fmt))


def test_the_allow_list_is_configurable():
    with pytest.raises(UnsupportedMediaType):
        inspect(make_image("GIF"), accepted_formats=("JPEG", "PNG"))
    assert inspect(make_image("PNG"), accepted_formats=("PNG",)).format == "PNG"


def test_truncated_image_is_invalid():
    data = make_image("PNG", (300, 300), color=None)
    noisy = io.BytesIO()
    Image.effect_noise((300, 300), 50).save(noisy, "PNG")
    for broken in (data[: len(data) // 2], noisy.getvalue()[:2000]):
        with pytest.raises(InvalidImage):
            inspect(broken)


def test_a_header_alone_is_invalid():
    with pytest.raises(InvalidImage):
        inspect(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    data = make_image("PNG", (100, 100))

    def decoded(image):
        raise AssertionError("pixels decoded before the limit was checked")

    with monkeypatch.context() as patched:
        patched.setattr(ImageFile.ImageFile, "load", decoded)
        with pytest.raises(TooManyPixels) as caught:
            inspect(data, max_pixels=9_999)
    assert "100x100" in caught.value.message
    assert inspect(make_image("PNG", (100, 100)), max_pixels=10_000).width == 100


def test_empty_and_oversized_files_are_refused():
    with pytest.raises(EmptyFile):
        inspect(b"")
    data = make_image("PNG")
    with pytest.raises(FileTooLarge):
        inspect(data, max_bytes=len(data) - 1)
    assert inspect(data, max_bytes=len(data)).size == len(data)


def test_inspect_leaves_the_stream_at_the_start():
    stream = io.BytesIO(make_image("JPEG"))
    media.inspect(stream, **LIMITS)
    assert stream.tell() == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cat.png", "cat.png"),
        ("C:\\Users\\me\\cat.png", "cat.png"),
        ("../../etc/passwd", "passwd.png"),  # the real type's extension added
        ("chat\u00e9.png", "chat\u00e9.png"),
        ("cafe\u0301.png", "caf\u00e9.png"),  # NFC
        ("chat.jpg", "chat.jpg.png"),  # a PNG saved as .jpg would mislead
        ("evil\r\nX-Header: 1.png", "evilX-Header: 1.png"),
        ("a\u202egnp.exe", "agnp.exe.png"),  # bidi override dropped, extension added
        ("...", "image.png"),
        ("", "image.png"),
        (None, "image.png"),
    ],
)
def test_sanitize_filename(raw, expected):
    assert media.sanitize_filename(raw, "PNG") == expected


def test_sanitize_filename_limits_length_and_keeps_the_extension():
    name = media.sanitize_filename("x" * 500 + ".jpeg", "JPEG")
    assert len(name) <= 200 and name.endswith(".jpeg")


@pytest.mark.parametrize(
    ("what", "case"),
    [("inspect", case) for case in memory_probe.CASES]
    + [
        ("render", case)
        for case in ("jpeg", "jpeg-progressive", "png-rgba", "apng", "gif", "webp", "avif")
    ],
)
def test_a_decode_holds_no_more_memory_than_it_reserved(what, case, tmp_path):
    """What an upload's decode (every frame) or a render reserves in DECODE_MEMORY covers
    what the process's memory grows by, for each format and animation: a WebP decodes to
    four copies of an RGBA canvas, an AVIF to its YUV planes and RGB, an animated GIF keeps
    RGBA frames although its first is a palette, a progressive JPEG every coefficient of
    the image at full size (a thumbnail's render too). Counting the first frame alone let
    eight uploads of a 75 KB GIF hold 4 GB. (Each in a process of its own: memory_probe.)"""
    image = tmp_path / case
    image.write_bytes(memory_probe.image_bytes(case, 2000))
    probe = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", what, case, str(image)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    reserved, peak = map(int, probe.stdout.split())
    assert 0 < peak <= reserved


@pytest.mark.parametrize(
    ("mode", "value", "placeholder"),
    [
        ("I;16", 200, "#000000"),
        ("I;16", 30000, "#757575"),
        ("I;16", 65535, "#ffffff"),
        ("L", 117, "#757575"),  # the 8-bit grey a variant of 30000 shows
    ],
)
def test_the_placeholder_of_16_bit_greyscale_is_scaled_not_clipped(mode, value, placeholder):
    """16-bit values are scaled into 8 bits, as a variant shows them: converted as they
    were, 200/65535 (near black) gave #c8c8c8 and 30000/65535 (mid grey) white."""
    out = io.BytesIO()
    Image.new(mode, (40, 30), value).save(out, "PNG")
    assert inspect(out.getvalue()).placeholder == placeholder


def test_a_png_with_megabytes_of_compressed_text_is_refused_before_they_are_inflated():
    """Pillow inflates zTXt and iTXt chunks as it opens a PNG, before any decode reserves
    memory: a 60 KB file held 64 MiB. Past PNG_TEXT_MEMORY of text, the upload is a 422
    that says why."""
    out = io.BytesIO()
    text = PngImagePlugin.PngInfo()
    for i in range(6):
        text.add_text(f"note{i}", "x" * 1_000_000, zip=True)
    Image.new("RGB", (1, 1)).save(out, "PNG", pnginfo=text)
    assert len(out.getvalue()) < 50_000
    with pytest.raises(InvalidImage, match="more than 4 MiB of text metadata"):
        inspect(out.getvalue())
    small = PngImagePlugin.PngInfo()
    small.add_text("note", "x" * 500_000, zip=True)
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG", pnginfo=small)
    assert inspect(out.getvalue()).width == 1
