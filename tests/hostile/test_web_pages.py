"""Case 6: a web page the user visits cannot drive the no-key loopback server (cross-site requests, DNS rebinding,
the UI framework's CORS), checked with plain HTTP and with a real browser on an attacker page."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import httpx
import pytest

from tests.serve.test_ui import ARGS, CHROMIUM
from tests.hostile.conftest import HTTP, error
from tests.servers import Server, free_port

ROUTES = ["/v1/documents", "/v1/chat/completions", "/v1/documents/0123456789abcdef0123456789abcdef/chat"]


def documents(server: Server) -> list[str]:
    return [d["id"] for d in HTTP.get(f"{server.url}/v1/documents").json()["documents"]]


def test_json_routes_refuse_what_a_page_can_send_without_asking(server):
    before = documents(server)
    for route in ROUTES:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            response = HTTP.post(server.url + route, content=b'{"text": "from a web page", "question": "q"}',
                                  headers=headers)
            assert response.status_code == 415, (route, content_type, response.text)
            assert "application/json" in response.text
    form = HTTP.post(f"{server.url}/v1/documents", files={"file": ("a.txt", b"from a web page")},
                      headers={"origin": "http://evil.example"})
    assert form.status_code == 403 and error(form)[0] == "cross_origin"
    assert documents(server) == before


def test_only_the_servers_own_host_names_are_answered(server):
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.nip.io", "[::ffff:7f00:1]:7860"):
        for path in ("/v1/documents", "/", "/health"):
            response = HTTP.get(server.url + path, headers={"host": host})
            assert response.status_code == 400 and error(response)[0] == "invalid_host", (host, path)
            assert "--allowed-hosts" in error(response)[1]
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}", "app.localhost"):
        assert HTTP.get(f"{server.url}/v1/documents", headers={"host": host}).status_code == 200, host


def test_the_api_is_closed_to_other_origins_unless_allowed(server, tmp_path):
    local_page = "http://localhost:3000"  # the UI framework's own CORS lets any localhost origin in
    preflight = HTTP.options(f"{server.url}/v1/chat/completions", headers={
        "origin": local_page, "access-control-request-method": "POST", "access-control-request-headers": "content-type"})
    assert preflight.status_code == 403 and not _cors(preflight)
    assert not _cors(HTTP.get(f"{server.url}/v1/documents", headers={"origin": local_page}))
    ui_post = HTTP.post(f"{server.url}/gradio_api/queue/join", json={}, headers={"origin": local_page})
    assert ui_post.status_code == 403

    opened = Server(tmp_path / "data", "--no-ui", "--allowed-origins", "https://app.example").start()
    try:
        preflight = HTTP.options(f"{opened.url}/v1/documents", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "content-type" in preflight.headers["access-control-allow-headers"]
        created = HTTP.post(f"{opened.url}/v1/documents", json={"text": "hello"},
                             headers={"origin": "https://app.example"})
        assert created.status_code == 201 and created.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in created.headers
        # a rename is a PATCH: the allowed methods named every method but it, so a page could not rename
        url = f"{opened.url}/v1/documents/{created.json()['id']}"
        preflight = HTTP.options(url, headers={"origin": "https://app.example", "access-control-request-method":
                                               "PATCH", "access-control-request-headers": "content-type"})
        methods = {m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")}
        assert {"GET", "POST", "PATCH", "DELETE"} <= methods
        renamed = HTTP.patch(url, json={"name": "notes"}, headers={"origin": "https://app.example"})
        assert renamed.status_code == 200 and renamed.json()["document"]["name"] == "notes"
        other = HTTP.post(f"{opened.url}/v1/documents", json={"text": "x"}, headers={"origin": "https://evil.example"})
        assert other.status_code == 403
    finally:
        opened.stop()


def _cors(response: httpx.Response) -> dict:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


ATTACK = """<!doctype html><title>cute cats</title><script>
const target = "TARGET";
async function attack() {
  const results = [];
  const attempt = async (name, request) => {
    try { const r = await request(); results.push(name + ":" + (r.type === "opaque" ? "sent" : r.status)); }
    catch (e) { results.push(name + ":blocked"); }
  };
  const body = JSON.stringify({text: "planted by a web page", question: "q", messages: [{role: "user", content: "q"}]});
  await attempt("text", () => fetch(target + "/v1/documents", {method: "POST", mode: "no-cors",
                                     headers: {"Content-Type": "text/plain"}, body}));
  await attempt("chat", () => fetch(target + "/v1/chat/completions", {method: "POST", mode: "no-cors", body}));
  const form = new FormData();
  form.append("file", new Blob(["planted by a web page"], {type: "text/plain"}), "planted.txt");
  await attempt("form", () => fetch(target + "/v1/documents", {method: "POST", mode: "no-cors", body: form}));
  await attempt("read", async () => { const r = await fetch(target + "/v1/documents", {credentials: "include"});
                                       results.push("listed:" + (await r.text()).length); return r; });
  await attempt("json", () => fetch(target + "/v1/documents", {method: "POST", credentials: "include",
                                     headers: {"Content-Type": "application/json"}, body}));
  document.title = "done " + results.join(" ");
}
attack();
</script>"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")
def test_an_attacker_page_in_a_real_browser_changes_and_reads_nothing(server, tmp_path):
    from playwright.sync_api import sync_playwright

    (tmp_path / "index.html").write_text(ATTACK.replace("TARGET", server.url))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    before = documents(server)
    try:
        with sync_playwright() as playwright:
            # evil.test resolves to loopback, as after a DNS rebinding.
            browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                 args=[*ARGS, "--host-resolver-rules=MAP evil.test 127.0.0.1"])
            try:
                page = browser.new_page()
                # A page on another local port: the UI framework's CORS would have let it in.
                page.goto(f"http://localhost:{attacker.server_address[1]}/index.html")
                page.wait_for_function("document.title.startsWith('done')", timeout=30_000)
                title = page.title()
                assert "read:blocked" in title and "listed:" not in title and "json:blocked" in title, title
                # After rebinding, the attacker's name points at the server: it answers nothing under that name.
                rebound = page.goto(f"http://evil.test:{server.port}/v1/documents")
                assert rebound.status == 400 and "invalid_host" in rebound.text()
                assert page.goto(f"http://evil.test:{server.port}/").status == 400
            finally:
                browser.close()
    finally:
        attacker.shutdown()
    assert documents(server) == before
