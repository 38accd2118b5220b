"""A gallery's image paths held compactly: a million paths take one UTF-8 byte array of their
parts below the gallery root, its end offsets and a sorted key per path (24 bytes per image
beside those bytes), not a million Python strings; a string is made only for the rows read. An
index folder stores the same arrays, which an opened index memory-maps."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np


def path_key(stored: bytes) -> int:
    """The int64 lookup key of a path's stored bytes, the same in every process (keys are stored)."""
    return int.from_bytes(hashlib.blake2b(stored, digest_size=8).digest(), "little", signed=True)


class PathList(Sequence):
    """Absolute image paths by row: `paths[i]` -> str, `paths.find(path)` -> row or None, `.root`
    (the deepest folder holding them all, unless given; "/" when empty). Held as `blob` (uint8
    [bytes], the paths' UTF-8 after `prefix` (the root's folder, when every path starts with it)
    one after another) and `table` (int64 [3, N]: rows `ends`, where path i ends in `blob`; `keys`,
    the `path_key`s of the paths' stored bytes sorted; `order`, the row of each key)."""

    def __init__(self, paths: Iterable[str], root: str | None = None):
        paths = list(paths)
        root = root if root is not None else (os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else "/")
        prefix = os.path.join(root, "")
        prefix = prefix if all(p.startswith(prefix) for p in paths) else ""
        encoded = [p[len(prefix):].encode("utf-8", "surrogateescape") for p in paths]
        del paths
        keys = np.fromiter((path_key(e) for e in encoded), np.int64, len(encoded))
        order = np.argsort(keys, kind="stable")
        ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._hold(np.frombuffer(b"".join(encoded), np.uint8), np.stack([ends, keys[order], order]), root, prefix)

    @classmethod
    def stored(cls, blob: np.ndarray, table: np.ndarray, root: str) -> "PathList":
        """The list whose `blob` and `table` (e.g. memory-mapped from an index folder) hold paths below `root`."""
        paths = cls.__new__(cls)
        paths._hold(blob, table, root, os.path.join(root, ""))
        return paths

    def _hold(self, blob: np.ndarray, table: np.ndarray, root: str, prefix: str) -> None:
        self.blob, self.table, self.root, self.prefix = blob, table, root, prefix
        self.ends, self.keys, self.order = table

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
        key = path_key(path[len(self.prefix):].encode("utf-8", "surrogateescape"))
        lo, hi = np.searchsorted(self.keys, key, "left"), np.searchsorted(self.keys, key, "right")
        return next((int(r) for r in self.order[lo:hi] if self._row(int(r)) == path), None)

    def nbytes(self) -> int:
        """Bytes of the arrays that hold the list."""
        return self.blob.nbytes + self.table.nbytes
