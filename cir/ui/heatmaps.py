"""Attention heatmaps of one noun phrase over an image, one row per phrase.

One matplotlib figure (Agg canvas, no pyplot, so threads can render at once) per row:
- `phrase_row`: [in context | isolated | colorbar]  [in context - isolated | colorbar]; the first
  two panels share one colour scale, 0 to the larger maximum of the two maps; the difference uses
  a symmetric diverging scale.
- `compare_row`: the in-context and isolated maps of two models side by side (the CC model and
  its lambda = 0 twin: the paper's Figure 5), all four panels on one colour scale.
- `head_grid`: the in-context maps of every layer (one row each) and head, on one colour scale.
Each patch of the model's grid is drawn as one flat square over the image, or upsampled
bilinearly (`smooth`); `alpha` is the heat's opacity over the image. A phrase's box, when known
(the grounding of an example query), is outlined on every panel of its row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

CMAP, DIFF_CMAP = "inferno", "RdBu_r"
BOX_COLOUR, BOX_WIDTH = (0, 255, 128), 2  # outline of a phrase's known box
ALPHA = 0.6  # default opacity of the heat over the image
VIEW = 190  # pixels of each panel: the image as the model sees it
DPI = 100
GAP, BAR_GAP, BAR_W, BAR_SPACE = 4, 4, 12, 60  # panel gap; colorbar gap, width, and the room after it for ticks
HEIGHT, TOP = 250, 52


def select(maps: torch.Tensor, layer: int | None = None, head: int | None = None) -> torch.Tensor:
    """[..., L, H, g, g] -> [..., g, g]: one head or the mean over heads, then one layer or the mean
    over layers (the order of `cir.losses.reduce_maps`)."""
    maps = maps.mean(-3) if head is None else maps[..., head, :, :]
    return maps.mean(-3) if layer is None else maps[..., layer, :, :]


def model_view(image: Image.Image, size: int = VIEW) -> Image.Image:
    """The part of `image` the model sees (open_clip: shorter side resized, centre crop), `size` px square."""
    w, h = image.size
    s = size / min(w, h)
    image = image.convert("RGB").resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def view_box(box, size: tuple[int, int], view: int = VIEW) -> tuple[int, int, int, int]:
    """A box [x0, y0, x1, y1] in pixels of an image of `size` (w, h) -> in `model_view` pixels, clipped."""
    w, h = size
    s = view / min(w, h)
    left, top = (max(view, round(w * s)) - view) // 2, (max(view, round(h * s)) - view) // 2
    x0, y0, x1, y1 = (round(box[0] * s) - left, round(box[1] * s) - top, round(box[2] * s) - left,
                      round(box[3] * s) - top)
    clip = lambda v: min(max(v, 0), view - 1)
    return clip(x0), clip(y0), clip(x1), clip(y1)


def outline(panel: np.ndarray, box: tuple[int, int, int, int], colour=BOX_COLOUR, width: int = BOX_WIDTH) -> np.ndarray:
    """`panel` [S, S, 3] with the rectangle `box` (view pixels, inclusive) drawn `width` px wide inside it."""
    x0, y0, x1, y1 = box
    out = panel.copy()
    out[y0:y0 + width, x0:x1 + 1] = out[max(y0, y1 - width + 1):y1 + 1, x0:x1 + 1] = colour
    out[y0:y1 + 1, x0:x0 + width] = out[y0:y1 + 1, max(x0, x1 - width + 1):x1 + 1] = colour
    return out


def shared_norm(*maps: np.ndarray) -> Normalize:
    """The one colour scale of several maps: 0 .. their largest value."""
    return Normalize(0.0, max(max(float(m.max()) for m in maps), 1e-12))


def diff_norm(diff: np.ndarray) -> Normalize:
    m = max(float(np.abs(diff).max()), 1e-12)
    return Normalize(-m, m)


def upsample(heat: np.ndarray, size: int, smooth: bool = False) -> np.ndarray:
    """[g, g] -> [size, size]: each patch a flat square, or bilinear between patch centres (edges held)."""
    g = heat.shape[0]
    if not smooth:
        cells = np.arange(size) * g // size
        return heat[cells][:, cells]
    pos = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)  # pixel centres in patch-centre units
    lo = np.floor(pos).astype(int)
    hi, t = np.minimum(lo + 1, g - 1), pos - lo
    rows = heat[lo] * (1 - t)[:, None] + heat[hi] * t[:, None]
    return rows[:, lo] * (1 - t)[None] + rows[:, hi] * t[None]


def overlay(view: np.ndarray, heat: np.ndarray, norm: Normalize, cmap: str, alpha: float = ALPHA,
            smooth: bool = False) -> np.ndarray:
    """`heat` [g, g] coloured by `cmap` on `norm`'s scale over `view` [S, S, 3] at opacity `alpha`."""
    rgb = colormaps[cmap](norm(upsample(heat, view.shape[0], smooth)))[..., :3]
    return ((1 - alpha) * view + alpha * 255 * rgb).round().astype(np.uint8)


@dataclass
class PhraseRow:
    """A rendered row and the scales it was drawn with."""

    image: np.ndarray  # [HEIGHT, width, 3] uint8
    norm: Normalize  # the maps' panels
    diff_norm: Normalize | None  # the difference panel (phrase rows)


def _draw(view: Image.Image, title: str, groups: list[tuple[list[tuple[str, np.ndarray]], Normalize, str]],
          alpha: float, smooth: bool, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Groups of panels [(label, heat)], each group on its norm and cmap and closed by a colorbar;
    `box` (view pixels) outlined on every panel. Panels are composed with numpy; matplotlib draws
    only the text and the colorbars."""
    width = GAP + sum(len(panels) * (VIEW + GAP) + BAR_GAP + BAR_W + BAR_SPACE for panels, _, _ in groups)
    background = np.asarray(view, dtype=np.float32)
    fig = Figure(figsize=(width / DPI, HEIGHT / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    title = title.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (from JSON) crash the font code
    fig.text(4 / width, 1 - 14 / HEIGHT, title, fontsize=11, fontweight="bold", va="center")
    bottom, x = HEIGHT - TOP - VIEW, GAP
    for panels, norm, cmap in groups:
        for label, heat in panels:
            panel = overlay(background, heat, norm, cmap, alpha, smooth)
            fig.figimage(outline(panel, box) if box else panel, xo=x, yo=bottom)
            fig.text((x + VIEW / 2) / width, (bottom + VIEW + 10) / HEIGHT, label, fontsize=9, ha="center", va="center")
            x += VIEW + GAP
        cax = fig.add_axes(((x + BAR_GAP) / width, (bottom + 8) / HEIGHT, BAR_W / width, (VIEW - 16) / HEIGHT))
        fig.colorbar(ScalarMappable(norm, cmap), cax=cax).ax.tick_params(labelsize=7)
        x += BAR_GAP + BAR_W + BAR_SPACE
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def phrase_row(view: Image.Image, in_context: np.ndarray, isolated: np.ndarray, title: str, alpha: float = ALPHA,
               smooth: bool = False, diff_scale: float | None = None,
               box: tuple[int, int, int, int] | None = None) -> PhraseRow:
    """One phrase: maps [g, g] over `view` (from `model_view`, VIEW px square); the difference on
    ±`diff_scale` when given (a scale shared across phrases), else on its own largest value; `box`
    (from `view_box`) outlined."""
    norm, diff = shared_norm(in_context, isolated), in_context - isolated
    dnorm = Normalize(-diff_scale, diff_scale) if diff_scale else diff_norm(diff)
    image = _draw(view, title, [([("in context", in_context), ("isolated", isolated)], norm, CMAP),
                                ([("in context − isolated", diff)], dnorm, DIFF_CMAP)], alpha, smooth, box)
    return PhraseRow(image, norm, dnorm)


def compare_row(view: Image.Image, maps: dict[str, tuple[np.ndarray, np.ndarray]], title: str, alpha: float = ALPHA,
                smooth: bool = False, box: tuple[int, int, int, int] | None = None) -> PhraseRow:
    """One phrase under several models: {model name: (in context, isolated) [g, g]}, one colour scale;
    `box` (from `view_box`) outlined."""
    norm = shared_norm(*(m for pair in maps.values() for m in pair))
    panels = [(f"{name}: {kind}", m) for name, pair in maps.items() for kind, m in zip(("in context", "isolated"), pair)]
    return PhraseRow(_draw(view, title, [(panels, norm, CMAP)], alpha, smooth, box), norm, None)


def head_grid(view: Image.Image, heads: np.ndarray, title: str, alpha: float = ALPHA, smooth: bool = False,
              box: tuple[int, int, int, int] | None = None) -> PhraseRow:
    """One phrase's in-context maps of every layer and head, `heads` [L, H, g, g]: one row per layer,
    one panel per head, all on one colour scale; `box` outlined."""
    norm = shared_norm(*heads.reshape(-1, *heads.shape[-2:]))
    rows = [_draw(view, title if layer == 0 else "", [([(f"layer {layer + 1} · head {h + 1}", m)
                                                         for h, m in enumerate(per_head)], norm, CMAP)],
                  alpha, smooth, box)
            for layer, per_head in enumerate(heads)]
    return PhraseRow(np.concatenate(rows), norm, None)
