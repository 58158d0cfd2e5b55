"""The engine servers' API key: SGLang's `--api-key`, checked and sent as SGLang does.

A server started with `--api-key KEY` answers 401 `{"error": "Unauthorized"}` to any
request whose `Authorization` header is not exactly `Bearer KEY`, except the health
checks (paths under `/health`: `/health` and `/health_generate`), which stay open as in
SGLang so that launchers and load balancers can poll them. Clients (HTTPEngine, the
router, weight pushes) send the header on every request when they hold a key.

Which key a run uses (`run_api_key`): the user's `--sglang-api-key` if given; else, for
servers that listen beyond the loopback interface (Ray places them on node addresses),
a random key that only this run knows; else none (a server on 127.0.0.1 is reachable from
this machine only).
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket

from aiohttp import web

OPEN_PREFIX = "/health"
FLAG = "--api-key"


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The request headers that carry `api_key` (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def is_authorized(path: str, authorization: str | None, api_key: str | None) -> bool:
    """Whether a request to `path` with this Authorization header may proceed."""
    if not api_key or path.startswith(OPEN_PREFIX):
        return True
    # compare_digest: the time taken does not tell how much of a guess was right.
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {api_key}".encode())


def api_key_middleware(api_key: str):
    """An aiohttp middleware that refuses requests without the key (401)."""
    @web.middleware
    async def require_api_key(request: web.Request, handler):
        if not is_authorized(request.path, request.headers.get("Authorization"), api_key):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)
    return require_api_key


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address) resolves to the loopback interface only."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def run_api_key(user_key: str | None, host: str) -> str | None:
    """The key of the engine servers that bind `host`: the user's, else a fresh random one
    when `host` is reachable from other machines, else None."""
    if user_key:
        return user_key
    # Hex, not urlsafe base64: a key that starts with "-" reads as a flag on the
    # servers' command line (`--api-key -x...`) and the server refuses to start.
    return None if is_loopback(host) else secrets.token_hex(32)


def redacted(argv: list[str]) -> list[str]:
    """`argv` with the value of --api-key hidden, for logs and error messages."""
    shown = list(argv)
    for i, token in enumerate(shown):
        if token == FLAG and i + 1 < len(shown):
            shown[i + 1] = "***"
        elif token.startswith(FLAG + "="):
            shown[i] = FLAG + "=***"
    return shown
