"""The KubeRay examples under deploy/ are valid YAML and run commands that glyphserve's CLI accepts."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from glyphserve.cli import build_parser
from glyphserve.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _parse(command: str):
    words = shlex.split(command)
    assert words[0] == "glyphserve"
    parser, _ = build_parser()
    return parser.parse_args(words[1:])


def test_rayjob_runs_a_ray_batch():
    job = yaml.safe_load((DEPLOY / "rayjob-batch.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"].startswith("2.60")
    args = _parse(job["spec"]["entrypoint"])
    assert args.command == "batch" and args.ray == "auto" and args.model
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
               for group in workers)


def test_rayservice_builds_a_valid_glyphserve_config(monkeypatch):
    pytest.importorskip("ray")
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    [application] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = application["import_path"].partition(":")
    ray_serve = importlib.import_module(module)
    assert callable(getattr(ray_serve, name))
    monkeypatch.setenv("GLYPHSERVE_API_KEY", "secret")  # the manifest takes it from a secret
    config = ray_serve.config_from_args(application["args"])
    assert config.ray == "auto" and config.replicas == "auto" and config.max_replicas == 4
    assert str(config.data_dir) == "/data" and config.model == "zai-org/Glyph" and config.api_key == "secret"
    assert config.device == "cuda"  # a GPU per replica even before a GPU node is up
    monkeypatch.delenv("GLYPHSERVE_API_KEY")
    with pytest.raises(ConfigError, match="api-key"):
        ray_serve.config_from_args(application["args"])
    with pytest.raises(ConfigError, match="unknown glyphserve settings: gpus"):
        ray_serve.config_from_args({**application["args"], "gpus": "0,1"})


def test_the_image_leaves_out_the_checkouts_environments_and_users_documents():
    """``docker build -f deploy/Dockerfile .`` copies the repository: not its virtualenv (GBs), history, test output,
    or ``./data``, the server's default data folder (users' documents)."""
    ignored = set((DEPLOY.parent / ".dockerignore").read_text().split())
    assert {".git/", ".venv/", "/data/", "test-artifacts/", "**/__pycache__/"} <= ignored
    assert "COPY --chown=ray . /home/ray/glyphserve" in (DEPLOY / "Dockerfile").read_text()
