"""uvicorn's httptools protocol with the limits a public server needs and uvicorn lacks:

- request headers: at most ``max_header_bytes`` in all (request line included) and
  ``max_headers`` fields, else ``431`` in the server's JSON error shape, and the connection
  closes;
- a connection that sends nothing is closed after the keep-alive timeout (uvicorn only starts
  that timer after a first response, so idle connections that never sent a request stayed open);
- a request's headers must arrive within ``header_timeout`` seconds (slow-header clients);
- at most ``max_connections`` open connections; the next one gets ``503`` in the JSON shape
  (uvicorn's own ``limit_concurrency`` answers in plain text).

Build the class with :func:`guarded_protocol` and pass it to ``uvicorn.run(http=...)``; with
several workers, pass ``"cifarlab.serve.protocol:FromEnv"``, built from the settings that the
workers read from the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cifarlab.serve.settings import settings_from_env

__all__ = ["guarded_protocol"]


def __getattr__(name: str) -> Any:
    if name == "FromEnv":
        s = settings_from_env(dict(os.environ))
        return guarded_protocol(s.max_header_bytes, s.max_headers, s.header_timeout,
                                s.max_connections)
    raise AttributeError(name)


def guarded_protocol(max_header_bytes: int, max_headers: int, header_timeout: float,
                     max_connections: int = 1024) -> type[asyncio.Protocol]:
    class GuardedHttpTools(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._refusal: tuple[int, str] | None = None
            self._header_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                self._send_error(503, f"More than {max_connections} open connections "
                                      "(`cifarlab serve --max-connections`); retry shortly.")
                return
            # idle from the start: closed after the keep-alive timeout unless a request begins
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            self._header_count = 0
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_too_slow)

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count > max_headers:
                self._refusal = (431, f"More than {max_headers} request header fields "
                                      "(`cifarlab serve --max-headers`).")
                raise ValueError(self._refusal[1])
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._stop_header_timer()
            super().on_headers_complete()

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > max_header_bytes:
                self._refusal = (431, f"Request headers are larger than {max_header_bytes} "
                                      "bytes (`cifarlab serve --max-header-kb`).")
                raise ValueError(self._refusal[1])

        def _stop_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _header_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self._send_error(408, f"Request headers did not arrive within "
                                      f"{header_timeout:g} s.")

        def send_400_response(self, msg: str) -> None:
            status, message = self._refusal or (400, f"Malformed HTTP request: {msg}")
            self._send_error(status, message)

        def _send_error(self, status: int, message: str) -> None:
            body = json.dumps({"error": message, "status": status}).encode()
            reason = {400: "Bad Request", 408: "Request Timeout",
                      431: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
            head: list[Any] = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.append(b"content-type: application/json\r\ncontent-length: "
                        + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n")
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return GuardedHttpTools
