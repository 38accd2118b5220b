"""Attention heatmaps of one noun phrase over an image: in context, isolated, and their difference.

One matplotlib figure (Agg canvas, no pyplot, so threads can render at once) per phrase row:
[in context | isolated | colorbar]  [in context - isolated | colorbar]. The first two panels
share one colour scale, 0 to the larger maximum of the two maps; the difference uses a
symmetric diverging scale. Each patch of the model's grid is one flat square over the image.
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
ALPHA = 0.6  # heat over image
VIEW = 190  # pixels of each panel: the image as the model sees it
DPI = 100
# row layout in pixels: three panels, a colorbar after the second and the third, titles above
WIDTH, HEIGHT, TOP = 760, 250, 52
PANEL_X, BAR_X, BAR_W = (4, 198, 486), (392, 680), 12


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


def shared_norm(in_context: np.ndarray, isolated: np.ndarray) -> Normalize:
    """The one colour scale of both maps: 0 .. the larger maximum."""
    return Normalize(0.0, max(float(in_context.max()), float(isolated.max()), 1e-12))


def diff_norm(diff: np.ndarray) -> Normalize:
    m = max(float(np.abs(diff).max()), 1e-12)
    return Normalize(-m, m)


def overlay(view: np.ndarray, heat: np.ndarray, norm: Normalize, cmap: str) -> np.ndarray:
    """`heat` [g, g] coloured by `cmap` on `norm`'s scale, one flat square per patch, over `view` [S, S, 3]."""
    rgb = colormaps[cmap](norm(heat))[..., :3]
    cells = np.arange(view.shape[0]) * heat.shape[0] // view.shape[0]
    return ((1 - ALPHA) * view + ALPHA * 255 * rgb[cells][:, cells]).round().astype(np.uint8)


@dataclass
class PhraseRow:
    """A rendered phrase row and the scales it was drawn with."""

    image: np.ndarray  # [HEIGHT, WIDTH, 3] uint8
    norm: Normalize  # in-context and isolated panels
    diff_norm: Normalize  # difference panel


def phrase_row(view: Image.Image, in_context: np.ndarray, isolated: np.ndarray, title: str) -> PhraseRow:
    """Draw one phrase: maps [g, g] over `view` (from `model_view`, VIEW px square). The panels are
    composed with numpy; matplotlib draws only the text and the two colorbars."""
    norm, diff = shared_norm(in_context, isolated), in_context - isolated
    dnorm = diff_norm(diff)
    background = np.asarray(view, dtype=np.float32)
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    title = title.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (from JSON) crash the font code
    fig.text(4 / WIDTH, 1 - 14 / HEIGHT, title, fontsize=11, fontweight="bold", va="center")
    bottom = HEIGHT - TOP - VIEW
    for x, heat, n, cmap, name in ((PANEL_X[0], in_context, norm, CMAP, "in context"),
                                   (PANEL_X[1], isolated, norm, CMAP, "isolated"),
                                   (PANEL_X[2], diff, dnorm, DIFF_CMAP, "in context − isolated")):
        fig.figimage(overlay(background, heat, n, cmap), xo=x, yo=bottom)
        fig.text((x + VIEW / 2) / WIDTH, (bottom + VIEW + 10) / HEIGHT, name, fontsize=9, ha="center", va="center")
    for x, n, cmap in ((BAR_X[0], norm, CMAP), (BAR_X[1], dnorm, DIFF_CMAP)):
        cax = fig.add_axes((x / WIDTH, (bottom + 8) / HEIGHT, BAR_W / WIDTH, (VIEW - 16) / HEIGHT))
        fig.colorbar(ScalarMappable(n, cmap), cax=cax).ax.tick_params(labelsize=7)
    canvas.draw()
    return PhraseRow(np.asarray(canvas.buffer_rgba())[..., :3].copy(), norm, dnorm)
