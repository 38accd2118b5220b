"""Latency of the Research views on this CPU: phrase influence of a 5-phrase caption, 10 prompt
variants, and the projection of the gallery, at N gallery images (the demo's embeddings repeated
with noise and renormalised, so ranks are over N distinct rows).

    python -m bench.explain_bench [--images 10000] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from cir.cli import parse_first, positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.explain_bench", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=positive_int, default=10_000, help="gallery size (default 10000)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs of each view; the median is reported (default 5)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    return p.parse_args(argv)


parse_first(__name__, parse_args)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cir.explain import (Gallery, InfluenceConfig, QueryEncoder, VariantConfig, phrase_influence,  # noqa: E402
                         prompt_variants, score_variants)
from cir.index import GalleryIndex  # noqa: E402
from cir.projection import ProjectionConfig, projection_of  # noqa: E402
from cir.ui.explorer import Explorer, as_image, phrase_spans  # noqa: E402

CAPTION = ("make the red circle at the top left blue, move the small green star to the bottom right "
           "and add a yellow square at the center")
PHRASES = ["the red circle", "the top left", "the small green star", "the bottom right", "a yellow square"]


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ex = Explorer.load(device="cpu")
    rng = np.random.default_rng(0)
    base = np.asarray(ex.index.embeddings, dtype=np.float32)
    emb = base[rng.integers(0, len(base), a.images)] + 0.05 * rng.normal(size=(a.images, base.shape[1])).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    gallery = Gallery(emb, [f"{i}" for i in range(a.images)])
    encoder = QueryEncoder(ex.model, ex.preprocess(as_image(ex.examples[0].reference)))
    phrases = phrase_spans(CAPTION, [[p] for p in PHRASES])
    ideal = [gallery.paths[0], gallery.paths[1]]
    variants = prompt_variants(CAPTION, phrases, VariantConfig(max_variants=10, shapes=True))[1:]  # 10 variants
    phrase_influence(encoder, CAPTION, phrases, gallery)  # warm-up
    out = {"images": a.images, "threads": torch.get_num_threads(), "phrases": len(phrases), "variants": len(variants),
           "influence_s": median_s(lambda: phrase_influence(encoder, CAPTION, phrases, gallery, (), InfluenceConfig()),
                                   a.repeats),
           "variants_s": median_s(lambda: score_variants(encoder, variants, gallery, ideal), a.repeats)}
    index = GalleryIndex.from_embeddings(emb)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        projection_of(index, folder, ProjectionConfig("pca"))
        out["projection_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        projection_of(index, folder, ProjectionConfig("pca"))
        out["projection_cached_s"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    from cir.cli import run_cli
    run_cli(main)
