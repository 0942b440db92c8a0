"""Run by tests/test_media.py in a process of its own: one decode (an upload's, of every
frame) or one render of a generated image, and the bytes it reserved in a `DecodeBudget`
against how far the process's peak resident memory grew.

    python -m tests.memory_probe {inspect|render} CASE FILE
(FILE: `image_bytes(CASE, side)`, made by the caller: making it here would raise the
high-water mark first) prints `reserved peak` in bytes.
"""

from __future__ import annotations

import io
import sys

from PIL import Image

from image_api import media, variants

#: case -> (Pillow format, mode, frames)
CASES = {
    "jpeg": ("JPEG", "RGB", 1),
    "jpeg-progressive": ("JPEG", "RGB", 1),
    "jpeg-progressive-cmyk": ("JPEG", "CMYK", 1),
    "png-rgba": ("PNG", "RGBA", 1),
    "apng": ("PNG", "RGBA", 2),
    "apng-blended": ("PNG", "RGB", 3),
    "gif": ("GIF", "P", 1),
    "gif-animated": ("GIF", "P", 3),
    "webp": ("WEBP", "RGB", 1),
    "webp-animated": ("WEBP", "RGBA", 2),
    "avif": ("AVIF", "RGB", 1),
    "avif-animated": ("AVIF", "RGB", 2),
}


def image_bytes(case: str, side: int) -> bytes:
    """Frames of stripes, different in each frame (so none is skipped as a duplicate)."""
    fmt, mode, count = CASES[case]
    frames = []
    for i in range(count):
        frame = Image.new("RGB", (side, side), (40 * i, 80, 120))
        for y in range(0, side, 97):
            frame.paste((200, 60 * i % 256, 10), (0, y, side, y + 3))
        frames.append(frame.convert(mode))
    out = io.BytesIO()
    options = {"save_all": True, "append_images": frames[1:]} if count > 1 else {}
    if case.startswith("jpeg-progressive"):
        options.update(progressive=True, subsampling=0, quality=90)
    if case == "apng-blended":
        options.update(disposal=1, blend=1)
    if fmt in ("WEBP", "AVIF"):
        options.update(quality=50)
    if fmt == "AVIF":
        options.update(speed=10)
    frames[0].save(out, fmt, **options)
    return out.getvalue()


class Recorded(media.DecodeBudget):
    def __init__(self):
        super().__init__(capacity=1 << 62, wait=0)
        self.reserved = 0

    def reserve(self, cost: int):
        self.reserved += cost
        return super().reserve(cost)


def run(what: str, data: bytes, budget: Recorded) -> None:
    if what == "inspect":
        media.inspect(
            io.BytesIO(data),
            accepted_formats=tuple(media.CONTENT_TYPES),
            max_bytes=1 << 40,
            max_pixels=1 << 40,
            max_animation_pixels=1 << 40,
            budget=budget,
        )
        return
    with Image.open(io.BytesIO(data)) as image:
        size, content_type = image.size, media.CONTENT_TYPES[image.format]
    spec = variants.VariantSpec(size=(256, 256), box=(0, 0, *size), format="WEBP", quality=80)
    with variants.render(io.BytesIO(data), content_type, spec, budget):
        pass


def main() -> None:
    what, case, path = sys.argv[1:]
    with open(path, "rb") as file:
        data = file.read()
    # The same code on a small image first: loading the codecs' libraries grows the
    # process too, and that is not the decode's.
    run(what, image_bytes(case, 64), Recorded())
    budget = Recorded()
    before = high_water_mark()
    run(what, data, budget)
    print(budget.reserved, high_water_mark() - before)


def high_water_mark() -> int:
    """The process's peak resident memory in bytes (VmHWM: this program's own, where
    getrusage's ru_maxrss starts at the forking parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    main()
