"""A gallery's image paths held compactly: a million paths take one UTF-8 byte array of their
parts below the gallery root, its end offsets and a sorted hash per path (24 bytes per image
beside those bytes), not a million Python strings; a string is made only for the rows read."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np


class PathList(Sequence):
    """Absolute image paths by row: `paths[i]` -> str, `paths.find(path)` -> row or None, `.root`
    (the deepest folder holding them all, unless given; "/" when empty). Held as `blob` (uint8
    [bytes], the paths' UTF-8 after `prefix` (the root's folder, when every path starts with it)
    one after another), `ends` (int64 [N], where path i ends in `blob`) and `keys` / `order`
    (int64 [N]: the hashes of the paths' stored bytes sorted, and the row of each)."""

    def __init__(self, paths: Iterable[str], root: str | None = None):
        paths = list(paths)
        self.root = root if root is not None else (
            os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else "/")
        prefix = os.path.join(self.root, "")
        self.prefix = prefix if all(p.startswith(prefix) for p in paths) else ""
        encoded = [p[len(self.prefix):].encode("utf-8", "surrogateescape") for p in paths]
        del paths
        self.blob = np.frombuffer(b"".join(encoded), np.uint8)
        self.ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        hashes = np.fromiter((hash(e) for e in encoded), np.int64, len(encoded))
        self.order = np.argsort(hashes, kind="stable")
        self.keys = hashes[self.order]

    def __len__(self) -> int:
        return len(self.ends)

    def _row(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i else 0
        return self.prefix + self.blob[start:int(self.ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(r) for r in range(*i.indices(len(self)))]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)} paths")
        return self._row(i % len(self))

    def __iter__(self):
        return (self._row(i) for i in range(len(self)))

    def __contains__(self, path) -> bool:
        return isinstance(path, str) and self.find(path) is not None

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and len(other) == len(self) \
            and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def find(self, path: str) -> int | None:
        """The first row holding `path` exactly, or None."""
        if not path.startswith(self.prefix):
            return None
        encoded = path[len(self.prefix):].encode("utf-8", "surrogateescape")
        key = hash(encoded)
        lo, hi = np.searchsorted(self.keys, key, "left"), np.searchsorted(self.keys, key, "right")
        return next((int(r) for r in self.order[lo:hi] if self._row(int(r)) == path), None)

    def nbytes(self) -> int:
        """Bytes of the arrays that hold the list."""
        return self.blob.nbytes + self.ends.nbytes + self.keys.nbytes + self.order.nbytes
