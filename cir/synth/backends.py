"""The pipeline's LLM backends. Each has `name`, `model` and `complete(Request) -> str`, the answer text.

- `OpenAIBackend`: any OpenAI-compatible chat-completions server (OpenAI's GPT-4o, vLLM, Ollama):
  the prompt and the images (base64 data URLs) in one user message; request timeout; backs off on
  429 (honouring Retry-After) and, exponentially with jitter, on 5xx, 408 and timeouts. Other 4xx
  answers and an unreachable server stop the run with a one-line error (a rerun resumes).
- `SceneBackend`: offline, for CIR-Shapes pairs. It plays the LLM: it "sees" an image by looking its
  content hash up in the scenes carried by the pairs' meta, reads the earlier steps' object lists
  from the request (`Request.inputs`, the JSON the prompt embeds) and answers with JSON text.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import json
import mimetypes
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from cir.atomic import sha256_file
from cir.data.shapes.captions import TEMPLATES, CaptionBuilder, phrase_operation
from cir.data.shapes.scene import CELLS, Obj, Operation, Scene
from cir.errors import UserError


@dataclass(frozen=True)
class Request:
    step: str  # "step1", "step2" or "step3"
    prompt: str  # the full prompt text
    images: tuple[str, ...]  # image paths, sent after the text
    inputs: dict  # the earlier steps' object lists the prompt embeds, for offline backends


class BadAnswer(Exception):
    """An LLM answer that is not JSON, breaks the step's schema or contradicts earlier steps."""


class PairFailed(Exception):
    """A pair got no valid answer within the attempts allowed; it is left out (a rerun retries it)."""


@lru_cache(maxsize=None)
def image_hash(path: str) -> str:
    return sha256_file(path)


# ----------------------------------------------------------------------------- OpenAI-compatible HTTP

class OpenAIBackend:
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_attempts: int = 4, json_mode: bool = False, backoff: float = 1.0, max_backoff: float = 60.0):
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"--base-url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout, self.max_attempts = model, api_key, timeout, max_attempts
        self.json_mode, self.backoff, self.max_backoff = json_mode, backoff, max_backoff

    def body(self, request: Request) -> dict:
        content = [{"type": "text", "text": request.prompt}]
        content += [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in request.images]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def complete(self, request: Request) -> str:
        data = json.dumps(self.body(request)).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        for attempt in range(1, self.max_attempts + 1):
            delay = None
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data, headers), timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                if e.code not in (408, 429) and e.code < 500:
                    raise UserError(f"{self.url} answered HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
                why, delay = f"HTTP {e.code}", retry_after(e.headers.get("Retry-After")) if e.code == 429 else None
            except urllib.error.URLError as e:
                if not isinstance(e.reason, (TimeoutError, ConnectionResetError, ConnectionAbortedError)):
                    raise UserError(f"cannot reach {self.url}: {e.reason} (a rerun resumes)") from None
                why = type(e.reason).__name__
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                why = type(e).__name__
            if attempt == self.max_attempts:
                raise PairFailed(f"{request.step}: {self.url}: {why} in all {self.max_attempts} attempt(s)")
            time.sleep(delay if delay is not None else
                       min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5))
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise BadAnswer(f"the server's response is not a chat completion ({type(e).__name__}: {e})") from None
        if not isinstance(content, str):
            raise BadAnswer("the chat completion has no text content")
        return content


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date), or None."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- CIR-Shapes scenes

BACKGROUND = "background"
ATTRIBUTES = ("shape", "color", "size", "cell")
MODIFICATIONS = {"color": "recolor", "shape": "reshape", "size": "resize", "cell": "move"}
DIFFERENCE_TYPES = {"add": "addition", "remove": "removal"}  # every other operation is a modification


def object_entry(o: Obj) -> dict:
    return {"name": o.shape, "descriptors": [o.color, o.size], "location": CELLS[o.cell]}


def background_entry(background: str) -> dict:
    return {"name": BACKGROUND, "descriptors": [background], "location": "whole image"}


def parse_entry(entry: dict) -> Obj | str:
    """The object (jitter 0) an entry of `object_entry` describes, or the background's color."""
    if entry["name"] == BACKGROUND:
        return entry["descriptors"][0]
    color, size = entry["descriptors"]
    return Obj(entry["name"], color, size, CELLS.index(entry["location"]))


def _distance(a: Obj, b: Obj) -> int:
    return sum(getattr(a, k) != getattr(b, k) for k in ATTRIBUTES)


def match(before: list[Obj], after: list[Obj]) -> dict[int, int]:
    """after index -> before index: the same object (jitter aside), else one with exactly one of
    shape, color, size, cell changed (a same-cell candidate first). Unmatched: added / removed."""
    pairs: dict[int, int] = {}
    for dist in (0, 1):
        for j, a in enumerate(after):
            free = [i for i, b in enumerate(before) if i not in pairs.values() and _distance(a, b) == dist]
            if j not in pairs and free:
                pairs[j] = min(free, key=lambda i: before[i].cell != a.cell)
    return pairs


def scene_changes(reference: Scene, target: Scene) -> list[tuple[str, ...]]:
    """The names that may refer to each changed thing: ("red circle",) for an added or removed object,
    ("red circle", "blue circle") for a modified one, ("background",) for a new background."""
    m = match(list(reference.objects), list(target.objects))
    out = [tuple(dict.fromkeys((reference.objects[m[j]].name, a.name))) if j in m else (a.name,)
           for j, a in enumerate(target.objects) if j not in m or _distance(a, reference.objects[m[j]])]
    out += [(b.name,) for i, b in enumerate(reference.objects) if i not in m.values()]
    return out + [(BACKGROUND,)] * (reference.background != target.background)


class SceneBackend:
    """Answers steps 1-2 from the scenes of the images, step 3 from the two object lists."""

    name = model = "scene"

    def __init__(self, scenes: dict[str, Scene]):
        self.scenes = scenes  # image content hash -> scene

    @classmethod
    def from_pairs(cls, pairs) -> "SceneBackend":
        scenes = {}
        for p in pairs:
            try:
                scenes[image_hash(p.reference)] = Scene.from_json(p.meta["reference_scene"])
                scenes[image_hash(p.target)] = Scene.from_json(p.meta["target_scene"])
            except (KeyError, TypeError) as e:
                raise UserError(f"pair {p.id!r}: the scene backend needs CIR-Shapes scenes in meta.reference_scene and "
                                f"meta.target_scene ({type(e).__name__}: {e}); make pairs with `pairs-from-shapes`") from None
        return cls(scenes)

    def complete(self, request: Request) -> str:
        return self.answer(request.step, [image_hash(p) for p in request.images], request.inputs)

    def answer(self, step: str, image_hashes: list[str], inputs: dict) -> str:
        if step == "step1":
            scene = self.scenes[image_hashes[0]]
            return json.dumps({"objects": [object_entry(o) for o in sorted(scene.objects, key=lambda o: o.cell)]
                               + [background_entry(scene.background)]})
        if step == "step2":
            return json.dumps({"objects": self._target_objects(inputs["reference_objects"], self.scenes[image_hashes[0]])})
        rng = random.Random(json.dumps(inputs, sort_keys=True))
        return json.dumps({"differences": self._differences(inputs["reference_objects"], inputs["target_objects"], rng)})

    @staticmethod
    def _target_objects(reference: list[dict], scene: Scene) -> list[dict]:
        ref = [parse_entry(e) for e in reference]
        obj_index = [i for i, r in enumerate(ref) if isinstance(r, Obj)]
        objs = sorted(scene.objects, key=lambda o: o.cell)
        m = match([ref[i] for i in obj_index], objs)
        out = []
        for j, o in enumerate(objs):
            i = obj_index[m[j]] if j in m else None
            status = "new" if i is None else "modified" if _distance(ref[i], o) else "unchanged"
            out.append({"status": status, "reference_index": i} | (reference[i] if status == "unchanged" else object_entry(o)))
        b = next(i for i, r in enumerate(ref) if isinstance(r, str))
        return out + [{"status": "unchanged" if ref[b] == scene.background else "modified", "reference_index": b}
                      | background_entry(scene.background)]

    @staticmethod
    def _differences(reference: list[dict], target: list[dict], rng: random.Random) -> list[dict]:
        ref = [parse_entry(e) for e in reference]
        referenced = {t["reference_index"] for t in target}
        ops = [(Operation("remove", obj=ref[i]), i, None) for i in range(len(ref)) if i not in referenced]
        for j, t in enumerate(target):
            i, after = t["reference_index"], parse_entry(t)
            if t["status"] == "new":
                ops.append((Operation("add", after=after), None, j))
            elif t["status"] == "modified" and isinstance(after, str):
                ops.append((Operation("background", background=after), i, j))
            elif t["status"] == "modified":
                changed = next(k for k in ATTRIBUTES if getattr(ref[i], k) != getattr(after, k))
                ops.append((Operation(MODIFICATIONS[changed], obj=ref[i], after=after), i, j))
        out = []
        for op, i, j in ops:
            b = CaptionBuilder()
            phrase_operation(rng, b, op, TEMPLATES)
            out.append({"type": DIFFERENCE_TYPES.get(op.type, "modification"), "caption": b.text,
                        "reference_index": i, "target_index": j, "mentions": [p["text"] for p in b.phrases]})
        return out
