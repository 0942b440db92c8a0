"""Metadata taken out of stored images without touching a pixel.

Each walker reads a container's segments or chunks and keeps only what decoding and
display need: the compressed pixels, colour (ICC profiles, gamma, transparency) and
animation. EXIF (GPS above all), XMP, IPTC, comments, text chunks, thumbnails and
anything after the image's end go. Nothing is re-encoded: the kept pieces are copied as
they are, so the stored file decodes to exactly the pixels of the upload.

An EXIF Orientation other than 1 is written back as a minimal EXIF holding only that tag,
so the image displays as before. AVIF keeps its rotation in its own boxes (`irot`,
`imir`), and removing an item from its index would move every offset: the bytes of its
Exif and XMP items are overwritten in place instead (an empty EXIF, then zeros).

The walkers trust no declared length: every length is checked against the bytes left, each
byte is visited a bounded number of times, and the output is slices of the input (no
copies that grow with the number of segments). A file they cannot follow is refused as
`Unstrippable`; Pillow has decoded it first, so that means a container we do not know.
"""

from __future__ import annotations

import re
import struct
import zlib

#: What the walkers give: the stripped file as a list of pieces (slices of the input, or
#: new bytes), to be written one after another.
Pieces = list[bytes | memoryview]


class Unstrippable(ValueError):
    """The container does not have the structure its format requires."""


def strip(data: bytes | memoryview, image_format: str, orientation: int = 1) -> Pieces:
    """The pieces of `data` (a whole file of `image_format`) without its metadata; an
    `orientation` other than 1 is kept as a minimal EXIF where the format has EXIF."""
    walker = _WALKERS.get(image_format)
    if walker is None:
        raise Unstrippable(f"No metadata walker for {image_format}")
    try:
        return walker(_Reader(data), orientation)
    except (IndexError, struct.error) as error:
        raise Unstrippable(f"The {image_format} file ends inside a segment") from error


class _Reader:
    """Bounds-checked access to the input: `view` for slices, `data` for find()."""

    def __init__(self, data: bytes | memoryview):
        self.data = data
        self.view = memoryview(data).cast("B")
        self.size = len(self.view)

    def need(self, end: int, what: str) -> None:
        if end > self.size:
            raise Unstrippable(f"{what} runs past the end of the file")

    def uint(self, pos: int, size: int, order: str = "big") -> int:
        self.need(pos + size, "A length")
        return int.from_bytes(self.view[pos : pos + size], order)


def orientation_exif(orientation: int) -> bytes:
    """A TIFF-structured EXIF with one tag, Orientation (0x0112, SHORT)."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\0\0\0\0"


# --- JPEG ----------------------------------------------------------------------------------

_SOI, _EOI, _SOS, _COM = 0xD8, 0xD9, 0xDA, 0xFE
#: Application segments kept, by marker and signature: JFIF, ICC profiles and Adobe's
#: (whose colour-transform flag decides how CMYK and YCCK decode).
_KEPT_APP = {0xE0: (b"JFIF\0",), 0xE2: (b"ICC_PROFILE\0",), 0xEE: (b"Adobe",)}
#: Kept segments cut to their standard size, dropping what may follow it: JFIF's thumbnail
#: (its size fields then say none), anything appended to Adobe's 12 bytes.
_CUT_APP = {0xE0: (12, b"\0\0"), 0xEE: (12, b"")}


def _jpeg(reader: _Reader, orientation: int) -> Pieces:
    data, view = reader.data, reader.view
    if bytes(view[:2]) != b"\xff\xd8":
        raise Unstrippable("A JPEG starts with SOI")
    pieces: Pieces = [b"\xff\xd8"]
    pos = 2
    while True:
        if reader.uint(pos, 1) != 0xFF:
            raise Unstrippable(f"Expected a JPEG marker at byte {pos}")
        while reader.uint(pos, 1) == 0xFF:  # fill bytes may precede a marker
            pos += 1
        marker = reader.uint(pos, 1)
        pos += 1
        if marker == _EOI:
            break  # whatever follows (a second picture, a trailer) is not this image
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, _SOI):
            raise Unstrippable(f"Marker 0x{marker:02X} outside entropy-coded data")
        length = reader.uint(pos, 2)
        if length < 2:
            raise Unstrippable("A JPEG segment length below 2")
        end = pos + length
        reader.need(end, "A JPEG segment")
        if _keeps(marker, view[pos + 2 : end]):
            pieces.append(bytes((0xFF, marker)))
            pieces.append(
                _cut(marker, view[pos + 2 : end]) if marker in _CUT_APP else view[pos:end]
            )
        pos = end
        if marker == _SOS:
            scan_end = _entropy_end(data, reader, pos)
            pieces.append(view[pos:scan_end])
            pos = scan_end
    if orientation != 1:
        payload = b"Exif\0\0" + orientation_exif(orientation)
        # Right after SOI, or after a JFIF APP0 there (which comes first by its own spec).
        at = 3 if pieces[1:2] == [b"\xff\xe0"] else 1
        pieces.insert(at, b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
    pieces.append(b"\xff\xd9")
    return pieces


def _cut(marker: int, payload: memoryview) -> bytes:
    """A JFIF or Adobe segment's length and payload, cut to the standard fields."""
    size, suffix = _CUT_APP[marker]
    if len(payload) < size:
        raise Unstrippable(f"An APP{marker - 0xE0} segment shorter than its fields")
    kept = bytes(payload[:size]) + suffix
    return struct.pack(">H", len(kept) + 2) + kept


def _keeps(marker: int, payload: memoryview) -> bool:
    if marker == _COM:
        return False
    if 0xE0 <= marker <= 0xEF:
        return any(bytes(payload[: len(sig)]) == sig for sig in _KEPT_APP.get(marker, ()))
    return True  # tables, frame and scan headers, restart intervals


def _entropy_end(data, reader: _Reader, pos: int) -> int:
    """Where the entropy-coded data starting at `pos` ends: at the first 0xFF that starts a
    marker (not a stuffed 0xFF00, a restart marker or a fill byte)."""
    while True:
        # Past stuffed bytes and restart markers in C: a photo has one every few hundred
        # bytes.
        match = _MARKER_OR_FILL.search(data, pos)
        if match is None:
            raise Unstrippable("The JPEG's scan data has no end")
        found = match.start()
        if reader.view[found + 1] != 0xFF:
            return found
        # Fill bytes before a marker: the marker starts at the last 0xFF of the run.
        while found + 1 < reader.size and reader.view[found + 1] == 0xFF:
            found += 1
        if found + 1 >= reader.size:
            raise Unstrippable("The JPEG's scan data has no end")
        if reader.view[found + 1] != 0x00:
            return found
        pos = found + 2  # the run ended in a stuffed 0xFF00


#: 0xFF followed by anything but a stuffing 0x00 or a restart marker.
_MARKER_OR_FILL = re.compile(rb"\xff[^\x00\xd0-\xd7]")


# --- PNG -----------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Chunks kept: critical ones, colour and transparency, and animation (APNG).
_PNG_KEPT = {
    b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP",
    b"sBIT", b"bKGD", b"pHYs", b"cICP", b"mDCv", b"cLLi", b"acTL", b"fcTL", b"fdAT",
}  # fmt: skip


def _png(reader: _Reader, orientation: int) -> Pieces:
    view = reader.view
    if bytes(view[:8]) != _PNG_SIGNATURE:
        raise Unstrippable("A PNG starts with its signature")
    pieces: Pieces = [_PNG_SIGNATURE]
    pos = 8
    while True:
        length = reader.uint(pos, 4)
        kind = bytes(view[pos + 4 : pos + 8])
        end = pos + 12 + length
        reader.need(end, f"The PNG chunk {kind!r}")
        if kind in _PNG_KEPT:
            pieces.append(view[pos:end])
        if kind == b"IHDR" and orientation != 1:
            pieces.append(_png_chunk(b"eXIf", orientation_exif(orientation)))
        if kind == b"IEND":
            return pieces
        pos = end


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


# --- GIF -----------------------------------------------------------------------------------

#: Application extensions kept: looping (Netscape, AnimExts) and ICC profiles.
_GIF_APPLICATIONS = (b"NETSCAPE2.0", b"ANIMEXTS1.0", b"ICCRGBG1012")


def _gif(reader: _Reader, orientation: int) -> Pieces:
    view = reader.view
    if bytes(view[:6]) not in (b"GIF87a", b"GIF89a"):
        raise Unstrippable("A GIF starts with its signature")
    flags = reader.uint(10, 1)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    reader.need(pos, "The GIF's colour table")
    pieces: Pieces = [view[:pos]]
    while pos < reader.size:
        block = view[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x2C:  # an image: descriptor, local colour table, LZW code size, data
            flags = reader.uint(pos + 9, 1)
            start = pos
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
            pos = _sub_blocks_end(reader, pos)
            pieces.append(view[start:pos])
        elif block == 0x21:  # an extension: label, then sub-blocks
            label, start = reader.uint(pos + 1, 1), pos
            pos = _sub_blocks_end(reader, pos + 2)
            if label == 0xF9 or (
                label == 0xFF and bytes(view[start + 3 : start + 14]) in _GIF_APPLICATIONS
            ):
                pieces.append(view[start:pos])  # frame timing, looping, ICC
        else:
            raise Unstrippable(f"Unknown GIF block 0x{block:02X} at byte {pos}")
    pieces.append(b";")  # a GIF cut short after its last frame gets its trailer back
    return pieces


def _sub_blocks_end(reader: _Reader, pos: int) -> int:
    while True:
        size = reader.uint(pos, 1)
        pos += 1 + size
        if size == 0:
            reader.need(pos, "A GIF data block")
            return pos


# --- WebP ----------------------------------------------------------------------------------

#: Chunks kept: the bitstreams, alpha, animation, the extended header and the ICC profile.
_WEBP_KEPT = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF", b"ICCP"}
_VP8X_XMP, _VP8X_EXIF = 0x04, 0x08


def _webp(reader: _Reader, orientation: int) -> Pieces:
    view = reader.view
    if bytes(view[:4]) != b"RIFF" or bytes(view[8:12]) != b"WEBP":
        raise Unstrippable("A WebP starts with RIFF....WEBP")
    end_of_riff = min(8 + reader.uint(4, 4, "little"), reader.size)
    chunks: Pieces = []
    extended = False
    pos = 12
    while pos + 8 <= end_of_riff:
        kind = bytes(view[pos : pos + 4])
        size = reader.uint(pos + 4, 4, "little")
        end = pos + 8 + size
        reader.need(end, f"The WebP chunk {kind!r}")
        padded = min(end + (size & 1), end_of_riff)
        if kind == b"VP8X":
            extended = True
            if size < 10:
                raise Unstrippable("A VP8X chunk is 10 bytes")
            flags = view[pos + 8] & ~(_VP8X_XMP | _VP8X_EXIF)
            if orientation != 1:
                flags |= _VP8X_EXIF
            chunks += [view[pos : pos + 8], bytes((flags,)), view[pos + 9 : padded]]
        elif kind == b"ANMF":
            chunks += _webp_frame(reader, pos, end)
        elif kind in _WEBP_KEPT:
            chunks.append(view[pos:padded])
        if size & 1 and padded == end:  # the last chunk of a file cut short: pad it
            chunks.append(b"\0")
        pos = padded
    if orientation != 1 and extended:
        exif = orientation_exif(orientation)
        chunks.append(b"EXIF" + struct.pack("<I", len(exif)) + exif)
    riff_size = 4 + sum(len(chunk) for chunk in chunks)
    return [b"RIFF" + struct.pack("<I", riff_size) + b"WEBP", *chunks]


#: What an animation frame holds besides its 16-byte header: alpha and a bitstream.
_WEBP_FRAME_KEPT = {b"ALPH", b"VP8 ", b"VP8L"}


def _webp_frame(reader: _Reader, pos: int, end: int) -> Pieces:
    """An ANMF chunk with only its header, alpha and bitstream (metadata chunks hidden in
    a frame go too)."""
    view = reader.view
    body = pos + 8 + 16
    reader.need(body, "A WebP frame header")
    kept: Pieces = []
    while body + 8 <= end:
        size = reader.uint(body + 4, 4, "little")
        stop = min(body + 8 + size + (size & 1), end)
        reader.need(body + 8 + size, "A chunk of a WebP frame")
        if bytes(view[body : body + 4]) in _WEBP_FRAME_KEPT:
            kept.append(view[body:stop])
            if size & 1 and stop == body + 8 + size:
                kept.append(b"\0")
        body = stop
    length = 16 + sum(len(piece) for piece in kept)
    return [b"ANMF" + struct.pack("<I", length), view[pos + 8 : pos + 24], *kept]


# --- AVIF ----------------------------------------------------------------------------------


def _avif(reader: _Reader, orientation: int) -> Pieces:
    """The file as it is, but for the bytes of its Exif and XMP items (see the module)."""
    meta = _child(reader, 0, reader.size, b"meta")
    if meta is None:
        return [reader.view]
    start, end = meta
    start += 4  # a full box: version and flags
    hidden = _metadata_items(reader, _child(reader, start, end, b"iinf"))
    ranges = sorted(
        [*_item_extents(reader, _child(reader, start, end, b"iloc"), hidden), *_spare(reader)]
    )
    pieces: Pieces = []
    pos = 0
    for first, last, kind in ranges:
        if first < pos:
            raise Unstrippable("Metadata items of the AVIF overlap")
        # Decoders check that an Exif item holds a TIFF header: an empty EXIF, then zeros.
        blank = _EMPTY_EXIF_ITEM if kind == b"Exif" else b""
        if last - first < len(blank):
            raise Unstrippable("An AVIF Exif item too short to hold an EXIF")
        pieces += [reader.view[pos:first], blank + bytes(last - first - len(blank))]
        pos = last
    pieces.append(reader.view[pos:])
    return pieces


#: Top-level boxes a picture needs; the others (free, skip, uuid: XMP's) are blanked.
_AVIF_KEPT = {b"ftyp", b"meta", b"mdat", b"moov"}


def _spare(reader: _Reader):
    """Ranges (first, last, b"") of the file no picture needs: the payload of other
    top-level boxes, and whatever follows the last whole box."""
    pos = 0
    while pos + 8 <= reader.size:
        size, kind = reader.uint(pos, 4), bytes(reader.view[pos + 4 : pos + 8])
        header = 8
        if size == 1 and pos + 16 <= reader.size:
            size, header = reader.uint(pos + 8, 8), 16
        elif size == 0:
            size = reader.size - pos
        if size < header or pos + size > reader.size:
            break
        if kind not in _AVIF_KEPT and size > header:
            yield pos + header, pos + size, b""
        pos += size
    if pos < reader.size:
        yield pos, reader.size, b""


def _boxes(reader: _Reader, pos: int, end: int):
    """(type, payload start, box end) of each box in [pos, end)."""
    while pos + 8 <= end:
        size = reader.uint(pos, 4)
        kind = bytes(reader.view[pos + 4 : pos + 8])
        header = 8
        if size == 1:
            size, header = reader.uint(pos + 8, 8), 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise Unstrippable(f"The AVIF box {kind!r} runs past its parent")
        yield kind, pos + header, pos + size
        pos += size


def _child(reader, pos, end, wanted: bytes) -> tuple[int, int] | None:
    for kind, start, stop in _boxes(reader, pos, end):
        if kind == wanted:
            return start, stop
    return None


#: An Exif item's payload: the offset of its TIFF header (0), then a TIFF with no tags.
_EMPTY_EXIF_ITEM = b"\0\0\0\0MM\x00\x2a\0\0\0\x08\0\0\0\0\0\0"


def _metadata_items(reader: _Reader, iinf) -> dict[int, bytes]:
    """The items that are Exif, or XMP (`mime` with application/rdf+xml), by id."""
    if iinf is None:
        return {}
    start, end = iinf
    version = reader.uint(start, 1)
    pos = start + 4 + (2 if version == 0 else 4)
    items = {}
    for kind, payload, stop in _boxes(reader, pos, end):
        if kind != b"infe":
            continue
        infe_version = reader.uint(payload, 1)
        if infe_version < 2:
            continue  # the versions before 2 have no item type
        id_size = 2 if infe_version == 2 else 4
        item_id = reader.uint(payload + 4, id_size)
        type_at = payload + 4 + id_size + 2
        item_type = bytes(reader.view[type_at : type_at + 4])
        rest = bytes(reader.view[type_at + 4 : stop])
        if item_type == b"Exif" or (item_type == b"mime" and b"rdf+xml" in rest):
            items[item_id] = item_type
    return items


def _item_extents(reader: _Reader, iloc, items: dict[int, bytes]):
    """File ranges (first, last, item type) holding the data of `items` (construction
    method 0: in the file)."""
    if iloc is None or not items:
        return
    start, end = iloc
    version = reader.uint(start, 1)
    pos = start + 4
    sizes = reader.uint(pos, 2)
    offset_size, length_size = sizes >> 12, (sizes >> 8) & 0xF
    base_size, index_size = (sizes >> 4) & 0xF, sizes & 0xF if version in (1, 2) else 0
    pos += 2
    count_size = 2 if version < 2 else 4
    count = reader.uint(pos, count_size)
    pos += count_size
    for _ in range(count):
        item_id = reader.uint(pos, count_size)
        pos += count_size
        method = 0
        if version in (1, 2):
            method = reader.uint(pos, 2) & 0xF
            pos += 2
        pos += 2  # data reference index
        base = reader.uint(pos, base_size) if base_size else 0
        pos += base_size
        extents = reader.uint(pos, 2)
        pos += 2
        for _ in range(extents):
            pos += index_size
            offset = reader.uint(pos, offset_size) if offset_size else 0
            pos += offset_size
            length = reader.uint(pos, length_size) if length_size else 0
            pos += length_size
            if item_id in items and method == 0:
                first = base + offset
                last = first + length if length else reader.size
                if last > reader.size:
                    raise Unstrippable("An AVIF item runs past the end of the file")
                yield first, last, items[item_id]
        if pos > end:
            raise Unstrippable("The AVIF item locations run past their box")


_WALKERS = {"JPEG": _jpeg, "PNG": _png, "GIF": _gif, "WEBP": _webp, "AVIF": _avif}
