"""Reader for the official CIRR layout (`captions/cap.rc2.<split>.json`, `image_splits/split.rc2.<split>.json`).

Also holds the small JSON checks that the CIRCO reader shares.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cir.data.triplets import Triplet, normalize_path
from cir.errors import UserError


def load_json(path: Path, kind: type[list] | type[dict]):
    """The JSON value in `path`, which must be a `kind` (list or dict); a UserError otherwise."""
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise UserError(f"{path}: expected a JSON {'list' if kind is list else 'object'}, got {type(data).__name__}")
    return data


def require(entry: dict, key: str, kind: type, where: str, item: type | None = None, default=None):
    """entry[key], checked to be a `kind` (a list of `item` when given); a UserError naming `where` otherwise.

    A missing key gives `default` when one is given."""
    if key not in entry:
        if default is not None:
            return default
        raise UserError(f"{where}: missing field '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or (item is not None and not all(isinstance(x, item) for x in value)):
        wanted = f"a list of {item.__name__}" if item is not None else kind.__name__
        raise UserError(f"{where}: field '{key}' must be {wanted}, got {repr(value)[:80]}")
    return value


def read_cirr(root: str | os.PathLike, split: str) -> tuple[list[Triplet], list[str]]:
    """CIRR triplets of `split` (train, val, test1) and its gallery (every image of the split, sorted).

    Paths are absolute and normalised; `subset` is the img_set's six members, reference included.
    test1 has no target_hard, so its targets are empty. Missing files and malformed entries raise
    UserError naming the file (and the entry's index)."""
    root = Path(normalize_path(root))
    captions_file = root / "captions" / f"cap.rc2.{split}.json"
    split_file = root / "image_splits" / f"split.rc2.{split}.json"
    entries = load_json(captions_file, list)
    names = load_json(split_file, dict)
    paths = {name: normalize_path(require(names, name, str, str(split_file)), root) for name in names}
    gallery = sorted(set(paths.values()))
    missing = [p for p in gallery if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{split_file}: {len(missing)} of {len(gallery)} images not found, e.g. {missing[0]}")

    triplets, seen = [], set()
    for i, entry in enumerate(entries):
        t = _triplet(entry, split, paths, f"{captions_file}: entry {i}", split_file)
        if t.id in seen:
            raise UserError(f"{captions_file}: entry {i}: duplicate pairid {t.id}")
        seen.add(t.id)
        triplets.append(t)
    return triplets, gallery


def _triplet(entry, split: str, paths: dict[str, str], where: str, split_file: Path) -> Triplet:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object, got {type(entry).__name__}")

    def path_of(name: str) -> str:
        if name not in paths:
            raise UserError(f"{where}: image '{name}' is not listed in {split_file}")
        return paths[name]

    pairid = require(entry, "pairid", int, where)
    img_set = require(entry, "img_set", dict, where)
    has_target = "target_hard" in entry or not split.startswith("test")
    return Triplet(
        id=str(pairid),
        reference=path_of(require(entry, "reference", str, where)),
        caption=require(entry, "caption", str, where),
        targets=[path_of(require(entry, "target_hard", str, where))] if has_target else [],
        subset=[path_of(m) for m in require(img_set, "members", list, f"{where}: img_set", item=str)],
        meta={"dataset": "cirr", "pairid": pairid,
              "target_soft": require(entry, "target_soft", dict, where, default={}),
              "img_set_id": require(img_set, "id", int, f"{where}: img_set")},
    )
