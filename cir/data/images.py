"""Image decoding, free of torch (cir.data.triplets, and so the torch-free cir.synth, check images with it).

`load_rgb` is the project's one image loader (training, evaluation, index builds, the app): every
image file becomes the RGB picture a viewer shows, or a `BadImage` with a one-line reason.
- limits: at most MAX_IMAGE_PIXELS pixels (checked on the header, before decoding: a decompression
  bomb is refused without allocating it) and sides at most MAX_ASPECT : 1 (preprocessing resizes
  the short side up to the model's input size, so a 20000 x 1 sliver would allocate gigabytes);
  the first decode also puts PIL's own guard on that limit (`guard_pil` says why);
- EXIF orientation is applied (`ImageOps.exif_transpose`); a multi-frame file gives its first
  frame (animated GIF, multi-page TIFF);
- transparency is composited over white (RGBA, LA, palette or RGB with a transparent colour);
  16-bit greys (and 32-bit ones holding values above 255) are scaled to 8 bits (PIL's own
  conversion clips them, mostly to white);
  CMYK, palette, grey and bilevel images are converted by PIL.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from cir.errors import UserError

MAX_IMAGE_PIXELS = 64_000_000  # 64 MP: above any phone photo in common use; 192 MB once decoded to RGB
MAX_ASPECT = 100  # longer side / shorter side


def guard_pil() -> None:
    """Make PIL itself refuse what `open_image` refuses: more than MAX_IMAGE_PIXELS pixels.

    Why a third-party module's global state is changed: images reach PIL by paths that do not go
    through `open_image` (Gradio's own image handling: its upload preprocessing, gallery and cache
    code; any other library the process loads), and those must refuse a decompression bomb too. PIL's
    own guard (`Image.MAX_IMAGE_PIXELS`, default about 89 MP) only warns between its limit and
    twice it and raises above; with the limit set to ours and its `DecompressionBombWarning` made
    an error, every decode in the process stops at the project's limit. Idempotent. Called by
    `open_image` (every decode of the project goes through it) and by the app's `build_demo` (for
    Gradio's own), never on import; tests/test_images.py checks both in a fresh interpreter.
    """
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class BadImage(UserError, OSError):
    """An image file the project refuses or cannot decode; `str()` is one line naming the file.

    An OSError too, so code that treats unreadable files as OSError keeps working."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"cannot read image {name}: {reason}")


def _reason(e: BaseException) -> str:
    """One line saying why PIL failed."""
    text = " ".join(str(e).split())
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        m = re.search(r"\((\d+) pixels\)", text)
        size = f"{int(m[1]):,} pixels is" if m else "too many pixels:"
        return f"{size} over the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
    if isinstance(e, Image.UnidentifiedImageError):
        text = "not an image file, or a format PIL cannot read"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _display_name(source) -> str:
    """How messages name an image source: its path, or "<bytes>" for a file object."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"


def open_image(source: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """`Image.open(source)` (the header only) within the project's limits, else `BadImage`.

    `name` names the file in messages (default: `source` when it is a path)."""
    guard_pil()
    name = name or _display_name(source)
    try:
        im = Image.open(source)
    except FileNotFoundError:
        raise BadImage(name, "file not found") from None
    except Exception as e:  # PIL raises many types (and DecompressionBombError above twice the limit)
        raise BadImage(name, _reason(e)) from None
    w, h = im.size
    problem = (f"{w * h:,} pixels is over the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
               if w * h > MAX_IMAGE_PIXELS else f"empty image ({w} x {h})" if min(w, h) < 1
               else f"{w} x {h} is more elongated than {MAX_ASPECT}:1" if max(w, h) > MAX_ASPECT * min(w, h) else None)
    if problem:
        im.close()
        raise BadImage(name, problem)
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """An opened image (first frame) as the RGB picture a viewer shows."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF: keep the stored orientation
        im = im.copy()
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im).astype(np.int64)
        if im.mode != "I" or arr.max(initial=0) > 255:  # 16-bit range (a 32-bit I image of 8-bit data stays)
            arr = np.clip(arr, 0, 65535) >> 8
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _decode(source, name: str | None, draft: bool) -> Image.Image:
    name = name or _display_name(source)
    with open_image(source, name) as im:
        try:
            if draft:  # JPEG: decode at 1/8 scale; every byte of the stream is still read and checked
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return _to_rgb(im)
        except Exception as e:
            raise BadImage(name, _reason(e)) from None


def load_rgb(source: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """The image at `source` (a path or a binary file object) as RGB, or `BadImage` (one line;
    `name` names the file in it, default: the path)."""
    return _decode(source, name, draft=False)


def decode_problem(path: str) -> str | None:
    """None when `load_rgb(path)` would succeed, else its one-line reason (what readers of files
    naming images check up front; JPEGs are decoded at reduced scale, which reads the whole file)."""
    try:
        _decode(path, None, draft=True)
    except BadImage as e:
        return e.reason
    return None
