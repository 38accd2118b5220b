"""One cleanup policy for the files the app writes for visitors: review uploads (each in its own
folder, with its review store and exports), exports and thumbnails.

`sweep(folders)` deletes each folder's entries (a file, or a subfolder as a whole) unused for
`limits.CLEANUP_AGE_S`, then the least recently used until the folders together hold at most
`limits.CLEANUP_MAX_BYTES`. An entry's last use is its newest modification: a review store is
written at every decision, a thumbnail touched whenever it is handed out (`cir.ui.thumbnails`).
`start(folders)` sweeps every `limits.CLEANUP_EVERY_S` in a daemon thread and removes the folders
when the process exits (app.py makes SIGTERM such an exit).
"""
from __future__ import annotations

import atexit
import os
import shutil
import threading
import time

from cir.ui import limits


def _usage(path: str) -> tuple[float, int]:
    """(newest modification time, bytes) of a file, or of a folder's files (links not followed; an
    empty folder's own time)."""
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_mtime, st.st_size
    times, size = [], 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                f = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            times.append(f.st_mtime)
            size += f.st_size
    return max(times, default=st.st_mtime), size


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def sweep(folders, max_age_s: float = limits.CLEANUP_AGE_S, max_bytes: int = limits.CLEANUP_MAX_BYTES,
          now: float | None = None) -> list[str]:
    """Delete the entries of `folders` unused for `max_age_s`, then the least recently used until
    they hold at most `max_bytes` in all; returns the deleted paths, oldest first."""
    now = time.time() if now is None else now
    entries = []
    for folder in folders:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            try:
                entries.append((*_usage(path), path))
            except FileNotFoundError:
                continue
    entries.sort()
    total, deleted = sum(size for _, size, _ in entries), []
    for used, size, path in entries:
        if used > now - max_age_s and total <= max_bytes:
            break
        _remove(path)
        total -= size
        deleted.append(path)
    return deleted


def start(folders) -> threading.Thread:
    """Sweep `folders` every CLEANUP_EVERY_S in a daemon thread (the first time at once), and remove
    them when the process exits normally. The process's signal handlers are left alone."""
    folders = [os.fspath(f) for f in folders]
    for folder in folders:
        atexit.register(shutil.rmtree, folder, True)

    def run():
        while True:
            sweep(folders)
            time.sleep(limits.CLEANUP_EVERY_S)
    thread = threading.Thread(target=run, name="cleanup", daemon=True)
    thread.start()
    return thread
