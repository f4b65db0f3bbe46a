"""Ray, for the commands that reach beyond one machine (``batch --ray``, ``serve --ray``).

Ray is the optional extra ``glyphserve[cluster]``. ``connect("local")`` starts a Ray instance on this
machine for the command's lifetime; any other address (``auto``, ``ray://head:10001``, ``head:6379``) joins
a running cluster, whose nodes must have glyphserve installed (and see the input paths of a batch).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from glyphserve.errors import ConfigError, MissingExtraError


def require_ray():
    """The ``ray`` module, or a clear error when the extra is missing."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError("Ray is not installed (the cluster extra): pip install 'glyphserve[cluster]'") from None
    return ray


def connect(address: str, *, min_cpus: int = 1) -> Callable[[], None]:
    """Start (``local``) or join (an address) Ray; returns what disconnects again. A process already
    connected (a test, a notebook) is used as it is and stays connected.

    A local instance gets at least ``min_cpus`` logical CPUs, so actors that hold a CPU each (CPU engines)
    leave one for the tasks that feed them."""
    ray = require_ray()
    if ray.is_initialized():
        return lambda: None
    # Ray's own log lines go to its session folder; the command prints what the user needs.
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "local":
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), **options)
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return ray.shutdown


# Seconds a cluster's address has to accept a TCP connection: Ray's own connect retries an address where nothing
# listens for minutes (its GCS client waits 60 s a round, then tries again).
REACH_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """Fail at once when ``address`` names a host and port (``head:6379``, ``ray://head:10001``) that accepts no
    connection; ``auto`` and other forms are left to Ray."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or (":" in host and not host.startswith("[")):
        return  # no port, or an IPv6 address without brackets (which part is the port?)
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConfigError(f"cannot join the Ray cluster at {address}: {host}:{port} accepts no connection "
                          f"({reason}); is the head node up (ray start --head) and the port open?") from None


def cluster_gpus() -> int:
    """GPUs the connected cluster has (0 on CPU-only clusters)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
