"""The docs page in a real headless Chromium (Debian's), against gunicorn: Swagger UI
renders every operation and can call the API, with no request leaving the machine and no
Content-Security-Policy violation."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium")
#: As the workplace runs Chromium on a closed network: no background calls to Google.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="CHROMIUM IS NOT INSTALLED: the docs page was not checked in a browser "
    "(`make test` installs Debian's chromium when it runs as root)",
)


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        context = browser.new_context()
        yield context.new_page()
        context.close()
        browser.close()


def test_the_docs_page_renders_and_calls_the_api_offline(running, page):
    seen, elsewhere, problems = [], [], []

    def route(route):
        url = route.request.url
        seen.append(url)
        if url.startswith(running.url + "/"):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    page.route("**/*", route)
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.add_init_script(
        "window.cspViolations = [];"
        "document.addEventListener('securitypolicyviolation', e =>"
        " window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
    )

    page.goto(f"{running.url}/api/docs")
    page.wait_for_selector(".opblock", timeout=20_000)
    assert "image-api" in page.inner_text(".info .title")
    operations = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/api/images/upload", "/api/images/{image_id}/download", "/healthz"} <= {
        text.replace("\u200b", "") for text in operations
    }
    assert page.locator(".opblock").count() == 11  # every documented operation

    # "Try it out" on /healthz: the page may call the API (connect-src 'self').
    health = page.locator("#operations-health-liveness")
    health.locator(".opblock-summary").click()
    health.locator("button.try-out__btn").click()
    health.locator("button.execute").click()
    status = health.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for(timeout=10_000)
    assert status.inner_text().strip() == "200"

    assert elsewhere == [], f"requests left the machine: {elsewhere}"
    assert any(url.endswith("/api/openapi.json") for url in seen)
    assert page.evaluate("window.cspViolations") == []
    assert problems == []
