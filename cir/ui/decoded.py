"""Decoded images shared by the calls of a request: each file is decoded once while it stays in a
small cache bounded in pixels (`cir.ui.limits.DECODED_CACHE_PIXELS`), so the upload check, the
query encoding, the domain check and the maps of one query decode it once between them."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

from PIL import Image

from cir.data.images import load_rgb
from cir.ui import limits


class DecodedImages:
    """`decoded(path)`: the RGB image of a file, shared; callers must not modify it."""

    def __init__(self, max_pixels: int = limits.DECODED_CACHE_PIXELS):
        self.max_pixels = max_pixels
        self._images: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._pixels = 0
        self._lock = threading.Lock()
        self._decoding: dict[tuple, threading.Lock] = {}  # one decode per file at a time

    def __call__(self, path: str, name: str | None = None) -> Image.Image:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
            decoding = self._decoding.setdefault(key, threading.Lock())
        with decoding:
            with self._lock:
                if key in self._images:
                    return self._images[key]
            try:
                image = load_rgb(path, name)
            finally:
                with self._lock:
                    self._decoding.pop(key, None)
            self._keep(key, image)
            return image

    def _keep(self, key: tuple, image: Image.Image) -> None:
        pixels = image.width * image.height
        if pixels > self.max_pixels:
            return
        with self._lock:
            self._images[key] = image
            self._pixels += pixels
            while self._pixels > self.max_pixels:
                _, old = self._images.popitem(last=False)
                self._pixels -= old.width * old.height


decoded = DecodedImages()
