"""The web UI in headless Chromium (Debian's): upload (rendered at once), de-duplication, rename and delete (confirmed
first), the example document, chat with evidence and settings, a question over several documents, each text box's
name, the API docs. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import itertools
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from glyphserve.engine.types import MAX_TEMPERATURE
from tests.serve.conftest import REPO, STORY

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts" / "ui"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@contextmanager
def chromium():
    """Headless Chromium (Debian's), closed at the end."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_ui(browser, url: str, outside: list[str] | None = None, headers: dict[str, str] | None = None):
    """The UI at ``url`` in a new page of ``browser`` (a browser context of its own: a user of its own, whose every
    request carries ``headers``), loaded; requests anywhere but the server (or ``data:``) are aborted and listed in
    ``outside``."""

    def only_loopback(route):
        if route.request.url.startswith(url) or route.request.url.startswith("data:"):
            return route.continue_()
        if outside is not None:
            outside.append(route.request.url)
        return route.abort()

    page = browser.new_page(viewport={"width": 1600, "height": 1400}, extra_http_headers=headers)
    page.route("**/*", only_loopback)
    page.goto(url)
    page.wait_for_selector("#upload", timeout=60_000)
    return page


@contextmanager
def ui_page(url: str, outside: list[str] | None = None):
    """The UI at ``url`` in headless Chromium (see ``open_ui``)."""
    with chromium() as browser:
        yield open_ui(browser, url, outside)


@pytest.fixture
def browser_page(extractive_server):
    """A page of the UI that may reach only the server; fails the test if it tried anything else."""
    outside: list[str] = []
    with ui_page(extractive_server.url, outside) as page:
        yield page
    assert outside == [], f"the UI tried to reach outside the server: {outside}"


def upload(page, path: Path) -> None:
    page.locator("#upload input[type=file]").set_input_files(str(path))


def set_slider(page, elem_id: str, value: str) -> None:
    """Set the slider ``#elem_id`` to ``value``, by its bar and by its number box in turn, until its state holds it.

    Each way is read back from the other box, which shows the slider's state, not what was typed into the first. Set
    again until it holds, for up to a minute: under load the accordion's slider, just opened, sometimes let a setting
    go (once, on CI's two cores, 40 settings of the bar in 10 s: the number stayed 0), hence the report of both boxes,
    the focus and the page's images still loading if none held."""
    bar = page.locator(f"#{elem_id} input[type=range]")
    number = page.locator(f"#{elem_id} input[type=number]")
    deadline = time.monotonic() + 60
    for attempt in itertools.count():
        if attempt % 2:
            number.fill(value)
            number.press("Tab")  # the box's value is taken (and bounded) as it loses focus
            if bar.input_value() == value:
                return
        else:
            bar.fill(value)
            if number.input_value() == value:
                return
        if time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    state = page.evaluate("""() => ({focus: document.activeElement && document.activeElement.outerHTML.slice(0, 200),
                                     loading: Array.from(document.images).filter((image) => !image.complete).length})""")
    raise AssertionError(f"the slider #{elem_id} never held {value}: bar {bar.input_value()!r}, "
                         f"number {number.input_value()!r}, {state}")


def upload_story(page, path: Path, first_line: str) -> Path:
    """Upload ``first_line`` and the story as the file ``path`` (a name and content of its own: not another test's
    upload), once it is rendered."""
    from playwright.sync_api import expect

    path.write_text(f"{first_line}\n\n{STORY}", encoding="utf-8")
    upload(page, path)
    expect(page.locator("#status")).to_contain_text(f"Rendered {path.name}", timeout=60_000)
    return path


def stored_names(server) -> list[str]:
    return [d["name"] for d in httpx.get(f"{server.url}/v1/documents").json()["documents"]]


def test_upload_renders_at_once_and_the_chat_shows_evidence_and_settings(browser_page, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    expect(page.locator("#backend-notice")).to_contain_text("No vision-language model is loaded")
    expect(page.locator("#backend-notice")).to_contain_text("glyphserve serve zai-org/Glyph")
    page.locator("#send").click()  # errors land in the page, not as a traceback
    expect(page.locator("#status")).to_contain_text("upload or select a document first")

    document = tmp_path / "keeper.txt"
    document.write_text("The keeper's copy.\n\n" + STORY, encoding="utf-8")  # not another test's upload
    upload(page, document)  # no Render button: the upload is rendered as it arrives
    expect(page.locator("#pages img").first).to_be_visible(timeout=60_000)
    expect(page.locator("#status")).to_contain_text("Rendered keeper.txt")
    # One figure a row, each headed by its name: no header row above them (it was an empty one).
    expect(page.locator("#stats table th")).to_have_text(["characters", "text tokens", "vision tokens", "compression"])
    expect(page.get_by_role("rowheader", name="vision tokens")).to_be_visible()
    expect(page.locator("#stats thead, #stats th:empty, #stats td:empty")).to_have_count(0)

    page.locator("#settings").click()
    expect(page.locator("#max-tokens")).to_contain_text("Glyph thinks before it answers")
    expect(page.locator("#temperature")).to_contain_text("0 answers greedily")
    # The slider reaches the API's highest temperature (it stopped at 1.5), and an answer at it comes.
    expect(page.locator("#temperature input[type=range]")).to_have_attribute("max", f"{MAX_TEMPERATURE:g}")
    set_slider(page, "temperature", f"{MAX_TEMPERATURE:g}")
    page.locator("#use-cache input").uncheck()

    page.locator("#question textarea").fill("Which schooner hit the rocks?")
    page.locator("#send").click()
    expect(page.locator("#chat")).to_contain_text("schooner Albatross", timeout=60_000)
    expect(page.locator("#answer-stats")).to_contain_text("Timings")
    expect(page.locator("#evidence img").first).to_be_visible()
    page.locator("#question textarea").fill("What was engraved on the compass?")
    page.locator("#question textarea").press("Enter")
    expect(page.locator("#chat")).to_contain_text("for courage at sea", timeout=60_000)
    expect(page.locator("#chat")).to_contain_text("schooner Albatross")  # the history stays
    page.screenshot(path=str(ARTIFACTS / "chat-with-evidence.png"), full_page=True)
    page.locator("#clear").click()
    expect(page.locator("#chat")).not_to_contain_text("Albatross")


def test_a_question_sent_as_a_file_uploads_is_asked_about_that_file(browser_page, tmp_path):
    """Sent at once after the file is picked, before the upload has chosen its document: it was refused ("upload or
    select a document first", on a page with none chosen before) or asked about the document chosen before, with
    the conversation about that one."""
    from playwright.sync_api import expect

    page = browser_page
    upload_story(page, tmp_path / "before.txt", "The document before.")
    page.locator("#question textarea").fill("Which schooner hit the rocks?")
    page.locator("#send").click()
    expect(page.locator("#status")).to_contain_text("Done.", timeout=60_000)
    page.locator("#question textarea").fill("What was the ferry called?")
    # Thirty copies: a second or so of rendering, to send the question in.
    document = tmp_path / "ferry.txt"
    document.write_text("The ferry was called the Morning Star.\n\n" + "\n\n".join([STORY] * 30), encoding="utf-8")
    upload(page, document)
    page.locator("#question textarea").press("Enter")
    # Its box is emptied as it is sent, and the next question, typed while it waits for the upload, stays there
    # (the handler emptied the box as it began, wiping it).
    expect(page.locator("#question textarea")).to_have_value("")
    assert page.evaluate("window.glyphserveUploads.count") == 1  # (still waiting: the file renders for a second)
    page.locator("#question textarea").fill("Who was its captain?")
    page.locator("#question textarea").blur()  # (the page does not write into a box being typed in)
    expect(page.locator("#status")).to_contain_text("Done.", timeout=60_000)
    expect(page.locator("#question textarea")).to_have_value("Who was its captain?")
    expect(page.locator("#chat")).to_contain_text("Morning Star")
    expect(page.locator("#chat")).not_to_contain_text("schooner")  # a chat of its own
    expect(page.locator("#status")).not_to_contain_text("Rendered")  # the answer's status, not the upload's
    assert page.locator("#stored").inner_text().count("ferry.txt") == 1


def test_the_same_file_twice_is_stored_once(browser_page, extractive_server, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    document = upload_story(page, tmp_path / "twice.txt", "A document uploaded twice.")
    count = stored_names(extractive_server).count("twice.txt")
    # The upload box empties once the file is stored (the UI framework's copy of it is gone).
    expect(page.locator("#upload button[aria-label='Clear']")).to_have_count(0)
    upload(page, document)
    expect(page.locator("#status")).to_contain_text("already stored", timeout=60_000)
    assert stored_names(extractive_server).count("twice.txt") == count == 1
    page.screenshot(path=str(ARTIFACTS / "deduplicated.png"), full_page=True)


def test_files_the_api_takes_are_taken_whatever_their_names(browser_page, extractive_server, tmp_path):
    """The upload box refused NOTES and app.log in the page ("Invalid file type", by their names), which the API
    takes (the type is told from the content), and the status box kept the error before beside that toast. The
    server decides, and says why it refuses content in the toast and the status alike."""
    from playwright.sync_api import expect

    from tests.serve.conftest import make_png

    page = browser_page
    toast, status = page.locator(".toast-body"), page.locator("#status")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    notes = tmp_path / "NOTES"
    notes.write_text("Notes without an extension.\n\n" + STORY, encoding="utf-8")
    log = tmp_path / "app.log"
    log.write_text("2024-05-01 12:00:03 INFO the keeper's log\n" + STORY, encoding="utf-8")
    for named in (notes, log):
        upload(page, empty)
        expect(status).to_contain_text("'empty.txt' is empty", timeout=60_000)
        upload(page, named)
        expect(status).to_contain_text(f"Rendered {named.name} into", timeout=60_000)
        expect(toast).to_have_count(0)
        expect(page.locator("#pages img").first).to_be_visible()
    assert {"NOTES", "app.log"} <= set(stored_names(extractive_server))

    picture = tmp_path / "picture.txt"  # a PNG, whatever its name says
    picture.write_bytes(make_png())
    upload(page, picture)
    refusal = ("'picture.txt' is a PNG image, which is not supported; supported types are PDF, DOCX, plain text and "
               "Markdown")
    expect(toast).to_contain_text(refusal, timeout=60_000)
    expect(toast.locator(".toast-title")).to_have_text("Error")
    expect(status).to_have_text(f"Error: {refusal}")
    page.screenshot(path=str(ARTIFACTS / "unsupported-content.png"), full_page=True)


def test_an_upload_over_the_limit_is_refused_before_it_is_sent_and_the_limit_is_shown(browser_page, extractive_server,
                                                                                     tmp_path):
    """The UI framework refused it in the page with a toast of its own, and the status box kept the error of the
    upload before beside it. The page refuses it before the framework sees it (picked or dropped), the status and a
    toast headed Error saying why, and nothing is sent."""
    from playwright.sync_api import expect

    page = browser_page
    sent = []
    page.on("request", lambda request: sent.append(request.url) if "/upload" in request.url else None)
    toast, status = page.locator(".toast-body"), page.locator("#status")
    expect(page.locator("#upload")).to_contain_text("up to 1 MiB")  # the server's --max-upload-mb
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    upload(page, empty)
    expect(toast).to_contain_text("'empty.txt' is empty", timeout=60_000)
    sent.clear()

    big = tmp_path / "big.txt"
    big.write_text("All work and no play. " * 70_000, encoding="utf-8")  # 1.5 MiB
    upload(page, big)
    refusal = ("'big.txt' was not sent: the upload is 1,540,000 bytes (1.47 MiB); this server accepts at most "
               "1,048,576 bytes (1 MiB, --max-upload-mb)")
    expect(status).to_have_text(f"Error: {refusal}", timeout=30_000)
    expect(toast.locator(".toast-message-text")).to_have_text([refusal])  # the empty file's error is gone
    expect(toast.locator(".toast-title")).to_have_text("Error")
    page.screenshot(path=str(ARTIFACTS / "upload-over-the-limit.png"), full_page=True)

    dropped = page.evaluate_handle("() => { const files = new DataTransfer(); "
                                   "files.items.add(new File([new Uint8Array(2 ** 20 + 1)], 'dropped.txt')); "
                                   "return files; }")
    box = page.locator("#upload button.upload-container")
    for event in ("dragenter", "dragover", "drop"):
        box.dispatch_event(event, {"dataTransfer": dropped})
    expect(status).to_contain_text("'dropped.txt' was not sent: the upload is 1,048,577 bytes", timeout=30_000)
    expect(toast).to_contain_text("'dropped.txt' was not sent")
    expect(toast).to_have_count(1)
    page.wait_for_timeout(500)  # (time for an upload to start, were it to)
    assert sent == []
    assert not {"big.txt", "dropped.txt"} & set(stored_names(extractive_server))


def test_an_error_toast_stays_after_the_one_it_replaced_would_have_gone(browser_page):
    """Each action closes the toasts before it. An error that came back while they faded out joined them, and went
    with them when the first one's 10 s ran out: a second error 9.5 s after the first showed for half a second."""
    from playwright.sync_api import expect

    page = browser_page
    toast = page.locator(".toast-body")
    page.locator("#send").click()  # nothing chosen: an error at once
    expect(toast).to_contain_text("upload or select a document first")
    page.wait_for_timeout(9_500)
    page.locator("#question textarea").fill("Who was the keeper?")
    page.locator("#send").click()
    expect(toast).to_have_count(1)
    page.wait_for_timeout(2_000)  # past the first toast's 10 s
    expect(toast).to_contain_text("upload or select a document first")


def test_a_successful_upload_clears_the_error_toast_of_the_one_before(browser_page, tmp_path):
    """An error toast stays 10 s: after the user fixed the file and uploaded it again, the stale error stayed on
    screen beside the success. Each new upload (render, question...) now takes earlier toasts with it. The toast is
    headed Error (it read Warning)."""
    from playwright.sync_api import expect

    page = browser_page
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 and nothing a PDF reader can read")
    upload(page, broken)
    toast = page.locator(".toast-body")
    expect(toast).to_contain_text("'broken.pdf' is not a readable PDF", timeout=60_000)
    expect(toast.locator(".toast-title")).to_have_text("Error")
    expect(page.locator("#status")).to_contain_text("Error:")
    fixed = tmp_path / "fixed.txt"
    fixed.write_text("The fixed copy.\n\n" + STORY, encoding="utf-8")
    expect(toast).to_have_count(1)  # (still on screen: what follows is no toast timing out)
    upload(page, fixed)
    expect(page.locator("#status")).to_contain_text("Rendered fixed.txt", timeout=60_000)
    expect(toast).to_have_count(0, timeout=2_000)  # (it fades out)
    page.screenshot(path=str(ARTIFACTS / "error-cleared.png"), full_page=True)
    again = tmp_path / "broken-again.pdf"
    again.write_bytes(b"%PDF-1.7 broken again")
    upload(page, again)  # a new error shows as before
    expect(toast).to_contain_text("'broken-again.pdf' is not a readable PDF", timeout=60_000)


def test_a_page_left_open_across_a_server_restart_asks_about_the_document_it_shows(tmp_path):
    """The server restarted: the UI framework's per-session state is gone. The framework reloads the page once it
    has reconnected (a fresh page, nothing stale shown); a question sent before that is about the document the
    page still shows (it said "upload or select a document first")."""
    from playwright.sync_api import Error, expect

    from tests.serve.conftest import Server

    def kept(page) -> bool:  # the page as it was (the UI framework has not reloaded it)
        try:
            return page.evaluate("window.glyphserveKept === true")
        except Error:  # navigating
            return False

    server = Server(tmp_path / "data").start()
    try:
        with ui_page(server.url) as page:
            page.get_by_role("tab", name="Example").click()
            page.locator("#example").click()
            expect(page.locator("#pages img").first).to_be_visible(timeout=60_000)
            page.evaluate("window.glyphserveKept = true")
            server.stop()
            server.start()
            page.locator("#question textarea").fill("What was the revenue in the third quarter?")
            page.locator("#send").click()
            deadline = time.monotonic() + 60
            while kept(page) and "Done." not in page.locator("#status").inner_text():
                assert "upload or select" not in page.locator("#status").inner_text()
                assert time.monotonic() < deadline
                time.sleep(0.2)
            if kept(page):
                expect(page.locator("#chat")).to_contain_text("15.1 million euros")
            else:  # reloaded: a fresh page, the document still stored
                page.wait_for_selector("#upload", timeout=60_000)
                assert [d["name"] for d in httpx.get(f"{server.url}/v1/documents").json()["documents"]] == [
                    "example_report.txt"]
    finally:
        server.stop()


def test_rename_and_delete(browser_page, extractive_server, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    upload_story(page, tmp_path / "draft.txt", "A document to rename and delete.")
    page.locator("#name textarea").fill("Final report")
    page.locator("#rename").click()
    expect(page.locator("#status")).to_contain_text("Renamed to Final report")
    assert "Final report" in stored_names(extractive_server) and "draft.txt" not in stored_names(extractive_server)
    page.screenshot(path=str(ARTIFACTS / "renamed.png"), full_page=True)
    page.locator("#delete").click()
    page.locator("#confirm-delete").click()
    expect(page.locator("#status")).to_contain_text("Deleted Final report for every user of this server")
    expect(page.locator("#pages img")).to_have_count(0)
    assert "Final report" not in stored_names(extractive_server)


def test_delete_acts_only_on_the_document_shown_as_chosen(browser_page, extractive_server, tmp_path):
    """Clearing the list's choice clears what the page acts on (Delete once removed a document no longer shown as
    chosen); a document deleted elsewhere is reported as deleted and leaves the list."""
    from playwright.sync_api import expect

    page = browser_page
    upload_story(page, tmp_path / "keep.txt", "A document that must survive.")
    page.locator("#stored .remove-all").click()
    expect(page.locator("#pages img")).to_have_count(0)
    expect(page.locator("#name textarea")).to_have_value("")
    page.locator("#delete").click()
    expect(page.locator("#status")).to_contain_text("choose one document to delete")
    assert "keep.txt" in stored_names(extractive_server)

    upload_story(page, tmp_path / "gone.txt", "A document deleted through the API.")
    (gone,) = [d["id"] for d in httpx.get(f"{extractive_server.url}/v1/documents").json()["documents"]
               if d["name"] == "gone.txt"]
    assert httpx.delete(f"{extractive_server.url}/v1/documents/{gone}").json()["deleted"] is True
    page.locator("#question textarea").fill("Who was the keeper?")
    page.locator("#send").click()  # asked about it: said to be deleted, and nothing stays chosen
    expect(page.locator("#status")).to_contain_text("'gone.txt' was deleted (in another tab or through the API)")
    expect(page.locator("#pages img")).to_have_count(0)
    page.locator("#delete").click()
    expect(page.locator("#status")).to_contain_text("choose one document to delete")
    assert "keep.txt" in stored_names(extractive_server)


def choose(page, name: str) -> None:
    """Choose the document named ``name`` in the page's list, as it stands in the page."""
    page.locator("#stored input").click()
    page.get_by_role("option", name=re.compile(f"^{re.escape(name)} · ")).click()
    page.keyboard.press("Escape")


def test_a_document_deleted_elsewhere_is_named_alike_in_the_toast_and_the_status(extractive_server, tmp_path):
    """Another user deleted the chosen document: the question got a toast headed Warning ("that document was
    deleted") beside a status naming the document's id. A question, a rename or a choice from a list that still shows
    it now gets a toast headed Error saying what the status says, naming the document; Delete and Confirm delete of a
    document deleted meanwhile only say that it is gone already (what was asked is done)."""
    from playwright.sync_api import expect

    server = extractive_server

    def document(name: str) -> Path:
        path = tmp_path / name
        path.write_text(f"The {name} of the keeper.\n\n" + STORY, encoding="utf-8")
        return path

    def stored_id(name: str) -> str:
        (found,) = [d["id"] for d in httpx.get(f"{server.url}/v1/documents").json()["documents"] if d["name"] == name]
        return found

    def says_deleted(page, name: str) -> None:
        message = f"'{name}' was deleted (in another tab or through the API): choose another document"
        toast = page.locator(".toast-body")
        expect(toast.locator(".toast-message-text")).to_have_text([message])
        expect(toast.locator(".toast-title")).to_have_text("Error")
        expect(page.locator("#status")).to_have_text(f"Error: {message}")
        expect(page.locator("#pages img")).to_have_count(0)
        expect(page.locator("#stored")).not_to_contain_text(name)

    with chromium() as browser:
        mine = open_ui(browser, server.url)
        for name in ("minutes.txt", "agenda.txt", "report.txt"):
            upload(mine, document(name))
            expect(mine.locator("#status")).to_contain_text(f"Rendered {name}", timeout=60_000)
        theirs = open_ui(browser, server.url)  # (its list shows the three)
        choose(theirs, "minutes.txt")
        expect(theirs.locator("#status")).to_contain_text("Selected minutes.txt")
        mine.locator("#stored .remove-all").click()  # (report.txt was chosen)
        expect(mine.locator("#pages img")).to_have_count(0)
        choose(mine, "minutes.txt")
        expect(mine.locator("#status")).to_contain_text("Selected minutes.txt")
        mine.locator("#delete").click()
        mine.locator("#confirm-delete").click()
        expect(mine.locator("#status")).to_contain_text("Deleted minutes.txt for every user")
        theirs.locator("#question textarea").fill("Who was the keeper?")
        theirs.locator("#send").click()
        says_deleted(theirs, "minutes.txt")
        theirs.screenshot(path=str(ARTIFACTS / "deleted-elsewhere.png"), full_page=True)

        choose(theirs, "agenda.txt")
        expect(theirs.locator("#status")).to_contain_text("Selected agenda.txt")
        httpx.delete(f"{server.url}/v1/documents/{stored_id('agenda.txt')}").raise_for_status()
        theirs.locator("#name textarea").fill("Agenda, final")
        theirs.locator("#rename").click()
        says_deleted(theirs, "agenda.txt")

        httpx.delete(f"{server.url}/v1/documents/{stored_id('report.txt')}").raise_for_status()
        choose(theirs, "report.txt")  # (the page's list still shows it)
        says_deleted(theirs, "report.txt")

        for step in ("Delete", "Confirm delete"):
            upload(mine, document("notes.txt"))
            expect(mine.locator("#status")).to_contain_text("Rendered notes.txt", timeout=60_000)
            if step == "Confirm delete":
                mine.locator("#delete").click()
                expect(mine.locator("#confirm-delete")).to_be_visible()
            httpx.delete(f"{server.url}/v1/documents/{stored_id('notes.txt')}").raise_for_status()
            mine.locator("#confirm-delete" if step == "Confirm delete" else "#delete").click()
            expect(mine.locator("#status")).to_have_text(
                "'notes.txt' was already deleted (in another tab or through the API).")
            expect(mine.locator(".toast-body")).to_have_count(0)
            expect(mine.locator("#pages img")).to_have_count(0)
            expect(mine.locator("#delete")).to_be_visible()
            expect(mine.locator("#stored")).not_to_contain_text("notes.txt")


def test_delete_asks_first_and_says_the_document_goes_for_every_user(extractive_server, tmp_path):
    """Two users upload the same file: it is stored once, so one user's delete takes it from both (it was deleted at
    the first click). Delete asks first, saying so; Cancel keeps the document, and a change of the chosen
    documents withdraws the question; only Confirm delete deletes."""
    from playwright.sync_api import expect

    server = extractive_server
    shared = tmp_path / "shared-notes.txt"
    shared.write_text("Notes that two users uploaded.\n\n" + STORY, encoding="utf-8")
    with chromium() as browser:
        mine, theirs = open_ui(browser, server.url), open_ui(browser, server.url)  # two users
        upload(theirs, shared)
        expect(theirs.locator("#status")).to_contain_text("Rendered shared-notes.txt", timeout=60_000)
        upload(mine, shared)
        status = mine.locator("#status")
        expect(status).to_contain_text("already stored", timeout=60_000)
        assert stored_names(server).count("shared-notes.txt") == 1

        mine.locator("#delete").click()
        expect(status).to_contain_text("Delete shared-notes.txt for every user of this server?")
        expect(status).to_contain_text("the same file uploaded by several users is stored once")
        expect(mine.locator("#delete")).to_be_hidden()
        expect(mine.locator("#confirm-delete")).to_be_visible()
        mine.screenshot(path=str(ARTIFACTS / "delete-asks.png"), full_page=True)
        mine.wait_for_timeout(500)  # (time for a delete to happen, were it to)
        assert "shared-notes.txt" in stored_names(server)
        mine.locator("#cancel-delete").click()
        expect(status).to_have_text("Not deleted.")
        expect(mine.locator("#confirm-delete")).to_be_hidden()
        expect(mine.locator("#cancel-delete")).to_be_hidden()
        assert "shared-notes.txt" in stored_names(server)

        mine.locator("#delete").click()
        mine.locator("#confirm-delete").click()
        expect(status).to_contain_text("Deleted shared-notes.txt for every user of this server.")
        expect(mine.locator("#delete")).to_be_visible()
        expect(mine.locator("#confirm-delete")).to_be_hidden()
        assert "shared-notes.txt" not in stored_names(server)
        theirs.locator("#question textarea").fill("Who was the keeper?")  # gone for the other user too
        theirs.locator("#send").click()
        expect(theirs.locator("#status")).to_contain_text("'shared-notes.txt' was deleted")

        kept = tmp_path / "kept-notes.txt"
        kept.write_text("Notes that stay.\n\n" + STORY, encoding="utf-8")
        upload(mine, kept)
        expect(status).to_contain_text("Rendered kept-notes.txt", timeout=60_000)
        mine.locator("#delete").click()
        expect(mine.locator("#confirm-delete")).to_be_visible()
        mine.locator("#stored .remove-all").click()  # the choice changes: nothing left to confirm
        expect(mine.locator("#confirm-delete")).to_be_hidden()
        expect(mine.locator("#delete")).to_be_visible()
        assert "kept-notes.txt" in stored_names(server)


def test_each_text_box_has_a_name_of_its_own(browser_page):
    """Each text box is found by a name of its own (what a screen reader reads out): the question box's was the
    UI framework's "Textbox", which get_by_label("Text") found beside the pasted-text box's "Text"."""
    from playwright.sync_api import expect

    page = browser_page
    page.get_by_role("tab", name="Paste text").click()
    names = {"#question textarea": "Question", "#pasted textarea": "Text to render", "#name textarea": "Document name"}
    for box, name in names.items():
        expect(page.locator(box)).to_have_accessible_name(name)
        expect(page.get_by_label(name)).to_have_count(1)  # (a part of no other element's name)
    expect(page.get_by_role("textbox")).to_have_count(len(names))
    expect(page.get_by_label("Text")).to_have_count(1)
    expect(page.get_by_role("textbox", name="Textbox")).to_have_count(0)


def test_the_example_document_and_the_api_docs(browser_page, extractive_server):
    from playwright.sync_api import expect

    page = browser_page
    page.get_by_role("tab", name="Example").click()
    page.locator("#example").click()
    expect(page.locator("#pages img").first).to_be_visible(timeout=60_000)
    page.locator("#question textarea").fill("What was the revenue in the third quarter?")
    page.locator("#send").click()
    expect(page.locator("#chat")).to_contain_text("15.1 million euros", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "example.png"), full_page=True)
    docs = page.get_by_role("link", name="API docs").get_attribute("href")
    page.goto(extractive_server.url + docs)  # Swagger UI, served from this server's own files
    expect(page.get_by_text("/v1/chat/completions").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "api-docs.png"))


def test_a_question_over_several_documents_marks_the_pages_it_cites(browser_page, tmp_path):
    import re

    from playwright.sync_api import expect

    page = browser_page
    mill, ferry = tmp_path / "mill-notes.txt", tmp_path / "ferry-log.txt"
    mill.write_text("The Carrow mill ground barley for the brewers of the valley.", encoding="utf-8")
    ferry.write_text("The Carrow ferry crossed the estuary twice a day in summer.", encoding="utf-8")
    upload(page, mill)
    expect(page.locator("#status")).to_contain_text("Rendered mill-notes.txt", timeout=60_000)
    expect(page.locator("#upload button[aria-label='Clear']")).to_have_count(0)  # the box empties once stored
    upload(page, ferry)
    expect(page.locator("#status")).to_contain_text("Rendered ferry-log.txt", timeout=60_000)
    page.locator("#stored input").click()  # add the first document to the one just rendered
    page.get_by_role("option", name=re.compile(r"^mill-notes\.txt · ")).first.click()
    page.keyboard.press("Escape")
    expect(page.locator("#status")).to_contain_text("Questions go to all of them together")
    page.locator("#question textarea").fill("What did the Carrow mill and the Carrow ferry do?")
    page.locator("#send").click()
    expect(page.locator("#chat")).to_contain_text("[mill-notes.txt, page 1]", timeout=60_000)
    expect(page.locator("#chat")).to_contain_text("[ferry-log.txt, page 1]")
    expect(page.locator("#answer-stats")).to_contain_text("Pages cited")
    expect(page.locator("#pages")).to_contain_text("· shown")
    page.screenshot(path=str(ARTIFACTS / "collection.png"), full_page=True)


def test_stop_takes_a_waiting_question_out_of_the_queue(tmp_path, tiny_model_dir):
    """With the engine busy (one sequence at a time, a long answer streaming through the API), a question asked in
    the UI waits in the queue; Stop takes it out (a cancelled request), and the server goes on."""
    from playwright.sync_api import expect

    with question_waiting(tmp_path, tiny_model_dir) as (client, page, cancelled):
        # A second question meanwhile (Enter, beside Send's answer) is refused, back in its box: it came into the
        # same chat, each answer writing its conversation over the other's.
        page.locator("#question textarea").fill("And who steered?")
        page.locator("#question textarea").press("Enter")
        expect(page.locator(".toast-body")).to_contain_text("an answer is still coming", timeout=30_000)
        expect(page.locator("#question textarea")).to_have_value("And who steered?")
        expect(page.locator("#chat")).not_to_contain_text("And who steered?")
        expect(page.locator("#status")).to_contain_text("Answering")
        page.locator("#stop").click()
        expect(page.locator("#status")).to_contain_text("Stopped before any answer came", timeout=30_000)
        # nothing was answered: the question leaves the chat (no conversation to send with the next one) and is
        # back in its box, to send again
        expect(page.locator("#question textarea")).to_have_value("Who rowed out?")
        expect(page.locator("#chat")).not_to_contain_text("Who rowed out?")
        _wait_for_metric(client, "glyphserve_requests_cancelled_total", cancelled + 1)
        assert _metric(client, "glyphserve_requests_cancelled_total") == cancelled + 1  # it, and only it
        page.screenshot(path=str(ARTIFACTS / "stopped.png"), full_page=True)


def test_a_file_uploaded_while_an_answer_comes_stops_it_and_keeps_its_own_chat(tmp_path, tiny_model_dir):
    """The page shows the new file with a chat of its own: the answer about the document before went on, and wrote
    its conversation and that document's pages over the new one's (a new user's trial)."""
    from playwright.sync_api import expect

    with question_waiting(tmp_path, tiny_model_dir) as (client, page, cancelled):
        upload_story(page, tmp_path / "next.txt", "The next document.")
        expect(page.locator("#status")).to_contain_text("The answer in progress, about the document shown before, "
                                                        "was stopped.")
        _wait_for_metric(client, "glyphserve_requests_cancelled_total", cancelled + 1)
        expect(page.locator("#chat")).not_to_contain_text("Who rowed out?")
        expect(page.locator("#status")).to_contain_text("Rendered next.txt")


@contextmanager
def question_waiting(tmp_path: Path, tiny_model_dir: Path):
    """A tiny-model server of one sequence kept busy (``busy_engine``), its page showing the stored story and the
    question "Who rowed out?" sent there, waiting in the queue: yields (API client, page, cancelled requests before
    it). The server is checked healthy after the block."""
    from playwright.sync_api import expect

    from tests.serve.conftest import Server
    from tests.serve.test_api import upload_text

    server = Server(tmp_path / "data", str(tiny_model_dir), "--device", "cpu", "--max-num-seqs", "1").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            with busy_engine(server, upload_text(client, STORY)), ui_page(server.url) as page:
                page.locator("#stored input").click()
                page.locator("ul[role=listbox] li").first.click()
                expect(page.locator("#pages img")).not_to_have_count(0, timeout=30_000)
                cancelled = _metric(client, "glyphserve_requests_cancelled_total")
                page.locator("#question textarea").fill("Who rowed out?")
                page.locator("#send").click()
                expect(page.locator("#status")).to_contain_text("Answering", timeout=30_000)
                assert client.get("/health").json()["queue_depth"] >= 1  # it waits behind the API's answers
                yield client, page, cancelled
            assert client.get("/health").json()["status"] == "ok"
    finally:
        server.stop()


@contextmanager
def busy_engine(server, document: dict):
    """Three long answers about ``document`` streamed through the API on a server of one sequence: one runs, two
    wait, so a question asked meanwhile waits behind ~10,000 tokens of work however fast the machine decodes (with
    one, a fast machine had finished it). They are left when the block ends."""
    busy, leave = threading.Event(), threading.Event()

    def occupy():
        body = {"messages": [{"role": "user", "content": "Tell the whole story."}], "document": document["id"],
                "max_tokens": 3500, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=120) as own, \
                own.stream("POST", "/v1/chat/completions", json=body) as reply:
            for _ in reply.iter_lines():
                busy.set()
                if leave.is_set():
                    return

    readers = [threading.Thread(target=occupy) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        assert busy.wait(60)
        yield
    finally:
        leave.set()
        for reader in readers:
            reader.join(60)


def _wait_for_metric(client: httpx.Client, name: str, value: float, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while _metric(client, name) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.1)


def test_the_answer_length_sliders_top_answers(tmp_path, tiny_model_dir):
    """The answer-length slider stops at half the model's context (the tiny model's 4,096 tokens), so that its top
    leaves room for the pages: it stopped at the whole context, where every question was refused."""
    from playwright.sync_api import expect

    from tests.serve.conftest import Server
    from tests.serve.test_api import upload_text

    server = Server(tmp_path / "data", str(tiny_model_dir), "--device", "cpu").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            upload_text(client, STORY)
            context = client.get("/v1/models").json()["data"][0]["max_model_len"]
        with ui_page(server.url) as page:
            page.locator("#stored input").click()
            page.locator("ul[role=listbox] li").first.click()
            expect(page.locator("#pages img")).not_to_have_count(0, timeout=30_000)
            page.locator("#settings").click()
            top = page.locator("#max-tokens input[type=range]")
            expect(top).to_have_attribute("max", str(context // 2))
            set_slider(page, "max-tokens", str(context // 2))
            page.locator("#question textarea").fill("Who rowed out?")
            page.locator("#send").click()
            expect(page.locator("#status")).to_contain_text("Done.", timeout=60_000)
    finally:
        server.stop()


def _metric(client: httpx.Client, name: str) -> float:
    line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith(name))
    return float(line.split()[-1])
