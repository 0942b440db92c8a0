"""The gallery at `/`, driven in Debian's headless Chromium against gunicorn at a phone's
width: a key, two uploads, their thumbnails (signed URLs, no key on <img>), a refused
upload explained, the keyboard flow, replace and delete; no request leaves the machine,
no CSP violation, no horizontal scrolling. The screenshot goes to build/gallery.png."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.helpers import ROOT, Service, make_image
from tests.test_docs_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="CHROMIUM IS NOT INSTALLED: the gallery was not checked in a browser "
    "(`make test` installs Debian's chromium when it runs as root)",
)

SCREENSHOT = ROOT / "build" / "gallery.png"
ALL_LOADED = (
    "n => document.querySelectorAll('#grid img').length === n && "
    "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
)

#: The colour of the middle pixel of the image a selector names, as [r, g, b, a].
MIDDLE_PIXEL = """selector => {
    const img = document.querySelector(selector);
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = 1;
    const context = canvas.getContext('2d');
    context.drawImage(img, img.naturalWidth / 2, img.naturalHeight / 2, 1, 1, 0, 0, 1, 1);
    return [...context.getImageData(0, 0, 1, 1).data];
}"""


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        context = browser.new_context(viewport={"width": 375, "height": 740})
        yield context.new_page()
        context.close()
        browser.close()


def wait_until(page, expression: str, arg=None, timeout: float = 15) -> None:
    """Poll `expression` (a function of `arg`) in the page until it holds. Playwright's own
    wait_for_function evaluates a string, which the page's CSP rightly forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression, arg):
        assert time.monotonic() < deadline, f"never true: {expression}"
        page.wait_for_timeout(50)


def focused(page) -> str:
    return page.evaluate(
        "document.activeElement.id || document.activeElement.getAttribute('aria-label') || "
        "document.activeElement.tagName"
    )


def tab_to(page, wanted, tries: int = 12) -> None:
    for _ in range(tries):
        page.keyboard.press("Tab")
        if wanted(focused(page)):
            return
    pytest.fail(f"Tab never reached it (last: {focused(page)})")


def stored(service, filename: str, data: bytes | None = None) -> dict:
    """`data` (a small PNG unless given) uploaded with the service's admin key: its JSON."""
    response = service.http.post(
        f"{service.url}/api/images/upload",
        files={"image": (filename, data or make_image())},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()["image"]


def open_with_key(page, service) -> None:
    """The gallery, given the service's admin key."""
    page.goto(f"{service.url}/")
    page.fill("#key", service.key)
    page.keyboard.press("Enter")


def test_the_gallery_uploads_shows_replaces_and_deletes(running, page, tmp_path):
    elsewhere, problems = [], []

    def route(route):
        if route.request.url.startswith(running.url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    page.on(
        "console",
        lambda message: (
            message.type == "error"
            and "Failed to load resource" not in message.text  # the refused upload's 415
            and problems.append(message.text)
        ),
    )
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.add_init_script(
        "window.cspViolations = [];"
        "document.addEventListener('securitypolicyviolation', e =>"
        " window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    files = {}
    for name, fmt, colour in (("red.png", "PNG", "red"), ("blue.jpg", "JPEG", "blue")):
        files[name] = tmp_path / name
        files[name].write_bytes(make_image(fmt, (120, 80), color=colour))
    text = tmp_path / "notes.png"
    text.write_text("this is text, not a picture")
    green = tmp_path / "green.png"
    green.write_bytes(make_image("PNG", (60, 90), color="green"))

    page.goto(f"{running.url}/")
    # Keys are on: the page asks for one, once.
    page.wait_for_selector("#key", state="visible")
    page.fill("#key", running.key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#files", state="visible")
    wait_until(page, "() => document.getElementById('status').textContent.includes('No images')")

    # The keyboard reaches the picker; two files chosen there upload with progress bars.
    tab_to(page, lambda name: name == "files")
    page.set_input_files("#files", [files["red.png"], files["blue.jpg"]])
    wait_until(page, ALL_LOADED, 2)
    alts = page.eval_on_selector_all("#grid img", "images => images.map(i => i.alt)")
    assert sorted(alts) == ["blue.jpg", "red.png"]
    thumbnails = page.eval_on_selector_all("#grid img", "images => images.map(i => i.src)")
    assert all("signature=" in url and "w=256" in url for url in thumbnails)

    # A refused upload says why.
    page.set_input_files("#files", text)
    error = page.wait_for_selector(".uploads .error")
    assert "notes.png" in error.inner_text() and "415" in error.inner_text()

    # Tab through the thumbnails; Enter opens one, Escape closes it.
    tab_to(page, lambda name: name.startswith("Open "))
    page.keyboard.press("Enter")
    page.wait_for_selector("#detail[open]")
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail:not([open])", state="attached")

    # Replace the red one from its detail view.
    page.click('#grid button[aria-label="Open red.png"]')
    page.wait_for_selector("#detail[open]")
    page.set_input_files("#replace-file", green)
    wait_until(page, "() => document.getElementById('detail-status').textContent === 'Replaced.'")
    assert page.inner_text('#detail-meta dd[data-field="version"]') == "2"
    assert page.inner_text("#detail-title") == "green.png"
    # The detail view shows the new picture: its imageUrl is the same URL as before (it
    # names the image, not a version), which the browser had kept the old picture for.
    wait_until(page, "() => document.getElementById('detail-image').complete")
    colour = page.evaluate(MIDDLE_PIXEL, "#detail-image")
    assert colour[1] > 100 and colour[0] < 60, colour  # green
    page.keyboard.press("Escape")
    # Its thumbnail is the new picture, not the browser's copy of the old one.
    wait_until(page, ALL_LOADED, 2)
    colour = page.evaluate(MIDDLE_PIXEL, '#grid button[aria-label="Open green.png"] img')
    assert colour[1] > 100 and colour[0] < 60, colour  # green

    # Delete the blue one, confirming.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click('#grid button[aria-label="Open blue.jpg"]')
    page.click("#detail-delete")
    wait_until(page, "() => document.querySelectorAll('#grid li').length === 1")
    wait_until(page, ALL_LOADED, 1)

    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scroll
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert page.evaluate("window.cspViolations") == []
    assert elsewhere == [] and problems == []
    listed = running.http.get(f"{running.url}/api/images").json()
    assert [(i["filename"], i["version"]) for i in listed["images"]] == [("green.png", 2)]


def test_the_grid_loads_more_as_you_scroll(running, page):
    for i in range(30):
        response = running.http.post(
            f"{running.url}/api/images/upload",
            files={"image": (f"{i:02}.png", make_image("PNG", (8, 8), color=(i * 8, 0, 0)))},
        )
        assert response.status_code == 201
    open_with_key(page, running)
    wait_until(page, "() => document.querySelectorAll('#grid li').length === 24")
    names = page.eval_on_selector_all("#grid img", "images => images.map(i => i.alt)")
    assert names[0] == "29.png"  # newest first
    page.evaluate("() => document.getElementById('more').scrollIntoView()")
    wait_until(page, "() => document.querySelectorAll('#grid li').length === 30")
    names = page.eval_on_selector_all("#grid img", "images => images.map(i => i.alt)")
    assert names == [f"{i:02}.png" for i in reversed(range(30))]
    # A desktop window shows the grid's end without scrolling: it fills itself.
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.reload()
    wait_until(page, "() => document.querySelectorAll('#grid li').length === 30")


def test_a_refused_key_is_explained_and_can_be_changed(running, page):
    page.goto(f"{running.url}/")
    page.fill("#key", "ключ")  # not something a header can carry
    page.keyboard.press("Enter")
    assert "letters, digits and punctuation" in page.inner_text("#key-status")
    page.fill("#key", "iak_000000000000_wrong")
    page.keyboard.press("Enter")
    wait_until(page, "() => document.getElementById('key-status').textContent.includes('refused')")
    assert page.is_visible("#key-status") and page.evaluate("document.activeElement.id") == "key"
    page.fill("#key", running.key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#files", state="visible")
    page.click("#change-key")
    page.wait_for_selector("#key", state="visible")
    assert page.evaluate("sessionStorage.length") == 0


def _key_for(running, name: str, owner: str) -> str:
    """A write key for `owner`, made with `keys create` on the running service's data."""
    made = running.flask("keys", "create", "--name", name, "--owner", owner, "--scope", "write")
    return made.strip().splitlines()[-1]


# Holds the answers to requests made with one key until the test lets them through: the
# page's own fetch, wrapped before its script runs. `window.heldRead` is set once the page
# has read a held answer's body and run what follows (a task after the read: the page's
# continuation is microtasks, which all run first).
HOLD_ANSWERS_FOR = """key => {
    const fetch = window.fetch;
    let release;
    window.released = new Promise(resolve => { release = resolve; });
    window.release = () => release();
    window.heldRead = false;
    window.fetch = async (url, options = {}) => {
        const answer = await fetch(url, options);
        const sent = (options.headers || {}).Authorization || "";
        if (sent !== `Bearer ${key}`) return answer;
        await window.released;
        const json = answer.json.bind(answer);
        answer.json = async () => {
            const body = await json();
            setTimeout(() => { window.heldRead = true; }, 0);
            return body;
        };
        return answer;
    };
}"""


def test_a_page_asked_for_with_the_previous_key_is_dropped(running, page):
    """Changing the key while the first key's page is on its way: the grid shows the new
    key's images only (the late page used to be added to the emptied grid)."""
    for color in ("red", "blue"):
        stored(running, f"admin-{color}.png", make_image(color=color))
    bob = _key_for(running, "bob-gallery", "bob")
    requests.post(
        f"{running.url}/api/images/upload",
        files={"image": ("bob.png", make_image(color="green"))},
        headers={"Authorization": f"Bearer {bob}"},
        timeout=10,
    ).raise_for_status()
    page.add_init_script(f"({HOLD_ANSWERS_FOR})({json.dumps(running.key)})")
    page.goto(f"{running.url}/")
    page.fill("#key", running.key)
    page.keyboard.press("Enter")  # the admin's first page is asked for, and held
    page.click("#change-key")
    page.fill("#key", bob)
    page.keyboard.press("Enter")
    wait_until(page, "() => document.querySelectorAll('#grid li').length === 1")
    page.evaluate("window.release()")
    wait_until(page, "() => window.heldRead")  # the admin's page arrived, and was dropped
    names = page.eval_on_selector_all("#grid img", "images => images.map(i => i.alt)")
    assert names == ["bob.png"]


def test_deleting_an_image_deleted_elsewhere_takes_it_off_the_grid(running, page):
    stored(running, "gone.png", make_image(color="red"))
    open_with_key(page, running)
    wait_until(page, ALL_LOADED, 1)
    image_id = page.get_attribute("#grid li", "data-id")
    # Opened, and found current (the detail asks for the image's metadata as it opens).
    with page.expect_response(lambda response: response.url.endswith(f"/images/{image_id}")):
        page.click('#grid button[aria-label="Open gone.png"]')
    assert running.http.delete(f"{running.url}/api/images/{image_id}").status_code == 200
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#detail-delete")
    # The open picture's 404 may take the tile off first (its metadata is a 404 too): the
    # end is the same either way.
    wait_until(page, "() => !document.querySelector('#detail').open")
    assert page.locator("#grid li").count() == 0
    assert "No images yet" in page.inner_text("#status")


def refuse_as_expired(route) -> None:
    """Answer a picture's request as the service answers an expired signed URL."""
    route.fulfill(
        status=403,
        content_type="application/json",
        body='{"message":"The signed URL has expired","code":"url_expired"}',
    )


def test_pictures_whose_signed_urls_were_refused_are_shown_with_fresh_ones(running, page):
    """A tab left open past SIGNED_URL_TTL asks for pictures with expired URLs (403
    url_expired): the gallery fetches the image's metadata for fresh URLs, and shows them.
    Here each download URL is refused the first time it is asked for."""
    for color in ("red", "green"):
        stored(running, f"{color}.png", make_image(color=color))
    refused = set()

    def expire_once(route):
        if route.request.url in refused:
            route.continue_()
            return
        refused.add(route.request.url)
        refuse_as_expired(route)

    page.route("**/download?*", expire_once)
    open_with_key(page, running)
    wait_until(page, ALL_LOADED, 2)
    page.click('#grid button[aria-label="Open green.png"]')
    wait_until(
        page,
        "() => { const i = document.getElementById('detail-image');"
        " return i.complete && i.naturalWidth > 0; }",
    )
    colour = page.evaluate(MIDDLE_PIXEL, "#detail-image")
    assert colour[1] > 100 and colour[0] < 60, colour  # green
    assert len(refused) == 3  # two thumbnails and the picture, each refused once


def test_a_picture_whose_image_was_deleted_elsewhere_leaves_the_grid(running, page):
    """A refused picture whose metadata is a 404 (deleted by another client since the page
    listed it) takes its tile off; the last one gone, the grid says it is empty."""
    image = stored(running, "gone.png", make_image(color="red"))

    def deleted_meanwhile(route):
        running.http.delete(f"{running.url}/api/images/{image['_id']}").raise_for_status()
        refuse_as_expired(route)

    page.route("**/download?*", deleted_meanwhile)
    open_with_key(page, running)
    wait_until(page, "() => document.querySelector('#status').textContent.includes('No images')")
    assert page.locator("#grid li").count() == 0


def test_an_inline_download_shows_in_a_tab_without_csp_errors(running, page):
    """`?disposition=inline` shows the image in a tab: the browser's own image page styles
    itself inline, which the download's CSP allows (and nothing else: no script, no load)."""
    created = stored(running, "wide.png", make_image("PNG", (300, 100), color="purple"))
    problems = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.set_extra_http_headers({"Authorization": f"Bearer {running.key}"})
    page.goto(f"{running.url}/api/images/{created['_id']}/download?disposition=inline")
    wait_until(page, "() => document.images.length === 1 && document.images[0].naturalWidth > 0")
    assert page.evaluate("document.images[0].naturalWidth") == 300
    assert problems == []


def test_opening_an_image_deleted_elsewhere_closes_it_and_takes_it_off_the_grid(running, page):
    for color in ("red", "green"):
        stored(running, f"{color}.png", make_image(color=color))
    open_with_key(page, running)
    wait_until(page, ALL_LOADED, 2)
    gone = page.get_attribute('#grid button[aria-label="Open red.png"] >> xpath=..', "data-id")
    assert running.http.delete(f"{running.url}/api/images/{gone}").status_code == 200
    page.click('#grid button[aria-label="Open red.png"]')
    wait_until(page, "() => !document.querySelector('#detail').open")
    wait_until(page, "() => document.querySelectorAll('#grid li').length === 1")
    assert page.get_attribute("#grid li", "data-id") != gone
    assert page.inner_text("#status") == "red.png was deleted elsewhere."
    assert focused(page) == "Open green.png"  # the keyboard goes on from the next tile


def test_the_detail_shows_the_image_as_it_is_and_writes_only_the_version_it_shows(
    running, page, tmp_path
):
    """Another client replaced the image after the grid loaded: the detail shows its
    current version, and a replace or delete from a detail that another client has
    overtaken since is refused (If-Match), says so and shows what is there now."""
    api = f"{running.url}/api/images"
    image_id = running.http.post(
        f"{api}/upload", files={"image": ("one.png", make_image(color="red"))}
    ).json()["image"]["_id"]

    def replaced_elsewhere(color: str) -> None:
        files = {"image": (f"{color}.png", make_image(color=color))}
        assert running.http.put(f"{api}/{image_id}", files=files).status_code == 200

    def version_shown() -> str:
        return page.inner_text('#detail-meta dd[data-field="version"]')

    def server_version() -> int:
        return running.http.get(f"{api}/{image_id}").json()["version"]

    open_with_key(page, running)
    wait_until(page, ALL_LOADED, 1)
    replaced_elsewhere("blue")  # version 2; the grid still holds version 1
    page.click('#grid button[aria-label="Open one.png"]')
    wait_until(page, "() => document.querySelector('#detail').dataset.version === '2'")
    assert version_shown() == "2" and page.inner_text("#detail-title") == "blue.png"

    replaced_elsewhere("green")  # version 3, while the detail shows 2
    green = tmp_path / "mine.png"
    green.write_bytes(make_image(color="yellow"))
    page.set_input_files("#replace-file", str(green))
    wait_until(page, "() => document.querySelector('#detail').dataset.version === '3'")
    assert "changed elsewhere" in page.inner_text("#detail-status")
    assert server_version() == 3  # nothing overwritten
    page.set_input_files("#replace-file", str(green))  # now it means version 3
    wait_until(page, "() => document.getElementById('detail-status').textContent === 'Replaced.'")
    assert server_version() == 4 and version_shown() == "4"

    replaced_elsewhere("purple")  # version 5
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#detail-delete")
    wait_until(page, "() => document.querySelector('#detail').dataset.version === '5'")
    assert "Not deleted" in page.inner_text("#detail-status")
    assert server_version() == 5 and page.locator("#grid li").count() == 1


def test_with_public_url_the_gallery_opened_by_another_host_shows_the_pictures(tmp_path, page):
    """The API's links name PUBLIC_URL's host, whatever host the page was opened by (a
    loopback address, an internal name): its CSP allows pictures from there too."""
    service = Service(tmp_path / "data", {"WEB_CONCURRENCY": "1"})
    service.env["PUBLIC_URL"] = f"http://localhost:{service.port}"
    service.start()
    try:
        stored(service, "a.png", make_image(color="teal"))
        page.goto(f"{service.url}/")  # 127.0.0.1, not localhost
        page.fill("#key", service.key)
        page.keyboard.press("Enter")
        wait_until(page, ALL_LOADED, 1)
        assert page.get_attribute("#grid img", "src").startswith(
            f"http://localhost:{service.port}/"
        )
    finally:
        service.stop()


#: Counts uploads whose answer the page has handled: a listener added at send(), after the
#: page's own (which it adds before sending), so it runs after it.
COUNT_HANDLED_UPLOADS = """() => {
    window.uploadsHandled = 0;
    const send = XMLHttpRequest.prototype.send;
    XMLHttpRequest.prototype.send = function (...args) {
        this.addEventListener("load", () => { window.uploadsHandled += 1; });
        return send.apply(this, args);
    };
}"""


def test_an_upload_answered_after_the_key_changed_stays_out_of_the_new_grid(
    running, page, tmp_path
):
    """The admin's upload is answered after the key was changed to bob's: it belongs to the
    admin, and bob's grid does not show it (where deleting it said 'deleted' on a 404)."""
    bob = _key_for(running, "bob-uploads", "bob")
    held = []
    page.route("**/api/images/upload", lambda route: held.append(route))
    page.add_init_script(f"({COUNT_HANDLED_UPLOADS})()")
    picture = tmp_path / "late.png"
    picture.write_bytes(make_image(color="orange"))
    open_with_key(page, running)
    wait_until(page, "() => document.getElementById('status').textContent.includes('No images')")
    page.set_input_files("#files", str(picture))
    while not held:
        page.wait_for_timeout(20)
    page.click("#change-key")
    page.fill("#key", bob)
    page.keyboard.press("Enter")
    wait_until(page, "() => document.getElementById('status').textContent.includes('No images')")
    held[0].continue_()
    wait_until(page, "() => window.uploadsHandled === 1")
    assert page.locator("#grid li").count() == 0
    listed = running.http.get(f"{running.url}/api/images").json()["images"]
    assert [image["filename"] for image in listed] == ["late.png"]  # the admin's


def test_a_picture_refused_again_is_asked_for_again_later(running, page):
    """A thumbnail refused twice (its address over the rate limit: the renewed URL is
    refused too) is asked for again later, on the page's clock, until it shows."""
    stored(running, "busy.png", make_image(color="navy"))
    refused = []

    def route(route):
        if len(refused) < 3:
            refused.append(route.request.url)
            route.fulfill(
                status=429,
                content_type="application/json",
                headers={"Retry-After": "30"},
                body='{"message":"Rate limit exceeded","code":"rate_limited"}',
            )
        else:
            route.continue_()

    page.route("**/api/images/*/download?*", route)
    page.clock.install()
    open_with_key(page, running)
    while len(refused) < 2:  # the first answer, and the renewed URL's at once
        page.wait_for_timeout(20)
    for _ in range(200):  # later ones come on the page's clock, moved on by the test
        if page.evaluate(ALL_LOADED, 1):
            break
        page.clock.fast_forward(5000)
        page.wait_for_timeout(20)
    assert page.evaluate(ALL_LOADED, 1) and len(refused) == 3


def test_a_first_visit_asks_for_a_key_without_a_request_the_api_refuses(running, page):
    """The page says keys are needed: a first visit shows the key form at once. It used to
    find out with a request of its own, refused (a 401 and a console error, or a 429 once
    the address had spent its budget)."""
    stored(running, "k.png")
    asked, problems = [], []
    page.on("request", lambda request: "/api/" in request.url and asked.append(request.url))
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.goto(f"{running.url}/")
    page.wait_for_selector("#key", state="visible")
    assert asked == [] and problems == []
    page.fill("#key", running.key)
    page.keyboard.press("Enter")
    wait_until(page, ALL_LOADED, 1)
    assert problems == []


def test_details_opened_past_the_urls_expiry_ask_for_fresh_ones_first(running, page):
    """A tab left open past SIGNED_URL_TTL (the page's clock moved on by two hours): the
    details do not ask for the grid's expired imageUrl, which would only be refused, but
    wait for the one the metadata they fetch as they open gives."""
    image = stored(running, "late.png")
    held = []
    page.route(f"**/api/images/{image['_id']}", lambda route: held.append(route))
    page.clock.install()
    open_with_key(page, running)
    wait_until(page, ALL_LOADED, 1)
    page.clock.fast_forward(2 * 3600 * 1000)
    page.click('#grid button[aria-label="Open late.png"]')
    while not held:  # the details' metadata, held until the picture is looked at
        page.wait_for_timeout(20)
    assert page.get_attribute("#detail-image", "src") is None  # not the expired URL
    held[0].continue_()
    wait_until(page, "() => document.getElementById('detail-image').naturalWidth > 0")
