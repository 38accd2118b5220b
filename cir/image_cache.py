"""The frozen image tower's outputs for every image a training file uses, computed once and kept on
disk, so that a run with a frozen image tower (`cir.train --freeze-image --image-cache DIR`) never
decodes, renders or runs the tower.

    python -m cir.image_cache --checkpoint CKPT --train data/shapes/train.jsonl --out data/shapes-cache-grid7

Per triplet: its reference, its first target and, for CIR-Shapes queries of 2+ operations, every
partial fulfilment (the fixed pool training draws its hard negatives from), rendered here once.
Files: `tower.npy` [N, E + P * W] fp16 (per image the pooled output [E], then the P patch outputs
[W] row-major, read memory-mapped), `rows.npz` (per triplet: reference row, target row, first
partial row, partial count) and `manifest.json` (the towers' hash, the triplet file's sha256,
shapes). The folder is filled in OUT.partial and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from cir.cli import add_device_flags, parse_first, run_cli

FORMAT = "cir-image-cache/1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.image_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model checkpoint whose (frozen) image tower encodes the images")
    p.add_argument("--train", required=True, help="training triplets JSONL")
    p.add_argument("--out", required=True, help="cache folder to write (replaced when complete)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--workers", type=int, default=1, help="decoding and rendering processes (default 1)")
    add_device_flags(p)
    return p.parse_args(argv)


parse_first(__name__, parse_args)

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cir.atomic import sha256_file, staged_dir, write_json
from cir.data.images import load_rgb
from cir.data.shapes.partials import has_partials, partial_subsets, render_partial
from cir.data.triplets import Triplet, read_triplets
from cir.errors import UserError


def towers_hash(model: torch.nn.Module) -> str:
    """sha256 of the image tower's weights (fp32 bytes in state-dict order): what a cache was made with."""
    h = hashlib.sha256()
    for name, value in model.clip.visual.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ImageCache:
    """A cache folder, opened: `tower` [N, F] fp16 (memory-mapped) and per triplet its rows."""

    folder: Path
    tower: np.ndarray
    reference: np.ndarray  # [T] row of each triplet's reference
    target: np.ndarray  # [T] row of its first target
    partial_start: np.ndarray  # [T] row of its first partial fulfilment
    partial_count: np.ndarray  # [T] partial fulfilments (0 for 1-operation queries)
    manifest: dict

    @staticmethod
    def open(folder: str | Path) -> "ImageCache":
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            rows = np.load(folder / "rows.npz")
            tower = np.load(folder / "tower.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"image cache {folder}: not a complete cache ({e}); build it with python -m cir.image_cache") from None
        if manifest.get("format") != FORMAT or list(tower.shape) != manifest.get("shape"):
            raise UserError(f"image cache {folder}: format or shape does not match its manifest; build it again")
        return ImageCache(folder, tower, rows["reference"], rows["target"], rows["partial_start"],
                          rows["partial_count"], manifest)

    def check(self, model: torch.nn.Module, train_file: Path) -> None:
        """Refuse a cache made from another triplet file or with other image-tower weights than `model`'s."""
        if self.manifest["train"]["sha256"] != sha256_file(train_file):
            raise UserError(f"image cache {self.folder} was made for another triplet file than {train_file}")
        if self.manifest["towers_sha256"] != towers_hash(model):
            raise UserError(f"image cache {self.folder} was made with other image-tower weights than this model's")

    def rows(self, rows) -> torch.Tensor:
        """Tower outputs of cache rows (a list of ints): [n, F] fp16."""
        return torch.from_numpy(np.ascontiguousarray(self.tower[np.asarray(rows, dtype=np.int64)]))

    def partials(self, i: int, count: int, rng: random.Random) -> list[int]:
        """Rows of `count` distinct partial fulfilments of triplet i drawn with `rng` (all of them when
        it has no more; [] for a 1-operation query)."""
        pool = list(range(int(self.partial_start[i]), int(self.partial_start[i] + self.partial_count[i])))
        return pool if count >= len(pool) else rng.sample(pool, count)


class _Sources(Dataset):
    """Item k: the preprocessed image of source k, a path or (triplet meta, operation subset) of a partial."""

    def __init__(self, sources: list, preprocess):
        self.sources, self.preprocess = sources, preprocess

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, k):
        src = self.sources[k]
        image = load_rgb(src) if isinstance(src, str) else render_partial(*src)
        return self.preprocess(image)


def image_sources(triplets: list[Triplet]) -> tuple[list, dict[str, np.ndarray]]:
    """The images to encode (paths, each once, and (meta, operation subset) pairs of partial
    fulfilments, in `partial_subsets` order) and each triplet's rows."""
    sources: list = []
    row_of: dict[str, int] = {}

    def path_row(path: str) -> int:
        if path not in row_of:
            row_of[path] = len(sources)
            sources.append(path)
        return row_of[path]

    T = len(triplets)
    rows = {k: np.zeros(T, dtype=np.int64) for k in ("reference", "target", "partial_start", "partial_count")}
    for i, t in enumerate(triplets):
        rows["reference"][i], rows["target"][i] = path_row(t.reference), path_row(t.targets[0])
    for i, t in enumerate(triplets):  # partials after every path, each triplet's in one run of rows
        meta = t.meta or {}
        subsets = partial_subsets(len(meta["operations"])) if has_partials(meta) else []
        rows["partial_start"][i], rows["partial_count"][i] = len(sources), len(subsets)
        sources += [(meta, sub) for sub in subsets]
    return sources, rows


@torch.no_grad()
def build_cache(model: torch.nn.Module, preprocess, train_file: Path, out: Path, batch_size: int = 256,
                workers: int = 1, device: str | torch.device = "cpu") -> ImageCache:
    """Encode every image of `train_file`'s triplets (and their partial fulfilments) with `model`'s
    image tower into the cache folder `out`, atomically. Returns it opened."""
    triplets, _ = read_triplets(train_file, check_images=False)
    if not triplets:
        raise UserError(f"no triplets in {train_file}")
    sources, rows = image_sources(triplets)
    model.eval()
    visual = model.clip.visual
    width = visual.output_dim + model.grid * model.grid * visual.transformer.width
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out, out.with_name(out.name + ".partial")) as stage:
        tower = np.lib.format.open_memmap(stage / "tower.npy", mode="w+", dtype=np.float16, shape=(len(sources), width))
        loader = DataLoader(_Sources(sources, preprocess), batch_size=batch_size, num_workers=workers)
        done = 0
        for images in tqdm(loader, desc="image cache", unit="batch"):
            pooled, patches = visual(images.to(device))
            flat = torch.cat([pooled, patches.flatten(1)], 1)
            tower[done:done + len(flat)] = flat.float().cpu().numpy().astype(np.float16)
            done += len(flat)
        tower.flush()
        del tower
        np.savez(stage / "rows.npz", **rows)
        write_json(stage / "manifest.json", {
            "format": FORMAT, "shape": [len(sources), width],
            "layout": {"pooled": visual.output_dim, "patches": model.grid * model.grid, "patch_width": visual.transformer.width},
            "towers_sha256": towers_hash(model),
            "train": {"path": str(train_file), "sha256": sha256_file(train_file), "triplets": len(triplets)},
            "images": {"paths": sum(isinstance(s, str) for s in sources),
                       "partials": sum(not isinstance(s, str) for s in sources)}})
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # the previous cache, if any
    return ImageCache.open(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from cir.checkpoint import load_checkpoint
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, _ = load_checkpoint(a.checkpoint, device)
    cache = build_cache(model, preprocess, Path(a.train), Path(a.out), a.batch_size, a.workers, device)
    m = cache.manifest
    print(f"wrote {a.out}: {m['shape'][0]:,} images ({m['images']['partials']:,} partial fulfilments), "
          f"{cache.tower.nbytes / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    run_cli(main)
