"""Cases 3, 4, 5 and 10: hostile uploads, small on the wire and huge once unpacked or rendered, each answered with
a 4xx within its time bound, adding less than the memory bound to the server, while another user's upload and
question go through untouched."""

from __future__ import annotations

import io
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from glyphserve.bench import hostile_files
from tests.hostile.conftest import ADDED_BYTES, HTTP, PDF_SECONDS, UPLOAD_SECONDS, Watch, error
from tests.serve.conftest import STORY, make_pdf
from tests.servers import Server

QUESTION = "What did the harbour master give the keeper?"
WHITE_BOX = b"1 1 1 rg 0 0 612 792 re f"  # drawn (so not blank without rendering), nothing visible


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """Lets a 10,000-page PDF in (to show it is read without rendering its pages), and a short upload budget."""
    server = Server(tmp_path_factory.mktemp("tight") / "data", "--no-ui", "--max-pdf-pages", "10000",
                    "--ingest-timeout", "4").start()
    yield server
    server.stop()


def send_file(server: Server, name: str, data: bytes):
    return HTTP.post(f"{server.url}/v1/documents", files={"file": (name, data)})


def other_user(server: Server, tag: str) -> str:
    """Another user's PDF upload and question, answered in full."""
    created = send_file(server, f"story-{tag}.pdf", make_pdf(f"{STORY}\n\nCopy {tag}."))
    assert created.status_code in (200, 201), created.text
    answer = HTTP.post(f"{server.url}/v1/documents/{created.json()['id']}/chat", json={"question": QUESTION})
    assert answer.status_code == 200, answer.text
    return answer.json()["answer"]


def attack(server: Server, tag: str, send, *, seconds: float = UPLOAD_SECONDS, added: int = ADDED_BYTES):
    """``send()`` alone, checked against the bounds (time, memory added to the server), then again while another
    user uploads and asks, whose answer must be what it is without it; the hostile answer."""
    with Watch(server, tag) as watch:
        response = send()
    assert 400 <= response.status_code < 500, response.text
    assert watch.seconds < seconds, f"{tag}: {watch.seconds:.1f} s"
    assert watch.added < added, f"{tag}: +{watch.added / 2**20:.0f} MiB"
    alone = other_user(server, f"{tag}-alone")
    with ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(send)
        beside = other_user(server, f"{tag}-beside")
        assert hostile.result().status_code == response.status_code
    assert beside == alone  # the other user's answer, complete and unchanged
    return response


def test_a_docx_of_250_mib_of_paragraphs_in_0_8_mb(server):
    data = hostile_files.docx_of_paragraphs(250)
    assert len(data) < 2**20
    response = attack(server, "paragraphs", lambda: send_file(server, "paragraphs.docx", data))
    assert error(response)[0] == "file_too_large" and "--max-unpacked-mb" in error(response)[1]


def test_a_docx_whose_zip_understates_its_size_is_counted_while_it_streams(server):
    """The same paragraphs, the zip declaring 100 MiB (under the unpacked limit): refused by the paragraph
    count as the XML streams, long before 250 MiB."""
    honest = hostile_files.docx_of_paragraphs(250)
    with zipfile.ZipFile(io.BytesIO(honest)) as archive:
        size = archive.getinfo("word/document.xml").file_size
    data = honest.replace(size.to_bytes(4, "little"), (100 * 2**20).to_bytes(4, "little"))
    response = attack(server, "understated", lambda: send_file(server, "understated.docx", data))
    assert error(response)[0] == "file_too_large" and "--max-docx-paragraphs" in error(response)[1]


@pytest.mark.parametrize("inflated_mib", [1536, 600])
def test_a_zip_member_declaring_1000_bytes_that_inflates_to_gigabytes(server, inflated_mib):
    data = hostile_files.docx_with_lying_size(inflated_mib)
    response = attack(server, f"liar-{inflated_mib}", lambda: send_file(server, "liar.docx", data))
    assert error(response)[0] == "corrupt_file"  # stopped at the declared size, where the checksum fails


def test_billion_laughs_and_tens_of_thousands_of_entries(server):
    laughs = attack(server, "laughs", lambda: send_file(server, "laughs.docx", hostile_files.docx_with_entity_expansion()))
    assert "DTD" in error(laughs)[1]
    entries = hostile_files.zip_of_many_entries(60_000)
    many = attack(server, "entries", lambda: send_file(server, "entries.docx", entries))
    assert error(many)[0] == "file_too_large" and "entries" in error(many)[1]


def pages_rendered(server: Server) -> float:
    metrics = HTTP.get(f"{server.url}/metrics").text
    return float(re.search(r"^glyphserve_pages_rendered_total (\S+)$", metrics, re.M).group(1))


@pytest.mark.parametrize("kind, text", [
    ("long-lines", ("The lantern at the mill burned until the river rose over the road to town. " * 6 + "\n\n") * 24_000),
    ("short-lines", "line\n" * 60_000),  # 300 KB, ~750 pages: its lines, not its length, say so
])
def test_a_text_of_more_pages_than_the_limit_is_refused_before_rendering(server, kind, text):
    """About 1,100 or 750 pages against the limit of 500: counted from the layout, not one page rendered."""
    before = pages_rendered(server)
    refused = send_file(server, f"{kind}.txt", text.encode())
    assert error(refused)[0] == "too_many_pages" and "--max-pages" in error(refused)[1]
    assert pages_rendered(server) == before
    attack(server, kind, lambda: send_file(server, f"{kind}.txt", text.encode()))


def test_a_pdf_of_10000_blank_pages(server, tight):
    data = hostile_files.pdf_of_pages(10_000)
    refused = attack(server, "pages", lambda: send_file(server, "pages.pdf", data))
    assert error(refused)[0] == "too_many_pages" and "--max-pdf-pages" in error(refused)[1]
    # Allowed: read to the end without rendering a page (none has content), then empty.
    read = attack(tight, "pages-allowed", lambda: send_file(tight, "pages.pdf", data), seconds=PDF_SECONDS)
    assert error(read)[0] == "empty_document"


def test_a_pdf_that_takes_too_long_is_stopped_and_blocks_no_one(tight):
    """2,000 pages that must each be rendered to find them blank (minutes): its parser process is killed at the
    budget, and two of them at once hold up neither other PDFs nor pasted text."""
    slow = hostile_files.pdf_of_pages(2_000, WHITE_BOX)
    with ThreadPoolExecutor(2) as pool:
        second = pool.submit(send_file, tight, "slow-2.pdf", slow)
        response = attack(tight, "slow", lambda: send_file(tight, "slow.pdf", slow), seconds=UPLOAD_SECONDS + 2)
        assert second.result().status_code == 400
    assert error(response)[0] == "ingest_timeout" and "--ingest-timeout" in error(response)[1]


def files_in_flight(server: Server) -> tuple[float, float]:
    """Uploaded files being read, and waiting for a thread to read them."""
    metrics = HTTP.get(f"{server.url}/metrics").text
    return tuple(float(re.search(rf"^glyphserve_upload_files_{state} (\S+)$", metrics, re.M).group(1))
                 for state in ("reading", "waiting"))


def test_one_clients_slow_files_hold_up_its_own_files_only(tight):
    """A hostile-input trial: 4 PDFs of one client taking the whole --ingest-timeout held another client's 0.1 s
    text file back 9 s (one line for every client's files), and 8 of them got it refused as out of time. Here one
    client sends 19 such PDFs: 2 are read at once, 16 wait in its own line and the 19th is refused at once (429);
    another client's files are read meanwhile, and each waiting file gets its whole budget or a 429 saying when to
    retry."""
    slow = hostile_files.pdf_of_pages(2_000, WHITE_BOX)
    other = httpx.Client(timeout=120, transport=httpx.HTTPTransport(local_address="127.0.0.2"))  # another address
    with ThreadPoolExecutor(19) as pool:
        sent = [pool.submit(send_file, tight, f"slow-{i}.pdf", slow) for i in range(19)]
        deadline = time.monotonic() + 60
        while files_in_flight(tight) != (2, 16):
            assert time.monotonic() < deadline, files_in_flight(tight)
            time.sleep(0.05)
        for name, data in (("story.txt", STORY.encode()), ("story.pdf", make_pdf(STORY))):
            created = other.post(f"{tight.url}/v1/documents", files={"file": (name, data)})
            assert created.status_code in (200, 201), created.text
        assert files_in_flight(tight) == (2, 16)  # the slow files' client still has all 18 in flight
        responses = [future.result() for future in sent]
    codes = sorted(error(r)[0] for r in responses)
    assert codes == ["ingest_timeout"] * 4 + ["too_many_uploads"] * 15, codes  # (2 read, then the 2 next in line)
    refused = [r for r in responses if r.status_code == 429]
    assert all(1 <= int(r.headers["retry-after"]) <= 4 for r in refused)
    assert sum("the most this server takes from one client" in error(r)[1] for r in refused) == 1
    assert all("this client's other uploads held its 2" in error(r)[1] for r in refused
               if "the most this server takes" not in error(r)[1])
    assert files_in_flight(tight) == (0, 0)


def test_one_clients_slow_renders_hold_up_its_own_uploads_only(tight):
    """A new user's trial: 2 texts of one client whose rendering took the whole budget (single lines of CJK with
    Latin fragments, laid out again on every page) held every other client's upload until it ran out of time (2
    render threads, first come first served). Here such texts take one render thread, their client's share, and
    another client's pasted text and file are stored meanwhile."""
    slow = ("中文测试文本" + " ab cd\t") * 48_000  # ~6 s to render alone here: past the 4 s budget
    other = httpx.Client(timeout=120, transport=httpx.HTTPTransport(local_address="127.0.0.2"))  # another address
    with ThreadPoolExecutor(2) as pool:
        sent = [pool.submit(HTTP.post, f"{tight.url}/v1/documents", json={"text": f"{slow}{i}"}) for i in range(2)]
        deadline = time.monotonic() + 30
        while float(re.search(r"^glyphserve_upload_files_rendering (\S+)$", HTTP.get(f"{tight.url}/metrics").text,
                              re.M).group(1)) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        pasted = other.post(f"{tight.url}/v1/documents", json={"text": f"{STORY} (another client's)"})
        stored = other.post(f"{tight.url}/v1/documents", files={"file": ("other.txt", f"{STORY} (a file)".encode())})
        waited = time.monotonic() - started
        assert not all(future.done() for future in sent)  # the slow texts were still in flight
        responses = [future.result() for future in sent]
    assert pasted.status_code == 201 and stored.status_code == 201, (pasted.text, stored.text)
    assert waited < 3.5, waited  # (they waited for the slow texts' budget before: 4 s and more)
    # out of time, or (the second, behind the first in its client's line) refused for want of its turn
    assert {error(r)[0] for r in responses} <= {"ingest_timeout", "too_many_uploads"}


def test_upload_names_are_cleaned_and_the_raw_name_kept(server):
    raw = "../../etc/evil\x00name\x1b[31m" + "x" * 5000 + ".txt"
    boundary = "glyphserveboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{raw}"\r\n'
            f"Content-Type: text/plain\r\n\r\n{STORY} (a copy with a hostile name)\r\n--{boundary}--\r\n").encode()
    response = HTTP.post(f"{server.url}/v1/documents", content=body,
                         headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 201, response.text
    document = response.json()["document"]
    assert document["name"] == "evilname[31m" + "x" * 184 + ".txt"
    assert document["original_name"] == raw[:4096]


def test_a_quote_in_a_file_name_arrives_as_sent(server):
    """Browsers, curl and httpx send '"' in a form's file name as %22 (the HTML standard's escape): it was
    stored as "%22"."""
    response = HTTP.post(f"{server.url}/v1/documents",
                         files={"file": ('the "Q3" report.txt', f"{STORY} (quoted)".encode(), "text/plain")})
    assert response.status_code == 201, response.text
    assert response.json()["document"]["name"] == 'the "Q3" report.txt'
