"""The server's edge: what is refused before Gradio reads a request, and how the app is launched.

Gradio stores every input value of an event in the visitor's session before the app's own limits
run, so a large body costs memory even when it is refused later. `BodyCap` (ASGI middleware)
refuses a body over `limits.MAX_BODY_BYTES` from its Content-Length, or while it streams in without
one, with a one-line 413; `launch_options` passes it to Gradio's FastAPI app with the upload limit
and the bound on the sessions Gradio keeps (`limits.MAX_SESSIONS`, the least recently used dropped).
"""
from __future__ import annotations

import json

from starlette.middleware import Middleware

from cir.ui import limits


class BodyCap:
    """ASGI middleware: HTTP request bodies of at most `max_bytes`, else a one-line 413 before the app
    reads any of it. A body with a Content-Length is judged by it; one without (chunked) is read up to
    the limit first and handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": f"request body over the limit of {self.max_bytes // 2 ** 20} MB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def launch_options() -> dict:
    """The keyword arguments of `gr.Blocks.launch` that put the app's limits at the server's edge."""
    return {"max_file_size": limits.MAX_FILE_SIZE, "state_session_capacity": limits.MAX_SESSIONS,
            "app_kwargs": {"middleware": [Middleware(BodyCap, max_bytes=limits.MAX_BODY_BYTES)]}}
