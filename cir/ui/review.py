"""Annotators' decisions on a triplet file, kept in one SQLite store beside it, and their exports.

`data/x.jsonl` is reviewed into `data/x.review.sqlite`: one row per decision
(`seq`, `id`, `annotator`, `kind`: accept | reject | edit | undo, `note`, `caption`, `time`;
"edit" accepts the triplet with `caption` replacing its caption, "undo" takes the item's decision
back so it is undecided again). The latest decision per id counts, per annotator when several share
a store ("" is the unnamed annotator); `agreement` compares the annotators' decisions. A name is
bound to the browser that first decides under it (table `annotators`: the name and the sha256 of
that browser's key): a decision or undo under a name bound to another key is refused. The store is
in WAL mode with synchronous writes and a busy timeout, so processes and threads that save at once
each wait their turn and every committed decision survives a crash.

Decisions travel as records `{"id", "decision", "note", "time"[, "caption"][, "annotator"]}`;
`export_log` writes all of them (or one annotator's) as JSONL to `data/x.review.jsonl`, and a store with no decisions
yet takes in such a log found beside it (a last line cut short by a crash is dropped, every complete
line kept). `export_accepted` writes the accepted and edited triplets to `data/x.accepted.jsonl`;
an edited one loses its noun phrases and grounding spans (character spans of the old caption; the
project recomputes noun phrases when absent).
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path

from cir.atomic import write_text
from cir.data.triplets import Triplet, write_triplets
from cir.errors import UserError

DECISIONS = ("accept", "reject", "edit", "undo")
UNDO = "undo"
BUSY_TIMEOUT_S = 60.0  # how long a save waits while another process or thread writes the store

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    annotator TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL CHECK (kind IN {DECISIONS}),
    note TEXT NOT NULL DEFAULT '',
    caption TEXT CHECK (kind != 'edit' OR caption IS NOT NULL),
    time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_annotator ON decisions (annotator, id, seq);
CREATE TABLE IF NOT EXISTS annotators (name TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL);
"""
_COLUMNS = "id, kind, note, caption, time, annotator"
# the latest row per (annotator, id), or per id over everyone when no annotator is named
_LATEST = "SELECT MAX(seq) FROM decisions WHERE ? IS NULL OR annotator = ? GROUP BY id"
_LATEST_EACH = "SELECT MAX(seq) FROM decisions GROUP BY annotator, id"


def store_path(triplet_path: str | os.PathLike) -> Path:
    """`x.jsonl` -> `x.review.sqlite` beside it."""
    p = Path(triplet_path)
    return p.with_name(p.stem + ".review.sqlite")


def log_path(triplet_path: str | os.PathLike) -> Path:
    """`x.jsonl` -> `x.review.jsonl` beside it (the store's decisions as JSONL)."""
    p = Path(triplet_path)
    return p.with_name(p.stem + ".review.jsonl")


def export_path(triplet_path: str | os.PathLike) -> Path:
    """`x.jsonl` -> `x.accepted.jsonl` beside it."""
    p = Path(triplet_path)
    return p.with_name(p.stem + ".accepted.jsonl")


def _enter_wal(db: sqlite3.Connection) -> None:
    """Put the store in WAL mode. Switching a new file's journal mode skips SQLite's busy handler
    when another connection switches it at the same moment, so a locked switch is retried until
    the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def refuse_symlink(path: str | os.PathLike) -> Path:
    """`path` as a Path, or UserError when it is a symbolic link: a review file (store, its SQLite
    journals, log, exports) is never read or written through a link, which could lead outside the
    review folders."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path.name} is a symbolic link; review files must be plain files")
    return path


@contextmanager
def _connected(store: str | os.PathLike):
    """A connection to the store (created with its table when new), closed after use; a file that
    is no review store, or a store or journal that is a symbolic link, is a UserError."""
    store = refuse_symlink(store)
    for journal in ("-wal", "-shm", "-journal"):
        refuse_symlink(store.with_name(store.name + journal))
    try:
        with closing(sqlite3.connect(store, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as db:
            _enter_wal(db)
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(_SCHEMA)
            yield db
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise UserError(f"{store.name}: still busy after {BUSY_TIMEOUT_S:.0f} s; save again") from None
        raise UserError(f"{store.name}: {e}") from None
    except sqlite3.DatabaseError as e:
        raise UserError(f"{store.name}: not a review store ({e}); move it away to start a new one") from None


@contextmanager
def _writing(store: str | os.PathLike):
    """A connection inside a write transaction (one writer at a time; others wait up to the busy
    timeout), committed on leaving and rolled back on an error."""
    with _connected(store) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _rows(store: str | os.PathLike, where: str = "", args: tuple = ()) -> list[dict]:
    """Records of the store's rows (`where` filters them), in the order saved; [] without a store."""
    if not Path(store).is_file():
        return []
    with _connected(store) as db:
        rows = db.execute(f"SELECT {_COLUMNS} FROM decisions {where} ORDER BY seq", args).fetchall()
    return [_record(*row) for row in rows]


def _record(triplet_id: str, kind: str, note: str, caption: str | None, when: str, annotator: str) -> dict:
    rec = {"id": triplet_id, "decision": kind, "note": note, "time": when}
    rec |= {"caption": caption} if kind == "edit" else {}
    return rec | {"annotator": annotator} if annotator else rec


def read_records(store: str | os.PathLike) -> list[dict]:
    """Every decision in the store in the order saved ([] when there is none yet)."""
    return _rows(store)


def read_decisions(store: str | os.PathLike, annotator: str | None = None) -> dict[str, dict]:
    """The latest decision per triplet id (of one annotator's, when named; "" is the unnamed one);
    ids whose latest decision is an undo are undecided."""
    latest = _rows(store, f"WHERE seq IN ({_LATEST}) AND kind != 'undo'", (annotator, annotator))
    return {r["id"]: r for r in latest}


def agreement(store: str | os.PathLike) -> tuple[int, int, float | None]:
    """(annotators with a decision, items decided by two or more, the share of those items on which
    all agree whether to keep the triplet: accept or edit vs reject; None when there are none)."""
    kept, people = {}, set()
    for r in _rows(store, f"WHERE seq IN ({_LATEST_EACH}) AND kind != 'undo'"):
        kept.setdefault(r["id"], []).append(r["decision"] != "reject")
        people.add(r.get("annotator", ""))
    shared = [votes for votes in kept.values() if len(votes) > 1]
    return len(people), len(shared), (sum(len(set(v)) == 1 for v in shared) / len(shared) if shared else None)


def _last_undoable(db: sqlite3.Connection, annotator: str | None) -> str | None:
    row = db.execute(f"SELECT id FROM decisions WHERE seq IN ({_LATEST}) AND kind != 'undo' ORDER BY seq DESC LIMIT 1",
                     (annotator, annotator)).fetchone()
    return row[0] if row else None


def taken_message(annotator: str) -> str:
    """What a browser is told when `annotator` is bound to another browser."""
    who = f"the name {annotator!r} is" if annotator else "decisions without a name are"
    return (f"{who} another browser's (a name belongs to the browser that first decides under it): "
            "type another name under Annotator")


def _key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _bind(db: sqlite3.Connection, annotator: str, key: str | None) -> None:
    """Bind `annotator` to the browser key `key` when unbound; UserError when another key holds it
    (None: no binding checked)."""
    if key is None:
        return
    row = db.execute("SELECT key_sha256 FROM annotators WHERE name = ?", (annotator,)).fetchone()
    if row is None:
        db.execute("INSERT INTO annotators (name, key_sha256) VALUES (?, ?)", (annotator, _key_sha256(key)))
    elif row[0] != _key_sha256(key):
        raise UserError(taken_message(annotator))


def bound_elsewhere(store: str | os.PathLike, annotator: str, key: str) -> bool:
    """Whether `annotator` is bound to another browser key than `key` in the store."""
    if not Path(store).is_file():
        return False
    with _connected(store) as db:
        row = db.execute("SELECT key_sha256 FROM annotators WHERE name = ?", (annotator,)).fetchone()
    return row is not None and row[0] != _key_sha256(key)


def undo(store: str | os.PathLike, annotator: str = "", key: str | None = None) -> str | None:
    """Take back the annotator's most recent decision still in effect (an "undo" row, saved in the
    same transaction that finds it); returns its id, None when there is nothing to undo. With a
    browser `key`, the name must be bound to it (see `append_decision`)."""
    if not Path(store).is_file():
        return None
    with _writing(store) as db:
        _bind(db, annotator, key)
        undone = _last_undoable(db, annotator)
        if undone is not None:
            _insert(db, decision(undone, UNDO, annotator=annotator))
    return undone


def decision(triplet_id: str, kind: str, note: str = "", caption: str | None = None, annotator: str = "") -> dict:
    """A decision record; `caption` is required for (and only kept by) an "edit"; `annotator` is kept when named."""
    if kind not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {kind!r}")
    if kind == "edit" and not (caption or "").strip():
        raise UserError("an edited caption cannot be empty")
    for what, text in (("caption", caption or ""), ("note", note or ""), ("annotator name", annotator or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"the {what} is not valid Unicode text (a lone surrogate at character {e.start})") from None
    return _record(triplet_id, kind, note or "", caption, time.strftime("%Y-%m-%dT%H:%M:%S%z"), annotator or "")


def _insert(db: sqlite3.Connection, *records: dict) -> None:
    db.executemany("INSERT INTO decisions (id, kind, note, caption, time, annotator) VALUES (?, ?, ?, ?, ?, ?)",
                   [(r["id"], r["decision"], r.get("note", ""), r.get("caption") if r["decision"] == "edit" else None,
                     r.get("time", ""), r.get("annotator", "")) for r in records])


def append_decision(store: str | os.PathLike, record: dict, key: str | None = None) -> None:
    """Save one decision (committed to disk before this returns). With a browser `key`, its annotator's
    name is bound to that key in the same transaction, or refused (UserError) when bound to another."""
    with _writing(store) as db:
        _bind(db, record.get("annotator", ""), key)
        _insert(db, record)


# ---------------------------------------------------------------------------- JSONL logs
def _is_text(value) -> bool:
    """Whether `value` is a str the store can keep (valid Unicode, no lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split(data: bytes, path: Path) -> list[dict]:
    """The records of a JSONL log's complete lines: a last line without its newline is kept when it
    parses and dropped otherwise (cut short by a crash); a bad complete line is an error."""
    records = []
    lines = data.split(b"\n")
    for no, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            if no == len(lines):
                break
            raise UserError(f"{path.name}:{no}: not a review record (invalid JSON); fix or remove that line") from None
        if rec is not None:
            if not (isinstance(rec, dict) and rec.get("decision") in DECISIONS and _is_text(rec.get("id"))
                    and all(_is_text(rec.get(k, "")) for k in ("note", "time", "annotator"))
                    and (rec["decision"] != "edit" or _is_text(rec.get("caption")))):
                raise UserError(f"{path.name}:{no}: not a review record (needs a string id, a decision in "
                                f"{DECISIONS} and, for an edit, a caption)")
            records.append(rec)
    return records


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL review log in the order written ([] when there is none)."""
    path = refuse_symlink(path)
    return _split(path.read_bytes(), path) if path.is_file() else []


def open_store(store: str | os.PathLike, log: str | os.PathLike) -> dict[str, dict]:
    """Make a store with no decisions yet take in the JSONL log `log` when there is one; returns
    `read_decisions`. Without either, nothing is created."""
    records = read_log(log)
    if records:
        with _writing(store) as db:
            if db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 0:
                _insert(db, *records)
    return read_decisions(store)


def export_log(store: str | os.PathLike, out: str | os.PathLike, annotator: str | None = None) -> int:
    """Write every decision in the store (one annotator's, when named; "" is the unnamed one), in
    the order saved, as a JSONL log (atomically); returns how many."""
    records = [r for r in read_records(store) if annotator is None or r.get("annotator", "") == annotator]
    write_text(refuse_symlink(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


# ---------------------------------------------------------------------------- triplets
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


def export_accepted(triplets: list[Triplet], decisions: dict[str, dict], out: str | os.PathLike,
                    base: str | os.PathLike | None = None) -> int:
    """Write the accepted triplets as a triplet file (atomically), image paths relative to `base`
    (default: its folder); returns how many."""
    keep = accepted(triplets, decisions)
    write_triplets(refuse_symlink(out), keep, base)
    return len(keep)
