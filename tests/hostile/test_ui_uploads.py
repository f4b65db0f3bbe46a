"""The web UI's uploads share the upload queues fairly, as the API's do: in Chromium (Debian's), users told apart
by the address a proxy on this machine puts in ``X-Forwarded-For`` (as the API tells its clients apart)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from glyphserve.bench import hostile_files
from tests.hostile.conftest import HTTP, copy_gone, error
from tests.hostile.test_uploads import WHITE_BOX, files_in_flight
from tests.serve.conftest import STORY
from tests.serve.test_ui import ARTIFACTS, CHROMIUM, chromium, open_ui, upload
from tests.servers import Server

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")

BUDGET_S = 15  # --ingest-timeout: a slow PDF holds its thread this long


def user(address: str) -> dict[str, str]:
    """The headers of a user at ``address`` behind a proxy on this machine."""
    return {"X-Forwarded-For": address}


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """The UI, and a budget that slow PDFs take whole; ``server.cache`` is the folder where the UI framework keeps
    its copies of files."""
    root = tmp_path_factory.mktemp("ui-queue")
    server = Server(root / "data", "--ingest-timeout", str(BUDGET_S))
    server.cache = root / "ui-framework-cache"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(server.cache))  # read by the server process at start
        server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_pdf() -> bytes:
    """2,000 pages that must each be rendered to find them blank: minutes, so it takes its budget whole."""
    return hostile_files.pdf_of_pages(2_000, WHITE_BOX)


def wait_for(server: Server, in_flight: tuple[int, int], page, seconds: float = 60) -> None:
    """Until the server's uploaded files (being read, waiting for a thread) are ``in_flight``; waiting in ``page``,
    so that the browser's requests go on meanwhile (the pages' routes are handled here, in Playwright's calls)."""
    deadline = time.monotonic() + seconds
    while files_in_flight(server) != in_flight:
        assert time.monotonic() < deadline, files_in_flight(server)
        page.wait_for_timeout(50)


def test_one_ui_users_slow_pdfs_hold_up_no_other_ui_users_upload(slow_server, slow_pdf, tmp_path):
    """A user's two slow PDFs took the UI framework's 2 places for uploads, which every UI user shared first come
    first served: another user's text file waited for their whole budget. Here that one is stored while the slow
    PDFs are still being read, and the slow ones end with their error on their own pages."""
    from playwright.sync_api import expect

    slow = [tmp_path / f"slow-{n}.pdf" for n in (1, 2)]
    for path in slow:
        path.write_bytes(slow_pdf)
    quick = tmp_path / "quick.txt"
    quick.write_text("Another user's quick file.\n\n" + STORY, encoding="utf-8")
    with chromium() as browser:
        # two tabs of one user, and another user
        first, second = (open_ui(browser, slow_server.url, headers=user("10.0.0.1")) for _ in slow)
        other = open_ui(browser, slow_server.url, headers=user("10.0.0.2"))
        for page, path in zip((first, second), slow):
            upload(page, path)
        wait_for(slow_server, (2, 0), other)  # both read at once: that user's share
        upload(other, quick)
        expect(other.locator("#status")).to_contain_text("Rendered quick.txt", timeout=BUDGET_S * 1000)
        assert files_in_flight(slow_server)[0] == 2  # the slow PDFs were still being read meanwhile
        other.screenshot(path=str(ARTIFACTS / "beside-slow-uploads.png"), full_page=True)
        for page in (first, second):
            expect(page.locator("#status")).to_contain_text("--ingest-timeout", timeout=BUDGET_S * 4000)


def test_a_refused_ui_upload_says_when_to_retry_and_keeps_the_page(slow_server, slow_pdf, tmp_path):
    """The user's uploads through the API fill its line (2 read, 16 waiting): its next upload in the UI is refused at
    once (the API's 429), the toast and the status saying when to retry; the document it shows, its pages and the
    question being typed stay. The API and the UI count one user's uploads together."""
    from playwright.sync_api import expect

    kept = tmp_path / "kept.txt"
    kept.write_text("The document on screen.\n\n" + STORY, encoding="utf-8")
    refused = tmp_path / "refused.txt"
    refused.write_text("An upload too many.\n\n" + STORY, encoding="utf-8")
    with chromium() as browser, ThreadPoolExecutor(18) as pool, \
            httpx.Client(timeout=120, headers=user("10.0.0.3")) as api:
        page = open_ui(browser, slow_server.url, headers=user("10.0.0.3"))
        upload(page, kept)
        expect(page.locator("#status")).to_contain_text("Rendered kept.txt", timeout=60_000)
        pages = page.locator("#pages img").count()
        page.locator("#question textarea").fill("Who rowed out?")
        sent = [pool.submit(api.post, f"{slow_server.url}/v1/documents", files={"file": (f"slow-{n}.pdf", slow_pdf)})
                for n in range(18)]
        wait_for(slow_server, (2, 16), page)
        upload(page, refused)
        toast = page.locator(".toast-body")
        expect(toast).to_contain_text(re.compile(r"your address has 2 uploads being read and 16 waiting, the most "
                                                 r"this server takes from one address at once: retry in \d+ s"),
                                      timeout=30_000)
        expect(toast.locator(".toast-title")).to_have_text("Error")
        expect(page.locator("#status")).to_contain_text("retry in")
        assert files_in_flight(slow_server) == (2, 16)  # refused at once, not after a wait in line
        page.screenshot(path=str(ARTIFACTS / "refused-upload.png"), full_page=True)
        expect(page.locator("#pages img")).to_have_count(pages)
        expect(page.locator("#stats")).to_contain_text("vision tokens")
        expect(page.locator("#name textarea")).to_have_value("kept.txt")
        expect(page.locator("#question textarea")).to_have_value("Who rowed out?")
        responses = [future.result() for future in sent]
    assert {error(r)[0] for r in responses} <= {"ingest_timeout", "too_many_uploads"}
    assert "refused.txt" not in [d["name"] for d in HTTP.get(f"{slow_server.url}/v1/documents").json()["documents"]]
    assert files_in_flight(slow_server) == (0, 0)


def test_a_file_two_users_upload_at_once_is_read_by_both(slow_server, slow_pdf, tmp_path):
    """The same file under the same name is one copy of the UI framework's, which an upload removes when it is done
    with it: another user's upload of it, still waiting for its turn to be read (its user's uploads through the API
    hold that user's threads), reads it when its turn comes, and the copy goes after that one."""
    from playwright.sync_api import expect

    shared = tmp_path / "shared.txt"
    shared.write_text("A file two users upload at once.\n\n" + STORY, encoding="utf-8")
    with chromium() as browser, ThreadPoolExecutor(2) as pool, \
            httpx.Client(timeout=120, headers=user("10.0.0.4")) as api:
        waiting = open_ui(browser, slow_server.url, headers=user("10.0.0.4"))
        prompt = open_ui(browser, slow_server.url, headers=user("10.0.0.5"))
        sent = [pool.submit(api.post, f"{slow_server.url}/v1/documents", files={"file": (f"slow-{n}.pdf", slow_pdf)})
                for n in range(2)]
        wait_for(slow_server, (2, 0), waiting)
        upload(waiting, shared)
        wait_for(slow_server, (2, 1), waiting)
        upload(prompt, shared)
        expect(prompt.locator("#status")).to_contain_text("Rendered shared.txt", timeout=BUDGET_S * 1000)
        assert files_in_flight(slow_server) == (2, 1)  # the other upload of it still waits for its turn
        expect(waiting.locator("#status")).to_contain_text("shared.txt was already stored", timeout=BUDGET_S * 4000)
        assert {error(future.result())[0] for future in sent} == {"ingest_timeout"}
    assert copy_gone(slow_server, shared)  # once both were done with it (and its grace passed)


def test_three_users_uploading_one_new_file_at_once_each_get_its_document(slow_server, tmp_path):
    """The first upload done removed the UI framework's one copy of the file while the others' were written but their
    handlers had not started: they found no file ("internal error", nothing shown), every round of a new user's
    trial. The copy now stays a grace after its last reader."""
    from playwright.sync_api import expect

    shared = tmp_path / "together.txt"
    shared.write_text("A file three users upload at once.\n\n" + STORY * 200, encoding="utf-8")
    with chromium() as browser:
        pages = [open_ui(browser, slow_server.url, headers=user(f"10.0.1.{n}")) for n in range(3)]
        for page in pages:
            upload(page, shared)
        for page in pages:
            expect(page.locator("#status")).to_contain_text(
                re.compile(r"Rendered together\.txt|together\.txt was already stored"), timeout=60_000)
            expect(page.locator("#pages img").first).to_be_visible()
    assert copy_gone(slow_server, shared)


def test_an_upload_request_the_server_refuses_is_said_in_its_words_in_the_toast_and_the_status(tmp_path_factory,
                                                                                                tmp_path):
    """A file whose request the server refused (here 503: other clients' bodies in flight fill their budget) got
    the UI framework's toast "HTTP 503: " with the server's JSON error body raw, and the status box went on saying
    what the action before did. Now both say the server's message; once the bodies are gone, the file goes up."""
    from playwright.sync_api import expect

    from tests.hostile.test_connections import connect, head, until

    server = Server(tmp_path_factory.mktemp("bodies") / "data", "--max-upload-mb", "1", "--max-bodies-mb", "2")
    server.start()
    document = tmp_path / "note.txt"
    document.write_text("A note sent while the server is busy.\n\n" + STORY * 300, encoding="utf-8")  # 115 KB: no
    # small body, which a reserve of its own would take in (as it takes the page's events)
    held = []
    try:
        with chromium() as browser:
            page = open_ui(browser, server.url)
            for _ in range(2):  # 2 MiB announced, held: the budget is full
                sock = connect(server)
                sock.sendall(head("/v1/documents", 2**20) + b'{"text": "')
                held.append(sock)
            assert until(lambda: HTTP.post(f"{server.url}/v1/documents", json={"text": "x" * 200_000}).status_code
                         == 503)  # both heads taken in
            upload(page, document)
            status, toast = page.locator("#status"), page.locator(".toast-body")
            said = "the requests in flight hold 2 MiB of bodies, this server's 2 MiB for them (--max-bodies-mb)"
            expect(status).to_contain_text(f"'note.txt' was not sent: {said}", timeout=30_000)
            expect(toast).to_contain_text(f"HTTP 503: {said}")
            assert "{" not in toast.first.inner_text()
            page.screenshot(path=str(ARTIFACTS / "upload-refused-by-the-server.png"), full_page=True)
            for sock in held:
                sock.close()
            upload(page, document)
            expect(status).to_contain_text("Rendered note.txt", timeout=60_000)
    finally:
        for sock in held:
            sock.close()
        server.stop()
