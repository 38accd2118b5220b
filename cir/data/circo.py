"""Reader for the official CIRCO layout: ROOT/annotations/<split>.json and the COCO 2017 unlabeled
images, ROOT/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg (the gallery of every split)."""
from __future__ import annotations

import os
from pathlib import Path

from cir.data.annotations import load_json, require
from cir.data.triplets import Triplet, normalize_path
from cir.errors import UserError

DEFAULT_IMAGE_DIR = "COCO2017_unlabeled/unlabeled2017"
SPLITS = ("val", "test")


def read_circo(root: str | os.PathLike, split: str, image_dir: str | os.PathLike | None = None
               ) -> tuple[list[Triplet], list[str]]:
    """CIRCO triplets of `split` (val, test) and the gallery (every `<digits>.jpg` in the image folder, sorted).

    Images are `<image_dir>/<12-digit id>.jpg`, `image_dir` defaulting to
    `root/COCO2017_unlabeled/unlabeled2017`. Targets are the gt_img_ids' paths, target_img_id's
    first (empty for test). Missing files and malformed entries raise UserError naming the path
    it expected (and the entry's index)."""
    if split not in SPLITS:
        raise UserError(f"unknown CIRCO split {split!r}; choose from {', '.join(SPLITS)} (CIRCO has no training split)")
    root = Path(normalize_path(root))
    annotations_file = root / "annotations" / f"{split}.json"
    entries = load_json(annotations_file, list)
    image_dir = Path(normalize_path(image_dir if image_dir is not None else root / DEFAULT_IMAGE_DIR))
    if not image_dir.is_dir():
        raise UserError(f"CIRCO image folder not found: {image_dir} (the COCO 2017 unlabeled images; "
                        "pass --images DIR)")
    gallery = sorted(normalize_path(p) for p in image_dir.glob("*.jpg") if p.stem.isdigit())

    triplets, seen, in_gallery = [], set(), set(gallery)
    for i, entry in enumerate(entries):
        t = _triplet(entry, split, image_dir, in_gallery, f"{annotations_file}: entry {i}")
        if t.id in seen:
            raise UserError(f"{annotations_file}: entry {i}: duplicate id {t.id}")
        seen.add(t.id)
        triplets.append(t)
    return triplets, gallery


def _triplet(entry, split: str, image_dir: Path, in_gallery: set[str], where: str) -> Triplet:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object, got {type(entry).__name__}")

    def path_of(image_id: int) -> str:
        path = str(image_dir / f"{image_id:012d}.jpg")
        if path not in in_gallery:
            raise UserError(f"{where}: image not found: {path}")
        return path

    query_id = str(require(entry, "id", int, where))
    reference = path_of(require(entry, "reference_img_id", int, where))
    caption = require(entry, "relative_caption", str, where)
    targets = []
    if "gt_img_ids" in entry or not split.startswith("test"):
        target = require(entry, "target_img_id", int, where)
        targets = [target, *require(entry, "gt_img_ids", list, where, item=int)]
    return Triplet(
        id=query_id,
        reference=reference,
        caption=caption,
        targets=[path_of(g) for g in dict.fromkeys(targets)],
        meta={"dataset": "circo", "shared_concept": require(entry, "shared_concept", str, where),
              "semantic_aspects": require(entry, "semantic_aspects", list, where, default=[])},
    )


def coco_id(path: str | os.PathLike) -> int:
    """The COCO image id of a CIRCO gallery path (`.../000000009761.jpg` -> 9761)."""
    return int(Path(path).stem)
