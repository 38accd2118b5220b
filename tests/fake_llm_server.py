"""A small OpenAI-compatible chat-completions server for tests, on 127.0.0.1 with an ephemeral port.

It answers cir.synth's prompts from CIR-Shapes scene metadata: the images arrive as base64 data
URLs and are looked up by content hash, the earlier steps' object lists are read back from the
prompt (the JSON lines that begin with {"objects", the answer example aside), and `SceneBackend.answer` writes the reply.
`faults` scripts the replies to the first requests, one entry per request:
None (a normal answer), "malformed" (not JSON), "429" (with Retry-After), "500", "slow" (the
answer after `slow` seconds, beyond the client's timeout), "401".
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cir.synth.backends import SceneBackend

STEP_INPUTS = ("reference_objects", "target_objects")


class FakeLLM:
    def __init__(self, scenes: SceneBackend, faults=(), retry_after: float = 1.0, slow: float = 2.0):
        self.scenes, self.faults, self.retry_after, self.slow = scenes, list(faults), retry_after, slow
        self.requests: list[tuple[float, dict, str]] = []  # (arrival time, body, reply kind)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeLLM":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, body: dict) -> str:
        """The assistant's answer to a chat-completions request body."""
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        hashes = [hashlib.sha256(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])).hexdigest()
                  for p in parts if p["type"] == "image_url"]
        lists = [json.loads(line)["objects"] for line in text.splitlines()
                 if line.startswith('{"objects"') and '"..."' not in line]  # not the prompt's answer example
        return self.scenes.answer(f"step{len(lists) + 1}", hashes, dict(zip(STEP_INPUTS, lists)))

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    kind = fake.faults.pop(0) if fake.faults else None
                    fake.requests.append((time.monotonic(), body, kind))
                if kind == "429":
                    return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": str(fake.retry_after)})
                if kind in ("500", "401"):
                    return self._send(int(kind), {"error": {"message": f"fake {kind}"}})
                if kind == "slow":
                    time.sleep(fake.slow)
                content = "Sure! Here is the JSON: {oops" if kind == "malformed" else fake.reply(body)
                try:
                    self._send(200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}]})
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                    pass

        return Handler
