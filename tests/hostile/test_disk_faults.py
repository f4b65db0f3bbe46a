"""Case 7: disk faults give clear codes and lose nothing. The server runs in a private mount namespace on a small
tmpfs (a real full disk, real read-only remounts); without the right to mount, those tests are skipped."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.hostile.conftest import error
from tests.servers import REPO, Server, free_port

PAGE_TEXT = "\n".join(f"Line {i}: the keeper climbed the ninety-seven steps to light the lamp." for i in range(900))


def _namespace_prefix() -> tuple[list[str], list[str]] | None:
    """(command prefix, nsenter flags) to run a program in a private mount namespace where it may mount tmpfs."""
    candidates = [(["unshare", "--mount", "--propagation", "private"], ["-m"]),
                  (["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"], ["-U", "-m"])]
    for prefix, enter in candidates:
        try:
            probe = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', "/tmp"],
                                   capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix, enter
    return None


NAMESPACE = _namespace_prefix()
needs_mounts = pytest.mark.skipif(NAMESPACE is None, reason="cannot mount a tmpfs in a private mount namespace here")


class TmpfsServer(Server):
    """A server whose data folder is a tmpfs of ``size`` (e.g. "6m"), mounted in its own mount namespace."""

    def __init__(self, data_dir, size: str, *args: str, options: str = ""):
        super().__init__(data_dir, "--no-ui", *args)
        self.mount_options = f"size={size}{',' + options if options else ''}"
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        mount = f'mount -t tmpfs -o {self.mount_options} tmpfs "$0" && exec "$@"'
        return [*NAMESPACE[0], "sh", "-c", mount, str(self.data_dir), *super().command()]

    def inside(self, *command: str) -> subprocess.CompletedProcess:
        """Run a command in the server's mount namespace (where its tmpfs is)."""
        return subprocess.run(["nsenter", "-t", str(self.process.pid), *NAMESPACE[1], *command],
                              capture_output=True, text=True, timeout=30, check=True)


def _upload(client: httpx.Client, text: str) -> httpx.Response:
    return client.post("/v1/documents", json={"text": text})


def _intact(client: httpx.Client, ids: list[str]) -> None:
    listed = {d["id"]: d for d in client.get("/v1/documents").json()["documents"]}
    assert set(ids) <= set(listed)
    for doc_id in ids:
        for page in range(1, listed[doc_id]["pages"] + 1):
            assert client.get(f"/v1/documents/{doc_id}/pages/{page}.png").status_code == 200


@needs_mounts
def test_a_full_disk_gets_507_and_loses_nothing(tmp_path):
    server = TmpfsServer(tmp_path / "data", "3m").start()
    try:
        with server.client() as client:
            stored, response = [], None
            for i in range(200):
                response = _upload(client, f"Document {i}.\n{PAGE_TEXT}")
                if response.status_code != 201:
                    break
                stored.append(response.json()["id"])
            assert response.status_code == 507, response.text
            assert error(response)[0] == "storage_full" and "full" in error(response)[1]
            assert stored and client.get("/health").status_code == 200
            _intact(client, stored)
            assert ".tmp-" not in server.inside("ls", "-A", str(server.data_dir / "docs")).stdout
            # Every byte taken (as by another program): a delete still frees room (it gave 507, the index's log
            # had no room to drop the row), with the reserve the store keeps for it, made again after.
            filler = str(server.data_dir / "filler")
            server.inside("sh", "-c", f'dd if=/dev/zero of="{filler}" bs=64k 2>/dev/null; true')
            assert _upload(client, "A short note.").status_code == 507
            deleted = client.delete(f"/v1/documents/{stored.pop()}")
            assert deleted.status_code == 200, deleted.text
            reserve = server.inside("stat", "-c", "%s", str(server.data_dir / ".reserve")).stdout.strip()
            assert reserve == "1048576"  # made again from the room the delete freed
            server.inside("sh", "-c", f'dd if=/dev/zero of="{filler}-2" bs=4k 2>/dev/null; true')
            assert client.delete(f"/v1/documents/{stored.pop()}").status_code == 200  # full again: the reserve's
            server.inside("rm", filler)
            assert _upload(client, "A short note.").status_code == 201
            _intact(client, stored)
    finally:
        server.stop()


@needs_mounts
def test_a_read_only_documents_folder_refuses_writes_and_a_delete_changes_nothing(tmp_path):
    server = TmpfsServer(tmp_path / "data", "16m").start()
    docs = str(server.data_dir / "docs")
    try:
        with server.client() as client:
            kept = _upload(client, PAGE_TEXT).json()["id"]
            # Only the documents folder read-only (the index stays writable): the delete used to answer 200.
            server.inside("mount", "--bind", docs, docs)
            server.inside("mount", "-o", "remount,bind,ro", docs)
            refused = client.delete(f"/v1/documents/{kept}")
            assert refused.status_code == 503 and error(refused)[0] == "storage_unavailable"
            assert f"could not delete document {kept}" in error(refused)[1]
            assert "Read-only file system" in error(refused)[1]
            upload = _upload(client, "More text.")
            assert upload.status_code == 503 and error(upload)[0] == "storage_unavailable"
            _intact(client, [kept])
            answer = client.post(f"/v1/documents/{kept}/chat", json={"question": "How many steps?"})
            assert answer.status_code == 200 and "ninety-seven" in answer.json()["answer"]
            server.inside("umount", docs)
            assert client.delete(f"/v1/documents/{kept}").status_code == 200
            assert client.get(f"/v1/documents/{kept}").status_code == 404
            assert server.inside("ls", "-A", docs).stdout.strip() == ""  # nothing left behind
    finally:
        server.stop()


def _start_fails(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _serve(data_dir) -> list[str]:
    return [sys.executable, "-m", "glyphserve.cli", "serve", "--port", str(free_port()), "--data-dir", str(data_dir)]


def test_starting_where_the_data_folder_cannot_be_made_is_one_error_line(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = _start_fails(_serve(tmp_path / "a-file" / "data"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: could not use")


@needs_mounts
def test_starting_on_a_read_only_data_folder_is_one_error_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    mount = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
    result = _start_fails([*NAMESPACE[0], "sh", "-c", mount, str(data), *_serve(data)])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: could not use the data folder") and "Read-only file system" in result.stderr
