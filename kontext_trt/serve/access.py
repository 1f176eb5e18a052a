"""Who may call the server, checked before any route runs: the Host header (DNS rebinding), the Origin of requests
that change state (cross-site POSTs from other pages), the API key (Authorization: Bearer, compared in constant
time), and how many body bytes a request may send (counted while it arrives). One ASGI middleware; its refusals
are in OpenAI's error shape."""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from kontext_trt.serve.forms import size_text
from kontext_trt.serve.openai_api import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = frozenset({"/healthz", "/"})  # the liveness probe and the static page (it sends the key itself)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_BYTES = 2**20  # any body but an upload: JSON requests are a few KiB
DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def is_loopback(host: str) -> bool:
    """Whether a bind address answers this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, str | None]:
    """A Host header (or --allowed-hosts entry) as (name, port or None): example.com:8000, [::1]:8000, ::1."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, port = value.split(":")
        return name, port
    return value, None


def host_allowed(value: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this server: an entry NAME matches it on any port, NAME:PORT on that port,
    *.DOMAIN any subdomain; no entries or "*": any Host."""
    if not allowed or "*" in allowed:
        return True
    if not value:
        return False
    name, port = split_host(value)
    for entry in allowed:
        want, want_port = split_host(entry)
        if want_port is not None and want_port != port:
            continue
        if name == want or (want.startswith("*.") and name.endswith(want[1:])):
            return True
    return False


def same_origin(origin: str, host: str | None) -> bool:
    """Whether an Origin header names the server the request reached (its Host header), default ports filled in."""
    parts = urlsplit(origin)
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc or not host:
        return False
    name, port = split_host(parts.netloc)
    host_name, host_port = split_host(host)
    default = DEFAULT_PORTS[parts.scheme]
    return (name, port or default) == (host_name, host_port or default)


def authorized(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries `Bearer <key>`, compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    return hmac.compare_digest(token.strip().encode(), key.encode()) and scheme.lower() == "bearer"


@dataclass(frozen=True)
class Access:
    """The server's access settings: API key (None: none asked), Host names (empty or "*": any), CORS origins, and
    the body cap of each path (others get BODY_BYTES)."""

    api_key: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    cors_origins: tuple[str, ...] = ()
    body_caps: dict[str, int] = field(default_factory=dict)

    def refusal(self, method: str, path: str, headers: Headers) -> ApiError | None:
        """Why a request may not reach the app (None: it may)."""
        host = headers.get("host")
        if not host_allowed(host, self.allowed_hosts):
            return ApiError(400, f"Host {host!r} is not a name this server answers to: use its address, or start it "
                            "with --allowed-hosts naming this host", code="invalid_host", param="Host")
        origin = headers.get("origin")
        if (method not in SAFE_METHODS and origin is not None and origin not in self.cors_origins
                and "*" not in self.cors_origins and not same_origin(origin, host)):
            return ApiError(403, f"cross-origin requests from {origin[:100]!r} are refused: a page of another site "
                            "may not run edits here (start the server with --cors-origin ORIGIN to allow one)",
                            code="forbidden_origin", param="Origin")
        if self.api_key is not None and path not in PUBLIC_PATHS and not authorized(headers.get("authorization"),
                                                                                      self.api_key):
            missing = headers.get("authorization") is None
            return ApiError(401, ("no API key given: send the header Authorization: Bearer KEY" if missing else
                                  "incorrect API key: send the server's key as Authorization: Bearer KEY"),
                            code="invalid_api_key", param="Authorization", headers={"WWW-Authenticate": "Bearer"})
        return None

    def too_large(self, path: str, cap: int) -> ApiError:
        """The 413 of a body over its path's cap (an upload's: its image is what is too large)."""
        if path in self.body_caps:
            return ApiError(413, f"the request body is over {size_text(cap)}: send a smaller image (this server's "
                            "upload limit) with short fields", code="file_too_large", param="image")
        return ApiError(413, f"the request body is over {size_text(cap)}: send a smaller request",
                        code="request_too_large")


class Guard:
    """ASGI middleware: refuses what Access refuses, a declared Content-Length over the cap at once, and a body
    that grows over the cap while it is read (the route's read raises the 413)."""

    def __init__(self, app: Callable[..., Awaitable[None]], access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path = scope["path"]
        cap = self.access.body_caps.get(path, BODY_BYTES)
        refusal = self.access.refusal(scope["method"], path, headers)
        length = headers.get("content-length", "")
        if refusal is None and length.strip().isdigit() and int(length) > cap:
            refusal = self.access.too_large(path, cap)
        if refusal is not None:
            response = JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)
            return await response(scope, receive, send)
        received = 0

        async def capped() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise self.access.too_large(path, cap)
            return message

        await self.app(scope, capped, send)
