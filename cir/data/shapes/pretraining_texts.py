"""Texts for the CLIP-style pretraining of the towers on CIR-Shapes scenes: whole-scene descriptions
with their region mentions (`describe_scene`), what covers each patch (`patch_contents`, indices into
`CELL_CONTENTS`) and the patches of a box (`patch_distribution_of_box`) for the dense losses."""
from __future__ import annotations

import random

from cir.data.shapes.scene import BACKGROUNDS, CANVAS, CELLS, COLORS, SHAPES, SIZES, Scene, cell_box

# Background phrasings of at most 3 CLIP tokens, so that even four objects (articles dropped) fit a
# 40-token context; scenes of up to three objects also get the longer ones.
SHORT_BACKGROUND_FORMS = ["{bg} background with {objs}", "{objs}, {bg} background"]
BACKGROUND_FORMS = SHORT_BACKGROUND_FORMS + ["{objs} on a {bg} background", "a {bg} background with {objs}",
                                             "{objs}; the background is {bg}"]


def describe_scene(scene: Scene, rng: random.Random) -> tuple[str, list[tuple[int, int, list[float]]]]:
    """A description naming the background and every object's size, color, shape and cell, in a
    random order and phrasing: "a small red circle at the top left and a large blue star in the
    center on a pink background" (a CLIP training text), and its region mentions: (start, end, box)
    of every object's words ("small red circle", its box) and every cell's ("top left", the cell)."""
    objs = rng.sample(scene.objects, len(scene.objects))
    article = "a " if len(objs) < 4 else ""
    names = []  # (text, [(start, end, box)] relative to the name)
    for o in objs:
        words = f"{o.size} {o.color} {o.shape}"
        at = _cell_phrase(rng, CELLS[o.cell])
        name = f"{article}{words} {at}"
        cell_start = len(name) - len(CELLS[o.cell])
        names.append((name, [(len(article), len(article) + len(words), o.box()),
                             (cell_start, len(name), cell_box(o.cell))]))
    join = rng.choice([", ", "; "])
    joins = [join] * (len(names) - 2) + [rng.choice([join, " and "])] if len(names) > 1 else []
    body, mentions = "", []
    for i, (name, spans) in enumerate(names):
        body += joins[i - 1] if i else ""
        mentions += [(len(body) + s, len(body) + e, box) for s, e, box in spans]
        body += name
    forms = BACKGROUND_FORMS if len(objs) < 4 else SHORT_BACKGROUND_FORMS
    form = rng.choice(forms)
    offset = len(form.split("{objs}")[0].format(bg=scene.background))
    return form.format(bg=scene.background, objs=body), [(s + offset, e + offset, box) for s, e, box in mentions]


# What a patch can show, as a text: one of 80 objects ("small red circle") or the background ("pink
# background"). Dense (patch-level) CLIP pretraining classifies patches into these.
CELL_CONTENTS = tuple(f"{size} {color} {shape}" for size in SIZES for color in COLORS for shape in SHAPES) + \
    tuple(f"{bg} background" for bg in BACKGROUNDS)


def patch_contents(scene: Scene, grid: int) -> list[int]:
    """Index into CELL_CONTENTS of what covers the centre of each patch of a grid x grid ViT
    (row-major): the object whose box holds it, else the background."""
    out = []
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) * CANVAS / grid, (r + 0.5) * CANVAS / grid
            inside = [o for o in scene.objects if (b := o.box())[0] <= x <= b[2] and b[1] <= y <= b[3]]
            out.append(CELL_CONTENTS.index(f"{inside[0].size} {inside[0].color} {inside[0].shape}" if inside
                                           else f"{scene.background} background"))
    return out


def patch_distribution_of_box(box: list[float], grid: int) -> list[float]:
    """Uniform distribution over the patches of a grid x grid ViT whose centres lie in `box` (canvas
    pixels); the patch nearest the box centre when none does. [grid * grid], row-major."""
    centres = [((c + 0.5) * CANVAS / grid, (r + 0.5) * CANVAS / grid) for r in range(grid) for c in range(grid)]
    inside = [box[0] <= x <= box[2] and box[1] <= y <= box[3] for x, y in centres]
    if not any(inside):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        nearest = min(range(len(centres)), key=lambda i: (centres[i][0] - cx) ** 2 + (centres[i][1] - cy) ** 2)
        inside = [i == nearest for i in range(len(centres))]
    return [float(v) / sum(inside) for v in inside]


def _cell_phrase(rng: random.Random, cell: str) -> str:
    if cell == "center":
        return rng.choice(["in the center", "at the center"])
    if cell in ("left", "right"):
        return f"on the {cell}"
    return rng.choice(["at the ", "in the "]) + cell if " " in cell else f"at the {cell}"
