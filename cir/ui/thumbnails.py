"""Thumbnails as files: each image's small PNG copy is written once into one folder, which the app
gives Gradio as a static path, so it is served as is and never re-encoded or copied per request.
A thumbnail of at most `INLINE_BYTES` also travels inside an answer as a data: URL (`data_url`),
which saves the browser one request per result image. A gallery image that is missing or cannot be
read is shown as the "image missing" tile (`or_missing`)."""
from __future__ import annotations

import atexit
import base64
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from PIL import Image, ImageDraw

from cir.atomic import atomic_path
from cir.data.images import load_rgb
from cir.errors import UserError

THUMBNAIL = 256  # px, longer side of images sent to the browser
INLINE_BYTES = 8192  # thumbnails up to this size are sent inside answers, larger ones as files
MISSING = "image missing"  # the text of the tile shown for an image that is missing or cannot be read


class Thumbnails:
    """`thumbnails(path)`: the path of `path`'s thumbnail, made on first use or by `prepare` (named
    by a hash of the file's real path, size and modification time, so a changed file gets a new
    one; its modification time is its last use, and one deleted by the cleanup is made again). The
    folder is a fresh temporary one, removed at exit."""

    def __init__(self, size: int = THUMBNAIL):
        self.size = size
        self._folder: Path | None = None
        self._lock = threading.Lock()
        self._made: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, thumbnail)

    @property
    def folder(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="cir-thumbnails-")).resolve()
                atexit.register(shutil.rmtree, self._folder, True)
            return self._folder

    def __call__(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except OSError:
            raise UserError(f"image not found: {path}") from None
        made = self._made.get(path)
        if made is not None and made[:2] == (st.st_size, st.st_mtime_ns):
            try:
                os.utime(made[2])  # in use: the cleanup (cir.ui.cleanup) keeps it
                return made[2]
            except FileNotFoundError:
                pass  # deleted by the cleanup: made again
        key = hashlib.sha256(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{self.size}".encode())
        out = self.folder / f"{key.hexdigest()[:32]}.png"
        if not out.is_file():
            image = load_rgb(path)
            image.thumbnail((self.size, self.size))
            with atomic_path(out, bulk=True) as tmp:
                image.save(tmp, "PNG")
        self._made[path] = (st.st_size, st.st_mtime_ns, str(out))
        return str(out)

    def or_missing(self, path: str | os.PathLike) -> str:
        """`self(path)`, or the path of the "image missing" tile when `path` is missing or cannot be read."""
        try:
            return self(path)
        except (UserError, OSError):
            return self.missing()

    def missing(self) -> str:
        """The path of the "image missing" tile (made on first use, touched on every use as thumbnails are)."""
        out = self.folder / f"missing-{self.size}.png"
        try:
            os.utime(out)
        except FileNotFoundError:
            tile = Image.new("RGB", (self.size, self.size), (230, 230, 230))
            ImageDraw.Draw(tile).text((self.size // 2, self.size // 2), MISSING, fill=(90, 90, 90), anchor="mm",
                                      font_size=self.size // 10)
            with atomic_path(out, bulk=True) as tmp:
                tile.save(tmp, "PNG")
        return str(out)

    def data_url(self, thumbnail_path: str | os.PathLike, limit: int = INLINE_BYTES) -> str | None:
        """The PNG thumbnail at `thumbnail_path` (a path `self` returned) as a data: URL, or None
        when the file is larger than `limit` bytes (read per call: nothing is kept in memory)."""
        with open(thumbnail_path, "rb") as f:
            png = f.read(limit + 1)
        return None if len(png) > limit else "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    def prepare(self, paths: list[str]) -> threading.Thread:
        """Make the thumbnails of `paths` in a background thread (unreadable files are skipped: the
        page says why when one is shown)."""
        def make():
            for p in paths:
                try:
                    self(p)
                except (UserError, OSError):
                    continue
        thread = threading.Thread(target=make, name="thumbnails", daemon=True)
        thread.start()
        return thread


thumbnail = Thumbnails()
