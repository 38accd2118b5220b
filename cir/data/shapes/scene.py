"""The CIR-Shapes scene model: objects on a 3 x 3 grid of a 128 x 128 canvas, scenes, the
operations that change them, and how all three are sampled."""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, replace

CANVAS = 128
CELL = CANVAS / 3
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
