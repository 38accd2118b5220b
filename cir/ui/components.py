"""The explorer's Gradio adapters: component instances whose pre- or postprocessing the app
replaces, values built in Gradio's own formats, and the small conversions both tabs share."""
from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import gradio as gr
import numpy as np
from gradio.data_classes import ImageData
from PIL import Image

from cir.atomic import atomic_path
from cir.data.images import open_image
from cir.errors import UserError
from cir.ui import limits
from cir.ui.decoded import decoded
from cir.ui.thumbnails import thumbnail

MEAN = "mean"  # the layer and head dropdowns' value of the mean over all


def user_error(message: str) -> gr.Error:
    """A visitor's mistake as the page shows it: one line there, and no traceback in the server's log."""
    return gr.Error(message, print_exception=False)


def shown(fn):
    """Show a UserError in the page as a one-line error instead of a failed event."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise user_error(str(e)) from None
    return wrapper


def choice_index(value: str) -> int | None:
    """A layer or head dropdown's value as an index; None for the mean."""
    return None if value in (None, MEAN) else int(value)


def markdown_literal(text: str) -> str:
    """`text` shown as itself in gr.Markdown: Markdown and HTML characters escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~<>&])", r"\\\1", text)


def highlight(caption: str, phrases: list[dict]) -> list[tuple[str, str | None]]:
    """Caption pieces for gr.HighlightedText: the innermost non-overlapping phrases marked."""
    taken: list[tuple[int, int]] = []
    for p in sorted(phrases, key=lambda p: p["end"] - p["start"]):
        if all(p["end"] <= s or p["start"] >= e for s, e in taken):
            taken.append((p["start"], p["end"]))
    pieces, pos = [], 0
    for s, e in sorted(taken):
        pieces += [(caption[pos:s], None)] if s > pos else []
        pieces.append((caption[s:e], "noun phrase"))
        pos = e
    return pieces + ([(caption[pos:], None)] if pos < len(caption) else [])


def image_output(**kwargs) -> gr.Image:
    """A gr.Image for pictures the app draws (arrays): each is written once, atomically, into
    Gradio's cache under a hash of its pixels (Gradio's own writer rewrites a cached file in place
    on every use, so a browser downloading a picture while another request returned the same one
    could read it truncated); the cache's age limit (`limits.DELETE_CACHE`) removes them."""
    image = gr.Image(**kwargs)
    gradio_postprocess = image.postprocess

    def postprocess(value):
        if isinstance(value, np.ndarray):
            pixels = np.ascontiguousarray(value, dtype=np.uint8)
            digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()[:32]
            path = Path(image.GRADIO_CACHE) / "cir-drawn" / f"{digest}.png"
            if not path.is_file():
                with atomic_path(path, bulk=True) as tmp:
                    Image.fromarray(pixels).save(tmp, "PNG")
            value = str(path)
        return gradio_postprocess(value)

    image.postprocess = postprocess
    return image


def gallery_value(items: list[tuple[str, str]]) -> list[dict]:
    """`gr.Gallery.postprocess` of (thumbnail path, caption) items, as an event with
    `postprocess=False` returns it, without Gradio's thread pool and file checks per call. A small
    thumbnail goes as a data: URL inside the answer (its item carries no file marker, so Gradio
    passes it as is), a larger one as a file URL Gradio serves from the thumbnail folder."""
    value = []
    for path, caption in items:
        image = ImageData(path=path, orig_name=os.path.basename(path), mime_type="image/png").model_dump()
        inline = thumbnail.data_url(path)
        if inline is not None:
            del image["meta"]
            image["url"] = inline
        value.append({"image": image, "caption": caption})
    return value


def query_image(**kwargs) -> gr.Image:
    """A gr.Image whose upload is read by the project's image loader before Gradio opens it: an
    unreadable file or a decompression bomb fails the event with a one-line reason naming the
    uploaded file (Gradio would fail it with a hidden error, a callback would name the server's
    temp path). With `image_mode=None` the file reaches the callbacks as uploaded, so
    `cir.data.images.load_rgb` alone decides orientation, transparency and bit depth; an image over
    `limits.MAX_REQUEST_PIXELS` is refused before it is decoded, and the decode is kept for the
    request's other calls (`cir.ui.decoded`). (The check
    wraps this instance's `preprocess`: a gr.Image subclass would make Gradio write a .pyi stub
    beside this module on every import.)"""
    image = gr.Image(image_mode=None, **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        name = getattr(payload, "orig_name", None) or "the uploaded image"
        try:
            limits.data_url(getattr(payload, "url", None))
            if payload is not None and payload.path:
                with open_image(payload.path, name) as header:
                    limits.request_pixels(header.width * header.height, name)
                decoded(payload.path, name)  # the one decode of this upload, shared by the request's calls
            return gradio_preprocess(payload)
        except UserError as e:
            raise user_error(str(e)) from None
        except gr.Error:
            raise
        except Exception as e:  # a data: URL PIL cannot read, or anything else Gradio trips on
            raise user_error(f"cannot read image {name}: {type(e).__name__}: {' '.join(str(e).split())}") from None

    image.preprocess = preprocess
    return image


def top_k(k, n: int) -> int:
    """The slider's k as a whole number clamped to [1, n]: an int, or a float or string holding one
    (the API may send anything; "abc", 2.7 and True are refused)."""
    try:
        if isinstance(k, bool) or not float(k).is_integer():
            raise ValueError
        k = int(float(k))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"top k must be a whole number from 1 to {n}, got {k!r}") from None
    return min(max(1, k), max(1, n))


def top_k_slider(n: int, **kwargs) -> gr.Slider:
    """A gr.Slider for top k over `n` images whose value is read by `top_k` (Gradio's own check
    fails on a string with a hidden generic error, and passes 2.7 or True on)."""
    slider = gr.Slider(1, min(100, n), value=min(10, n), step=1, **kwargs)

    def preprocess(payload):
        try:
            return top_k(payload, n)
        except UserError as e:
            raise user_error(str(e)) from None

    slider.preprocess = preprocess
    return slider
