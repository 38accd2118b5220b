"""The Why panel's maps: per-phrase attention over an image, in context vs isolated, with the CC
term of each phrase, beside another model's when compared. The Retrieve tab's Why panel draws them
over the query or a result, the Review tab over the current item's reference."""
from __future__ import annotations

import os

import numpy as np

from cir.ui import limits
from cir.ui.components import MEAN, choice_index, markdown_literal, shown
from cir.ui.explorer import Explorer, as_image, phrase_spans
from cir.ui.heatmaps import ALPHA, compare_row, head_grid, model_view, phrase_row, view_box
from cir.ui.models import Models

DEFAULT_EPS = 0.005
NO_COMPARE = "none"  # the "Compare with" choice of no other model
UPSAMPLING = ("flat patches", "smooth (bilinear)")


def truncation_notice(ex: Explorer, caption: str) -> str:
    """'' or a sentence saying how much of a caption too long for the text encoder is used."""
    tok = ex.model.tokenizer
    if not caption or not tok.truncated(caption):
        return ""
    keep = tok.context_length - 2
    used = tok.encode_with_offsets(caption)[1][keep - 1][1]
    return (f" ⚠ **Caption truncated** to the model's {keep} tokens: only its first {used} of {len(caption):,} "
            "characters are used.")


def render_maps(ex: Explorer, image, caption: str, phrases: list[dict], layer: str = MEAN, head: str = MEAN,
                eps: float = DEFAULT_EPS, opacity: float = ALPHA, upsampling: str = UPSAMPLING[0],
                other: Explorer | None = None, shared_scale: bool = False, boxes: dict | None = None,
                grid: bool = False):
    """(heatmap rows stacked into one image [H, W, 3] or None, CC table [[phrase, CC]]) of `phrases` over
    `image`; with `grid` each phrase shows its in-context maps of every layer and head instead; with
    `other` (another model's Explorer) each row shows both models' maps side by side;
    with `shared_scale` every difference panel uses one scale, ± the largest difference of all phrases;
    `boxes` {(start, end): box in `image` pixels} are outlined on their phrase's row."""
    results = ex.phrase_maps(image, caption, phrases, choice_index(layer), choice_index(head), float(eps))
    others = other.phrase_maps(image, caption, phrases, choice_index(layer), choice_index(head), float(eps)) \
        if other is not None and not grid else [None] * len(results)
    full = as_image(image)
    view = model_view(full)
    alpha, smooth = min(max(float(opacity), 0.0), 1.0), upsampling == UPSAMPLING[1]
    drawn = [r for r in results if r.cc is not None]
    diff_scale = max((float(np.abs(r.in_context - r.isolated).max()) for r in drawn), default=0.0) \
        if shared_scale else None
    rows, table = [], []
    for r, t in zip(results, others):
        if r.cc is None:
            table.append([r.text, "cut by the context length"])
            continue
        box = (boxes or {}).get((r.start, r.end))
        box = view_box(box, full.size) if box else None
        if grid:
            row = head_grid(view, r.heads, f"“{r.text}”   in context, every layer and head", alpha, smooth, box)
        elif t is not None and t.cc is not None:
            title = f"“{r.text}”   CC term {r.cc:.4f} ({ex.name}) · {t.cc:.4f} ({other.name})"
            row = compare_row(view, {ex.name: (r.in_context, r.isolated), other.name: (t.in_context, t.isolated)},
                              title, alpha, smooth, box)
        else:
            cut = f" (cut by the context length of {other.name})" if t is not None else ""
            row = phrase_row(view, r.in_context, r.isolated, f"“{r.text}”   CC term {r.cc:.4f}{cut}", alpha, smooth,
                             diff_scale or None, box)
        rows.append(row.image)
        table.append([r.text, round(r.cc, 5)])
    return (np.concatenate(rows) if rows else None), table


@shown
def attention(ex: Explorer, image, caption: str, rows, rows_caption: str, layer: str, head: str, eps: float,
              opacity: float = ALPHA, upsampling: str = UPSAMPLING[0], other: Explorer | None = None,
              shared_scale: bool = False, grid: bool = False):
    """Maps of the phrase rows over `image` (beside `other`'s, another model's, when given); for
    another caption than the rows', its phrases afresh:
    an example's gold ones when it is an example's caption, else spaCy's (the info names which, or
    "edited" for rows that differ from those). The boxes an example's
    grounding gives are outlined when `image` is that example's reference.

    -> (phrase rows, their caption, heatmap rows, CC table, info)."""
    if not image:
        return rows, rows_caption, None, [], ""
    caption = limits.caption(caption)
    phrases, source = ex.caption_phrases(caption)
    if caption == rows_caption:
        rows = phrase_spans(caption, limits.phrase_rows(rows))
        phrases, source = rows, source if rows == phrases else "edited"
    boxes = ex.boxes(image, caption)
    maps, table = render_maps(ex, image, caption, phrases, layer, head, eps, opacity, upsampling, other,
                              shared_scale, boxes, grid)
    scores = [c for _, c in table if isinstance(c, float)]
    outlined = sum((p["start"], p["end"]) in boxes for p in phrases)
    by = markdown_literal(ex.name) + (f"** beside **{markdown_literal(other.name)}" if other is not None and not grid
                                      else "")
    alone = ("" if other is None or not grid else
             f" · ⚠ every layer and head is one model's: untick it to compare with **{markdown_literal(other.name)}**")
    info = f"Maps over **{markdown_literal(os.path.basename(image))}** by **{by}** · {len(phrases)} phrase(s)" + (
        f" ({source})") + (f" · {outlined} known box(es) outlined" if outlined else "") + (
        f" · mean CC term (the loss) {sum(scores) / len(scores):.4f}" if scores else "") + alone + truncation_notice(
        ex, caption)
    return [[p["text"], p["start"], p["end"]] for p in phrases], caption, maps, table, info


@shown
def add_phrase(caption: str, rows, text: str):
    """Append a phrase typed by the user (it must occur in the caption) -> (rows, cleared textbox)."""
    phrases = phrase_spans(limits.caption(caption), limits.phrase_rows([*(rows or []), [text, None, None]]))
    return [[p["text"], p["start"], p["end"]] for p in phrases], ""


def layer_choices(ex: Explorer) -> list[tuple[str, str]]:
    return [("mean over layers", MEAN)] + [(f"layer {i + 1}", str(i)) for i in range(ex.layers)]


def head_choices(ex: Explorer) -> list[tuple[str, str]]:
    return [("mean over heads", MEAN)] + [(f"head {i + 1}", str(i)) for i in range(ex.heads)]


def compare_choices(models: Models, name: str) -> list[tuple[str, str]]:
    """The "Compare with" choices beside the model `name`: none, or any other loaded model."""
    return [("none", NO_COMPARE)] + [(n, n) for n in models.names if n != name]

