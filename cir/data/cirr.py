"""Reader for the official CIRR layout (`captions/cap.rc2.<split>.json`, `image_splits/split.rc2.<split>.json`)."""
from __future__ import annotations

import os
from pathlib import Path

from cir.data.annotations import load_json, require
from cir.data.triplets import Triplet, normalize_path
from cir.errors import UserError


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
