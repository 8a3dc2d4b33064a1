"""Request bodies: the per-request limit, enforced while a body streams in, and the budget for all
bodies in flight at once."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifarlab.serve.budget import ByteBudget
from cifarlab.serve.errors import TooLarge, error_body, too_large_message

__all__ = ["BODY_COPIES", "BodyBudget", "BodyLimit", "PathGuard", "declared_too_large",
           "limit_receive"]

BODY_COPIES = 2  # a body is held as received, and once more as its parts (multipart, v2)


def declared_too_large(headers: dict[bytes, bytes], max_bytes: int) -> bool:
    """Whether the Content-Length header (if any) already says the body is over the limit."""
    declared = headers.get(b"content-length")
    return declared is not None and declared.isdigit() and int(declared) > max_bytes


def limit_receive(receive: Receive, max_bytes: int) -> Receive:
    """``receive`` that raises :class:`TooLarge` once the body chunks pass ``max_bytes``, for
    bodies sent without (or with a false) Content-Length."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise TooLarge
        return message

    return limited


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 while they stream in: from the
    Content-Length header when there is one, else by counting chunks, so an oversized upload is
    never spooled to disk."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        if declared_too_large(dict(scope["headers"]), self.max_bytes):
            await self._refuse(send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limit_receive(receive, self.max_bytes), tracking_send)
        except TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = error_body(413, too_large_message(self.max_bytes))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class BodyBudget:
    """Hold ``BODY_COPIES`` × the body's size (its Content-Length, else the upload limit) of the
    in-flight upload budget (``--max-inflight-upload-mb``) from before the body is read until the
    response is sent. Requests over the budget wait their turn, unread (TCP pushes back on the
    client), so the bodies held at once never exceed the budget, however many clients send."""

    def __init__(self, app: ASGIApp, budget: ByteBudget, max_bytes: int):
        self.app, self.budget, self.max_bytes = app, budget, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else self.max_bytes
        cost = BODY_COPIES * min(size, self.max_bytes) + 4096
        async with self.budget.hold(min(cost, self.budget.capacity)):
            await self.app(scope, receive, send)


class PathGuard:
    """400 for a malformed request path: control characters (a NUL byte among them), bytes that
    are not UTF-8 once percent-decoded, or more than 2,048 characters. Such a path names nothing
    on this server, and passing it on only invites 500s further down (file systems refuse NUL)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _path_problem(scope.get("raw_path") or scope["path"].encode())
            if problem:
                body = error_body(400, f"Malformed request path: {problem}.")
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _path_problem(raw: bytes) -> str | None:
    if len(raw) > 2048:
        return "longer than 2048 characters"
    path = unquote_to_bytes(raw)
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 once percent-decoded"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "it contains a control character"
    return None
