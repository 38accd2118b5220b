"""Atomic writes: a file is written to a temporary beside the destination, fsynced, then renamed
onto it; a folder is filled in a staging folder, fsynced, then swapped onto the destination."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
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
            fsync_path(tmp)
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


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder (its entries: names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(src: Path, dst: Path) -> None:
    """Put folder `src` at `dst`. An existing `dst` is swapped out atomically (it ends up at `src`
    for the caller to delete); where the OS cannot swap, two renames leave it at `src`.old."""
    if not dst.exists():
        os.rename(src, dst)
    elif not _exchange(src, dst):
        os.rename(dst, src.with_name(src.name + ".old"))
        os.rename(src, dst)
    fsync_path(dst.parent)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, staging: str | os.PathLike) -> Iterator[Path]:
    """Yield the empty folder `staging` (emptied if it exists) to write files into; on success
    they and the folder are fsynced and `replace_dir(staging, path)` puts it at `path`, leaving the
    previous `path` at `staging` (or `staging`.old) for the caller to delete. On an exception (or
    a kill) `path` keeps its previous content."""
    staging = Path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    yield staging
    for f in staging.iterdir():
        fsync_path(f)
    fsync_path(staging)
    replace_dir(staging, Path(path))


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
