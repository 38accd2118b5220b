"""CIR-Shapes: the embedded, procedurally rendered benchmark (`docs/cir-shapes.md`).

    python -m cir.data.shapes --out DIR --train N --val N --test N --seed S

renders 128x128 scenes (3x3 grid, 1-4 objects) and composed queries of 1-3 operations with
varied phrasing, gold noun-phrase spans and grounding boxes, and for val/test a gallery with every
partial fulfilment of each multi-operation query. Output: `{split}.jsonl` in the triplet format
(`docs/triplets.md`), `gallery_{split}.txt`, `images/{split}/*.png`, `manifest.json`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cir.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.data.shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; existing files are overwritten)")
    p.add_argument("--train", type=int, default=0, help="number of training triplets (default 0)")
    p.add_argument("--val", type=int, default=0, help="number of validation triplets (default 0)")
    p.add_argument("--test", type=int, default=0, help="number of test triplets (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)")
    p.add_argument("--num-modifications", default="1,2,3",
                   help="comma-separated operation counts per caption, drawn uniformly (default 1,2,3)")
    p.add_argument("--phrasing", choices=["default", "heldout"], default="default",
                   help="caption templates: the training ones, or a held-out set never used for training")
    p.add_argument("--filler", type=float, default=0.25,
                   help="share of training-caption clauses whose template words are each swapped, with probability "
                        "1/2, for a random word of the CLIP vocabulary that no template (training or held-out) and "
                        "no scene description uses, so a model learns to read an operation from its arguments "
                        "(objects, cells, colors) rather than from one verb; train split only (default 0.25; 0 = off)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    p.add_argument("--exclude-scenes", action="append", default=[], metavar="JSONL",
                   help="never reuse a reference scene of this CIR-Shapes triplet file (repeatable), "
                        "e.g. render a test set apart from an existing training set")
    a = p.parse_args(argv)
    try:
        ks = tuple(int(x) for x in a.num_modifications.split(","))
    except ValueError:
        raise UserError(f"--num-modifications must be integers like 1,2,3, got {a.num_modifications!r}") from None
    if not ks or not all(1 <= k <= 3 for k in ks):
        raise UserError("--num-modifications values must be between 1 and 3")
    if min(a.train, a.val, a.test) < 0 or a.train + a.val + a.test == 0:
        raise UserError("give a positive size for at least one of --train, --val, --test")
    for f in a.exclude_scenes:
        if not Path(f).is_file():
            raise UserError(f"--exclude-scenes: no such file {f}")
    from cir.data.shapes.dataset import generate, scene_keys  # after parsing: --help and flag errors stay quick

    exclude = scene_keys(a.exclude_scenes)
    if not 0 <= a.filler <= 1:
        raise UserError(f"--filler must be between 0 and 1, got {a.filler}")
    m = generate(a.out, {"train": a.train, "val": a.val, "test": a.test}, a.seed, ks, a.phrasing, a.workers,
                 exclude=exclude, filler=a.filler)
    print(f"wrote {m['images']} images and {sum(m['sizes'].values())} triplets to {a.out}")
    return 0


if __name__ == "__main__":
    from cir.cli import run_cli
    run_cli(main)
