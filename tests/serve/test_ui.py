"""The web UI in headless Chromium: upload, render, ask, see the streamed answer and the pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.conftest import STORY

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def test_upload_render_and_chat(extractive_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    document = tmp_path / "keeper.txt"
    document.write_text(STORY, encoding="utf-8")
    outside: list[str] = []

    def only_loopback(route):
        if route.request.url.startswith(extractive_server.url) or route.request.url.startswith("data:"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.route("**/*", only_loopback)
            page.goto(extractive_server.url)
            page.wait_for_selector("#render", timeout=60_000)
            expect(page.locator("#backend-notice")).to_contain_text("No vision-language model is loaded")
            expect(page.locator("#backend-notice")).to_contain_text("--model zai-org/Glyph")

            # Errors land in the page, not as a traceback.
            page.locator("#render").click()
            expect(page.locator("#status")).to_contain_text("upload a file or paste some text first")

            page.locator("#upload input[type=file]").set_input_files(str(document))
            expect(page.locator("#upload")).to_contain_text("keeper.txt", timeout=30_000)
            page.locator("#render").click()
            expect(page.locator("#pages img").first).to_be_visible(timeout=60_000)
            expect(page.locator("#stats")).to_contain_text("vision tokens")
            expect(page.locator("#status")).to_contain_text("Rendered")

            page.locator("#question textarea").fill("Which schooner hit the rocks?")
            page.locator("#send").click()
            expect(page.locator("#chat")).to_contain_text("schooner Albatross", timeout=60_000)
            expect(page.locator("#answer-stats")).to_contain_text("Timings")
            expect(page.locator("#evidence img").first).to_be_visible()

            # A second turn keeps the history.
            page.locator("#question textarea").fill("What was engraved on the compass?")
            page.locator("#question textarea").press("Enter")
            expect(page.locator("#chat")).to_contain_text("for courage at sea", timeout=60_000)
            expect(page.locator("#chat")).to_contain_text("schooner Albatross")
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)

            page.locator("#clear").click()
            expect(page.locator("#chat")).not_to_contain_text("Albatross")
        finally:
            browser.close()
    assert outside == [], f"the UI tried to reach outside the server: {outside}"
