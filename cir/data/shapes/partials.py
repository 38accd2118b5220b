"""Partial fulfilments of a CIR-Shapes query (its reference scene with a non-empty proper subset of
its operations applied): the gallery's and training's hard negatives."""
from __future__ import annotations

import itertools
import random

from PIL import Image

from cir.data.shapes.render import render
from cir.data.shapes.scene import Operation, Scene, apply_all


def has_partials(meta: dict) -> bool:
    """Whether a CIR-Shapes query (`meta` of its triplet) has partial fulfilments: a reference scene
    and 2+ operations."""
    return len(meta.get("operations") or []) >= 2 and meta.get("reference_scene") is not None


def partial_subsets(k: int) -> list[tuple[int, ...]]:
    """The non-empty proper subsets of k operations (by index), smallest first: the partial
    fulfilments of a k-operation query (2 for k = 2, 6 for k = 3)."""
    return [sub for r in range(1, k) for sub in itertools.combinations(range(k), r)]


def random_partials(meta: dict, rng: random.Random, count: int = 1) -> list[Image.Image]:
    """Partial fulfilments of a CIR-Shapes query (`meta` of its triplet), rendered: its reference
    scene with a non-empty proper subset of its operations applied, hard negatives that satisfy some
    of the conditions but not all. `count` distinct subsets drawn with `rng` (every subset, in
    `partial_subsets` order, where count is at least their number); [] where the query has no
    partials (see `has_partials`)."""
    if not has_partials(meta):
        return []
    subsets = partial_subsets(len(meta["operations"]))
    if count < len(subsets):
        subsets = rng.sample(subsets, count)
    return [render_partial(meta, sub) for sub in subsets]


def render_partial(meta: dict, subset: tuple[int, ...]) -> Image.Image:
    """The reference scene of a CIR-Shapes query (`meta` of its triplet) with the operations of
    `subset` (indices, as `partial_subsets` gives them) applied, rendered."""
    ops = meta["operations"]
    return render(apply_all(Scene.from_json(meta["reference_scene"]), [Operation.from_json(ops[i]) for i in subset]))
