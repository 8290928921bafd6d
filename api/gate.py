"""The gate every request passes before its body is read: a `/v1` request needs a known
bearer token, and no body may pass the size limit (a declared Content-Length over it is
refused at once; a chunked body is counted as it arrives and refused when it passes).

An ASGI middleware, so that nothing (multipart spooling to disk included) reads a byte of
the body of a request that will be refused.
"""

from __future__ import annotations

import json

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Tenants

__all__ = ["Gate"]


class _TooLarge(Exception):
    """Raised inside `receive` when a body passes the limit as it streams."""


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    # The client may still be sending a body nobody will read: end the connection after.
    head += [(b"connection", b"close"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Gate:
    def __init__(self, app: ASGIApp, tenants: Tenants, max_body: int) -> None:
        self.app = app
        self.tenants = tenants
        self.max_body = max_body

    def _too_large(self) -> str:
        return f"request body over {self.max_body} bytes (ACTMAP_MAX_BODY_BYTES); send less"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            scheme, token = get_authorization_scheme_param(headers.get("authorization"))
            if self.tenants.lookup(token if scheme.lower() == "bearer" else None) is None:
                await _answer(
                    send, 401,
                    "missing or unknown bearer token; send Authorization: Bearer TOKEN",
                    [(b"www-authenticate", b"Bearer")],
                )  # fmt: skip
                return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _answer(send, 413, self._too_large(), [])
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        over = started = replaced = False

        async def counting() -> Message:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                over = True
                raise _TooLarge
            return message

        async def sending(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if over and not started:  # whatever the app made of the cut body: 413
                replaced = True
                await _answer(send, 413, self._too_large(), [])
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, sending)
        except _TooLarge:
            if started:
                raise
            if not replaced:
                await _answer(send, 413, self._too_large(), [])
        if over:
            await self._drain(receive)

    async def _drain(self, receive: Receive) -> None:
        """Read and drop up to the limit again of what the client is still sending, so that
        closing on unread bytes (a TCP reset) does not destroy the answer before it is read."""
        dropped = 0
        while dropped <= self.max_body:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            dropped += len(message.get("body", b""))
