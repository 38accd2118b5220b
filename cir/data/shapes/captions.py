"""Modification captions of CIR-Shapes queries: the templates (training and held-out), filler
words, and the builder that records gold noun-phrase spans and grounding boxes."""
from __future__ import annotations

import functools
import random
import re

from cir.data.shapes.scene import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, Obj, Operation, cell_box

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
