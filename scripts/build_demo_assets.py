"""Build the explorer's shipped demo: a small CIR-Shapes test split and its gallery index.

    python scripts/build_demo_assets.py [--checkpoint CKPT] [--out assets/demo] [--queries 60] [--seed 7]

writes OUT/examples.jsonl (the queries, triplet format, paths relative to OUT), OUT/gallery.txt
(references, targets and partial fulfilments), OUT/images/test/*.png, OUT/manifest.json (the
dataset's) and OUT/index/ (built with `cir.index` and CKPT; it stores paths relative to the index
folder, so the checkout can move). The seed must be one training never used; give the
training triplet files with --exclude-scenes to keep their scenes out. OUT is replaced at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.atomic import replace_dir  # noqa: E402
from cir.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from cir.cli import run_cli  # noqa: E402
from cir.data.shapes.dataset import generate, scene_keys  # noqa: E402
from cir.errors import UserError  # noqa: E402
from cir.index import build_index  # noqa: E402

SIZE_BUDGET = 2_000_000  # bytes; a warning above it


def build(out: str | os.PathLike, checkpoint=None, queries: int = 60, seed: int = 7, exclude=(),
          device: str = "cpu", progress: bool = True) -> dict:
    """Render, index and put the demo at `out`; returns {"queries", "images", "bytes"}."""
    out = Path(out)
    checkpoint = Path(checkpoint or DEFAULT_CHECKPOINT)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    if queries < 1:
        raise UserError(f"--queries must be positive, got {queries}")
    for f in exclude:
        if not Path(f).is_file():
            raise UserError(f"--exclude-scenes: no such file {f}")
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    manifest = generate(staging, {"test": queries}, seed, workers=1, progress=progress, exclude=scene_keys(exclude))
    (staging / "test.jsonl").rename(staging / "examples.jsonl")
    (staging / "gallery_test.txt").rename(staging / "gallery.txt")
    build_index(staging / "index", staging / "gallery.txt", checkpoint, device=device, progress=progress)
    old = out.with_name(out.name + ".staging.old")
    replace_dir(staging, out)
    for leftover in (staging, old):  # the previous demo, wherever the swap left it
        shutil.rmtree(leftover, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"queries": queries, "images": manifest["images"], "bytes": size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint the index is built with (default: the shipped one)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo"),
                   help="demo folder to (re)place (default: assets/demo)")
    p.add_argument("--queries", type=int, default=60, help="example queries to render (default 60)")
    p.add_argument("--seed", type=int, default=7, help="CIR-Shapes seed, one training never used (default 7)")
    p.add_argument("--exclude-scenes", action="append", default=[], metavar="JSONL",
                   help="never reuse a reference scene of this CIR-Shapes triplet file, e.g. the training set (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device for embedding the gallery (default cpu)")
    a = p.parse_args(argv)
    r = build(a.out, a.checkpoint, a.queries, a.seed, a.exclude_scenes, a.device)
    print(f"wrote {a.out}: {r['queries']} example queries, {r['images']} images, {r['bytes'] / 1e6:.2f} MB")
    if r["bytes"] > SIZE_BUDGET:
        print(f"warning: the demo exceeds {SIZE_BUDGET / 1e6:.0f} MB; use fewer --queries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
