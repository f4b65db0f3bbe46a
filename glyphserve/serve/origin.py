"""Same-origin protection: a web page the user visits must not be able to drive the server.

Pure ASGI, outermost, on every route (the UI's too):

- The ``Host`` header must name this server (``--allowed-hosts``; by default loopback names and addresses, plus
  ``--host`` when it is one specific address): a DNS-rebinding page reaches 127.0.0.1 under its own name.
- A request that changes something (POST, PUT, PATCH, DELETE, a WebSocket) and carries an ``Origin`` must come
  from this server's own origin or one of ``--allowed-origins``: browsers send ``Origin`` with every cross-site
  POST, including the form posts and ``text/plain`` fetches that need no preflight. Clients that are not
  browsers send none and pass.
- CORS on the API (``/v1``, ``/metrics``, ``/health``) is closed unless ``--allowed-origins`` opens it: this
  guard answers the API's preflights itself and drops any ``Access-Control-*`` header others add (the UI
  framework's own CORS allows every localhost origin, with credentials).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from glyphserve.errors import GlyphserveError
from glyphserve.serve.errors import CrossOriginError, HostNotAllowedError

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = ("localhost", "ip6-localhost")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
_ALLOWED_HEADERS = b"authorization, content-type"
_ALLOWED_METHODS = b"GET, POST, PATCH, DELETE, OPTIONS"  # every method a route of the API takes


@dataclass(frozen=True)
class OriginPolicy:
    hosts: frozenset[str] | None  # allowed Host names (lowercase, no port, no brackets); None: any
    origins: frozenset[str]  # allowed cross origins ("scheme://host[:port]", lowercase); "*": any

    @classmethod
    def build(cls, bind_host: str, allowed_hosts: list[str], allowed_origins: list[str]) -> OriginPolicy:
        """Hosts: ``allowed_hosts`` if given ("*": any), else loopback names plus ``bind_host`` when it is one
        specific address (a wildcard bind, which needs an API key, accepts any Host)."""
        if "*" in allowed_hosts or (not allowed_hosts and bind_host in WILDCARD_ADDRESSES):
            hosts = None
        elif allowed_hosts:
            hosts = frozenset(_hostname(h) for h in allowed_hosts)
        else:
            hosts = frozenset({*LOOPBACK_NAMES, _hostname(bind_host)})
        return cls(hosts, frozenset(o.lower().rstrip("/") for o in allowed_origins))

    def host_allowed(self, host: str) -> bool:
        if self.hosts is None:
            return True
        name = _hostname(host)
        if name in self.hosts or name.endswith(".localhost"):  # *.localhost always resolves to loopback
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Same origin as the Host it was sent to, or one allowed across origins."""
        origin = origin.lower().rstrip("/")
        scheme, _, netloc = origin.partition("://")
        return (scheme in ("http", "https") and netloc == host.lower()) or self.cross_allowed(origin)

    def cross_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.lower().rstrip("/") in self.origins


def _hostname(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` to the bare lowercase name or address."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host  # a name, or an IPv6 address without brackets


def is_api_path(path: str) -> bool:
    """The API's routes (the UI's are everything else; ``/health`` is neither), by ``route_path``."""
    return path in ("/metrics", "/v1") or path.startswith("/v1/")


def route_path(scope) -> str:
    """A request's path as the app's routes see it: without the prefix the app is mounted or proxied under (ASGI's
    ``root_path``, which the path starts with). Mounted at /glyph, the API's checks took /glyph/v1/... for a path
    of the web UI's, and its key was not asked for."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


SendError = Callable[[Callable, GlyphserveError, dict], Awaitable[None]]


class OriginGuard:
    def __init__(self, app, policy: OriginPolicy, send_error: SendError):
        self.app = app
        self.policy = policy
        self.send_error = send_error

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1") or None
        method = scope.get("method", "GET")
        refusal = None
        if not self.policy.host_allowed(host):
            refusal = HostNotAllowedError(
                f"this server does not answer to the host name {host!r}; allow it with --allowed-hosts"
            )
        elif origin is not None and (scope["type"] == "websocket" or method in UNSAFE_METHODS) \
                and not self.policy.origin_allowed(origin, host):
            refusal = CrossOriginError(
                f"requests from the web origin {origin!r} are not accepted; allow it with --allowed-origins"
            )
        path = route_path(scope)
        api = is_api_path(path) or path == "/health"
        if refusal is None and api and method == "OPTIONS" and origin is not None:
            return await self._preflight(send, origin)
        if refusal is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await self.send_error(send, refusal, scope)
        if not api:
            return await self.app(scope, receive, send)
        allow = origin is not None and self.policy.cross_allowed(origin)

        async def send_cors(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                if allow:
                    kept += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, send_cors)

    async def _preflight(self, send, origin: str) -> None:
        if self.policy.cross_allowed(origin):
            status, headers = 204, [
                (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-allow-methods", _ALLOWED_METHODS),
                (b"access-control-allow-headers", _ALLOWED_HEADERS), (b"access-control-max-age", b"600"),
            ]
        else:
            status, headers = 403, [(b"vary", b"Origin")]  # no CORS headers: the browser stops here
        await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
