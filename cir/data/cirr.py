"""Reader for CIRR (`captions/cap.rc2.<split>.json`, `image_splits/split.rc2.<split>.json`, images).

Two layouts of ROOT are recognised:
- the CIRR repository's: ROOT/captions, ROOT/image_splits, images in ROOT/img_raw/{train,dev,test1};
- CLIP4Cir's and SEARLE's: ROOT/cirr/captions, ROOT/cirr/image_splits, images in ROOT/{train,dev,test1}.
The split files name each image's path relative to the image folder ("./dev/dev-0-0-img0.png");
`image_dir` overrides where that folder is.
"""
from __future__ import annotations

import os
from pathlib import Path

from cir.data.annotations import load_json, require
from cir.data.triplets import Triplet, normalize_path
from cir.errors import UserError

SPLITS = ("train", "val", "test1")


def read_cirr(root: str | os.PathLike, split: str, image_dir: str | os.PathLike | None = None
              ) -> tuple[list[Triplet], list[str]]:
    """CIRR triplets of `split` (train, val, test1) and its gallery (every image of the split, sorted).

    Paths are absolute and normalised; `subset` is the img_set's six members, reference included.
    test1 has no target_hard, so its targets are empty. A missing file or image folder and
    malformed entries raise UserError naming the path it expected (and the entry's index)."""
    captions_file, split_file, paths = _split_images(root, split, image_dir)
    entries = load_json(captions_file, list)
    triplets, seen = [], set()
    for i, entry in enumerate(entries):
        t = _triplet(entry, split, paths, f"{captions_file}: entry {i}", split_file)
        if t.id in seen:
            raise UserError(f"{captions_file}: entry {i}: duplicate pairid {t.id}")
        seen.add(t.id)
        triplets.append(t)
    return triplets, sorted(set(paths.values()))


def cirr_image_names(root: str | os.PathLike, split: str, image_dir: str | os.PathLike | None = None
                     ) -> dict[str, str]:
    """{image path (as read_cirr gives it): CIRR image name ("test1-147-1-img1")} of `split`."""
    return {path: name for name, path in _split_images(root, split, image_dir)[2].items()}


def _split_images(root, split: str, image_dir) -> tuple[Path, Path, dict[str, str]]:
    """(captions file, split file, {image name: absolute path}) of `split`, every image checked to exist."""
    if split not in SPLITS:
        raise UserError(f"unknown CIRR split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(normalize_path(root))
    annotations = _annotation_dir(root, split)
    captions_file = annotations / "captions" / f"cap.rc2.{split}.json"
    split_file = annotations / "image_splits" / f"split.rc2.{split}.json"
    names = load_json(split_file, dict)
    relative = {name: require(names, name, str, str(split_file)) for name in names}
    if not relative:
        raise UserError(f"{split_file}: lists no images")
    bases = [Path(normalize_path(image_dir))] if image_dir is not None else list(
        dict.fromkeys([annotations / "img_raw", root]))
    first = min(relative)
    base = next((b for b in bases if os.path.isfile(normalize_path(relative[first], b))), None)
    if base is None:
        expected = " or ".join(normalize_path(relative[first], b) for b in bases)
        raise UserError(f"CIRR {split} images not found: expected {expected}"
                        + ("" if image_dir is not None else
                           "; pass --images DIR, the folder holding train/, dev/ and test1/"))
    paths = {name: normalize_path(rel, base) for name, rel in relative.items()}
    missing = sorted(p for p in set(paths.values()) if not os.path.isfile(p))
    if missing:
        raise UserError(f"{split_file}: {len(missing)} of {len(set(paths.values()))} images not found in {base}, "
                        f"e.g. {missing[0]}")
    return captions_file, split_file, paths


def _annotation_dir(root: Path, split: str) -> Path:
    """ROOT (the CIRR repository's layout) or ROOT/cirr (CLIP4Cir's and SEARLE's), whichever has the captions."""
    candidates = [root, root / "cirr"]
    for folder in candidates:
        if (folder / "captions" / f"cap.rc2.{split}.json").is_file():
            return folder
    expected = " or ".join(str(f / "captions" / f"cap.rc2.{split}.json") for f in candidates)
    raise UserError(f"CIRR {split} captions not found: expected {expected}")


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
