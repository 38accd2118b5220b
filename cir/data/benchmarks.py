"""CIRR and CIRCO by name: read a split from its official layout, or write it as the project's triplet files.

    python -m cir.data.benchmarks --dataset cirr --root ROOT --split train val --out data/cirr [--images DIR]

writes OUT/<split>.jsonl (docs/triplets.md; paths relative to OUT, meta as the readers give it) and
OUT/gallery_<split>.txt (the split's images, one path a line), the files `cir.train --data OUT`
and `cir.evaluate --triplets/--gallery` read. CIRCO has no training split (val and test only).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from cir.atomic import write_text
from cir.data.circo import SPLITS as CIRCO_SPLITS, read_circo
from cir.data.cirr import SPLITS as CIRR_SPLITS, read_cirr
from cir.data.triplets import Triplet, write_triplets
from cir.errors import UserError

SPLITS = {"cirr": CIRR_SPLITS, "circo": CIRCO_SPLITS}
TEST_SPLITS = {"cirr": "test1", "circo": "test"}  # no public ground truth: submission files only


def read_benchmark(dataset: str, root: str | os.PathLike, split: str, images: str | os.PathLike | None = None
                   ) -> tuple[list[Triplet], list[str]]:
    """(triplets, gallery) of a CIRR or CIRCO split read from its official layout under `root`."""
    if dataset not in SPLITS:
        raise UserError(f"unknown benchmark {dataset!r}; choose from {', '.join(SPLITS)}")
    if split not in SPLITS[dataset]:
        extra = " (CIRCO has no training split)" if dataset == "circo" else ""
        raise UserError(f"{dataset} has the splits {', '.join(SPLITS[dataset])}, not {split!r}{extra}")
    triplets, gallery = (read_cirr if dataset == "cirr" else read_circo)(root, split, images)
    if not triplets:
        raise UserError(f"{dataset} {split} under {root} has no queries")
    return triplets, gallery


def export_benchmark(dataset: str, root, split: str, out: str | os.PathLike, images=None) -> tuple[Path, Path]:
    """Write `split` as OUT/<split>.jsonl and OUT/gallery_<split>.txt; -> their paths."""
    triplets, gallery = read_benchmark(dataset, root, split, images)
    out = Path(out)
    triplets_file, gallery_file = out / f"{split}.jsonl", out / f"gallery_{split}.txt"
    write_triplets(triplets_file, triplets)
    write_text(gallery_file, "".join(f"{os.path.relpath(p, out.resolve())}\n" for p in gallery))
    return triplets_file, gallery_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.data.benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(SPLITS), required=True, help="the benchmark")
    p.add_argument("--root", required=True, help="the dataset folder in its official layout (see cir.data.cirr, cir.data.circo)")
    p.add_argument("--split", nargs="+", required=True,
                   help="splits to write: cirr train, val, test1; circo val, test")
    p.add_argument("--images", default=None,
                   help="image folder, if not where the layout puts it (CIRR: the folder holding train/, dev/ and "
                        "test1/; CIRCO: the folder of COCO jpgs)")
    p.add_argument("--out", required=True, help="folder to write <split>.jsonl and gallery_<split>.txt into")
    a = p.parse_args(argv)
    for split in a.split:
        for path in export_benchmark(a.dataset, a.root, split, a.out, a.images):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from cir.cli import run_cli
    run_cli(main)
