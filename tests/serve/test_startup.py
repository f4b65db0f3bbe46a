"""Starting ``glyphserve serve`` as a vLLM user would: what fails, how fast and with which message."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from glyphserve.cli import build_parser
from glyphserve.errors import ConfigError
from glyphserve.serve.commands import serve_config
from glyphserve.serve.config import model_id_name
from tests.serve.conftest import REPO, free_port

# A Hub that cannot be reached: a closed loopback port (no traffic leaves the machine).
OFFLINE = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9"}


def glyphserve(*args: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "glyphserve.cli", *args]
    # The old behaviour (the Hub client's retries) took over 30 s: a 20 s limit tells them apart.
    return subprocess.run(command, cwd=REPO, env=env or OFFLINE, capture_output=True, text=True, timeout=20)


def test_served_name_defaults_to_the_last_part_of_the_model_id():
    assert model_id_name("zai-org/Glyph") == "Glyph"
    assert model_id_name("/models/glyph-9b/") == "glyph-9b"
    assert model_id_name("tiny") == "tiny"


def test_an_endpoint_alone_means_the_openai_backend_as_for_ask_and_eval(tmp_path):
    parser, _ = build_parser(("glyphserve.serve.commands",))
    args = parser.parse_args(["serve", "--endpoint", "http://gpu1:8000/v1", "--data-dir", str(tmp_path)])
    config = serve_config(args)
    assert config.backend == "openai" and config.endpoints == ["http://gpu1:8000/v1"]
    config.validate()
    assert serve_config(parser.parse_args(["serve", "--data-dir", str(tmp_path)])).backend == "local"
    local = serve_config(parser.parse_args(["serve", "--backend", "local", "--endpoint", "http://gpu1:8000/v1"]))
    with pytest.raises(ConfigError, match="--endpoint needs --backend openai"):
        local.validate()


def test_quantize_without_a_model_is_refused(tmp_path):
    """The extractive backend has no weights: --quantize would be ignored without a word."""
    parser, _ = build_parser(("glyphserve.serve.commands",))
    config = serve_config(parser.parse_args(["serve", "--quantize", "fp8", "--data-dir", str(tmp_path)]))
    with pytest.raises(ConfigError, match="--quantize needs --model"):
        config.validate()


def test_the_context_flag_has_the_two_names_it_has_in_ask_batch_and_eval(tmp_path):
    parser, _ = build_parser(("glyphserve.serve.commands",))
    for flag in ("--max-model-len", "--max-context"):
        config = serve_config(parser.parse_args(["serve", "--data-dir", str(tmp_path), flag, "2048"]))
        assert config.max_model_len == 2048 and config.engine_config(None).max_context == 2048


def test_a_step_trace_is_bounded_and_only_for_a_local_engine(tmp_path):
    parser, _ = build_parser(("glyphserve.serve.commands",))

    def config(*args):
        return serve_config(parser.parse_args(["serve", "--data-dir", str(tmp_path), *args]))

    config("--step-trace", "1000").validate()
    with pytest.raises(ConfigError, match=r"--step-trace must be 0 to 1,000,000 steps"):
        config("--step-trace", "2000000").validate()
    with pytest.raises(ConfigError, match="--step-trace records a local engine's steps"):
        config("--step-trace", "10", "--endpoint", "http://gpu1:8000/v1").validate()


def test_an_offline_hub_id_fails_at_once_with_the_download_command(tmp_path):
    result = glyphserve("serve", "zai-org/Glyph", "--port", str(free_port()), "--data-dir", str(tmp_path),
                        env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr
    assert "hf download zai-org/Glyph --local-dir ./Glyph" in result.stderr
    assert "Traceback" not in result.stderr and "loading" not in result.stdout


def test_a_missing_folder_is_named(tmp_path):
    result = glyphserve("serve", str(tmp_path / "nowhere"), "--port", str(free_port()), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "no such folder" in result.stderr


def test_with_ray_a_missing_model_and_a_busy_port_are_one_line_before_ray_starts(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    missing = glyphserve("serve", "--ray", "--model", str(tmp_path / "no-model"), "--port", str(free_port()),
                         "--data-dir", str(tmp_path / "a"), "--no-ui")
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"error: {tmp_path / 'no-model'}: no such folder, and not a Hugging Face id (organisation/name)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = glyphserve("serve", "--ray", "--model", str(tiny_model_dir), "--port", str(port),
                           "--data-dir", str(tmp_path / "b"), "--no-ui")
    assert taken.returncode == 2 and taken.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "ray" not in (missing.stdout + taken.stdout).lower()  # Ray never started


def test_a_ray_address_where_nothing_listens_is_one_line_at_once(tmp_path, tiny_model_dir):
    """Ray's own connect retries such an address for minutes; both commands that join a cluster say so at once."""
    pytest.importorskip("ray")
    closed = free_port()  # nothing listens there
    served = glyphserve("serve", "--ray", f"127.0.0.1:{closed}", "--model", str(tiny_model_dir), "--port",
                        str(free_port()), "--data-dir", str(tmp_path / "a"), "--no-ui")
    (tmp_path / "doc.txt").write_text("A short document.")
    (tmp_path / "q.txt").write_text("What is it?\n")
    batched = glyphserve("batch", str(tmp_path / "doc.txt"), "--questions", str(tmp_path / "q.txt"), "-o",
                         str(tmp_path / "out.jsonl"), "--model", str(tiny_model_dir), "--ray",
                         f"ray://127.0.0.1:{closed}")
    for result, address in ((served, f"127.0.0.1:{closed}"), (batched, f"ray://127.0.0.1:{closed}")):
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().startswith(f"error: cannot join the Ray cluster at {address}: 127.0.0.1:"
                                                f"{closed} accepts no connection"), result.stderr


def test_a_busy_port_is_reported_before_the_weights_load(tmp_path, tiny_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = glyphserve("serve", str(tiny_model_dir), "--port", str(port), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr and "loading" not in result.stdout
    assert not (tmp_path / "data").exists()  # a server that cannot start leaves no data folder (and lock) behind


def test_two_different_models_are_refused(tmp_path):
    result = glyphserve("serve", "a/b", "--model", "c/d", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "two models given" in result.stderr


def test_missing_extras_give_one_line_with_the_pip_command(tmp_path):
    blocked = ("import sys; sys.modules['fastapi'] = None; from glyphserve.cli import main; "
               f"sys.exit(main(['serve', '--port', '{free_port()}', '--data-dir', {str(tmp_path)!r}]))")
    result = glyphserve(code=blocked)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: `glyphserve serve` needs the serve extra (fastapi is not installed): pip install 'glyphserve[serve]'"]


def test_ask_answers_extractively_without_a_model(tmp_path, capsys):
    from glyphserve.cli import main
    from tests.serve.conftest import STORY

    story = tmp_path / "keeper.txt"
    story.write_text(STORY, encoding="utf-8")
    assert main(["ask", str(story), "Which schooner hit the rocks?"]) == 0
    captured = capsys.readouterr()
    assert "schooner Albatross" in captured.out and "extractive" in captured.err
    assert main(["ask", str(story), "What was engraved?", "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    assert "for courage at sea" in result["text"] and result["prompt_tokens"] > 0 and result["new_tokens"] > 0


def test_a_data_folder_in_use_is_reported_before_the_weights_load(tmp_path, tiny_model_dir):
    from glyphserve.serve.store import DocumentStore

    held = DocumentStore(tmp_path / "data")  # the first server's store, here
    try:
        result = glyphserve("serve", str(tiny_model_dir), "--port", str(free_port()), "--data-dir",
                            str(tmp_path / "data"))
    finally:
        held.close()
    assert result.returncode == 2, result.stderr
    assert "is in use by another glyphserve server" in result.stderr and "loading" not in result.stdout
