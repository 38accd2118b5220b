"""Annotators' decisions on a triplet file, logged beside it, and the export of the accepted ones.

`data/x.jsonl` is reviewed into `data/x.review.jsonl`: one JSON object per decision,
`{"id", "decision": "accept" | "reject" | "edit" | "undo", "note", "time"[, "caption"][, "annotator"]}`
("edit" accepts the triplet with `caption` replacing its caption; "undo" takes the item's decision
back, so it is undecided again). Every decision is appended and fsynced on its own, and the latest
one per id counts, per annotator when several share a log (a record without "annotator" is the
unnamed annotator's); `agreement` compares the annotators' decisions. A last line cut short by a crash is dropped on reading (and
from the file by `open_log`), every complete line is kept. `export_accepted` writes the accepted
and edited triplets to `data/x.accepted.jsonl`; an edited one loses its noun phrases and grounding
spans (character spans of the old caption; the project recomputes noun phrases when absent).
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from cir.data.triplets import Triplet, write_triplets
from cir.errors import UserError

DECISIONS = ("accept", "reject", "edit", "undo")
UNDO = "undo"
_append_lock = threading.Lock()


def review_path(triplet_path: str | os.PathLike) -> Path:
    """`x.jsonl` -> `x.review.jsonl` beside it."""
    p = Path(triplet_path)
    return p.with_name(p.stem + ".review.jsonl")


def export_path(triplet_path: str | os.PathLike) -> Path:
    """`x.jsonl` -> `x.accepted.jsonl` beside it."""
    p = Path(triplet_path)
    return p.with_name(p.stem + ".accepted.jsonl")


def _split(data: bytes, path: Path) -> tuple[list[dict], int]:
    """(records of the complete lines, byte length of the good part): a last line without its
    newline is kept when it parses and dropped otherwise; a bad complete line is an error."""
    records, good = [], 0
    lines = data.split(b"\n")
    for no, line in enumerate(lines, 1):
        last = no == len(lines)
        try:
            rec = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            if last:  # half-written by a crash
                break
            raise UserError(f"{path}:{no}: not a review record (invalid JSON); fix or remove that line") from None
        if rec is not None:
            if not (isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec.get("decision") in DECISIONS
                    and (rec["decision"] != "edit" or isinstance(rec.get("caption"), str))):
                raise UserError(f"{path}:{no}: not a review record (needs a string id, a decision in {DECISIONS} "
                                "and, for an edit, a caption)")
            records.append(rec)
        good += len(line) + (not last)
    return records, good


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a review log in the order written ([] when there is none yet)."""
    path = Path(path)
    return _split(path.read_bytes(), path)[0] if path.is_file() else []


def _by(records: list[dict], annotator: str | None) -> list[dict]:
    return records if annotator is None else [r for r in records if r.get("annotator", "") == annotator]


def read_decisions(path: str | os.PathLike, annotator: str | None = None) -> dict[str, dict]:
    """The latest decision per triplet id in a review log (of one annotator's records, when named;
    "" is the unnamed one); ids whose latest record is an undo are undecided."""
    latest = {r["id"]: r for r in _by(read_records(path), annotator)}
    return {i: r for i, r in latest.items() if r["decision"] != UNDO}


def agreement(path: str | os.PathLike) -> tuple[int, int, float | None]:
    """(annotators with a decision, items decided by two or more, the share of those items on which
    all agree whether to keep the triplet: accept or edit vs reject; None when there are none)."""
    records = read_records(path)
    names = sorted({r.get("annotator", "") for r in records})
    per = [read_decisions(path, n) for n in names]
    kept = {}
    for decisions in per:
        for i, r in decisions.items():
            kept.setdefault(i, []).append(r["decision"] != "reject")
    shared = [votes for votes in kept.values() if len(votes) > 1]
    active = sum(bool(d) for d in per)
    return active, len(shared), (sum(len(set(v)) == 1 for v in shared) / len(shared) if shared else None)


def last_undoable(path: str | os.PathLike, annotator: str | None = None) -> str | None:
    """The id of the most recently logged decision still in effect (of one annotator, when named):
    what "undo" takes back; None when there is none."""
    records = _by(read_records(path), annotator)
    current = {r["id"]: n for n, r in enumerate(records)}
    return next((r["id"] for n, r in reversed(list(enumerate(records)))
                 if r["decision"] != UNDO and current[r["id"]] == n), None)


def open_log(path: str | os.PathLike) -> dict[str, dict]:
    """Repair a review log after a crash (drop a half-written last line, end a whole one with its
    newline) so appends continue cleanly; returns `read_decisions`."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        _, good = _split(data, path)
        with _append_lock, open(path, "r+b") as f:
            if good < len(data):
                f.truncate(good)
            elif data and not data.endswith(b"\n"):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return read_decisions(path)


def decision(triplet_id: str, kind: str, note: str = "", caption: str | None = None, annotator: str = "") -> dict:
    """A review record; `caption` is required for (and only kept by) an "edit"; `annotator` is kept when named."""
    if kind not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {kind!r}")
    if kind == "edit" and not (caption or "").strip():
        raise UserError("an edited caption cannot be empty")
    for what, text in (("caption", caption or ""), ("note", note or ""), ("annotator name", annotator or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"the {what} is not valid Unicode text (a lone surrogate at character {e.start})") from None
    rec = {"id": triplet_id, "decision": kind, "note": note or "", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rec |= {"caption": caption} if kind == "edit" else {}
    return rec | {"annotator": annotator} if annotator else rec


def append_decision(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one write, flushed and fsynced (and the folder entry, for a new log)."""
    path = Path(path)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with _append_lock:
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def first_undecided(triplets: list[Triplet], decisions: dict[str, dict]) -> int:
    """Position of the first triplet without a decision (len(triplets) when all are decided)."""
    return next((i for i, t in enumerate(triplets) if t.id not in decisions), len(triplets))


def accepted(triplets: list[Triplet], decisions: dict[str, dict]) -> list[Triplet]:
    """The accepted triplets in file order; an edited one carries its new caption and no spans of the old."""
    out = []
    for t in triplets:
        d = decisions.get(t.id)
        if d is None or d["decision"] == "reject":
            continue
        if d["decision"] == "edit" and d["caption"] != t.caption:
            meta = {k: v for k, v in t.meta.items() if k != "grounding"}
            t = replace(t, caption=d["caption"], noun_phrases=None, meta=meta | {"original_caption": t.caption})
        out.append(t)
    return out


def export_accepted(triplets: list[Triplet], decisions: dict[str, dict], out: str | os.PathLike) -> int:
    """Write the accepted triplets as a triplet file (atomically); returns how many."""
    keep = accepted(triplets, decisions)
    write_triplets(out, keep)
    return len(keep)
