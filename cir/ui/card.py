"""What the page says about the loaded model: its card, and a notice for queries unlike its training data.

The shipped models know only CIR-Shapes: synthetic scenes of a few flat-coloured shapes on a plain
background. Such a scene is made of a handful of colours, so `looks_like_shapes` asks whether a
dozen coarse colours cover nearly all of an image; a photo (a portrait, a cat) spreads over many.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from cir.atomic import sha256_file
from cir.ui.decoded import file_key

COLOURS, COVER = 12, 0.9  # a scene: its 12 most common coarse colours cover at least 90 % of its pixels
OUT_OF_DOMAIN = ("⚠ **This image looks unlike the training data**: the model knows only synthetic CIR-Shapes "
                 "scenes (flat shapes on a plain background), so its results for a photo say little.")


def looks_like_shapes(image: Image.Image) -> bool:
    """Whether `image` is made of a few flat colours, as a CIR-Shapes scene is."""
    small = np.asarray(image.convert("RGB").resize((64, 64), Image.NEAREST)).astype(np.int64) // 16  # 16 levels
    counts = np.bincount((small[..., 0] * 256 + small[..., 1] * 16 + small[..., 2]).ravel(), minlength=4096)
    return np.sort(counts)[::-1][:COLOURS].sum() >= COVER * counts.sum()


def model_card(ex) -> str:
    """Markdown: which model `ex` holds (file, name, step, architecture), what it was trained on,
    its recorded validation numbers, and the gallery it searches."""
    m, cfg = ex.manifest, ex.model.config
    data = m.get("data") or {}
    step = m.get("step")
    fusion = ("token merging" if getattr(cfg, "method", None) == "tmcir"
              else f"a {cfg.fusion_layers}-layer, {cfg.fusion_heads}-head fusion")
    lines = [f"**Model** `{os.path.basename(ex.checkpoint or 'in memory')}` ({ex.name}"
             + (f", {step:,} training steps" if isinstance(step, int) else "") + f"): {fusion} over a "
             f"{ex.model.grid} × {ex.model.grid} patch grid.",
             "**Trained on** CIR-Shapes" + (f" ({data['triplets']:,} triplets)" if isinstance(data.get("triplets"), int)
                                           else "") + ": synthetic scenes of flat-coloured shapes on a plain "
             "background. It knows nothing else: a photo still returns shape scenes."]
    recall = ((m.get("metrics") or {}).get("val_recall")) or {}
    if recall:
        lines.append("**Validation** " + ", ".join(f"R@{k} {v:.1f}" for k, v in recall.items())
                     + (f" (at step {m['metrics']['step']:,})" if isinstance(m["metrics"].get("step"), int) else "")
                     + ".")
    figures = measured(ex.checkpoint)
    if figures:
        lines.append(f"**Measured** on {figures['on']} ({figures['count']:,} queries): "
                     + ", ".join(f"R@{k} {figures['recall'][k]:.1f}" for k in ("1", "5", "10") if k in figures["recall"])
                     + ". " + maps_trust(ex))
    lines.append(f"**Gallery** {len(ex.index):,} images · {len(ex.examples)} example queries.")
    return "\n\n".join(lines)


def evaluation_path(checkpoint: str | os.PathLike) -> Path:
    """`x.safetensors` -> `x.eval.json` beside it: the file `python -m cir.evaluate --json` wrote for it."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".safetensors") + ".eval.json")


def measured(checkpoint: str | os.PathLike | None) -> dict | None:
    """The figures measured for this very checkpoint file (its `evaluation_path`, whose recorded
    sha256 must be the file's): {"on", "count", "recall", "grounding"}; None when there are none.
    Read and checked once per version of the two files (the Why panel asks on every redraw)."""
    if not checkpoint or not evaluation_path(checkpoint).is_file():
        return None
    return _measured(file_key(checkpoint), file_key(evaluation_path(checkpoint)))


@lru_cache(maxsize=32)
def _measured(checkpoint: tuple, evaluation: tuple) -> dict | None:
    """`measured` of the files `decoded.file_key` names (path, modification time, size)."""
    try:
        res = json.loads(Path(evaluation[0]).read_text())
        evaluated = res["evaluated"]
        if evaluated["checkpoint_sha256"] != sha256_file(checkpoint[0]):
            return None
        on = Path(evaluated.get("triplets", "")).parent.name or evaluated.get("split", "?")
        return {"on": f"`{on}`", "count": res["count"], "recall": res["recall"], "grounding": res.get("grounding")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def maps_trust(ex) -> str:
    """One sentence on how far to trust the model's phrase maps, from its measured grounding: how
    often a map peaks on the object its phrase names, in context and alone, and how often the
    phrases of one caption peak apart; or that it was not measured."""
    figures = measured(ex.checkpoint)
    objects = ((figures or {}).get("grounding") or {}).get("objects") or {}
    if not objects.get("count"):
        return "Its phrase maps' grounding was not measured: read them with care."
    pointing, distinct = objects["pointing"], objects["distinct"]
    return (f"Its phrase maps peak on the object the phrase names for {pointing['in_context']:.0f} % of phrases in "
            f"context ({pointing['isolated']:.0f} % alone), and the phrases of one caption peak apart in "
            f"{distinct['in_context']:.0f} % of captions ({figures['on']}, {objects['count']:,} phrases).")
