"""The project's common triplet format (`docs/triplets.md`): read, validate, write.

One JSON object per line: id, reference, caption, targets, [subset], [noun_phrases], [meta].
Image paths are stored relative to the file's folder (or absolute) and resolved to absolute,
normalised paths on reading, so the same image named two ways is one id everywhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from cir.atomic import atomic_path
from cir.data.images import decode_problem
from cir.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KNOWN_FIELDS = ("id", "reference", "caption", "targets", "subset", "noun_phrases", "meta")


def normalize_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """Absolute, normalised form of `path` (relative paths are taken from `base`)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base or ".") / p
    return os.path.normpath(os.path.abspath(p))


@dataclass
class Triplet:
    """One composed-retrieval query. Paths are absolute and normalised."""

    id: str
    reference: str
    caption: str
    targets: list[str] = field(default_factory=list)
    subset: list[str] | None = None
    noun_phrases: list[dict] | None = None  # [{"text", "start", "end"}] character spans in caption
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # unknown fields, kept when the file is rewritten

    def to_json(self, base: str | os.PathLike | None = None) -> dict:
        """The JSON object of this triplet, paths made relative to `base` when given."""
        rel = (lambda p: os.path.relpath(p, base)) if base is not None else (lambda p: p)
        obj = {"id": self.id, "reference": rel(self.reference), "caption": self.caption,
               "targets": [rel(t) for t in self.targets]}
        if self.subset is not None:
            obj["subset"] = [rel(s) for s in self.subset]
        if self.noun_phrases is not None:
            obj["noun_phrases"] = self.noun_phrases
        if self.meta:
            obj["meta"] = self.meta
        obj.update(self.extra)
        return obj


class BadLine(UserError):
    """A triplet line that breaks the format; the message names file and line."""


class _ImageChecker:
    """Checks that an image exists and decodes, once per path."""

    def __init__(self):
        self._seen: dict[str, str | None] = {}

    def problem(self, path: str) -> str | None:
        if path not in self._seen:
            self._seen[path] = image_problem(path)
        return self._seen[path]


def image_problem(path: str) -> str | None:
    """None when `path` is an image the project's loader reads, else a short reason."""
    if not os.path.isfile(path):
        return f"image not found: {path}"
    why = decode_problem(path)
    return None if why is None else f"image cannot be decoded: {path} ({why})"


def _parse_line(obj, base: str, line_no: int, where: str) -> Triplet:
    if not isinstance(obj, dict):
        raise BadLine(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, kind in (("id", str), ("reference", str), ("caption", str)):
        if key not in obj:
            raise BadLine(f"{where}: missing required field '{key}'")
        if not isinstance(obj[key], kind):
            raise BadLine(f"{where}: field '{key}' must be a string")
    if "targets" not in obj:
        raise BadLine(f"{where}: missing required field 'targets'")
    for key in ("targets", "subset"):
        if key in obj and not (isinstance(obj[key], list) and all(isinstance(x, str) for x in obj[key])):
            raise BadLine(f"{where}: field '{key}' must be a list of strings")
    try:
        obj["caption"].encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadLine(f"{where}: the caption is not valid Unicode text (a lone surrogate at character {e.start})") from None
    nps = obj.get("noun_phrases")
    if nps is not None:
        cap = obj["caption"]
        if not isinstance(nps, list):
            raise BadLine(f"{where}: field 'noun_phrases' must be a list")
        for np_ in nps:
            if not (isinstance(np_, dict) and isinstance(np_.get("start"), int) and isinstance(np_.get("end"), int)
                    and 0 <= np_["start"] < np_["end"] <= len(cap)):
                raise BadLine(f"{where}: noun phrase {np_!r} is not a span inside the caption")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise BadLine(f"{where}: field 'meta' must be an object")
    return Triplet(
        id=obj["id"],
        reference=normalize_path(obj["reference"], base),
        caption=obj["caption"],
        targets=[normalize_path(t, base) for t in obj["targets"]],
        subset=[normalize_path(s, base) for s in obj["subset"]] if "subset" in obj else None,
        noun_phrases=nps,
        meta=meta,
        extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
    )


def read_triplets(path: str | os.PathLike, skip_bad: bool = False, check_images: bool = True,
                  base: str | os.PathLike | None = None, max_lines: int | None = None,
                  max_line_chars: int | None = None) -> tuple[list[Triplet], list[str]]:
    """Read a triplet JSONL file; relative image paths are taken from `base` (default: the file's folder).

    Returns (triplets, problems). A bad line (invalid JSON, missing field, duplicate id, missing or
    undecodable image, more than `max_line_chars` characters: never held whole) raises a UserError
    naming file and line, or with `skip_bad` is skipped and its one-line reason appended to
    `problems`. A file of more than `max_lines` lines is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"triplet file not found: {path}")
    base = str(Path(base or path.parent).resolve())
    checker = _ImageChecker()
    triplets: list[Triplet] = []
    problems: list[str] = []
    ids: set[str] = set()
    with open(path, encoding="utf-8", errors="strict") as f:
        for line_no, raw in enumerate(_lines(f, path, max_line_chars), start=1):
            where = f"{path}:{line_no}"
            if max_lines is not None and line_no > max_lines:
                raise UserError(f"{path.name}: more than {max_lines:,} lines; split it into smaller files")
            if not raw.strip():
                continue
            try:
                if raw is _TOO_LONG:
                    raise BadLine(f"{where}: longer than {max_line_chars:,} characters")
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise BadLine(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise BadLine(f"{where}: not valid JSON (nested too deeply)") from None
                t = _parse_line(obj, base, line_no, where)
                if t.id in ids:
                    raise BadLine(f"{where}: duplicate id '{t.id}'")
                if check_images:
                    for img in [t.reference, *t.targets]:
                        if (why := checker.problem(img)) is not None:
                            raise BadLine(f"{where}: {why}")
            except BadLine as e:
                if not skip_bad:
                    raise
                problems.append(str(e))
                continue
            ids.add(t.id)
            triplets.append(t)
    return triplets, problems


_TOO_LONG = "too long"  # stands for a line over the length limit, which is skipped unread


def _lines(f, path: Path, max_chars: int | None = None) -> Iterable[str]:
    """The file's lines; one longer than `max_chars` is read in pieces and given as _TOO_LONG."""
    try:
        if max_chars is None:
            yield from f
            return
        while line := f.readline(max_chars + 1):
            if len(line) > max_chars and not line.endswith("\n"):
                while (rest := f.readline(max_chars)) and not rest.endswith("\n"):
                    pass
                line = _TOO_LONG
            yield line
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def write_triplets(path: str | os.PathLike, triplets: Iterable[Triplet], base: str | os.PathLike | None = None) -> None:
    """Write triplets atomically, image paths relative to `base` (default: the file's folder)."""
    path = Path(path)
    base = str(Path(base or path.parent).resolve())
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for t in triplets:
            f.write(json.dumps(t.to_json(base), ensure_ascii=False) + "\n")


def read_gallery(spec: str | os.PathLike) -> list[str]:
    """Gallery image paths (absolute, normalised, de-duplicated, sorted for a folder).

    `spec` is a folder (every image file below it) or a text file with one path per line
    (relative paths taken from the file's folder)."""
    spec = Path(spec)
    if spec.is_dir():
        paths = [normalize_path(p) for p in spec.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        return sorted(set(paths))
    if not spec.is_file():
        raise UserError(f"gallery not found: {spec} (give a folder of images or a text file of paths)")
    base = str(spec.parent.resolve())
    seen: dict[str, None] = {}
    with open(spec, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                seen.setdefault(normalize_path(line.strip(), base))
    return list(seen)


def read_training_triplets(data: str | os.PathLike | None, train: str | os.PathLike | None) -> tuple[Path, list[Triplet]]:
    """(`train`, or `data`/train.jsonl, and its triplets) for a training stage; images are checked when loaded."""
    if not (data or train):
        raise UserError("give --data DIR or --train FILE")
    path = Path(train) if train else Path(data) / "train.jsonl"
    triplets = read_triplets(path, check_images=False)[0]
    if not triplets:
        raise UserError(f"no triplets in {path}")
    return path, triplets
