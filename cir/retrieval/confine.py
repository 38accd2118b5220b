"""Whether image paths stay inside their gallery root, links followed, cheaply at a million paths:
their parts below the root are checked as bytes, a block at a time (each in normal form: no empty,
`.` or `..` part), then links are followed only where one can lead out: the real path of each
distinct folder holding images, and the links among each such folder's entries."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cir.retrieval.pathlist import PathList

BLOCK = 1 << 22  # bytes of paths looked at at once: the temporaries stay small at any gallery size
SLASH, DOT = ord("/"), ord(".")


def escaping(paths: Sequence[str], root: str) -> str | None:
    """One of the absolute, normalised `paths` (any sequence of str; a PathList below `root` is read
    as it is) that resolves outside `root` (symlinks followed), or None. A path not written in normal
    form below the root (an empty, `.` or `..` part, a NUL byte) counts as outside."""
    below = os.path.join(root, "")
    if not (isinstance(paths, PathList) and paths.prefix == below):
        paths = PathList(paths, root)
        if paths.prefix != below:  # not every path is written below the root
            return next(p for p in paths if not p.startswith(below))
    row, folders = _scan(paths)
    if row is not None:
        return paths[row]
    real_root = os.path.realpath(root)
    for folder in sorted(folders):
        if not _inside(os.path.realpath(os.path.join(root, folder)), real_root):
            return next(p for p in paths if p.startswith(os.path.join(root, folder, "")))
    rows = [r for folder in folders for r in _links_out(paths, os.path.normpath(os.path.join(root, folder)), real_root)]
    return paths[min(rows)] if rows else None


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(os.path.join(real_root, ""))


def _scan(paths: PathList) -> tuple[int | None, set[str]]:
    """(The first row whose part below the root is not in normal form, else None; the distinct
    folders below the root holding the paths, "" for the root itself)."""
    folders, row = set(), 0
    while row < len(paths):
        first = int(paths.ends[row - 1]) if row else 0
        stop = max(row + 1, int(np.searchsorted(paths.ends, first + BLOCK, "right")))
        b = np.asarray(paths.blob[first:int(paths.ends[stop - 1])])
        ends = np.asarray(paths.ends[row:stop]) - first  # [rows] in `b`
        starts = np.concatenate([[0], ends[:-1]])
        full = starts < ends
        begins, last = np.zeros(len(b), bool), np.zeros(len(b), bool)
        begins[starts[full]], last[ends[full] - 1] = True, True
        slash, dot = b == SLASH, b == DOT
        part_start, part_end = begins.copy(), last.copy()  # a part (between slashes) begins / ends here
        part_start[1:] |= slash[:-1]
        part_end[:-1] |= slash[1:]
        up = dot & part_start & ~last  # a `..` part begins here
        up[:-1] &= dot[1:] & part_end[1:]
        odd = (slash & (part_start | last)) | (dot & part_start & part_end) | up | (b == 0)
        bad = np.concatenate([np.flatnonzero(~full), np.searchsorted(ends, np.flatnonzero(odd), "right")])
        if len(bad):
            return row + int(bad.min()), set()
        slashes = np.concatenate([[-1], np.flatnonzero(slash)])
        at = slashes[np.searchsorted(slashes, ends) - 1]  # each path's last slash, or one before it
        cut = np.where(at >= starts, at, starts)  # where each path's folder ends
        data = b.tobytes()
        folders.update(data[s:e] for s, e in zip(starts.tolist(), cut.tolist()))
        row = stop
    return None, {f.decode("utf-8", "surrogateescape") for f in folders}


def _links_out(paths: PathList, folder: str, real_root: str) -> list[int]:
    """Rows of `paths` in `folder` that are links whose real path is not inside `real_root`."""
    try:
        with os.scandir(folder) as entries:
            links = [e.path for e in entries if e.is_symlink()]
    except (FileNotFoundError, NotADirectoryError):  # gone since the build: shown as missing images
        return []
    except OSError:  # not listable: each of its images is resolved instead
        links = [p for p in paths if os.path.dirname(p) == folder]
    rows = [paths.find(p) for p in links if not _inside(os.path.realpath(p), real_root)]
    return [r for r in rows if r is not None]
