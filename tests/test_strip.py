"""The metadata walkers: GPS, EXIF, XMP, comments and text go; pixels, colour profiles,
animation and orientation stay; and broken or hostile containers end in `Unstrippable`,
never another exception."""

from __future__ import annotations

import dataclasses
import functools
import io
import random
import struct

import pytest
from PIL import Image, PngImagePlugin

from image_api.media import signature_format
from image_api.strip import Unstrippable, strip
from tests.helpers import GPS_IFD, samples
from tests.helpers import decoded_frames as frames

ORIENTATION = 0x0112
SECRET = "52.3676 N 4.9041 E secret place"


def stripped(data: bytes, orientation: int = 1) -> bytes:
    return b"".join(bytes(piece) for piece in strip(data, signature_format(data[:16]), orientation))


def exif_with_gps(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010E] = SECRET  # ImageDescription
    exif[GPS_IFD] = {1: "N", 2: (52.0, 22.0, 3.36), 3: "E", 4: (4.0, 54.0, 14.76)}
    return exif


def picture(fmt: str, **options) -> bytes:
    image = Image.new("RGB", (37, 23))
    image.putdata(
        [(x * 7 % 256, y * 11 % 256, (x * y) % 256) for y in range(23) for x in range(37)]
    )
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _readable(path) -> bool:
    try:
        frames(path.read_bytes())
    except Exception:  # noqa: BLE001 (Pillow refuses broken files in many ways)
        return False
    return signature_format(path.read_bytes()[:16]) is not None


READABLE = [p for p in samples("valid") + samples("tricky") if _readable(p)]


@pytest.mark.parametrize("path", READABLE, ids=lambda p: p.name)
def test_every_sample_keeps_its_pixels_and_loses_its_gps(path):
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        orientation = image.getexif().get(ORIENTATION, 1)
    orientation = orientation if orientation in range(1, 9) else 1
    out = stripped(data, orientation)
    assert frames(out) == frames(data)
    with Image.open(io.BytesIO(out)) as image:
        exif = image.getexif()
        assert not exif.get_ifd(GPS_IFD)
        assert set(exif) <= {ORIENTATION}  # nothing but the orientation survives
        assert exif.get(ORIENTATION, 1) == orientation
    assert len(out) <= len(data) + 64


def test_the_gps_sample_loses_its_position():
    data = next(p for p in samples("valid") if p.name == "exif_gps.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        assert image.getexif().get_ifd(GPS_IFD)  # the sample does hold a position
    with Image.open(io.BytesIO(stripped(data))) as image:
        assert not image.getexif()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_orientations_are_kept_alone(fmt, orientation):
    data = picture(fmt, exif=exif_with_gps(orientation).tobytes(), **_lossless(fmt))
    out = stripped(data, orientation)
    assert frames(out) == frames(data)
    assert SECRET.encode() not in out
    with Image.open(io.BytesIO(out)) as image:
        exif = image.getexif()
        assert dict(exif) == ({ORIENTATION: orientation} if orientation != 1 else {})


def _lossless(fmt: str) -> dict:
    return {"lossless": True} if fmt == "WEBP" else {}


def test_jpeg_comments_xmp_and_trailing_pictures_go_the_icc_profile_stays():
    icc = _srgb_profile()
    data = picture("JPEG", exif=exif_with_gps().tobytes(), icc_profile=icc, comment=SECRET)
    data = _with_xmp_segment(data)
    # A second picture after the first one's end (as MPF and "motion photos" append).
    trailer = picture("JPEG", exif=exif_with_gps().tobytes())
    out = stripped(data + trailer)
    assert SECRET.encode() not in out and b"xmpmeta" not in out
    assert out.endswith(b"\xff\xd9") and out.count(b"\xff\xd8") == 1
    assert frames(out) == frames(data)
    with Image.open(io.BytesIO(out)) as image:
        assert image.info["icc_profile"] == icc


@functools.cache
def _srgb_profile() -> bytes:
    """One profile for the whole run (each one made carries its creation time)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _with_xmp_segment(jpeg: bytes) -> bytes:
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta>" + SECRET.encode() + b"</x:xmpmeta>"
    segment = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
    return jpeg[:2] + segment + jpeg[2:]


def test_progressive_jpeg_keeps_every_scan():
    data = picture("JPEG", progressive=True, exif=exif_with_gps().tobytes(), comment=SECRET)
    out = stripped(data)
    assert frames(out) == frames(data) and SECRET.encode() not in out


def test_png_text_chunks_go_colour_chunks_stay():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET)
    info.add_text("Location", SECRET, zip=True)
    info.add_itxt("XML:com.adobe.xmp", SECRET)
    data = picture("PNG", pnginfo=info, exif=exif_with_gps().tobytes(), icc_profile=_srgb_profile())
    out = stripped(data)
    assert SECRET.encode() not in out
    with Image.open(io.BytesIO(out)) as image:
        assert image.info.get("icc_profile") == _srgb_profile()
        assert not image.text
    assert frames(out) == frames(data)


def test_animated_png_and_gif_keep_their_frames_and_timing():
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue")]
    for fmt in ("PNG", "GIF", "WEBP"):
        out_file = io.BytesIO()
        extra = {"comment": SECRET} if fmt == "GIF" else {}
        if fmt == "WEBP":
            extra = {"lossless": True, "exif": exif_with_gps().tobytes(), "xmp": SECRET.encode()}
        images[0].save(
            out_file, fmt, save_all=True, append_images=images[1:], duration=70, loop=0, **extra
        )
        data = out_file.getvalue()
        out = stripped(data)
        assert SECRET.encode() not in out, fmt
        assert frames(out) == frames(data) and len(frames(out)) == 3, fmt
        assert timing(out) == timing(data) == ([70] * 3, 0), fmt


def timing(data: bytes) -> tuple[list[int], int]:
    """Each frame's duration, and the loop count."""
    with Image.open(io.BytesIO(data)) as image:
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            image.load()
            durations.append(image.info.get("duration"))
        return durations, image.info.get("loop")


def test_gif_comments_and_xmp_go():
    data = picture("GIF", comment=SECRET)
    # An XMP packet is an application extension ("XMP DataXMP"), in sub-blocks.
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/">{SECRET} by XMP</x:xmpmeta>'.encode()
    comment = data.index(b"\x21\xfe")
    data = (
        data[:comment]
        + b"\x21\xff\x0bXMP DataXMP"
        + bytes([len(xmp)])
        + xmp
        + b"\x00"
        + data[comment:]
    )
    assert b"by XMP" in data and frames(data)
    out = stripped(data)
    assert SECRET.encode() not in out and frames(out) == frames(data)


def test_webp_exif_and_xmp_go_the_icc_profile_stays():
    data = picture(
        "WEBP",
        lossless=True,
        exif=exif_with_gps().tobytes(),
        xmp=SECRET.encode(),
        icc_profile=_srgb_profile(),
    )
    out = stripped(data)
    assert SECRET.encode() not in out and b"EXIF" not in out and b"XMP " not in out
    with Image.open(io.BytesIO(out)) as image:
        assert image.info.get("icc_profile") == _srgb_profile()
    assert frames(out) == frames(data)


def test_avif_exif_and_xmp_are_blanked_in_place():
    """AVIF: the Exif and XMP items' bytes are overwritten (an empty EXIF, then zeros); the
    file keeps its size and layout, its rotation lives in its own boxes."""
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + SECRET.encode() + b"</x:xmpmeta>"
    data = picture("AVIF", exif=exif_with_gps(6).tobytes(), xmp=xmp)
    out = stripped(data)
    assert len(out) == len(data) and SECRET.encode() not in out
    assert frames(out) == frames(data)
    with Image.open(io.BytesIO(out)) as image:
        assert not image.getexif().get_ifd(GPS_IFD)
        assert image.getexif().get(ORIENTATION) == 6  # from the irot/imir boxes


# --- robustness -----------------------------------------------------------------------------


def _corpus() -> list[bytes]:
    files = [p.read_bytes() for p in samples("valid") + samples("tricky") + samples("hostile")]
    return [data for data in files if signature_format(data[:16]) is not None]


def _strip_or_refuse(data: bytes, fmt: str) -> None:
    try:
        out = b"".join(bytes(piece) for piece in strip(data, fmt, 6))
    except Unstrippable:
        return
    assert len(out) <= len(data) + 64  # never more than the input and a small EXIF


@pytest.mark.parametrize("index", range(len(_corpus())))
def test_cut_and_mangled_files_are_refused_never_crash(index):
    data = _corpus()[index]
    fmt = signature_format(data[:16])
    rng = random.Random(index)
    cuts = sorted({rng.randrange(len(data)) for _ in range(40)} | {len(data) // 2, 20})
    for cut in cuts:
        _strip_or_refuse(data[:cut], fmt)
    for _ in range(60):
        mangled = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(16, len(data)) if len(data) > 16 else 0
            mangled[position] = rng.choice((0x00, 0xFF, rng.randrange(256)))
        _strip_or_refuse(bytes(mangled), fmt)


def test_declared_lengths_are_not_trusted():
    """Lengths that point far past the end, or loop back, end in Unstrippable."""
    png = b"\x89PNG\r\n\x1a\n" + (2**31).to_bytes(4, "big") + b"IHDR"
    jpeg = b"\xff\xd8\xff\xe1\xff\xff" + b"\0" * 10
    gif = b"GIF89a" + b"\1\0\1\0\0\0\0" + b"\x21\xfe\xff" + b"x" * 10
    webp = b"RIFF\xff\xff\xff\xffWEBP" + b"VP8 \xff\xff\xff\x7f" + b"\0" * 10
    avif = b"\0\0\0\x18ftypavif\0\0\0\0avifmif1" + b"\xff\xff\xff\xffmeta" + b"\0" * 8
    for data, fmt in ((png, "PNG"), (jpeg, "JPEG"), (gif, "GIF"), (webp, "WEBP"), (avif, "AVIF")):
        with pytest.raises(Unstrippable):
            strip(data, fmt)


# --- images stored before stripping -----------------------------------------------------------


def test_the_strip_command_strips_images_stored_with_metadata(app, client, images, service):
    data = picture("JPEG", exif=exif_with_gps(6).tobytes(), comment=SECRET)
    # Stored as the release before stripping did (or STRIP_METADATA=false does).
    service.settings = dataclasses.replace(service.settings, strip_metadata=False)
    old = images.create(data, filename="gps.jpg")
    plain = images.create(picture("PNG"))
    service.settings = dataclasses.replace(service.settings, strip_metadata=True)
    download = f"/api/images/{old['_id']}/download"
    assert client.get(download).data == data

    runner = app.test_cli_runner()
    dry = runner.invoke(args=["strip-metadata"])
    assert dry.exit_code == 0, dry.output
    assert "1 to strip" in dry.output and old["_id"] in dry.output
    assert plain["_id"] not in dry.output
    assert client.get(download).data == data  # a dry run changes nothing

    applied = runner.invoke(args=["strip-metadata", "--apply"])
    assert applied.exit_code == 0 and "1 stripped" in applied.output, applied.output
    image = client.get(f"/api/images/{old['_id']}").get_json()
    stored = client.get(download).data
    assert image["version"] == 2 and image["size"] == len(stored) < len(data)
    assert (image["orientation"], image["width"], image["height"]) == (6, 23, 37)
    assert frames(stored) == frames(data) and SECRET.encode() not in stored
    with Image.open(io.BytesIO(stored)) as picture_:
        assert dict(picture_.getexif()) == {ORIENTATION: 6}
    assert client.get(f"/api/images/{plain['_id']}").get_json()["version"] == 1
    # Rerun (after an interruption, say): what is done is skipped.
    again = runner.invoke(args=["strip-metadata", "--apply"])
    assert "0 stripped" in again.output


def test_the_strip_command_says_which_images_were_deleted_or_replaced_meanwhile(
    app, images, service, monkeypatch
):
    data = picture("JPEG", exif=exif_with_gps(6).tobytes(), comment=SECRET)
    service.settings = dataclasses.replace(service.settings, strip_metadata=False)
    made = {images.create(data)["_id"] for _ in range(3)}
    service.settings = dataclasses.replace(service.settings, strip_metadata=True)
    strip_stored = service.strip_stored
    others = []

    def clients_meanwhile(record, apply=False):
        # While the command strips the first it comes to, a client deletes one of the
        # others and replaces the third.
        monkeypatch.setattr(service, "strip_stored", strip_stored)
        others.extend(sorted(made - {record.id}))
        assert images.client.delete(f"/api/images/{others[0]}").status_code == 200
        assert images.replace(others[1], picture("PNG")).status_code == 200
        return strip_stored(record, apply=apply)

    monkeypatch.setattr(service, "strip_stored", clients_meanwhile)
    applied = app.test_cli_runner().invoke(args=["strip-metadata", "--apply"])
    assert applied.exit_code == 0, applied.output
    lines = applied.output.splitlines()
    assert f"{others[0]}: skipped (deleted meanwhile)" in lines
    assert f"{others[1]}: skipped (replaced meanwhile: " in applied.output
    assert "1 stripped" in applied.output


# --- what an outside attack hid where the first walkers did not look ------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1)


def test_metadata_hidden_inside_webp_animation_frames_goes():
    frames_ = [Image.new("RGB", (32, 24), color) for color in ("red", "green", "blue")]
    out = io.BytesIO()
    frames_[0].save(
        out, "WEBP", save_all=True, append_images=frames_[1:], duration=100, lossless=True
    )
    original = out.getvalue()
    chunks, pos = [], 12
    while pos < len(original):
        kind, size = original[pos : pos + 4], struct.unpack("<I", original[pos + 4 : pos + 8])[0]
        data = original[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)
        if kind == b"ANMF":
            data += _chunk(b"EXIF", exif_with_gps().tobytes()) + _chunk(b"XMP ", SECRET.encode())
            data += _chunk(b"LEAK", SECRET.encode())
        chunks.append(_chunk(kind, data))
    body = b"WEBP" + b"".join(chunks)
    data = b"RIFF" + struct.pack("<I", len(body)) + body
    out = stripped(data)
    assert SECRET.encode() not in out
    assert frames(out) == frames(data) and timing(out) == timing(data)


def test_avif_spare_boxes_and_trailing_bytes_are_blanked():
    data = picture("AVIF")
    uuid = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")  # XMP's uuid box
    for extra in (
        SECRET.encode(),
        struct.pack(">I", 8 + len(SECRET)) + b"free" + SECRET.encode(),
        struct.pack(">I", 24 + len(SECRET)) + b"uuid" + uuid + SECRET.encode(),
    ):
        out = stripped(data + extra)
        assert SECRET.encode() not in out and len(out) == len(data + extra)
        assert frames(out) == frames(data)


def test_jfif_thumbnails_and_oversized_adobe_segments_go():
    jpeg = picture("JPEG")
    thumbnail = bytes(range(256)) * 3  # 16x16 RGB
    app0 = b"JFIF\0\x01\x01\0\0\x01\0\x01\x10\x10" + thumbnail
    adobe = b"Adobe\0d\0\0\0\0\x01" + SECRET.encode() * 100
    assert jpeg[2:4] == b"\xff\xe0"  # Pillow writes a JFIF APP0 first: replace it
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    data = (
        jpeg[:2]
        + b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
        + b"\xff\xee" + struct.pack(">H", len(adobe) + 2) + adobe
        + jpeg[app0_end:]
    )  # fmt: skip
    out = stripped(data)
    assert thumbnail not in out and SECRET.encode() not in out
    assert frames(out) == frames(data)
    with Image.open(io.BytesIO(out)) as image:
        assert image.info["jfif_version"] == (1, 1)


def test_gif_plain_text_extensions_go():
    gif = picture("GIF")
    text = b"\x21\x01\x0c" + bytes(12) + bytes([len(SECRET)]) + SECRET.encode() + b"\0"
    data = gif[:-1] + text + b";"
    out = stripped(data)
    assert SECRET.encode() not in out and frames(out) == frames(data)
