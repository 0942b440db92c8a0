"""Image bytes: the real type sniffed from the content, dimensions, limits, hash, filenames."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from .errors import EmptyFile, FileTooLarge, InvalidImage, TooManyPixels, UnsupportedMediaType

CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "AVIF": "image/avif",
}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "AVIF": ".avif"}

_CHUNK = 1024 * 1024
_MAX_FILENAME = 200


@dataclass(frozen=True)
class Upload:
    """A file a client sent: its bytes (a seekable stream) and the name it gave."""

    stream: BinaryIO
    filename: str | None


@dataclass(frozen=True)
class ImageInfo:
    """What we learned from an upload's bytes."""

    format: str
    content_type: str
    size: int
    width: int
    height: int
    sha256: str


def signature_format(head: bytes) -> str | None:
    """The format whose magic number starts `head`, for the formats we know; else None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def inspect(
    stream: BinaryIO, *, accepted_formats: tuple[str, ...], max_bytes: int, max_pixels: int
) -> ImageInfo:
    """Check an upload and describe it, or raise the 4xx error that fits.

    The stream must be seekable (Werkzeug spools uploads to a temporary file past 500 KB,
    so nothing here holds a large upload in memory); it is left at position 0.
    """
    size, sha256 = _measure(stream)
    if size == 0:
        raise EmptyFile()
    if size > max_bytes:
        raise FileTooLarge(f"The file is {size} bytes; the limit is {max_bytes} bytes")

    head = stream.read(16)
    stream.seek(0)
    claimed = signature_format(head)
    if claimed not in accepted_formats:
        raise UnsupportedMediaType(
            f"Not an accepted image type; accepted: "
            f"{', '.join(CONTENT_TYPES[f] for f in accepted_formats)}"
        )
    width, height = _decode(stream, claimed, max_pixels)
    stream.seek(0)
    return ImageInfo(
        format=claimed,
        content_type=CONTENT_TYPES[claimed],
        size=size,
        width=width,
        height=height,
        sha256=sha256,
    )


def _measure(stream: BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    stream.seek(0)
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    stream.seek(0)
    return size, digest.hexdigest()


def _decode(stream: BinaryIO, expected: str, max_pixels: int) -> tuple[int, int]:
    """Open with only the expected decoder, check the pixel count, then decode fully."""
    try:
        # Restricting `formats` keeps every other Pillow plugin (TIFF, SGI, FLI...) and their
        # history of crash bugs away from untrusted bytes.
        with Image.open(stream, formats=[expected]) as image:
            width, height = image.size
            # Checked from the header, before any pixel is decoded: a decompression bomb is
            # refused here in microseconds with bounded memory.
            if width * height > max_pixels:
                raise TooManyPixels(
                    f"The image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            image.load()
    except Image.DecompressionBombError:
        raise TooManyPixels() from None
    except (TooManyPixels, MemoryError):
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"The file looks like {expected} but cannot be read") from None
    except Exception as error:
        # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error and more on
        # broken streams; all of them mean the same thing to the client.
        raise InvalidImage(f"The {expected} image is corrupt or truncated") from error
    return width, height


def sanitize_filename(raw: str | None, image_format: str) -> str:
    """The client's filename made safe to echo in JSON and Content-Disposition.

    NFKC-normalised first, so that look-alikes (fullwidth full stops and solidi, small
    less-than and greater-than signs) are judged as
    what they turn into; then only the last path component is kept, control, format and
    separator characters are dropped, and the result is length-limited. Never empty and
    never a dotfile. It is metadata only: never a path.
    """
    name = unicodedata.normalize("NFKC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] not in ("C", "Z") or ch == " ")
    return _complete(name, EXTENSIONS[image_format])


def ascii_filename(name: str, content_type: str) -> str:
    """An ASCII stand-in for a stored filename (Content-Disposition's `filename`), made by
    the same rules: accents dropped, anything outside a small safe set replaced by `_`."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = _UNSAFE_ASCII.sub("_", ascii_name.replace("\\", "/").rsplit("/", 1)[-1])
    return _complete(ascii_name, EXTENSIONS[_FORMATS[content_type]])


_FORMATS = {content_type: name for name, content_type in CONTENT_TYPES.items()}
_UNSAFE_ASCII = re.compile(r"[^A-Za-z0-9 ._()+,=@-]")


def _complete(name: str, extension: str) -> str:
    """`name` with a stem ("image" when nothing is left of it: an emoji-only name, say),
    never a dotfile, without trailing dots or spaces, and length-limited."""
    stem, dot, ext = name.strip(" ").rpartition(".")
    if not dot:
        stem, ext = ext, ""
    stem, ext = stem.strip(" ."), ext.strip(" .")
    if not stem:
        stem, ext = "image", ext or extension.lstrip(".")
    ext = f".{ext[:16]}" if ext else ""
    return stem[: _MAX_FILENAME - len(ext)] + ext
