"""CIR-Shapes: the embedded, procedurally rendered benchmark (`docs/cir-shapes.md`).

    python -m cir.data.shapes --out DIR --train N --val N --test N --seed S

renders 128x128 scenes (3x3 grid, 1-4 objects) and composed queries of 1-3 operations with
varied phrasing, gold noun-phrase spans and grounding boxes, and for val/test a gallery with every
partial fulfilment of each multi-operation query. Output: `{split}.jsonl` in the triplet format,
`gallery_{split}.txt`, `images/{split}/*.png`, `manifest.json`.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import re
import random
from dataclasses import asdict, dataclass, replace
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from cir.atomic import atomic_path, remove_stale_temporaries, write_json, write_text
from cir.errors import UserError

CANVAS = 128
CELL = CANVAS / 3
SUPERSAMPLE = 4
MAX_JITTER = 3
BACKGROUNDS = {"white": (255, 255, 255), "gray": (200, 200, 200), "beige": (240, 225, 190), "pink": (250, 205, 215)}
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20),
          "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (25, 25, 25), "cyan": (30, 190, 200)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.45, "large": 0.85}
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
OPERATIONS = ("add", "remove", "recolor", "reshape", "resize", "move", "background")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major
    dx: int = 0  # jitter in px
    dy: int = 0

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def box(self) -> list[float]:
        """Pixel box [x0, y0, x1, y1] of the object's bounding square."""
        cx, cy = cell_center(self.cell)
        half = SIZES[self.size] * CELL / 2
        return [cx + self.dx - half, cy + self.dy - half, cx + self.dx + half, cy + self.dy + half]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def key(self) -> tuple:
        """Identity of a scene ignoring jitter (used to keep splits apart)."""
        return (self.background, tuple(sorted((o.shape, o.color, o.size, o.cell) for o in self.objects)))

    def valid(self) -> bool:
        names = [o.name for o in self.objects]
        cells = [o.cell for o in self.objects]
        return 1 <= len(self.objects) <= 4 and len(set(names)) == len(names) and len(set(cells)) == len(cells)

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) | {"cell_name": CELLS[o.cell]} for o in self.objects]}

    @staticmethod
    def from_json(d: dict) -> "Scene":
        return Scene(d["background"], tuple(Obj(**{k: v for k, v in o.items() if k != "cell_name"}) for o in d["objects"]))


def cell_center(cell: int) -> tuple[float, float]:
    r, c = divmod(cell, 3)
    return (c + 0.5) * CELL, (r + 0.5) * CELL


def cell_box(cell: int) -> list[float]:
    r, c = divmod(cell, 3)
    return [c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL]


# ----------------------------------------------------------------------------- rendering

def _polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "star":
        inner = half * math.sin(math.radians(18)) / math.sin(math.radians(54))
        pts = []
        for i in range(10):
            r = half if i % 2 == 0 else inner
            a = math.radians(-90 + 36 * i)
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    return None


def render(scene: Scene) -> Image.Image:
    """Draw a scene anti-aliased (supersampled, then box-filtered to 128x128 RGB)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (CANVAS * s, CANVAS * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = (v * s for v in o.box())
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        color = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, half), fill=color)
    return img.resize((CANVAS, CANVAS), Image.BOX)


# ----------------------------------------------------------------------------- sampling

def random_object(rng: random.Random, cell: int, taken_names: set[str]) -> Obj:
    while True:
        o = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), cell,
                rng.randint(-MAX_JITTER, MAX_JITTER), rng.randint(-MAX_JITTER, MAX_JITTER))
        if o.name not in taken_names:
            return o


def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 4)
    objs: list[Obj] = []
    for cell in rng.sample(range(9), n):
        objs.append(random_object(rng, cell, {o.name for o in objs}))
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(objs))


@dataclass(frozen=True)
class Operation:
    """One change. `obj` is the reference object it acts on (None for add/background)."""

    type: str
    obj: Obj | None = None
    after: Obj | None = None  # the object after the change (None for remove/background)
    background: str | None = None  # new background

    def apply(self, scene: Scene) -> Scene:
        if self.type == "background":
            return replace(scene, background=self.background)
        objs = [o for o in scene.objects if o != self.obj]
        if self.after is not None:
            objs.append(self.after)
        return replace(scene, objects=tuple(objs))

    @staticmethod
    def from_json(d: dict) -> "Operation":
        obj = lambda key: Obj(**{k: v for k, v in d[key].items() if k != "cell_name"}) if key in d else None
        return Operation(d["type"], obj("object"), obj("after"), d.get("background"))

    def to_json(self) -> dict:
        d = {"type": self.type}
        if self.obj is not None:
            d["object"] = asdict(self.obj) | {"cell_name": CELLS[self.obj.cell]}
        if self.after is not None:
            d["after"] = asdict(self.after) | {"cell_name": CELLS[self.after.cell]}
        if self.background is not None:
            d["background"] = self.background
        return d


def apply_all(scene: Scene, ops) -> Scene:
    for op in ops:
        scene = op.apply(scene)
    return scene


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
    ops, scene = meta["operations"], meta["reference_scene"]
    subsets = partial_subsets(len(ops))
    if count < len(subsets):
        subsets = rng.sample(subsets, count)
    return [render(apply_all(Scene.from_json(scene), [Operation.from_json(ops[i]) for i in sub])) for sub in subsets]


def sample_operations(rng: random.Random, scene: Scene, k: int, tries: int = 50) -> list[Operation] | None:
    """k operations on distinct objects whose every subset gives a valid scene, or None."""
    for _ in range(tries):
        ops: list[Operation] = []
        used_objs: set[Obj] = set()
        used_cells = {o.cell for o in scene.objects}
        types = rng.sample(OPERATIONS, k)
        for t in types:
            op = _sample_one(rng, scene, t, used_objs, used_cells)
            if op is None:
                break
            ops.append(op)
            if op.obj is not None:
                used_objs.add(op.obj)
            if op.after is not None:
                used_cells.add(op.after.cell)
        if len(ops) == k and all(apply_all(scene, sub).valid()
                                 for r in range(1, k + 1) for sub in itertools.combinations(ops, r)):
            return ops
    return None


def _sample_one(rng, scene: Scene, t: str, used_objs, used_cells) -> Operation | None:
    free_cells = [c for c in range(9) if c not in used_cells]
    names = {o.name for o in scene.objects}
    candidates = [o for o in scene.objects if o not in used_objs]
    jitter = lambda: (rng.randint(-MAX_JITTER, MAX_JITTER), rng.randint(-MAX_JITTER, MAX_JITTER))
    if t == "background":
        return Operation("background", background=rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    if t == "add":
        if not free_cells:
            return None
        return Operation("add", after=random_object(rng, rng.choice(free_cells), names))
    if not candidates:
        return None
    o = rng.choice(candidates)
    if t == "remove":
        return Operation("remove", obj=o)
    if t == "recolor":
        return Operation("recolor", obj=o, after=replace(o, color=rng.choice([c for c in COLORS if c != o.color])))
    if t == "reshape":
        return Operation("reshape", obj=o, after=replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape])))
    if t == "resize":
        return Operation("resize", obj=o, after=replace(o, size="large" if o.size == "small" else "small"))
    if t == "move":
        if not free_cells:
            return None
        dx, dy = jitter()
        return Operation("move", obj=o, after=replace(o, cell=rng.choice(free_cells), dx=dx, dy=dy))
    raise ValueError(t)


# ----------------------------------------------------------------------------- phrasing
# Templates: "{obj}" = the reference object (a noun phrase, grounded), "{cell}" = a cell phrase
# (grounded to the cell), "{new}" = a new object (noun phrase, not in the reference),
# "{shape_np}" = "a triangle", "{bg_np}" = "the background"; other slots are plain words.

TEMPLATES = {
    "add": ["add {new} at {cell}", "put {new} in {cell}", "place {new} at {cell}", "insert {new} in {cell}",
            "there should be {new} at {cell}", "include {new} at {cell}", "draw {new} in {cell}",
            "{cell} should get {new}"],
    "remove": ["remove {obj}", "delete {obj}", "take away {obj}", "get rid of {obj}", "erase {obj}",
               "without {obj}", "{obj} should be gone", "drop {obj}"],
    "recolor": ["make {obj} {color}", "change the color of {obj} to {color}", "recolor {obj} {color}",
                "paint {obj} {color}", "turn {obj} {color}", "{obj} should be {color}", "color {obj} {color}",
                "change {obj} to {color}"],
    "reshape": ["turn {obj} into {shape_np}", "change {obj} into {shape_np}", "make {obj} {shape_np}",
                "reshape {obj} into {shape_np}", "replace {obj} with {shape_np} of the same color",
                "{obj} should become {shape_np}", "swap {obj} for {shape_np}"],
    "resize": ["make {obj} {bigger}", "{resize_verb} {obj}", "{obj} should be {bigger}",
               "change the size of {obj} to {size}", "make {obj} {size}"],
    "move": ["move {obj} to {cell}", "shift {obj} to {cell}", "put {obj} at {cell}", "relocate {obj} to {cell}",
             "place {obj} in {cell}", "{obj} goes to {cell}", "slide {obj} over to {cell}"],
    "background": ["change {bg_np} to {bg}", "make {bg_np} {bg}", "set {bg_np} to {bg}", "use a {bg} background",
                   "switch {bg_np} to {bg}", "{bg_np} should be {bg}", "recolor {bg_np} {bg}"],
}
# Phrasings never used by the default generator: `--phrasing heldout` tests generalisation.
HELDOUT_TEMPLATES = {
    "add": ["i want {new} at {cell} too", "also show {new} in {cell}"],
    "remove": ["lose {obj}", "{obj} must disappear"],
    "recolor": ["give {obj} a {color} color", "{obj} needs to be {color} instead"],
    "reshape": ["{obj} becomes {shape_np}", "transform {obj} into {shape_np}"],
    "resize": ["{obj} needs to be {size}", "alter the size of {obj} so it is {size}"],
    "move": ["{obj} needs to sit at {cell}", "bring {obj} to {cell}"],
    "background": ["paint {bg_np} {bg}", "{bg_np} needs to become {bg}"],
}
JOINS = [" and ", ", then ", "; ", ", and ", ". ", ", ", " and also ", " then "]
FILLER_WORD = re.compile(r"[a-z]+")


@functools.lru_cache(maxsize=1)
def filler_words() -> tuple[str, ...]:
    """Words that training captions may carry in place of a template's words: the whole-word entries
    of the 20,000 most frequent CLIP BPE tokens (3-10 letters), minus every word of the templates
    (training and held-out: a held-out word, or one starting with its first five letters, is never
    seen in training), the scene vocabulary and the joins."""
    from open_clip.tokenizer import SimpleTokenizer

    used = " ".join(t for ts in list(TEMPLATES.values()) + list(HELDOUT_TEMPLATES.values()) for t in ts)
    used += " ".join(["", *JOINS, *COLORS, *SHAPES, *SIZES, *BACKGROUNDS, *CELLS, "please background little big"])
    used += " ".join(w for pair in RESIZE_WORDS.values() for ws in pair for w in ws)
    banned = set(FILLER_WORD.findall(used))
    stems = {w[:5] for ts in HELDOUT_TEMPLATES.values() for t in ts for w in FILLER_WORD.findall(t) if len(w) >= 5}
    encoder = SimpleTokenizer().encoder
    return tuple(w for w in (k[:-4] for k, i in sorted(encoder.items(), key=lambda kv: kv[1])
                             if k.endswith("</w>") and i < 20000)
                 if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 10
                 and w not in banned and w[:5] not in stems)
RESIZE_WORDS = {"large": (["larger", "bigger"], ["enlarge", "scale up", "grow"]),
                "small": (["smaller", "tinier"], ["shrink", "scale down", "reduce"])}


class CaptionBuilder:
    """Concatenates text while recording the character spans of noun phrases and their boxes."""

    def __init__(self):
        self.text = ""
        self.phrases: list[dict] = []  # gold noun phrases {"text","start","end"}
        self.grounding: list[dict] = []  # {"start","end","box","kind"}

    def add(self, s: str) -> None:
        self.text += s

    def add_phrase(self, s: str, box: list[float] | None = None, kind: str = "object") -> None:
        start = len(self.text)
        self.text += s
        self.phrases.append({"text": s, "start": start, "end": len(self.text)})
        if box is not None:
            self.grounding.append({"start": start, "end": len(self.text), "box": [round(v, 2) for v in box], "kind": kind})

    def add_object_ref(self, rng, o: Obj) -> None:
        """'the red circle' (sometimes 'the large red circle' or 'the red circle at the top left')."""
        r = rng.random()
        size = f"{o.size} " if r < 0.2 else ""
        if r > 0.85:  # a branch-level phrase holding two leaf phrases
            start = len(self.text)
            self.add_phrase(f"the {size}{o.name}", o.box())
            self.add(" " + rng.choice(["at", "in"]) + " ")
            self.add_phrase(f"the {CELLS[o.cell]}", cell_box(o.cell), kind="cell")
            self.phrases.insert(len(self.phrases) - 2, {"text": self.text[start:], "start": start, "end": len(self.text)})
            self.grounding.append({"start": start, "end": len(self.text), "box": [round(v, 2) for v in o.box()], "kind": "object"})
        else:
            self.add_phrase(f"the {size}{o.name}", o.box())


def phrase_operation(rng, b: CaptionBuilder, op: Operation, templates: dict,
                     filler: random.Random | None = None) -> None:
    """Append one operation's clause to the caption builder. With `filler`, each template word
    (not the slots) is swapped for a random `filler_words()` entry with probability 1/2."""
    template = rng.choice(templates[op.type])
    for piece in _split_template(template):
        if not piece.startswith("{"):
            if filler is not None:
                piece = FILLER_WORD.sub(lambda m: filler.choice(filler_words()) if filler.random() < 0.5 else m.group(),
                                        piece)
            b.add(piece)
        elif piece == "{obj}":
            b.add_object_ref(rng, op.obj)
        elif piece == "{cell}":
            b.add_phrase(f"the {CELLS[op.after.cell]}", cell_box(op.after.cell), kind="cell")
        elif piece == "{new}":
            a = op.after
            b.add_phrase(f"a {rng.choice(['small', 'little']) if a.size == 'small' else rng.choice(['large', 'big'])} {a.name}")
        elif piece == "{shape_np}":
            b.add_phrase(f"a {op.after.shape}")
        elif piece == "{bg_np}":
            b.add_phrase("the background")
        elif piece == "{color}":
            b.add(op.after.color)
        elif piece == "{bg}":
            b.add(op.background)
        elif piece == "{size}":
            b.add(op.after.size)
        elif piece == "{bigger}":
            b.add(rng.choice(RESIZE_WORDS[op.after.size][0]))
        elif piece == "{resize_verb}":
            b.add(rng.choice(RESIZE_WORDS[op.after.size][1]))
        else:
            raise ValueError(f"unknown slot {piece}")


def _split_template(t: str) -> list[str]:
    out, i = [], 0
    while i < len(t):
        j = t.find("{", i)
        if j < 0:
            out.append(t[i:])
            break
        if j > i:
            out.append(t[i:j])
        k = t.index("}", j)
        out.append(t[j:k + 1])
        i = k + 1
    return out


def make_caption(rng, ops: list[Operation], templates: dict, filler: float = 0.0,
                 filler_rng: random.Random | None = None) -> CaptionBuilder:
    """A caption for `ops`; each clause's template words are swapped for random words (see
    `phrase_operation`) with probability `filler`, drawn from `filler_rng` (so the rest of the
    caption, and every later scene, is what it would be without filler)."""
    b = CaptionBuilder()
    if rng.random() < 0.15:
        b.add("please ")
    for i, op in enumerate(ops):
        if i:
            b.add(rng.choice(JOINS))
        swap = filler > 0 and filler_rng.random() < filler
        phrase_operation(rng, b, op, templates, filler_rng if swap else None)
    if rng.random() < 0.3:
        b.add(".")
    return b


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


# What each cell holds, as a text: one of 80 objects ("small red circle") or, for an empty cell, the
# background ("pink background"). Dense (patch-level) CLIP pretraining classifies patches into these.
CELL_CONTENTS = tuple(f"{size} {color} {shape}" for size in SIZES for color in COLORS for shape in SHAPES) + \
    tuple(f"{bg} background" for bg in BACKGROUNDS)


def cell_contents(scene: Scene) -> list[int]:
    """Index into CELL_CONTENTS of what each of the 9 cells (row-major) holds."""
    out = [CELL_CONTENTS.index(f"{scene.background} background")] * 9
    for o in scene.objects:
        out[o.cell] = CELL_CONTENTS.index(f"{o.size} {o.color} {o.shape}")
    return out


def patch_cells(grid: int) -> list[int]:
    """The cell (0..8) holding the centre of each patch of a grid x grid ViT (row-major); the square
    canvas is resized to the input size as a whole, so patch j's centre lies in cell row/column
    floor(3 (j + 0.5) / grid)."""
    centre = [int(3 * (j + 0.5) / grid) for j in range(grid)]
    return [3 * r + c for r in centre for c in centre]


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


# ----------------------------------------------------------------------------- a split

def _render_job(job: tuple[str, dict]) -> None:
    path, scene = job
    with atomic_path(path, bulk=True) as tmp:
        render(Scene.from_json(scene)).save(tmp, format="PNG")


def build_split(rng: random.Random, split: str, n: int, taken_keys: set, ks: tuple[int, ...], templates: dict,
                with_partials: bool, filler: float = 0.0, filler_rng: random.Random | None = None
                ) -> tuple[list[dict], list[tuple[str, dict]], list[str]]:
    """Sample n queries (`filler`, `filler_rng`: see `make_caption`). Returns (triplet json
    objects, render jobs (relpath, scene), gallery relpaths)."""
    triplets, jobs, gallery = [], [], []
    keys_here: set = set()
    while len(triplets) < n:
        scene = random_scene(rng)
        key = scene.key()
        if key in taken_keys or key in keys_here:
            continue
        k = rng.choice(ks)
        ops = sample_operations(rng, scene, k)
        if ops is None:
            continue
        keys_here.add(key)
        qid = f"{split}-{len(triplets):06d}"
        target = apply_all(scene, ops)
        ref_path, tgt_path = f"images/{split}/{qid}-ref.png", f"images/{split}/{qid}-tgt.png"
        jobs += [(ref_path, scene.to_json()), (tgt_path, target.to_json())]
        gallery += [ref_path, tgt_path]
        partials = []
        if with_partials:
            for sub in partial_subsets(k):  # none for k = 1
                p = f"images/{split}/{qid}-partial-{''.join(map(str, sub))}.png"
                jobs.append((p, apply_all(scene, [ops[i] for i in sub]).to_json()))
                gallery.append(p)
                partials.append({"path": p, "operations": list(sub)})
        b = make_caption(rng, ops, templates, filler, filler_rng)
        triplets.append({
            "id": qid, "reference": ref_path, "caption": b.text, "targets": [tgt_path],
            "noun_phrases": b.phrases,
            "meta": {"dataset": "cir-shapes", "num_modifications": k, "operations": [op.to_json() for op in ops],
                     "grounding": b.grounding, "partials": partials,
                     "reference_scene": scene.to_json(), "target_scene": target.to_json()},
        })
    taken_keys |= keys_here
    return triplets, jobs, gallery


def scene_keys(triplet_files) -> set:
    """Reference-scene keys of existing CIR-Shapes triplet files (to keep a new dataset apart)."""
    keys = set()
    for path in triplet_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    keys.add(Scene.from_json(json.loads(line)["meta"]["reference_scene"]).key())
    return keys


def generate(out: str | Path, sizes: dict[str, int], seed: int, ks=(1, 2, 3), phrasing: str = "default",
             workers: int = 2, progress: bool = True, exclude: set | None = None, filler: float = 0.25) -> dict:
    """Render a CIR-Shapes dataset into `out`; returns the manifest.

    `exclude`: reference-scene keys that no split may use (e.g. another dataset's). `filler`: the
    share of training clauses with random words in place of template words (`make_caption`); the
    scenes, operations and the other splits do not depend on it."""
    out = Path(out)
    templates = TEMPLATES if phrasing == "default" else HELDOUT_TEMPLATES
    rng = random.Random(seed)
    taken: set = set(exclude or ())
    all_jobs = []
    per_split = {}
    for split, n in sizes.items():
        if n <= 0:
            continue
        split_seed = rng.getrandbits(64)
        triplets, jobs, gallery = build_split(random.Random(split_seed), split, n, taken, ks, templates,
                                              with_partials=split != "train", filler=filler if split == "train" else 0.0,
                                              filler_rng=random.Random(f"filler-{split_seed}"))
        per_split[split] = (triplets, gallery)
        all_jobs += jobs
    for split in per_split:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / "images" / split)  # left by a killed earlier run
    jobs_abs = [(str(out / p), s) for p, s in all_jobs]
    bar = tqdm(total=len(jobs_abs), desc="rendering", unit="img", disable=not progress)
    if workers > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs_abs, chunksize=64):
                bar.update()
    else:
        for j in jobs_abs:
            _render_job(j)
            bar.update()
    bar.close()
    for split, (triplets, gallery) in per_split.items():
        with atomic_path(out / f"{split}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for t in triplets:
                f.write(json.dumps(t) + "\n")
        write_text(out / f"gallery_{split}.txt", "\n".join(gallery) + "\n")
    manifest = {"dataset": "cir-shapes", "seed": seed, "sizes": {s: len(v[0]) for s, v in per_split.items()},
                "num_modifications": list(ks), "phrasing": phrasing, "filler": filler, "spec": "docs/cir-shapes.md",
                "images": len(all_jobs)}
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cir.data.shapes", description=__doc__,
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
