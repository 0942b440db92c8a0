"""Variants: an image resized and re-encoded on request (`?w=&h=&fit=&format=&q=&upscale=`),
rendered with Pillow once and then served from the blob storage like an original.

What a request asks for is first planned against the image's displayed size into a
`VariantSpec`: the output size, the part of the picture it shows, the format and the
quality. Requests that come to the same picture share one spec, so one cached variant
(`?w=256` and `?w=256&h=0&upscale=true` of a large image, say), recorded under the spec's
`params` and stored under a blob key of its render's own.

Decisions:
- A variant is a still picture: an animation's first frame, as a poster. The original keeps
  its animation; a resized animation would multiply the render's time and memory by the
  frame count inside one request.
- Auto-oriented (the EXIF orientation applied) and without metadata; the ICC profile stays
  when the colour model does (it is colour, not metadata).
- AVIF is encoded at libavif speed `AVIF_SPEED` (9: about 0.25 s for 2048x1536 here, against
  0.95 s at 8 and 1.3 s at 6, for files about a quarter larger than at 6; 1.25 s for
  4096x4096, where WebP takes 2 s), and only up to `AVIF_MAX_DIMENSION` pixels on the longer
  side (the default MAX_VARIANT_DIMENSION): with a larger MAX_VARIANT_DIMENSION,
  `format=avif` beyond it is a 400 and `format=auto` picks WebP. So a render stays well
  inside a request's budget.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

from .errors import BadRequest, DecoderBusy, InvalidImage
from .media import (
    CONTENT_TYPES,
    FORMATS,
    DecodeBudget,
    decode_cost,
    eight_bit,
    measure,
    numeric,
    orientation_of,
    stored_bytes,
)

FITS = ("contain", "cover", "fill")
#: `format=` values and the Pillow format each names (`auto` chooses from Accept).
OUTPUT_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "avif": "AVIF"}
#: The quality when `q` is not given; PNG and GIF are lossless and take none.
DEFAULT_QUALITY = {"JPEG": 85, "WEBP": 80, "AVIF": 60}
AVIF_SPEED = 9
AVIF_MAX_DIMENSION = 4096
#: Rendered variants up to this size stay in memory on their way to storage.
_SPOOL_BYTES = 1024 * 1024
#: Pillow's `reducing_gap`, as `Image.thumbnail` uses it: a fast integer reduction first,
#: then the resampling filter over at least twice the output size.
_REDUCING_GAP = 2.0
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Requested:
    """A download's variant parameters as the client sent them (each already in range)."""

    width: int = 0  # 0: free, follows the aspect ratio
    height: int = 0
    fit: str = "contain"
    format: str | None = None  # None: the original's type; "auto": from Accept
    quality: int | None = None
    upscale: bool = False


@dataclass(frozen=True)
class VariantSpec:
    """What to render: `size` pixels showing `box` (left, top, right, bottom) of the
    displayed picture, as `format` (Pillow's name) at `quality` (None: lossless)."""

    size: tuple[int, int]
    box: Box
    format: str
    quality: int | None

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def params(self) -> str:
        """The spec as text: what the cache key and the variant's record are made from."""
        box = ",".join(f"{edge:.3f}" for edge in self.box)
        quality = self.quality or 0
        return f"{self.size[0]}x{self.size[1]};box={box};{self.format.lower()};q={quality}"


def plan(
    requested: Requested,
    displayed: tuple[int, int],
    content_type: str,
    accepts: Callable[[str], bool],
    max_dimension: int,
) -> VariantSpec:
    """The spec for `requested` of a picture `displayed` pixels large, stored as
    `content_type`; `accepts(content_type)` tells what the client's Accept lists
    (for `format=auto`). A variant no side of which exceeds `max_dimension`."""
    size, box = _geometry(requested, displayed, max_dimension)
    fits_avif = max(size) <= AVIF_MAX_DIMENSION
    if requested.format == "auto":
        if accepts("image/avif") and fits_avif:
            output = "AVIF"
        elif accepts("image/webp"):
            output = "WEBP"
        else:
            output = FORMATS[content_type]
    elif requested.format is not None:
        output = OUTPUT_FORMATS[requested.format]
    else:
        output = FORMATS[content_type]
    if output == "AVIF" and not fits_avif:
        raise BadRequest(
            f"Invalid parameters: format: AVIF variants are limited to {AVIF_MAX_DIMENSION} "
            f"pixels on the longer side (this one would be {size[0]}x{size[1]}); ask for a "
            "smaller one, or for webp"
        )
    quality = None
    if output in DEFAULT_QUALITY:
        quality = requested.quality or DEFAULT_QUALITY[output]
    return VariantSpec(size, box, output, quality)


def _geometry(
    requested: Requested, displayed: tuple[int, int], max_dimension: int
) -> tuple[tuple[int, int], Box]:
    """The output size and the part of the picture it shows (as CSS object-fit)."""
    width, height = displayed
    wanted_w, wanted_h, fit = requested.width, requested.height, requested.fit
    whole: Box = (0.0, 0.0, float(width), float(height))
    upscale = requested.upscale
    if not wanted_w and not wanted_h:
        # A change of format alone: the picture as it is (never enlarged), within the bound.
        wanted_w = wanted_h = max_dimension
        fit, upscale = "contain", False
    if not wanted_w or not wanted_h or fit == "contain":
        scales = [s for s in (wanted_w / width, wanted_h / height) if s > 0]
        scale = _bounded(min(scales), upscale)
        return _clamped((width * scale, height * scale), max_dimension), whole
    if fit == "cover":
        # The centre of the picture at the box's aspect ratio, scaled to the box.
        if width * wanted_h > height * wanted_w:
            crop_w, crop_h = height * wanted_w / wanted_h, float(height)
        else:
            crop_w, crop_h = float(width), width * wanted_h / wanted_w
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        scale = _bounded(wanted_w / crop_w, upscale)
        size = _clamped((crop_w * scale, crop_h * scale), max_dimension)
        return size, (left, top, left + crop_w, top + crop_h)
    # fill: the whole picture stretched to the box; without upscaling, the box shrinks (its
    # aspect ratio kept) until it fits in the picture.
    shrink = 1.0 if upscale else min(1.0, width / wanted_w, height / wanted_h)
    return _clamped((wanted_w * shrink, wanted_h * shrink), max_dimension), whole


def _bounded(scale: float, upscale: bool) -> float:
    return scale if upscale else min(scale, 1.0)


def _clamped(size: tuple[float, float], max_dimension: int) -> tuple[int, int]:
    """`size` rounded, at least 1x1, and scaled down (aspect kept) to `max_dimension`."""
    width, height = size
    over = max(width, height) / max_dimension
    if over > 1:
        width, height = width / over, height / over
    return max(1, round(width)), max(1, round(height))


@dataclass(frozen=True)
class Rendered:
    """What `render` wrote: its length, sha256 and pixel size."""

    size: int
    sha256: str
    width: int
    height: int


@contextlib.contextmanager
def render(
    source: BinaryIO, content_type: str, spec: VariantSpec, budget: DecodeBudget
) -> Iterator[tuple[BinaryIO, Rendered]]:
    """Render `spec` from the image in `source` (seekable, stored as `content_type`): a
    temporary file of the variant's bytes (in memory while small), closed afterwards.

    JPEG sources are decoded at a reduced size (DCT scaling, `Image.draft`) when the variant
    is small. The decoded and the output pixels are reserved in `budget` first: a render
    waits for room like an upload's decode, then gets `DecoderBusy`.
    """
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as out:
        try:
            width, height = _render(source, FORMATS[content_type], spec, budget, out)
        except (DecoderBusy, MemoryError):
            raise
        except Exception as error:
            # A stored image was decoded in full at upload; failing now means a mode or a
            # size the encoder refuses, which is the variant's fault, not the client's.
            raise InvalidImage(
                f"The image cannot be rendered as a {spec.format} variant of "
                f"{spec.size[0]}x{spec.size[1]}"
            ) from error
        size, sha256 = measure(out)
        yield out, Rendered(size, sha256, width, height)


def _render(
    source: BinaryIO, source_format: str, spec: VariantSpec, budget: DecodeBudget, out: BinaryIO
) -> tuple[int, int]:
    with Image.open(source, formats=[source_format]) as image:
        orientation = orientation_of(image)
        turned = orientation >= 5
        shown_w, shown_h = image.size[::-1] if turned else image.size
        left, top, right, bottom = spec.box
        # The size the whole picture takes at the output's scale: decode no larger.
        full_w = spec.size[0] * shown_w / (right - left)
        full_h = spec.size[1] * shown_h / (bottom - top)
        stored_size = image.size
        if source_format == "JPEG":
            wanted = (full_h, full_w) if turned else (full_w, full_h)
            image.draft(None, (math.ceil(wanted[0]), math.ceil(wanted[1])))
        with budget.reserve(_render_cost(image, stored_size, orientation, spec)):
            image.load()
            icc = image.info.get("icc_profile")
            frame = _workable(image)
            if orientation in _TRANSPOSE:
                frame = frame.transpose(_TRANSPOSE[orientation])
            # The box in the decoded frame's pixels (a JPEG draft is smaller than shown).
            x_scale, y_scale = frame.width / shown_w, frame.height / shown_h
            box = (left * x_scale, top * y_scale, right * x_scale, bottom * y_scale)
            frame = frame.resize(
                spec.size, Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP
            )
            frame = _encodable(frame, spec.format)
            options = _save_options(spec)
            if icc and _model(frame.mode) == _model(image.mode):
                options["icc_profile"] = icc
            frame.save(out, spec.format, **options)
            return frame.size


def _render_cost(
    image: Image.Image, stored_size: tuple[int, int], orientation: int, spec: VariantSpec
) -> int:
    """Bytes of pixels a render of `image` (as decoded: a JPEG draft is smaller) may hold
    at once, counted as if every copy lived to the end: the decode (`media.decode_cost`:
    the frame and what its decoder holds); the frame's copy in a mode the filters take
    (`_workable`: a palette image with transparency becomes RGBA, four times its decoded
    size; 16-bit greyscale goes through two float copies); a turned copy (EXIF
    orientation); Pillow's premultiplied copy when there is alpha; its reduced copy and
    the filter's first pass; and the output with the encoder's working copies of it.
    Counting the decoded frame alone let a palette or 16-bit render take four times what
    DECODE_MEMORY allowed."""
    pixels = image.width * image.height
    mode = _workable_mode(image)
    copy = pixels * stored_bytes(mode)
    cost = decode_cost(image, stored_size)
    if numeric(image):
        cost += pixels * (4 + 4 + 1)  # as float, scaled as float, then 8 bits
    elif image.mode != mode or "transparency" in image.info:
        cost += copy
    if orientation in _TRANSPOSE:
        cost += copy
    if "A" in mode:
        cost += copy
    out = spec.size[0] * spec.size[1]
    # Pillow's integer reduction before the filter (`reducing_gap`): a copy up to twice the
    # gap times the output on each side, then the filter's first pass.
    reduced = min(pixels, int((2 * _REDUCING_GAP) ** 2 * out)) + int(2 * _REDUCING_GAP * out)
    return cost + reduced * stored_bytes(mode) + _ENCODER_BYTES.get(spec.format, 12) * out


#: Bytes per output pixel an encoder holds with the output frame where more than the usual
#: twelve: AVIF's YUV planes and its encoder's own (measured 26 to 33).
_ENCODER_BYTES = {"AVIF": 36}


def _workable(image: Image.Image) -> Image.Image:
    """The frame in a mode the resampling filters take (`_workable_mode`)."""
    mode = _workable_mode(image)
    if image.mode == mode and "transparency" not in image.info:
        return image
    if numeric(image):
        return eight_bit(image)
    return image.convert(mode)


def _workable_mode(image: Image.Image) -> str:
    """L, LA, RGB or RGBA: greyscale or colour as the image is, with alpha when it has an
    alpha band or a transparent colour (palette, greyscale or RGB). 16- and 32-bit
    greyscale become L."""
    if numeric(image):
        return "L"
    alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if image.mode in ("1", "L", "LA", "La"):
        return "LA" if alpha else "L"
    return "RGBA" if alpha else "RGB"


def _encodable(frame: Image.Image, output: str) -> Image.Image:
    """The frame in a mode `output` can store; JPEG has no alpha: white shows through."""
    if output == "JPEG" and frame.mode in ("RGBA", "LA"):
        base = Image.new("RGB" if frame.mode == "RGBA" else "L", frame.size, "white")
        base.paste(frame, mask=frame.getchannel("A"))
        return base
    if output in ("WEBP", "AVIF") and frame.mode in ("L", "LA"):
        return frame.convert("RGBA" if frame.mode == "LA" else "RGB")
    return frame


def _model(mode: str) -> str:
    """The colour model an ICC profile describes for pixels of `mode`."""
    if mode in ("1", "L", "LA", "La", "I", "I;16", "F"):
        return "grey"
    if mode in ("RGB", "RGBA", "RGBa", "P", "PA", "YCbCr"):
        return "rgb"
    return mode


def _save_options(spec: VariantSpec) -> dict:
    if spec.format == "AVIF":
        return {"quality": spec.quality, "speed": AVIF_SPEED}
    if spec.quality is not None:
        return {"quality": spec.quality}
    return {}
