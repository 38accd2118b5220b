"""Which server files the app opens for a visitor.

- Triplet files (the Review tab): only inside the review folders named at start
  (`app.py --review-dir DIR`, none by default), or a file the visitor uploads (copied into a
  private folder of the app's, where its review store is written too and its exports offered for download).
- Images a triplet file names: only the gallery's own images (a listed path, or the file a listed
  path is, links followed) and files inside the review folders.

Every path is resolved after following symlinks (`os.path.realpath`), so `..`, `/proc/self/root`
spellings and links out of a folder are judged by where they really lead. A refused path gets the
same message whether or not it exists, so the app never tells which outside paths exist.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cir.errors import UserError
from cir.retrieval.pathlist import PathList

REFUSED = "only triplet files inside the app's review folders (--review-dir) can be opened; or upload one"
NO_FOLDERS = "this app opens no server file for review (start it with --review-dir DIR); upload a triplet file instead"
IMAGE_REFUSED = "not shown: the image lies outside the gallery and the review folders"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class FileAccess:
    """The review folders and gallery images a running app may read (and write review stores in)."""

    def __init__(self, review_dirs=(), gallery_paths=(), upload_root: str | os.PathLike | None = None):
        self.review_dirs = []
        for d in review_dirs:
            real = os.path.realpath(d)
            if not os.path.isdir(real):
                raise UserError(f"--review-dir {d}: not a folder")
            self.review_dirs.append(real)
        self.gallery = gallery_paths if isinstance(gallery_paths, PathList) else PathList(gallery_paths)
        self.upload_root = os.path.realpath(upload_root or tempfile.mkdtemp(prefix="cir-review-uploads-"))

    def _in_review_dirs(self, real: str) -> bool:
        return any(_inside(real, d) for d in self.review_dirs)

    def triplet_file(self, path: str) -> str:
        """The resolved path of a triplet file typed by a visitor, or UserError (one message for
        every path outside the review folders, present or not)."""
        if not self.review_dirs:
            raise UserError(NO_FOLDERS)
        real = os.path.realpath(os.path.expanduser(path))
        if not self._in_review_dirs(real):
            raise UserError(REFUSED)
        if not os.path.isfile(real):
            raise UserError(f"triplet file not found in the review folders: {path}")
        return real

    def adopt_upload(self, uploaded: str, name: str | None = None) -> str:
        """Copy an uploaded triplet file into its own private folder; returns the copy's path (its
        review store and exports are written beside it)."""
        folder = tempfile.mkdtemp(dir=self.upload_root)
        stem = Path(name or uploaded).name
        target = os.path.join(folder, stem if stem.endswith(".jsonl") else stem + ".jsonl")
        shutil.copyfile(uploaded, target)
        return target

    def image(self, path: str) -> bool:
        """Whether an image a triplet file names may be shown: a gallery image (its real path or
        its path listed), or one inside a review folder."""
        real = os.path.realpath(path)
        return real in self.gallery or os.path.abspath(path) in self.gallery or self._in_review_dirs(real)
