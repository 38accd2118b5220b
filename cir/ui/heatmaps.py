"""Attention heatmaps of one noun phrase over an image, one row per phrase.

One image per row, composed with numpy and PIL in the look of a matplotlib figure (its colour
maps, font, ticks and tick labels); drawing an actual figure takes about a second per row:
- `phrase_row`: [in context | isolated | colorbar]  [in context - isolated | colorbar]; the first
  two panels share one colour scale, 0 to the larger maximum of the two maps; the difference uses
  a symmetric diverging scale.
- `compare_row`: the in-context and isolated maps of several models side by side (e.g. the CC
  model and its lambda = 0 twin: the paper's Figure 5), all panels on one colour scale, each
  model's maps on its own patch grid.
- `head_grid`: the in-context maps of every layer (one row each) and head, on one colour scale.
Each patch of the model's grid is drawn as one flat square over the image, or upsampled
bilinearly (`smooth`); `alpha` is the heat's opacity over the image. A phrase's box, when known
(the grounding of an example query), is outlined on every panel of its row.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from matplotlib import colormaps, font_manager
from matplotlib.colors import Colormap, Normalize
from matplotlib.ticker import MaxNLocator, ScalarFormatter
from PIL import Image, ImageDraw, ImageFont

CMAP, DIFF_CMAP = "inferno", "RdBu_r"
BOX_COLOUR, BOX_WIDTH = (0, 255, 128), 2  # outline of a phrase's known box
ALPHA = 0.6  # default opacity of the heat over the image
VIEW = 190  # pixels of each panel: the image as the model sees it
DPI = 100
GAP, BAR_GAP, BAR_W, BAR_SPACE = 4, 4, 12, 60  # panel gap; colorbar gap, width, and the room after it for ticks
HEIGHT, TOP = 250, 52
BAR_TOP, BAR_HEIGHT = TOP + 8, VIEW - 16  # colorbars: 8 px shorter than the panels at each end
TICK_BINS, TICK_LEN, TICK_PAD = 8, 5, 5  # colorbar ticks: at most 8 intervals (as matplotlib fits 7 pt labels
# on BAR_HEIGHT px), 5 px marks, 5 px to their labels


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


@lru_cache(maxsize=None)
def colormap(name: str) -> Colormap:
    """matplotlib's colour map `name`, its lookup table built once."""
    return colormaps[name]


def overlay(view: np.ndarray, heat: np.ndarray, norm: Normalize, cmap: str, alpha: float = ALPHA,
            smooth: bool = False) -> np.ndarray:
    """`heat` [g, g] coloured by `cmap` on `norm`'s scale over `view` [S, S, 3] at opacity `alpha`."""
    rgb = colormap(cmap)(norm(upsample(heat, view.shape[0], smooth)))[..., :3]
    return ((1 - alpha) * view + alpha * 255 * rgb).round().astype(np.uint8)


@dataclass
class PhraseRow:
    """A rendered row and the scales it was drawn with."""

    image: np.ndarray  # [HEIGHT, width, 3] uint8
    norm: Normalize  # the maps' panels
    diff_norm: Normalize | None  # the difference panel (phrase rows)


@lru_cache(maxsize=None)
def _font(points: float, bold: bool = False) -> ImageFont.FreeTypeFont:
    """Matplotlib's default font (DejaVu Sans) at `points`, in pixels of a DPI figure."""
    path = font_manager.findfont(font_manager.FontProperties(weight="bold" if bold else "normal"))
    return ImageFont.truetype(path, points * DPI / 72)


def ticks(norm: Normalize) -> tuple[list[tuple[float, str]], str]:
    """([(value, label)], offset text such as "1e−3"): the ticks matplotlib puts on a colorbar of
    BAR_HEIGHT px on `norm`'s scale, written by its ScalarFormatter."""
    lo, hi = float(norm.vmin), float(norm.vmax)
    slack = 1e-9 * (hi - lo)
    values = [float(v) for v in MaxNLocator(nbins=TICK_BINS, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
              if lo - slack <= v <= hi + slack]
    formatter = ScalarFormatter()
    formatter.create_dummy_axis()
    formatter.axis.set_view_interval(lo, hi)
    formatter.set_locs(values)
    return [(v, formatter(v)) for v in values], formatter.get_offset()


def fitted(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, cut and ended by "…" where it is wider than `width` px in `font`."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _bar_scale(canvas: ImageDraw.ImageDraw, left: int, norm: Normalize) -> None:
    """The frame, ticks and tick labels of the colorbar whose left edge is at `left`."""
    bottom = BAR_TOP + BAR_HEIGHT - 1
    canvas.rectangle((left, BAR_TOP, left + BAR_W - 1, bottom), outline="black")
    values, offset = ticks(norm)
    span = max(float(norm.vmax) - float(norm.vmin), 1e-30)
    for value, label in values:
        y = round(bottom - (value - float(norm.vmin)) / span * (BAR_HEIGHT - 1))
        canvas.line((left + BAR_W, y, left + BAR_W + TICK_LEN - 1, y), fill="black")
        canvas.text((left + BAR_W + TICK_LEN + TICK_PAD, y), label, fill="black", font=_font(7), anchor="lm")
    if offset:
        canvas.text((left, BAR_TOP - 4), offset, fill="black", font=_font(7), anchor="ld")


def _draw(view: Image.Image, title: str, groups: list[tuple[list[tuple[str, np.ndarray]], Normalize, str]],
          alpha: float, smooth: bool, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Groups of panels [(label, heat)], each group on its norm and cmap and closed by a colorbar;
    `box` (view pixels) outlined on every panel. A label is one line or two (split by a newline),
    each cut to fit above its panel. Panels and colour scales are composed with numpy, the text drawn
    by PIL in matplotlib's font and sizes."""
    width = GAP + sum(len(panels) * (VIEW + GAP) + BAR_GAP + BAR_W + BAR_SPACE for panels, _, _ in groups)
    background = np.asarray(view, dtype=np.float32)
    pixels = np.full((HEIGHT, width, 3), 255, np.uint8)
    labels, bars, x = [], [], GAP
    for panels, norm, cmap in groups:
        for label, heat in panels:
            panel = overlay(background, heat, norm, cmap, alpha, smooth)
            pixels[TOP:TOP + VIEW, x:x + VIEW] = outline(panel, box) if box else panel
            labels.append((x + VIEW // 2, label))
            x += VIEW + GAP
        scale = colormap(cmap)(norm(np.linspace(norm.vmax, norm.vmin, BAR_HEIGHT)))[:, :3]
        pixels[BAR_TOP:BAR_TOP + BAR_HEIGHT, x + BAR_GAP:x + BAR_GAP + BAR_W] = (scale * 255).round()[:, None]
        bars.append((x + BAR_GAP, norm))
        x += BAR_GAP + BAR_W + BAR_SPACE
    image = Image.fromarray(pixels)
    canvas = ImageDraw.Draw(image)
    title = title.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (from JSON) cannot be drawn
    canvas.text((4, 14), title, fill="black", font=_font(11, bold=True), anchor="lm")
    for centre, label in labels:
        label = "\n".join(fitted(line, _font(9), VIEW - 8) for line in label.split("\n"))
        if "\n" in label:  # two lines, their bottom just above the panel
            canvas.multiline_text((centre, TOP - 2), label, fill="black", font=_font(9), anchor="md", align="center",
                                 spacing=1)
        else:
            canvas.text((centre, TOP - 10), label, fill="black", font=_font(9), anchor="mm")
    for left, norm in bars:
        _bar_scale(canvas, left, norm)
    return np.array(image)


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
    """One phrase under several models: {model name: (in context, isolated) [g, g]} (each model's
    own grid g), one colour scale; `box` (from `view_box`) outlined."""
    norm = shared_norm(*(m for pair in maps.values() for m in pair))
    panels = [(f"{name}\n{kind}", m) for name, pair in maps.items()
              for kind, m in zip(("in context", "isolated"), pair)]
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
