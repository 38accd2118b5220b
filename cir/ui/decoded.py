"""Decoded images shared by the calls of a request: each file is decoded once while it stays in a
small cache bounded in pixels (`cir.ui.limits.DECODED_CACHE_PIXELS`), so the upload check, the
query encoding, the domain check and the maps of one query decode it once between them."""
from __future__ import annotations

import os
import threading

from cachetools import LRUCache, cached
from PIL import Image

from cir.data.images import load_rgb
from cir.ui import limits


def file_key(path: str, name: str | None = None) -> tuple[str, int, int]:
    """A file as the cache knows it: (real path, modification time, size); a changed file is another."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


@cached(LRUCache(limits.DECODED_CACHE_PIXELS, getsizeof=lambda image: image.width * image.height), key=file_key,
        condition=threading.Condition())
def decoded(path: str, name: str | None = None) -> Image.Image:
    """The RGB image of a file (`load_rgb`; `name` names it in errors), shared: callers must not
    modify it. The latest images are kept up to DECODED_CACHE_PIXELS in all (a larger one is not
    kept); one caller at a time decodes a file, the others wait for its image."""
    return load_rgb(path, name)
