"""Variants: `?w=&h=&fit=&format=&q=&upscale=` on a download renders a resized, re-encoded
copy once, caches it beside the originals, and serves it as an original is served."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from datetime import timedelta

import pytest
import requests
from PIL import Image, ImageCms, ImageOps

from image_api import variants
from image_api.records import new_id
from image_api.repair import MISSING_VARIANT, STALE_VARIANT, repair
from tests.helpers import FAKE_AWS, GPS_IFD, ImagesClient, exif_of, make_image, samples

LATER = timedelta(days=1)


def halves(size=(200, 100), fmt="PNG", left="red", right="blue", **save) -> bytes:
    """A picture whose left half is one colour and right half another."""
    image = Image.new("RGB", size, right)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), left), (0, 0))
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def opened(response) -> Image.Image:
    image = Image.open(io.BytesIO(response.data))
    image.load()
    return image


def near(colour, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour[:3], expected, strict=True))


RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture
def local(make_app, tmp_path):
    """A client of the embedded backends only, for what is the same on both (rendering)."""
    return make_app({"DATA_DIR": str(tmp_path / "local")}).test_client()


@pytest.fixture
def local_images(local):
    return ImagesClient(local)


@pytest.fixture
def local_service(local):
    return local.application.extensions["image_api"]


@pytest.fixture
def local_wide(local_images):
    image = local_images.create(halves(), filename="wide.png")
    return f"/api/images/{image['_id']}/download"


@pytest.fixture
def wide(images):
    """A 200x100 PNG, red on the left and blue on the right; its download URL."""
    image = images.create(halves(), filename="wide.png")
    return f"/api/images/{image['_id']}/download"


# --- sizes and fits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "size"),
    [
        ("w=50", (50, 25)),
        ("h=20", (40, 20)),
        ("w=50&h=0", (50, 25)),
        ("w=50&h=50", (50, 25)),  # contain, the default
        ("w=50&h=50&fit=contain", (50, 25)),
        ("w=50&h=50&fit=cover", (50, 50)),
        ("w=50&h=50&fit=fill", (50, 50)),
        ("w=1000", (200, 100)),  # no upscaling by default
        ("w=400&upscale=true", (400, 200)),
        ("w=400&h=400&fit=cover", (100, 100)),  # the box shrinks to fit, its shape kept
        ("w=400&h=400&fit=cover&upscale=1", (400, 400)),
        ("w=400&h=100&fit=fill", (200, 50)),
        ("format=webp", (200, 100)),
        ("upscale=true", (200, 100)),  # no box: the picture's own size, never enlarged
    ],
)
def test_a_variant_has_the_size_its_parameters_ask_for(local, local_wide, query, size):
    response = local.get(f"{local_wide}?{query}")
    assert response.status_code == 200, response.get_json()
    assert opened(response).size == size
    assert response.headers["Content-Length"] == str(len(response.data))


def test_contain_keeps_the_whole_picture_and_cover_crops_the_centre(local, local_wide):
    contained = opened(local.get(f"{local_wide}?w=40&h=40&format=png")).convert("RGB")
    assert near(contained.getpixel((2, 10)), RED) and near(contained.getpixel((37, 10)), BLUE)
    covered = opened(local.get(f"{local_wide}?w=40&h=40&fit=cover&format=png")).convert("RGB")
    # The centre 100x100 of 200x100: a quarter of the width each side of the middle.
    assert near(covered.getpixel((2, 20)), RED) and near(covered.getpixel((37, 20)), BLUE)
    filled = opened(local.get(f"{local_wide}?w=40&h=80&fit=fill&format=png")).convert("RGB")
    assert filled.size == (40, 80)
    assert near(filled.getpixel((2, 70)), RED) and near(filled.getpixel((37, 70)), BLUE)


def test_a_tall_cover_crops_the_middle_of_a_wide_picture(local_images, local):
    # Left third red, middle third white, right third blue: a 1:2 cover shows the middle.
    image = Image.new("RGB", (300, 100), "white")
    image.paste(Image.new("RGB", (100, 100), "red"), (0, 0))
    image.paste(Image.new("RGB", (100, 100), "blue"), (200, 0))
    out = io.BytesIO()
    image.save(out, "PNG")
    url = f"/api/images/{local_images.create(out.getvalue())['_id']}/download"
    tall = opened(local.get(f"{url}?w=25&h=50&fit=cover")).convert("RGB")
    assert tall.size == (25, 50)
    assert all(near(tall.getpixel((x, 25)), WHITE) for x in (2, 12, 22))


# --- formats and quality --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "content_type", "extension"),
    [
        ("jpeg", "image/jpeg", "jpg"),
        ("png", "image/png", "png"),
        ("webp", "image/webp", "webp"),
        ("avif", "image/avif", "avif"),
    ],
)
def test_each_format_is_what_it_says(local, local_wide, fmt, content_type, extension):
    response = local.get(f"{local_wide}?w=40&format={fmt}")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    image = opened(response)
    assert (Image.MIME[image.format], image.size) == (content_type, (40, 20))
    assert f"filename=wide.{extension}" in response.headers["Content-Disposition"]
    assert response.headers["ETag"] == f'"{hashlib.sha256(response.data).hexdigest()}"'


def test_without_format_a_variant_keeps_the_original_type(local_images, local):
    for fmt, content_type in [("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")]:
        image = local_images.create(make_image(fmt, (64, 48)), filename=f"a.{fmt.lower()}")
        response = local.get(f"/api/images/{image['_id']}/download?w=32")
        assert response.headers["Content-Type"] == content_type
        assert opened(response).size == (32, 24)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
def test_quality_changes_lossy_formats(local_images, local, fmt):
    noisy = Image.effect_noise((128, 128), 80).convert("RGB")
    out = io.BytesIO()
    noisy.save(out, "PNG")
    url = f"/api/images/{local_images.create(out.getvalue())['_id']}/download"
    low = local.get(f"{url}?format={fmt}&q=5")
    high = local.get(f"{url}?format={fmt}&q=95")
    assert len(low.data) < len(high.data)


def test_quality_is_ignored_for_png(local, local_wide, local_service):
    first = local.get(f"{local_wide}?w=40&format=png&q=5")
    rendered = local_service.variant_counts["rendered"]
    second = local.get(f"{local_wide}?w=40&format=png&q=95")
    assert first.data == second.data and first.headers["ETag"] == second.headers["ETag"]
    assert local_service.variant_counts["rendered"] == rendered  # the same variant, from the cache


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("image/avif,image/webp,*/*", "image/avif"),
        ("image/webp,image/apng,*/*;q=0.8", "image/webp"),
        ("image/avif;q=0,image/webp", "image/webp"),
        ("IMAGE/AVIF", "image/avif"),  # media types are case-insensitive
        ("*/*", "image/png"),  # a wildcard says nothing about AVIF: the original's type
        ("image/*", "image/png"),
        (None, "image/png"),
    ],
)
def test_format_auto_follows_accept_and_varies_on_it(local, local_wide, accept, content_type):
    headers = {} if accept is None else {"Accept": accept}
    response = local.get(f"{local_wide}?w=40&format=auto", headers=headers)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    assert "Accept" in response.headers["Vary"]
    assert Image.MIME[opened(response).format] == content_type


def test_only_format_auto_varies_on_accept(local, local_wide):
    response = local.get(f"{local_wide}?w=40&format=webp", headers={"Accept": "image/avif"})
    assert "Accept" not in response.headers.get("Vary", "")
    assert "Accept" not in local.get(local_wide).headers.get("Vary", "")


def test_avif_is_bounded_and_auto_falls_back_to_webp(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_VARIANT_DIMENSION": "8192"})
    client = app.test_client()
    side = variants.AVIF_MAX_DIMENSION + 1
    url = f"/api/images/{ImagesClient(client).create(make_image('PNG', (side, 4)))['_id']}"
    refused = client.get(f"{url}/download?format=avif")
    assert refused.status_code == 400
    assert refused.get_json()["code"] == "bad_request"
    assert "format" in refused.get_json()["message"]
    assert str(variants.AVIF_MAX_DIMENSION) in refused.get_json()["message"]
    auto = client.get(f"{url}/download?format=auto", headers={"Accept": "image/avif,image/webp"})
    assert auto.headers["Content-Type"] == "image/webp"
    fits = client.get(f"{url}/download?format=avif&w={side - 1}")
    assert fits.headers["Content-Type"] == "image/avif"


# --- bounds: every bad value is a 400 naming its parameter ----------------------------------


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("w=-1", "w"),
        ("w=abc", "w"),
        ("w=1.5", "w"),
        ("w=", "w"),
        ("w=%EF%BC%95", "w"),  # a fullwidth digit
        ("w=4097", "w"),
        ("w=" + "9" * 5000, "w"),
        ("h=99999", "h"),
        ("fit=stretch", "fit"),
        ("fit=", "fit"),
        ("format=gif", "format"),
        ("format=tiff", "format"),
        ("format=WEBP", "format"),
        ("q=0", "q"),
        ("q=101", "q"),
        ("q=-5", "q"),
        ("upscale=maybe", "upscale"),
        ("w=1&w=2", "w"),  # a proxy that took the other one would cache another picture
        ("format=webp&format=avif", "format"),
        ("upscale=true&upscale=false", "upscale"),
        ("disposition=inline&disposition=attachment", "disposition"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(local, local_wide, query, parameter):
    response = local.get(f"{local_wide}?{query}")
    assert response.status_code == 400, response.data
    body = response.get_json()
    assert body["code"] == "bad_request"
    assert f"{parameter}:" in body["message"]


def test_max_variant_dimension_is_a_setting(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_VARIANT_DIMENSION": "64"})
    client = app.test_client()
    url = f"/api/images/{ImagesClient(client).create(halves())['_id']}/download"
    assert client.get(f"{url}?w=65").status_code == 400
    assert opened(client.get(f"{url}?w=64")).size == (64, 32)
    # A change of format alone is fitted inside the bound.
    assert opened(client.get(f"{url}?format=png")).size == (64, 32)
    # The API description states this deployment's bound.
    operation = client.get("/api/openapi.json").get_json()["paths"][
        "/api/images/{image_id}/download"
    ]["get"]
    bounds = {p["name"]: p["schema"].get("maximum") for p in operation["parameters"]}
    assert (bounds["w"], bounds["h"], bounds["q"]) == (64, 64, 100)


def test_variant_sizes_allow_only_the_sizes_listed(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "VARIANT_SIZES": "64x64, 100x0"})
    client = app.test_client()
    url = f"/api/images/{ImagesClient(client).create(halves())['_id']}/download"
    assert opened(client.get(f"{url}?w=64&h=64&fit=cover")).size == (64, 64)
    assert opened(client.get(f"{url}?w=100&format=webp")).size == (100, 50)
    for query in ("w=65&h=64", "w=64", "h=100", "format=webp", "q=50"):
        response = client.get(f"{url}?{query}")
        assert response.status_code == 400, query
        assert (
            "w:" in response.get_json()["message"]
            and "64x64, 100x0" in response.get_json()["message"]
        )
    assert client.get(url).status_code == 200  # the original is not a variant


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("64", "WIDTHxHEIGHT"),
        ("64x", "WIDTHxHEIGHT"),
        ("axb", "WIDTHxHEIGHT"),
        ("5000x1", "5000x1"),
    ],
)
def test_bad_variant_sizes_stop_the_start(make_app, tmp_path, value, problem):
    from image_api.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        make_app({"DATA_DIR": str(tmp_path), "VARIANT_SIZES": value})


# --- what a variant keeps and drops ---------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_variant_is_turned_upright(local_images, local, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = halves((60, 30), "JPEG", quality=95, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    url = f"/api/images/{local_images.create(data, filename='turned.jpg')['_id']}/download"
    variant = opened(local.get(f"{url}?w={upright.width}&format=png")).convert("RGB")
    assert variant.size == upright.size
    width, height = upright.size
    for point in [(3, 3), (width - 4, 3), (3, height - 4), (width - 4, height - 4)]:
        assert near(variant.getpixel(point), upright.getpixel(point)), (orientation, point)
    assert not exif_of(local.get(f"{url}?w=20&format=jpeg").data)


def test_a_variant_has_no_metadata_but_keeps_its_colour_profile(images, client):
    exif = Image.Exif()
    exif[0x010E] = "secret place"
    exif[GPS_IFD] = {1: "N", 2: (52.0, 22.0, 3.36)}
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = halves((64, 32), "JPEG", exif=exif, icc_profile=icc)
    url = f"/api/images/{images.create(data, filename='gps.jpg')['_id']}/download"
    for fmt in ("jpeg", "png", "webp", "avif"):
        response = client.get(f"{url}?w=32&format={fmt}")
        assert b"secret place" not in response.data
        variant = opened(response)
        assert not variant.getexif(), fmt
        assert variant.info.get("icc_profile") == icc, fmt


@pytest.mark.parametrize("name", ["dispose_bgnd.gif", "iss634.gif"])
def test_a_variant_of_an_animation_is_its_first_frame(local_images, local, name):
    data = next(path for path in samples("valid") if path.name == name).read_bytes()
    original = Image.open(io.BytesIO(data))
    assert original.n_frames > 1
    first = original.convert("RGBA")
    url = f"/api/images/{local_images.create(data, filename=name)['_id']}/download"
    for fmt in ("webp", "png", "gif"):
        query = f"w={original.width}" + (f"&format={fmt}" if fmt != "gif" else "")
        variant = opened(local.get(f"{url}?{query}"))
        assert getattr(variant, "n_frames", 1) == 1, fmt
        assert variant.size == original.size
    lossless = opened(local.get(f"{url}?w={original.width}&format=png")).convert("RGBA")
    assert lossless.tobytes() == first.tobytes()


def test_every_accepted_sample_renders_in_every_format(make_app, tmp_path):
    """The valid and tricky samples that uploads accept never make a variant fail."""
    client = make_app({"DATA_DIR": str(tmp_path)}).test_client()
    images = ImagesClient(client)
    accepted = []
    for path in samples("valid") + samples("tricky"):
        response = images.upload(path.read_bytes(), filename=path.name)
        if response.status_code == 201:
            accepted.append(response.get_json()["image"]["_id"])
    assert len(accepted) >= 15
    for image_id in accepted:
        for query in ("w=24", "w=24&h=24&fit=cover&format=jpeg", "h=16&format=avif", "format=webp"):
            response = client.get(f"/api/images/{image_id}/download?{query}")
            assert response.status_code == 200, (image_id, query, response.data[:200])
            opened(response)


# --- served like an original: cache, validators, ranges, HEAD -------------------------------


def test_a_variant_is_rendered_once_then_served_from_the_cache(client, wide, service):
    first = client.get(f"{wide}?w=60&format=webp")
    assert service.variant_counts == {"rendered": 1}
    again = client.get(f"{wide}?w=60&format=webp")
    assert service.variant_counts == {"rendered": 1, "cached": 1}
    assert again.data == first.data and again.headers["ETag"] == first.headers["ETag"]
    # Parameters that come to the same picture share it: no upscaling is needed here.
    client.get(f"{wide}?w=60&h=0&format=webp&upscale=true&fit=cover")
    assert service.variant_counts == {"rendered": 1, "cached": 2}


def test_validators_ranges_and_head_work_on_a_variant(client, wide):
    url = f"{wide}?w=60&format=webp"
    full = client.get(url)
    etag = full.headers["ETag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={"If-Match": '"other"'}).status_code == 412
    part = client.get(url, headers={"Range": "bytes=2-9"})
    assert (part.status_code, part.data) == (206, full.data[2:10])
    assert part.headers["Content-Range"] == f"bytes 2-9/{len(full.data)}"
    assert client.get(url, headers={"Range": "bytes=2-9", "If-Range": etag}).status_code == 206
    stale = client.get(url, headers={"Range": "bytes=2-9", "If-Range": '"other"'})
    assert (stale.status_code, stale.data) == (200, full.data)
    beyond = client.get(url, headers={"Range": f"bytes={len(full.data)}-"})
    assert beyond.status_code == 416
    head = client.head(url)
    assert head.status_code == 200 and head.data == b""
    assert head.headers["Content-Length"] == str(len(full.data))
    assert head.headers["ETag"] == etag
    # The original's validators are not the variant's.
    assert client.get(wide, headers={"If-None-Match": etag}).status_code == 200


def test_concurrent_first_requests_render_a_variant_once(make_app, tmp_path, monkeypatch):
    app = make_app({"DATA_DIR": str(tmp_path)})
    service = app.extensions["image_api"]
    wide = f"/api/images/{ImagesClient(app.test_client()).create(halves())['_id']}/download"
    threads_count = 3
    render = variants.render
    deadline = time.monotonic() + 10

    def waiting_render(*args, **kwargs):
        # The first render goes on only once every other request waits for it (or is
        # rendering too, without the per-key lock: then this times out and it fails).
        while sum(n for _, n in service._rendering._locks.values()) < threads_count:
            assert time.monotonic() < deadline, "the other requests did not wait"
            time.sleep(0.005)
        return render(*args, **kwargs)

    monkeypatch.setattr(variants, "render", waiting_render)
    results = []

    def fetch():
        results.append(app.test_client().get(f"{wide}?w=70&format=png").data)

    workers = [threading.Thread(target=fetch) for _ in range(threads_count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == threads_count and len(set(results)) == 1
    assert service.variant_counts["rendered"] == 1


def test_renders_share_the_decode_budget(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "DECODE_MEMORY": "1000000", "DECODE_WAIT": "0.05"})
    client, service = app.test_client(), app.extensions["image_api"]
    url = f"/api/images/{ImagesClient(client).create(halves())['_id']}/download"
    with service.decode_budget.reserve(service.decode_budget.capacity):
        busy = client.get(f"{url}?w=50")
    assert busy.status_code == 503
    assert busy.get_json()["code"] == "decoder_busy" and busy.headers["Retry-After"]
    assert client.get(f"{url}?w=50").status_code == 200


def _transparent_palette_png(side: int) -> bytes:
    image = Image.new("P", (side, side), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    out = io.BytesIO()
    image.save(out, "PNG", transparency=0)
    return out.getvalue()


def test_a_render_reserves_the_copies_it_makes_not_only_the_decoded_pixels(make_app, tmp_path):
    """A palette PNG with transparency decodes to one byte a pixel, but is rendered from an
    RGBA copy (four) and Pillow's premultiplied copy of that (four more): 2.3 MB at
    500x500, not the 0.5 MB the decoded frame alone would reserve. With 2 MB of the budget
    free, it waits and gets 503; an RGB PNG of the same size (0.8 MB) renders."""
    app = make_app({"DATA_DIR": str(tmp_path), "DECODE_MEMORY": "4000000", "DECODE_WAIT": "0.05"})
    client, service = app.test_client(), app.extensions["image_api"]
    images = ImagesClient(client)
    palette = images.create(_transparent_palette_png(500), filename="p.png")["_id"]
    rgb = images.create(make_image("PNG", (500, 500)), filename="rgb.png")["_id"]
    with service.decode_budget.reserve(2_000_000):  # another decode holds half
        busy = client.get(f"/api/images/{palette}/download?w=50")
        assert (busy.status_code, busy.get_json()["code"]) == (503, "decoder_busy")
        assert client.get(f"/api/images/{rgb}/download?w=50").status_code == 200
    assert client.get(f"/api/images/{palette}/download?w=50").status_code == 200


@pytest.mark.parametrize("timeout", ["1", "2"])
def test_a_short_request_timeout_still_renders(make_app, tmp_path, timeout):
    """A render needs 2 s of the request's budget to start, or two fifths of a shorter
    REQUEST_TIMEOUT: with 2 s, every variant was a 503."""
    app = make_app({"DATA_DIR": str(tmp_path), "REQUEST_TIMEOUT": timeout})
    client = app.test_client()
    url = f"/api/images/{ImagesClient(client).create(halves())['_id']}/download"
    assert opened(client.get(f"{url}?w=50")).size == (50, 25)


def test_renders_at_once_are_limited_per_worker(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "RENDER_CONCURRENCY": "1", "DECODE_WAIT": "0.05"})
    client, service = app.test_client(), app.extensions["image_api"]
    url = f"/api/images/{ImagesClient(client).create(halves())['_id']}/download"
    with service._render_slots.taken():  # another request is rendering
        busy = client.get(f"{url}?w=50")
        cached = client.get(url)  # originals are not renders
    assert (busy.status_code, busy.get_json()["code"]) == (503, "decoder_busy")
    assert busy.headers["Retry-After"] and cached.status_code == 200
    assert client.get(f"{url}?w=50").status_code == 200


def test_a_render_that_spent_the_budget_is_still_stored_and_served(
    client, service, wide, monkeypatch
):
    from image_api import deadline

    render = variants.render

    def slow_render(*args, **kwargs):
        # As if the render took the rest of the request's budget (a loaded machine).
        deadline.current().expires = deadline.current().monotonic() - 1
        return render(*args, **kwargs)

    monkeypatch.setattr(variants, "render", slow_render)
    response = client.get(f"{wide}?w=30")
    assert response.status_code == 200
    assert opened(response).size == (30, 15)
    assert len(service.repository.variants_of(wide.split("/")[3])) == 1


def test_an_image_keeps_at_most_max_variants_per_image(make_app, tmp_path, clock):
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_VARIANTS_PER_IMAGE": "2"})
    client, service = app.test_client(), app.extensions["image_api"]
    image_id = ImagesClient(client).create(halves())["_id"]
    url = f"/api/images/{image_id}/download"
    for width in (10, 20, 30):
        assert client.get(f"{url}?w={width}").status_code == 200
    kept = service.repository.variants_of(image_id)
    assert sorted(v.width for v in kept) == [20, 30]  # the oldest went
    clock.advance(service.retention + timedelta(seconds=1))
    service.sweep_retired(limit=100)
    stored = {blob.key for blob in service.storage.list()}
    assert stored == {service.repository.get(image_id).key, *(v.key for v in kept)}
    assert opened(client.get(f"{url}?w=10")).size == (10, 5)  # rendered again when asked


def test_an_evicted_variant_asked_for_again_survives_the_sweep_of_its_old_blob(
    make_app, tmp_path, clock
):
    """Evicted (its blob retired), then asked for again, a variant is rendered under a new
    blob key. The sweep of the retired blob leaves it in place: when a variant's blob key
    named its parameters, the sweep deleted the new render, and the variant (a gallery's
    thumbnailUrl) was a 404 until repair."""
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_VARIANTS_PER_IMAGE": "1"})
    client, service = app.test_client(), app.extensions["image_api"]
    image_id = ImagesClient(client).create(halves())["_id"]
    url = f"/api/images/{image_id}/download"
    assert client.get(f"{url}?w=10").status_code == 200
    (evicted,) = service.repository.variants_of(image_id)
    assert client.get(f"{url}?w=20").status_code == 200  # evicts w=10
    assert opened(client.get(f"{url}?w=10")).size == (10, 5)  # rendered again, evicts w=20
    (again,) = service.repository.variants_of(image_id)
    assert again.params == evicted.params and again.key != evicted.key
    clock.advance(service.retention + timedelta(seconds=1))
    assert service.sweep_retired(limit=100) == 2
    assert opened(client.get(f"{url}?w=10")).size == (10, 5)
    assert service.repository.variants_of(image_id) == [again]  # served as it was stored
    assert opened(client.get(f"{url}?w=20")).size == (20, 10)


def test_a_render_recorded_while_the_sweep_deletes_the_old_blob_keeps_its_bytes(
    make_app, tmp_path, clock, monkeypatch
):
    """The other order: the sweep found no variant using the retired blob, and a render
    of the same variant is stored and recorded just before the sweep deletes that blob. The
    render's own blob is untouched and stays in use: no request renders it again, and none
    gets a 404 (when both had the same key, one of them did)."""
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_VARIANTS_PER_IMAGE": "1"})
    client, service = app.test_client(), app.extensions["image_api"]
    image_id = ImagesClient(client).create(halves())["_id"]
    url = f"/api/images/{image_id}/download"
    assert client.get(f"{url}?w=10").status_code == 200
    assert client.get(f"{url}?w=20").status_code == 200  # evicts w=10: retired
    clock.advance(service.retention + timedelta(seconds=1))
    storage, delete = service.storage.inner, service.storage.inner.delete
    deleted = []

    def delete_after_a_render(key):
        monkeypatch.setattr(storage, "delete", delete)
        assert client.get(f"{url}?w=10").status_code == 200  # stored and recorded again
        delete(key)
        deleted.append(key)

    monkeypatch.setattr(storage, "delete", delete_after_a_render)
    service.sweep_retired(limit=100)
    assert deleted
    (rendered,) = service.repository.variants_of(image_id)
    assert rendered.key not in deleted
    rendered_before = service.variant_counts["rendered"]
    assert opened(client.get(f"{url}?w=10")).size == (10, 5)
    assert service.variant_counts["rendered"] == rendered_before  # from the cache
    assert service.repository.variants_of(image_id) == [rendered]


def test_the_sweep_keeps_a_retired_blob_a_variant_of_an_older_release_still_uses(
    make_app, tmp_path, clock
):
    """Releases before a blob key per render stored an evicted variant asked for again
    under the key it was retired under: such a note is dropped, the blob kept."""
    app = make_app({"DATA_DIR": str(tmp_path)})
    client, service = app.test_client(), app.extensions["image_api"]
    image_id = ImagesClient(client).create(halves())["_id"]
    url = f"/api/images/{image_id}/download?w=10"
    assert client.get(url).status_code == 200
    (variant,) = service.repository.variants_of(image_id)
    service.repository.retire(variant.key, clock())
    assert service.sweep_retired(limit=100) == 1
    assert service.repository.retired_until(variant.key) is None
    assert opened(client.get(url)).size == (10, 5)
    assert service.repository.variants_of(image_id) == [variant]


def test_two_workers_rendering_one_variant_keep_the_first_recorded(make_app, tmp_path, monkeypatch):
    """Two workers (two apps on one data directory) render the same variant at once: the
    one recorded second sends the first's record and deletes its own blob, so one variant
    and one blob remain."""
    first = make_app({"DATA_DIR": str(tmp_path)})
    second = make_app({"DATA_DIR": str(tmp_path)})
    one, other = first.test_client(), second.test_client()
    image_id = ImagesClient(one).create(halves())["_id"]
    url = f"/api/images/{image_id}/download?w=30&format=png"
    render = variants.render
    meanwhile = []

    def other_worker_first(*args, **kwargs):
        monkeypatch.setattr(variants, "render", render)
        meanwhile.append(other.get(url))  # renders, stores and records it
        return render(*args, **kwargs)

    monkeypatch.setattr(variants, "render", other_worker_first)
    response = one.get(url)
    assert response.status_code == meanwhile[0].status_code == 200
    assert response.data == meanwhile[0].data
    assert response.headers["ETag"] == meanwhile[0].headers["ETag"]
    service = first.extensions["image_api"]
    (variant,) = service.repository.variants_of(image_id)
    stored = {blob.key for blob in service.storage.list()}
    assert stored == {service.repository.get(image_id).key, variant.key}


# --- no variant outlives its image or version -----------------------------------------------


def test_a_replace_retires_the_old_versions_variants(images, client, service, clock, wide):
    image_id = wide.split("/")[3]
    old = client.get(f"{wide}?w=30")
    assert len(service.repository.variants_of(image_id)) == 1
    assert images.replace(image_id, halves(left="green")).status_code == 200
    assert service.repository.variants_of(image_id) == []
    new = client.get(f"{wide}?w=30")
    assert new.data != old.data
    assert [v.version for v in service.repository.variants_of(image_id)] == [2]
    # The old variant's blob is kept for readers in flight, then swept with retired blobs.
    clock.advance(service.retention + timedelta(seconds=1))
    service.sweep_retired(limit=100)
    keys = {blob.key for blob in service.storage.list()}
    wanted = {service.repository.get(image_id).key, service.repository.variants_of(image_id)[0].key}
    assert keys == wanted


def test_a_delete_removes_the_variants_and_their_blobs(client, service, wide):
    image_id = wide.split("/")[3]
    for query in ("w=30", "w=40&format=webp", "h=10&format=jpeg"):
        assert client.get(f"{wide}?{query}").status_code == 200
    assert len(service.repository.variants_of(image_id)) == 3
    assert client.delete(f"/api/images/{image_id}").status_code == 200
    assert service.repository.variants_of(image_id) == []
    assert list(service.storage.list()) == []
    assert client.get(f"{wide}?w=30").status_code == 404


def test_a_render_that_loses_a_race_with_a_replace_removes_its_variant(
    images, client, service, wide, monkeypatch
):
    image_id = wide.split("/")[3]
    render = variants.render

    def replaced_meanwhile(*args, **kwargs):
        monkeypatch.setattr(variants, "render", render)
        assert images.replace(image_id, halves(left="green")).status_code == 200
        return render(*args, **kwargs)

    monkeypatch.setattr(variants, "render", replaced_meanwhile)
    response = client.get(f"{wide}?w=30&format=png")
    # The request read version 1 and gets its variant; nothing of version 1 stays recorded.
    assert response.status_code == 200
    assert near(opened(response).convert("RGB").getpixel((2, 7)), RED)
    assert service.repository.variants_of(image_id) == []


def test_repair_keeps_cached_variants_and_removes_stale_ones(client, service, clock, wide):
    image_id = wide.split("/")[3]
    client.get(f"{wide}?w=30")
    kept = service.repository.variants_of(image_id)[0]
    stale = kept.__class__(**{**kept.__dict__, "key": "f" * 32, "version": 9})
    service.repository.insert_variant(stale)
    service.storage.put(stale.key, io.BytesIO(b"old render"), stale.content_type)
    gone = kept.__class__(**{**kept.__dict__, "key": "e" * 32, "image_id": new_id()})
    service.repository.insert_variant(gone)
    service.storage.put(gone.key, io.BytesIO(b"render of a deleted image"), gone.content_type)
    lost = kept.__class__(**{**kept.__dict__, "key": "d" * 32, "params": "1x1;lost"})
    service.repository.insert_variant(lost)  # its blob never arrived
    clock.advance(LATER)

    dry = repair(service, timedelta(0))
    assert {(f.kind, f.key) for f in dry.findings} == {
        (STALE_VARIANT, stale.key),
        (STALE_VARIANT, gone.key),
        (MISSING_VARIANT, lost.key),
    }
    assert dry.variants == 4
    report = repair(service, timedelta(0), apply=True)
    assert len(report.findings) == 3
    assert [v.key for v in service.repository.scan_variants(None, 10)] == [kept.key]
    assert {blob.key for blob in service.storage.list()} == {
        kept.key,
        service.repository.get(image_id).key,
    }
    assert repair(service, timedelta(0), apply=True).findings == []
    assert client.get(f"{wide}?w=30").status_code == 200


# --- redirect mode, signed URLs --------------------------------------------------------------


@pytest.fixture
def redirecting(make_app, tmp_path, moto_server):
    app = make_app(
        {
            "DATA_DIR": str(tmp_path),
            "S3_BUCKET_NAME": f"variants-{new_id()}",
            "S3_ENDPOINT_URL": moto_server,
            "DOWNLOAD_MODE": "redirect",
            **FAKE_AWS,
        }
    )
    app.extensions["image_api"].storage.create()
    return app


def test_redirect_mode_redirects_to_the_cached_variant(redirecting):
    client = redirecting.test_client()
    service = redirecting.extensions["image_api"]
    image = ImagesClient(client).create(halves(), filename="wide.png")
    url = f"/api/images/{image['_id']}/download?w=50&format=webp"
    for _ in range(2):
        response = client.get(url)
        assert response.status_code == 302
        fetched = requests.get(response.headers["Location"], timeout=10)
        assert fetched.status_code == 200
        assert fetched.headers["Content-Type"] == "image/webp"
        assert "wide.webp" in fetched.headers["Content-Disposition"]
        assert Image.open(io.BytesIO(fetched.content)).size == (50, 25)
        assert response.headers["ETag"] == f'"{hashlib.sha256(fetched.content).hexdigest()}"'
    assert service.variant_counts == {"rendered": 1, "cached": 1}


def test_a_signed_url_does_not_stretch_to_a_variant(client, images):
    image = images.create(halves())
    anonymous = client.application.test_client(key=None)
    signed = image["imageUrl"]
    assert anonymous.get(signed).status_code == 200
    tampered = anonymous.get(f"{signed}&w=10")
    assert (tampered.status_code, tampered.get_json()["code"]) == (403, "invalid_signature")


def test_renders_waiting_for_a_slot_leave_a_thread_for_other_requests():
    """A render waiting for a slot holds a gunicorn thread as a running one does: renders
    occupy at most `threads` (GUNICORN_THREADS - 1), running or waiting, and the next is
    refused at once (503), so one thread always stays for other requests (a health check
    waited 7 s behind renders waiting on every thread)."""
    from image_api.capacity import Slots
    from image_api.errors import DecoderBusy

    slots = Slots(count=1, wait=60, threads=2)
    started, release, outcomes = threading.Event(), threading.Event(), []

    def render(name):
        try:
            with slots.taken():
                started.set()
                release.wait(30)
            outcomes.append((name, "rendered"))
        except DecoderBusy:
            outcomes.append((name, "busy"))

    running = threading.Thread(target=render, args=("first",))
    running.start()
    assert started.wait(10)
    waiting = threading.Thread(target=render, args=("second",))
    waiting.start()
    for _ in range(1000):
        if slots.busy == 2:
            break
        waiting.join(0.01)
    assert slots.busy == 2
    refused = threading.Thread(target=render, args=("third",))
    refused.start()
    refused.join(10)  # refused without waiting for the 60 s
    assert not refused.is_alive() and outcomes == [("third", "busy")]
    release.set()
    for thread in (running, waiting):
        thread.join(10)
    assert sorted(outcomes) == [("first", "rendered"), ("second", "rendered"), ("third", "busy")]
    assert slots.busy == 0


def one_render_slot(make_app, tmp_path, threads: int):
    """An app with one render slot, `threads` gunicorn threads and a minute's patience for
    a slot; its client, its service and a new variant's URL."""
    app = make_app(
        {
            "DATA_DIR": str(tmp_path),
            "GUNICORN_THREADS": str(threads),
            "RENDER_CONCURRENCY": "1",
            "DECODE_WAIT": "60",
            "REQUEST_TIMEOUT": "100",
            "GUNICORN_TIMEOUT": "120",
        }
    )
    client, service = app.test_client(), app.extensions["image_api"]
    url = f"/api/images/{ImagesClient(client).create(halves())['_id']}/download?w=50"
    return client, service, url


def test_requests_waiting_for_the_same_render_count_among_those_waiting(make_app, tmp_path):
    """Requests for a variant another request is rendering wait for that render, holding
    their threads: they were not counted, so one read key asking for one new variant at
    once on every thread left none for other requests. They take the same places as
    renders waiting for a slot; with none left, a 503 at once."""
    client, service, url = one_render_slot(make_app, tmp_path, threads=3)  # one may wait
    answers = []
    with service._render_slots.taken():  # another image's render
        first = threading.Thread(target=lambda: answers.append(client.get(url)))
        first.start()  # holds the variant's lock and waits for the slot
        for _ in range(1000):
            if service._render_slots.busy == 2:
                break
            first.join(0.01)
        assert service._render_slots.busy == 2
        second = threading.Thread(target=lambda: answers.append(client.get(url)))
        second.start()
        second.join(10)
        assert not second.is_alive()  # not left waiting for the first's render
        assert (answers[0].status_code, answers[0].get_json()["code"]) == (503, "decoder_busy")
        assert answers[0].headers["Retry-After"]
    first.join(10)
    assert answers[1].status_code == 200 and service.variant_counts == {"rendered": 1}
    assert client.get(url).status_code == 200
    assert service._render_slots.busy == 0


def test_a_browsers_six_connections_asking_for_new_thumbnails_all_get_them(make_app, tmp_path):
    """A page of new thumbnails: a browser asks on its six connections at once, and one
    gunicorn worker may take them all. With the default GUNICORN_THREADS (8), a render
    running and five waiting fit its seven places; with 4 threads (three places), two of
    them were a 503 `decoder_busy` that an <img> shows as a broken picture."""
    app = make_app({"DATA_DIR": str(tmp_path), "RENDER_CONCURRENCY": "1"})
    client, service = app.test_client(), app.extensions["image_api"]
    urls = [
        f"/api/images/{ImagesClient(client).create(halves())['_id']}/download?w=50"
        for _ in range(5)
    ]
    answers = []
    with service._render_slots.taken():  # the first connection's render
        asking = [
            threading.Thread(target=lambda url=url: answers.append(client.get(url))) for url in urls
        ]
        for thread in asking:
            thread.start()
        for _ in range(1000):
            if service._render_slots.busy == 6 or len(answers) == len(urls):
                break
            asking[0].join(0.01)
        assert service._render_slots.busy == 6  # none refused: all wait their turn
    for thread in asking:
        thread.join(10)
    assert [answer.status_code for answer in answers] == [200] * 5


def test_with_no_thread_to_spare_a_render_is_refused_without_waiting(make_app, tmp_path):
    """GUNICORN_THREADS=2 and RENDER_CONCURRENCY=1: a render waiting would leave no thread
    for other requests, so with the slot taken the next is a 503 at once (not after
    DECODE_WAIT's 60 s)."""
    client, service, url = one_render_slot(make_app, tmp_path, threads=2)
    answers = []
    with service._render_slots.taken():  # another request is rendering
        asking = threading.Thread(target=lambda: answers.append(client.get(url)))
        asking.start()
        asking.join(10)
        assert not asking.is_alive()
    assert (answers[0].status_code, answers[0].get_json()["code"]) == (503, "decoder_busy")
    assert client.get(url).status_code == 200
