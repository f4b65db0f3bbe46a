"""Where a model's weights are: a local folder, the Hugging Face cache, or the Hub (when it can be reached).

Checked before anything slow (importing torch, loading weights, binding the UI), so a missing model fails in
well under two seconds with the command that fetches it, instead of after the Hub client's retries.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from glyphserve.engine.types import NOT_A_MODEL, is_hub_id
from glyphserve.errors import ModelLoadError

HUB_PROBE_S = 1.5


def locate_weights(name: str) -> tuple[Path | None, str]:
    """The folder holding ``config.json`` and safetensors weights for ``name``, or why there is none."""
    path = Path(name).expanduser()
    if path.exists():
        return (path, "") if _complete(path) else (None, f"{path} lacks config.json or *.safetensors weights")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, local_files_only=True))
    except ImportError:
        return None, "not a local folder, and huggingface_hub is not installed to look in its cache"
    except Exception:
        return None, "not a local folder and not in the Hugging Face cache"
    if _complete(folder):
        return folder, ""
    return None, f"only partly in the Hugging Face cache ({folder})"


def resolve_model(name: str) -> str:
    """What to load for ``name``: a complete local folder (a cached Hub model as its snapshot folder, so
    loading never goes to the network), or the Hub id itself when the Hub can be reached to download it."""
    folder, problem = locate_weights(name)
    if folder is not None:
        return str(folder)
    if Path(name).expanduser().exists() or not is_hub_id(name):
        raise ModelLoadError(f"{name}: {problem}" if Path(name).expanduser().exists() else f"{name}: {NOT_A_MODEL}")
    endpoint = _hub_endpoint()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or not _reachable(endpoint):
        local = "./" + name.rsplit("/", 1)[-1]
        raise ModelLoadError(
            f"{name} is not in the Hugging Face cache and {endpoint} cannot be reached from here. On a machine with "
            f"network run `hf download {name} --local-dir {local}`, copy {local} here, and give that folder "
            f"instead of {name} (e.g. `glyphserve serve {local}`, `--model {local}`)"
        )
    return name


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _reachable(url: str, timeout: float = HUB_PROBE_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` (name lookup included: it runs in a
    thread because ``getaddrinfo`` takes no timeout)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                opened.append(True)
        except (OSError, TypeError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))
