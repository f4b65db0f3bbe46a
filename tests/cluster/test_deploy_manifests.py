"""The KubeRay examples under deploy/ are valid YAML and run commands that glyphserve's CLI accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from glyphserve.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _parse(command: str):
    words = shlex.split(command)
    assert words[0] == "glyphserve"
    return build_parser().parse_args(words[1:])


def test_rayjob_runs_a_ray_batch():
    job = yaml.safe_load((DEPLOY / "rayjob-batch.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"].startswith("2.60")
    args = _parse(job["spec"]["entrypoint"])
    assert args.command == "batch" and args.ray == "auto" and args.model
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
               for group in workers)
