"""Cases 8 and 9 in Chromium: names and passages an uploader chose are shown as text (the viewer's browser fetches
nothing they name), and deleting a document removes every copy the server holds, the UI framework's too."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from tests.serve.test_ui import ARGS, CHROMIUM
from tests.hostile.conftest import HTTP, copy_gone
from tests.servers import free_port

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")


class Beacon:
    """A loopback HTTP server that records every request it gets (what a planted ``<img>`` would fetch)."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.goto(server.url)
            page.wait_for_selector("#upload", timeout=60_000)
            yield page
        finally:
            browser.close()


def test_names_and_passages_are_shown_as_text(server, page):
    from playwright.sync_api import expect

    beacon = Beacon()
    try:
        planted = (f"The keeper's log. <img src={beacon.url}/html-in-passage> and ![lamp]({beacon.url}/markdown-image) "
                   f"and <b>bold?</b> The lamp was lit at dusk.")
        name = "<img src=x onerror=alert(1)>**Report**"  # a name carries no slash: path parts are cut
        created = HTTP.post(f"{server.url}/v1/documents", json={"text": planted, "name": name}).json()
        page.reload()
        page.wait_for_selector("#stored", timeout=60_000)
        page.locator("#stored input").click()
        page.get_by_role("option", name=name, exact=False).first.click()
        expect(page.locator("#status")).to_contain_text(f"Selected {name}.", timeout=30_000)
        page.locator("#question textarea").fill("When was the lamp lit?")
        page.locator("#send").click()
        expect(page.locator("#chat")).to_contain_text("![lamp](", timeout=60_000)
        chat = page.locator("#chat")
        expect(chat).to_contain_text(f"<img src={beacon.url}/html-in-passage>")
        expect(chat).to_contain_text("<b>bold?</b>")
        assert page.locator("#chat img, #status img").count() == 0
        assert page.locator("#chat b, #status strong:has-text('Report')").count() == 0
        page.wait_for_timeout(1000)
    finally:
        beacon.close()
    assert beacon.hits == [], beacon.hits
    assert created["document"]["name"] == name


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def test_deleting_a_document_removes_the_ui_frameworks_copies(server, page, tmp_path):
    from playwright.sync_api import expect

    source = tmp_path / "copied.txt"
    source.write_text("Copies of this file must not outlive it.\n\n" + "The keeper kept a log. " * 400)
    page.locator("#upload input[type=file]").set_input_files(str(source))
    expect(page.locator("#status")).to_contain_text("Rendered copied.txt", timeout=60_000)
    expect(page.locator("#pages img").first).to_be_visible(timeout=30_000)
    document = next(d for d in HTTP.get(f"{server.url}/v1/documents").json()["documents"] if d["name"] == source.name)
    pages = [HTTP.get(f"{server.url}/v1/documents/{document['id']}/pages/{n}.png").content
             for n in range(1, document["pages"] + 1)]
    shown = [page.locator("#pages img").nth(i).get_attribute("src") for i in range(page.locator("#pages img").count())]
    cached = _files(server.cache).values()
    assert any(png in cached for png in pages)  # the gallery's copies of the pages

    assert HTTP.delete(f"{server.url}/v1/documents/{document['id']}").status_code == 200
    cached = _files(server.cache).values()
    assert not any(png in cached for png in pages)
    assert copy_gone(server, source)  # the upload's, once read and its grace passed (another upload may want it)
    for src in shown:
        assert HTTP.get(src if src.startswith("http") else server.url + src).status_code in (403, 404), src
