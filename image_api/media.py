"""Image bytes: the real type sniffed from the content, dimensions, limits, hash, filenames."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
import operator
import os
import re
import tempfile
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageStat, PngImagePlugin, UnidentifiedImageError

from . import deadline, metrics, strip
from .errors import (
    DecoderBusy,
    EmptyFile,
    FileTooLarge,
    InvalidImage,
    TooManyPixels,
    UnsupportedMediaType,
)

CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "AVIF": "image/avif",
}
#: The Pillow format of each content type.
FORMATS = {content_type: name for name, content_type in CONTENT_TYPES.items()}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "AVIF": ".avif"}

_CHUNK = 1024 * 1024
#: Stripped uploads up to this size stay in memory; larger ones go to a temporary file.
_SPOOL_BYTES = 1024 * 1024
_ORIENTATION = 0x0112
_MAX_FILENAME = 200

#: Pillow inflates a PNG's compressed text chunks (zTXt, iTXt) as it opens the file, before
#: any pixel and before a decode can reserve memory: up to 64 MiB by default, for a file of
#: a few kilobytes. Metadata is stripped anyway; a PNG with more text than this is refused.
PNG_TEXT_MEMORY = 4 * 1024 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_MEMORY


@dataclass(frozen=True)
class Upload:
    """A file a client sent: its bytes (a seekable stream) and the name it gave."""

    stream: BinaryIO
    filename: str | None


@dataclass(frozen=True)
class ImageInfo:
    """What we learned from an upload's bytes. `width` and `height` are as displayed: after
    the EXIF `orientation` (5 to 8 turn the picture a quarter)."""

    format: str
    content_type: str
    size: int
    width: int
    height: int
    sha256: str
    orientation: int = 1
    # The average colour (#rrggbb) of the first frame's visible pixels; None if none is.
    placeholder: str | None = None


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
    stream: BinaryIO,
    *,
    accepted_formats: tuple[str, ...],
    max_bytes: int,
    max_pixels: int,
    max_animation_pixels: int | None = None,
    budget: DecodeBudget | None = None,
    digest: bool = True,
) -> ImageInfo:
    """Check an upload and describe it, or raise the 4xx error that fits.

    The stream must be seekable (Werkzeug spools uploads to a temporary file past 500 KB,
    so nothing here holds a large upload in memory); it is left at position 0. Every frame
    of an animation is decoded, up to `max_animation_pixels` in all; decoding waits for
    room in `budget`. Without `digest` its sha256 is left empty (for bytes that are not
    stored as they are: `without_metadata` hashes what is).
    """
    if digest:
        size, sha256 = measure(stream)
    else:
        size, sha256 = stream.seek(0, os.SEEK_END), ""
        stream.seek(0)
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
    limits = _Limits(max_pixels, max_animation_pixels or max_pixels)
    width, height, orientation, placeholder = _decode(stream, claimed, limits, budget or _UNBOUNDED)
    stream.seek(0)
    if orientation >= 5:
        width, height = height, width
    return ImageInfo(
        format=claimed,
        content_type=CONTENT_TYPES[claimed],
        size=size,
        width=width,
        height=height,
        sha256=sha256,
        orientation=orientation,
        placeholder=placeholder,
    )


@contextlib.contextmanager
def without_metadata(stream: BinaryIO, info: ImageInfo) -> Iterator[tuple[BinaryIO, ImageInfo]]:
    """The upload in `stream` as it is stored: without its metadata (`strip`), in a
    temporary file (in memory while small) that is closed afterwards, and its `info` for
    those bytes (size and sha256 change; the pixels do not)."""
    try:
        # Mapped, not read: a large upload is not held in memory a second time.
        view = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    except (AttributeError, OSError, ValueError):
        view = stream.read()  # a small upload Werkzeug kept in memory
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as out:
        try:
            size, sha256 = _write_stripped(view, info, out)
        except strip.Unstrippable as error:
            raise InvalidImage(
                f"The {info.format} file's structure cannot be followed to remove its "
                f"metadata safely: {error}"
            ) from None
        finally:
            if isinstance(view, mmap.mmap):
                # Slices of it may live on in a traceback: then it closes when they go.
                with contextlib.suppress(BufferError):
                    view.close()
            stream.seek(0)
        out.seek(0)
        yield out, dataclasses.replace(info, size=size, sha256=sha256)


def _write_stripped(view, info: ImageInfo, out: BinaryIO) -> tuple[int, str]:
    """Write `view` without its metadata to `out`; its size and sha256."""
    digest, size = hashlib.sha256(), 0
    for piece in strip.strip(view, info.format, info.orientation):
        digest.update(piece)
        size += out.write(piece)
    return size, digest.hexdigest()


@dataclass(frozen=True)
class _Limits:
    pixels: int  # per frame
    animation_pixels: int  # all frames together


class DecodeBudget:
    """How many bytes of decoded pixels one worker process may hold at once.

    Every decode reserves what its pixels will take before it starts and gives it back when
    done; one that does not fit waits for others to finish, up to `wait` seconds (and the
    request's time budget), then gets `DecoderBusy` (503, Retry-After). A decode larger
    than the whole budget runs alone. One instance per worker, shared by every thread.
    """

    def __init__(self, capacity: int, wait: float):
        self.capacity = capacity
        self.wait = wait
        self.in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        cost = min(cost, self.capacity)
        wait = self.wait
        if (budget := deadline.current()) is not None:
            wait = max(min(wait, budget.remaining()), 0)
        with self._changed:
            if self.in_use + cost > self.capacity:
                metrics.DECODE_WAITS.inc()
                if not self._changed.wait_for(lambda: self.in_use + cost <= self.capacity, wait):
                    metrics.DECODE_REFUSALS.inc()
                    raise DecoderBusy()
            self.in_use += cost
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= cost
                self._changed.notify_all()


_UNBOUNDED = DecodeBudget(capacity=1 << 62, wait=0)


def stored_bytes(mode: str) -> int:
    """Bytes Pillow stores a pixel of `mode` in: one for 1, L and P, two for 16-bit
    greyscale, four for everything else (RGB and LA too: three and two bands are padded)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_cost(image: Image.Image, full_size: tuple[int, int] | None = None) -> int:
    """Bytes a decode of `image` (opened, not loaded) holds at its peak; `full_size`: the
    size a JPEG has before `draft` made it smaller.

    The decoded frame, and what the decoder holds beside it, which depends on the format:
    WebP decodes to an RGBA canvas and copies it twice (whatever the mode); AVIF holds
    its YUV planes and RGB conversion beside the frame; an animation (its first frame
    alone too) keeps a canvas and the previous frame (for disposal and blending) in RGBA,
    even when the first frame is a palette; a progressive JPEG holds every coefficient of
    the whole image, at full size however small the draft. Measured with the pinned Pillow
    (tests/test_media.py holds each case to it): counting the frame alone let a 28 KB WebP
    take five times what it reserved, and a progressive JPEG's thumbnail eighty.
    """
    pixels = image.width * image.height
    animated = getattr(image, "n_frames", 1) > 1
    per_pixel = _DECODER_BYTES.get((image.format, animated))
    # Else the frame, and an eighth for the decoder's rows, tables and buffers.
    cost = per_pixel * pixels if per_pixel else stored_bytes(image.mode) * pixels * 9 // 8
    if image.format == "JPEG" and image.info.get("progressive"):
        width, height = full_size or image.size
        cost += _coefficient_bytes(image, width * height)
    return cost


def _coefficient_bytes(image: Image.Image, pixels: int) -> int:
    """libjpeg's buffer for a progressive JPEG: two bytes for each DCT coefficient of every
    component (one per pixel at full sampling, fewer for subsampled chroma), an eighth
    more for the blocks' padding."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    most = max(h for _, h, _, _ in layers) * max(v for _, _, v, _ in layers)
    per_pixel = sum(h * v for _, h, v, _ in layers) / most
    return int(2 * per_pixel * pixels * 9 / 8)


#: Peak bytes per pixel of the decoders that hold more than the frame: (format, animated)
#: -> bytes, an eighth or more above the most that was measured.
_DECODER_BYTES = {
    ("WEBP", False): 19,  # 16.4 (RGB and RGBA, lossy and lossless)
    ("WEBP", True): 19,
    ("AVIF", False): 16,  # 9.8 at 8 bits, 13.8 at 12 bits 4:4:4
    ("AVIF", True): 22,  # 14.4 with two 8-bit frames
    ("GIF", True): 20,  # 17.2 with two frames, 13.1 with four
    ("PNG", True): 18,  # APNG: 16 with disposal or blending
}


def measure(stream: BinaryIO) -> tuple[int, str]:
    """The size and sha256 of a seekable stream, read from its start; left at position 0."""
    digest = hashlib.sha256()
    size = 0
    stream.seek(0)
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    stream.seek(0)
    return size, digest.hexdigest()


def _decode(
    stream: BinaryIO, expected: str, limits: _Limits, budget: DecodeBudget
) -> tuple[int, int, int, str | None]:
    """Open with only the expected decoder, check the pixel counts, then decode every frame.
    Returns the stored width and height, the EXIF orientation and the placeholder colour."""
    try:
        # Restricting `formats` keeps every other Pillow plugin (TIFF, SGI, FLI...) and their
        # history of crash bugs away from untrusted bytes.
        with Image.open(stream, formats=[expected]) as image:
            width, height = image.size
            # Checked from the header, before any pixel is decoded: a decompression bomb is
            # refused here in microseconds with bounded memory.
            if width * height > limits.pixels:
                raise TooManyPixels(
                    f"The image is {width}x{height} pixels; the limit is {limits.pixels} pixels"
                )
            frames = getattr(image, "n_frames", 1)
            if frames * width * height > limits.animation_pixels:
                raise TooManyPixels(
                    f"The animation is {frames} frames of {width}x{height} pixels; the limit is "
                    f"{limits.animation_pixels} pixels in all frames together"
                )
            with budget.reserve(decode_cost(image)):
                # A file that decodes only in part (a truncated third frame) is refused.
                for frame in range(frames):
                    image.seek(frame)
                    image.load()
                    if frame == 0:
                        placeholder = _average_colour(image)
            orientation = orientation_of(image)
    except Image.DecompressionBombError:
        raise TooManyPixels() from None
    except (TooManyPixels, DecoderBusy, MemoryError):
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"The file looks like {expected} but cannot be read") from None
    except ValueError as error:
        if "text chunks" in str(error) or "Decompressed Data Too Large" in str(error):
            # Pillow's limits on PNG text (PNG_TEXT_MEMORY, and 1 MiB per chunk).
            raise InvalidImage(
                f"The PNG holds more than {PNG_TEXT_MEMORY // (1024 * 1024)} MiB of text "
                "metadata (or a text chunk over 1 MiB)"
            ) from None
        raise InvalidImage(f"The {expected} image is corrupt or truncated") from error
    except Exception as error:
        # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error and more on
        # broken streams; all of them mean the same thing to the client.
        raise InvalidImage(f"The {expected} image is corrupt or truncated") from error
    return width, height, orientation, placeholder


def orientation_of(image: Image.Image) -> int:
    """The EXIF Orientation (AVIF: from its irot and imir boxes), 1 when absent or invalid."""
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a broken EXIF block does not make a broken image)
        return 1
    return orientation if orientation in range(1, 9) else 1


def _average_colour(image: Image.Image) -> str | None:
    """The mean colour of the visible pixels, from 64x64 of them sampled evenly (nearest
    neighbour: any other filter makes Pillow copy a whole RGBA image to premultiply it,
    which doubled an upload's peak memory). Summed by Pillow; only transparency needs
    the alpha-weighted sums in Python."""
    small = image.resize((min(image.width, 64), min(image.height, 64)), Image.Resampling.NEAREST)
    if numeric(small):
        small = eight_bit(small)  # converted as it is, 16-bit values were clipped at 255
    if small.mode in _OPAQUE_MODES and "transparency" not in small.info:
        pixels = small.width * small.height
        sums = ImageStat.Stat(small.convert("RGB")).sum
        return "#" + "".join(f"{int(band_sum) // pixels:02x}" for band_sum in sums)
    small = small.convert("RGBA")
    *colours, alpha = small.split()
    total = int(ImageStat.Stat(alpha).sum[0])
    if total == 0:
        return None
    weights = alpha.tobytes()
    sums = [sum(map(operator.mul, band.tobytes(), weights)) for band in colours]
    return "#" + "".join(f"{band_sum // total:02x}" for band_sum in sums)


def numeric(image: Image.Image) -> bool:
    """Whether `image` is 16- or 32-bit greyscale (integer or float)."""
    return image.mode.startswith("I") or image.mode == "F"


def eight_bit(image: Image.Image) -> Image.Image:
    """A `numeric` image scaled into 8-bit greyscale (L), not clipped at 255."""
    return image.convert("F").point(lambda value: value / 256).convert("L")


#: Modes without an alpha band (a greyscale or RGB image may still name a transparent colour
#: in its `transparency` info; a palette may hold alpha itself).
_OPAQUE_MODES = frozenset({"1", "L", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16"})


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
    return _typed(_complete(name, EXTENSIONS[image_format]), image_format)


#: Extensions that name each format; a filename with another one gets the format's own
#: appended, so a PNG sent as `x.html` is saved by a browser as `x.html.png`, never as HTML.
_KNOWN_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "PNG": {".png", ".apng"},
    "GIF": {".gif"},
    "WEBP": {".webp"},
    "AVIF": {".avif"},
}
#: Names Windows reserves for devices, whatever the extension.
_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(10)),
    *(f"LPT{i}" for i in range(10)),
}


def _typed(name: str, image_format: str) -> str:
    stem, ext = os.path.splitext(name)
    if stem.split(".")[0].upper() in _RESERVED:
        stem = f"_{stem}"
    if ext.lower() not in _KNOWN_EXTENSIONS[image_format]:
        stem, ext = stem + ext, EXTENSIONS[image_format]
    return stem[: _MAX_FILENAME - len(ext)] + ext


def renamed(filename: str, image_format: str) -> str:
    """A stored filename with the extension of another format (a variant's download)."""
    stem, _ = os.path.splitext(filename)
    return stem + EXTENSIONS[image_format]


def ascii_filename(name: str, content_type: str) -> str:
    """An ASCII stand-in for a stored filename (Content-Disposition's `filename`), made by
    the same rules: accents dropped, anything outside a small safe set replaced by `_`."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = _UNSAFE_ASCII.sub("_", ascii_name.replace("\\", "/").rsplit("/", 1)[-1])
    return _complete(ascii_name, EXTENSIONS[FORMATS[content_type]])


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
