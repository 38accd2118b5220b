"""Drawing a CIR-Shapes scene: 128 x 128 RGB, anti-aliased."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from cir.data.shapes.scene import BACKGROUNDS, CANVAS, COLORS, Scene

SUPERSAMPLE = 4


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
