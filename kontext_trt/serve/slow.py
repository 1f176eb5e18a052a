"""Slow clients: a request's headers and its body must each arrive within --read-timeout seconds. Headers are
bounded by the HTTP protocol (a client that trickles them is disconnected), the body by an ASGI wrapper that answers
408 and closes the connection."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)
Message = dict[str, Any]
ASGIApp = Callable[[dict, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class ReadDeadline:
    """ASGI middleware: an HTTP request's body must be read within `timeout_s` of the request's start; past that,
    the app reads a disconnect and the client gets 408 (OpenAI's error shape, Connection: close) instead of
    whatever the app answered. Once the body is in, nothing is timed here (the edit has its own --timeout)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    def __getattr__(self, name: str) -> Any:  # the wrapped app's state, routes, ... (tests and Ray read them)
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = {"body_read": False, "timed_out": False, "answered": False}

        async def timed_receive() -> Message:
            if state["body_read"]:
                return await receive()
            if state["timed_out"]:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                state["timed_out"] = True
                log.info("%s %s: the body took over %gs to arrive: 408", scope["method"], scope["path"],
                         self.timeout_s)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_read"] = True
            return message

        async def checked_send(message: Message) -> None:
            if state["timed_out"]:  # the app answered a body it never got: answer 408 once, drop the rest
                if not state["answered"]:
                    state["answered"] = True
                    await send_408(send, self.timeout_s)
                return
            if message["type"] == "http.response.start":
                state["answered"] = True
            await send(message)

        try:
            await self.app(scope, timed_receive, checked_send)
        except Exception:  # the app failed on the disconnect it was handed (a JSON body cut short): that is the 408
            if not state["timed_out"]:
                raise
        if state["timed_out"] and not state["answered"]:
            await send_408(send, self.timeout_s)


async def send_408(send: Callable[[Message], Awaitable[None]], timeout_s: float) -> None:
    """408 in OpenAI's error shape; the connection closes after it (the rest of the body is never read)."""
    body = json.dumps({"error": {"message": f"the request body took over {timeout_s:g}s to arrive (--read-timeout): "
                                            "send it faster, or in one piece", "type": "invalid_request_error",
                                 "param": None, "code": "request_timeout"}}, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def header_deadline(protocol: type, timeout_s: float) -> type:
    """A subclass of uvicorn's HTTP protocol class (h11 or httptools) that closes a connection whose next request's
    headers are not complete within timeout_s of the connection opening or of the previous response (a trickling
    client, which keep-alive's idle timeout never catches: each byte resets it)."""

    class HeaderDeadline(protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            deadline = getattr(self, "header_deadline_task", None)
            if deadline is not None:
                deadline.cancel()
            super().connection_lost(exc)

        def arm_header_deadline(self) -> None:
            previous = getattr(self, "header_deadline_task", None)
            if previous is not None:
                previous.cancel()
            cycle = self.cycle
            self.header_deadline_task = self.loop.call_later(timeout_s, self.header_deadline_passed, cycle)

        def header_deadline_passed(self, cycle: object) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # no new request began: its headers are late
                log.info("a client sent no complete request headers within %gs: connection closed", timeout_s)
                self.transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{protocol.__name__}"
    return HeaderDeadline
