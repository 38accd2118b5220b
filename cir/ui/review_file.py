"""The Review tab's triplet files: opening one (typed inside a review folder, or uploaded as a
private copy), reading it within the Review limits (`cir.ui.limits`), finding the folder an
upload's relative image paths are taken from, and the captions that miss a change. A review state
is a plain dict: file, image base, position, filter, annotator."""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import replace

import gradio as gr

from cir.data.triplets import normalize_path, read_triplets
from cir.errors import UserError
from cir.synth.report import changed_objects, mentions
from cir.ui import limits, review
from cir.ui.access import FileAccess
from cir.ui.components import shown
from cir.ui.explorer import Explorer


@functools.lru_cache(maxsize=8)
def _triplets(path: str, base: str | None, mtime: float):
    """(triplets, problems) of a triplet file within the Review limits (cir.ui.limits): a file of too
    many lines is refused, a line too long or a triplet over a limit is skipped as a problem, and
    targets naming one file (by its real path) are merged. Images are not checked here: whether
    one may be read at all is FileAccess.image's call."""
    unplaced = lambda text: text.replace(path, os.path.basename(path))  # the page shows no server path
    try:
        triplets, problems = read_triplets(path, skip_bad=True, check_images=False, base=base,
                                           max_lines=limits.MAX_REVIEW_LINES, max_line_chars=limits.MAX_LINE_CHARS)
    except UserError as e:
        raise UserError(unplaced(str(e))) from None
    problems = [unplaced(p) for p in problems]
    kept = []
    for t in triplets:
        if (why := _over_limits(t)) is not None:
            problems.append(f"{os.path.basename(path)}: triplet {t.id!r}: {why}")
            continue
        real = {}
        for p in t.targets:
            real.setdefault(os.path.realpath(p), p)
        kept.append(replace(t, targets=list(real.values())))
    return kept, problems


def _over_limits(t) -> str | None:
    """Why a triplet is over the Review limits, or None."""
    if len(t.targets) > limits.MAX_TARGETS:
        return f"{len(t.targets):,} targets; at most {limits.MAX_TARGETS} are reviewed"
    scenes = t.meta.get("pair_meta") or t.meta
    for key in ("reference_scene", "target_scene"):
        scene = scenes.get(key) if isinstance(scenes, dict) else None
        objects = scene.get("objects") if isinstance(scene, dict) else None
        if isinstance(objects, list) and len(objects) > limits.MAX_SCENE_OBJECTS:
            return f"{len(objects):,} objects in its {key}; at most {limits.MAX_SCENE_OBJECTS} are compared"
    return None


def missing_changes(t, caption: str) -> list[str] | None:
    """The changes between a triplet's reference and target that `caption` does not mention (the
    check of `python -m cir.synth report`); None when the triplet carries no scenes or stage outputs."""
    try:
        changes = changed_objects(t)[1]
    except (UserError, KeyError, TypeError, ValueError, IndexError):
        return None
    return [names[0] for names in changes if not mentions(caption, names)]


@functools.lru_cache(maxsize=8)
def _flagged(path: str, base: str | None, mtime: float) -> frozenset[str]:
    return frozenset(t.id for t in _triplets(path, base, mtime)[0] if missing_changes(t, t.caption))


def _mtime(state: dict) -> float:
    try:
        return os.path.getmtime(state["path"])
    except FileNotFoundError:
        raise UserError(f"{os.path.basename(state['path'])} is gone (an upload unused for an hour is deleted); "
                        "open or upload it again") from None


def review_items(state: dict):
    """(triplets, problems) of a review state's triplet file, re-read when it changes."""
    return _triplets(state["path"], state.get("base"), _mtime(state))


def flagged(state: dict) -> frozenset[str]:
    """The ids of a review state's triplets whose caption misses a change (`missing_changes`)."""
    return _flagged(state["path"], state.get("base"), _mtime(state))


def within_bytes(path: str, name: str) -> str:
    """`path`, or UserError when the file is over the Review limit on a triplet file's size."""
    limits.review_bytes(os.path.getsize(path), name)
    return path


def opened(path: str, base: str | None = None):
    """A review state at the first undecided item of a triplet file the app may open (its review store
    takes in a JSONL review log beside it when it has no decisions yet); relative image paths are taken
    from `base` (default: its folder)."""
    state = {"path": path, "base": base}
    triplets, problems = review_items(state)
    if not triplets:
        raise UserError(f"no usable triplets in {os.path.basename(path)}" + (f" ({problems[0]})" if problems else ""))
    decisions = review.open_store(review.store_path(path), review.log_path(path))
    if problems:
        gr.Warning(f"skipped {len(problems)} bad line(s); first: {problems[0]}")
    # "opened" makes reopening a changed state, so the page refreshes even at the same position
    return state | {"pos": review.first_undecided(triplets, decisions), "opened": time.time()}


@shown
def review_open(access: FileAccess, path: str):
    """Open a triplet file typed by the visitor: only inside the review folders."""
    path = (path or "").strip()
    if not path:
        raise UserError("type the path of a triplet file in a review folder, or upload one")
    path = access.triplet_file(path)
    return opened(within_bytes(path, os.path.basename(path)))


@shown
def review_upload(ex: Explorer, access: FileAccess, uploaded: str | None):
    """Open an uploaded triplet file (a private copy; its review store and exports stay beside the copy);
    its relative image paths are taken from `upload_base`."""
    if not uploaded:
        raise UserError("upload a triplet file (.jsonl)")
    path = access.adopt_upload(within_bytes(uploaded, os.path.basename(uploaded)))
    return opened(path, upload_base(ex.root, access, path))


UPLOAD_BASE_LEVELS = 3  # folders above the gallery's folder tried as the base of an upload's relative paths


def upload_base(root: str, access: FileAccess, path: str) -> str:
    """The folder an uploaded triplet file's relative image paths are taken from: the gallery's folder
    `root`, or the nearest of its first UPLOAD_BASE_LEVELS parents from which the file's first
    line names an existing reference the app may show (a file written beside the gallery's image folder,
    like an examples file, names "images/x.png"); `root` when none does. Only that line is read."""
    reference = _first_reference(path)
    base = root
    for _ in range(UPLOAD_BASE_LEVELS + 1 if reference else 0):
        found = normalize_path(reference, base)
        if os.path.isfile(found) and access.image(found):
            return base
        base = os.path.dirname(base)
    return root


def _first_reference(path: str) -> str | None:
    """The "reference" of a triplet file's first non-empty line (read up to MAX_LINE_CHARS), or None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while line := f.readline(limits.MAX_LINE_CHARS + 1):
            if line.strip():
                try:
                    reference = json.loads(line).get("reference")
                except (ValueError, AttributeError, RecursionError):
                    return None
                return reference if isinstance(reference, str) else None
    return None
