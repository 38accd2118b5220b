"""Atomic file writes: write a temporary file beside the destination, fsync, then rename."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, bulk: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On an exception (or a kill) the destination keeps its previous content. The temporary file's
    name carries the writer's pid; one left behind by a writer that was killed is removed by the
    next atomic write to the same path. `bulk=True` (many files into one folder, e.g. rendered
    images) skips the fsync and the stale-temporary scan, which lists the whole folder and made
    writing n files O(n^2); such a writer calls `remove_stale_temporaries(folder)` once instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not bulk:
        _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 (and some writers recreate the file): make it ordinary
        if not bulk:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.{name}.{pid}.*.tmp` files beside `path` whose writing process no longer exists."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        _remove_if_writer_dead(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete every atomic-write temporary in `folder` whose writing process no longer exists."""
    for tmp in Path(folder).glob(".*.tmp"):
        _remove_if_writer_dead(tmp)


def _remove_if_writer_dead(tmp: Path) -> None:
    """`tmp` is named `.{name}.{pid}.{random}.tmp` (mkstemp's random part has no dots)."""
    parts = tmp.name[:-len(".tmp")].rsplit(".", 2)
    pid = parts[-2] if len(parts) == 3 else ""
    if not pid.isdigit() or int(pid) == os.getpid():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:  # the writer is gone: its file can never be completed
        tmp.unlink(missing_ok=True)
    except (PermissionError, OverflowError):  # alive (another user's process), or not a pid
        pass


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
