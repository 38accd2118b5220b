"""The explorer's Gradio Blocks: `build_demo(models)`.

Tabs: Retrieve (a model; query from examples, the gallery or an upload; top-k with scores;
per-phrase attention in context vs isolated with the CC term, beside another model's when
compared) and Review (step through a triplet file, accept / reject / edit, export). The callbacks
below are plain functions of component values and an `Explorer` (the selected model's);
`build_demo` only lays out components, wires them and queues the app.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import re
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import gradio as gr
import matplotlib
import numpy as np
from gradio.data_classes import ImageData
from PIL import Image

from cir.atomic import atomic_path, write_text
from cir.data.images import open_image
from cir.data.triplets import read_triplets
from cir.errors import UserError
from cir.synth.report import changed_objects, mentions
from cir.ui import limits, review
from cir.ui.access import IMAGE_REFUSED, FileAccess
from cir.ui.card import OUT_OF_DOMAIN, looks_like_shapes, model_card
from cir.ui.decoded import decoded
from cir.ui.explorer import Explorer, as_image, grounding_boxes, phrase_spans
from cir.ui.heatmaps import ALPHA, compare_row, head_grid, model_view, phrase_row, view_box
from cir.ui.models import Models
from cir.ui.thumbnails import thumbnail

CONCURRENCY = 4  # events of one kind served at once (model forwards still take turns, see Explorer.lock)
RETRIEVE_CONCURRENCY = 16  # retrieve events served at once: their queries share forwards (cir.ui.batching)
STATUS_UPDATE_S = 1.0  # waiting visitors get their queue position this often (Gradio's "auto" messages every
# waiting event each time one starts: quadratic in the queue's length)
PER_PAGE = 24
DEFAULT_EPS = 0.005
MEAN = "mean"
NO_COMPARE = "none"  # the "Compare with" choice of no other model
RANK_OVER = ("file images", "gallery index")
SHOW = ("all", "undecided", "accepted", "rejected", "flagged")  # the Review tab's filter; "accepted" includes
# edits; "flagged": the caption misses a change between reference and target (as `python -m cir.synth report` finds)
UPSAMPLING = ("flat patches", "smooth (bilinear)")
NO_EXAMPLES = ("No example queries with this gallery: start the app with `--examples triplets.jsonl` to add some, "
               "or pick a query under **Gallery** or upload one.")

# Narrow windows: the Why panel's columns stack and the heatmap image scales to the window's width
# (without a width of its own it collapsed to 0 x 0); gallery labels wrap instead of being cut.
# Added by the page-load script (Gradio 6 takes css only in launch(), which callers may call bare).
CSS = """
#heatmaps .image-container, #heatmaps .image-container > button, #heatmaps .image-frame,
#review-maps .image-container, #review-maps .image-container > button, #review-maps .image-frame {
  width: 100% !important; height: auto !important; }
#heatmaps img, #review-maps img { width: 100% !important; height: auto !important; max-height: none !important;
  object-fit: contain; }
@media (max-width: 640px) {
  #why-row { flex-direction: column; } #why-row > * { min-width: 0 !important; width: 100%; }
  #examples .grid-container, #browser .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
}
.caption-label { white-space: normal !important; overflow-wrap: anywhere; max-width: 100% !important; }
"""

# The page's script: the app's CSS, and the Review-tab keys: u undo, a accept, r reject, n next, p previous (ignored while typing in a field).
PAGE_JS = """() => {
  if (window.cirKeys) return;
  window.cirKeys = true;
  const style = document.createElement("style");
  style.textContent = %s;
  document.head.appendChild(style);
  const ids = {a: "review-accept", r: "review-reject", n: "review-next", p: "review-prev", u: "review-undo"};
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey || (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName)))) return;
    const b = ids[e.key] && document.getElementById(ids[e.key]);
    if (b && b.offsetParent !== null) { e.preventDefault(); b.click(); }
  });
}"""


def shown(fn):
    """Show a UserError in the page as a one-line error instead of a failed event."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(str(e)) from None
    return wrapper


def _choice(value: str) -> int | None:
    return None if value in (None, MEAN) else int(value)


def image_output(**kwargs) -> gr.Image:
    """A gr.Image for pictures the app draws (arrays): each is written once, atomically, into
    Gradio's cache under a hash of its pixels (Gradio's own writer rewrites a cached file in place
    on every use, so a browser downloading a picture while another request returned the same one
    could read it truncated); the cache's age limit (`limits.DELETE_CACHE`) removes them."""
    image = gr.Image(**kwargs)
    gradio_postprocess = image.postprocess

    def postprocess(value):
        if isinstance(value, np.ndarray):
            pixels = np.ascontiguousarray(value, dtype=np.uint8)
            digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()[:32]
            path = Path(image.GRADIO_CACHE) / "cir-drawn" / f"{digest}.png"
            if not path.is_file():
                with atomic_path(path, bulk=True) as tmp:
                    Image.fromarray(pixels).save(tmp, "PNG")
            value = str(path)
        return gradio_postprocess(value)

    image.postprocess = postprocess
    return image


def gallery_value(items: list[tuple[str, str]]) -> list[dict]:
    """`gr.Gallery.postprocess` of (thumbnail path, caption) items, as an event with
    `postprocess=False` returns it, without Gradio's thread pool and file checks per call. A small
    thumbnail goes as a data: URL inside the answer (its item carries no file marker, so Gradio
    passes it as is), a larger one as a file URL Gradio serves from the thumbnail folder."""
    value = []
    for path, caption in items:
        image = ImageData(path=path, orig_name=os.path.basename(path), mime_type="image/png").model_dump()
        inline = thumbnail.data_url(path)
        if inline is not None:
            del image["meta"]
            image["url"] = inline
        value.append({"image": image, "caption": caption})
    return value


def query_image(**kwargs) -> gr.Image:
    """A gr.Image whose upload is read by the project's image loader before Gradio opens it: an
    unreadable file or a decompression bomb fails the event with a one-line reason naming the
    uploaded file (Gradio would fail it with a hidden error, a callback would name the server's
    temp path). With `image_mode=None` the file reaches the callbacks as uploaded, so
    `cir.data.images.load_rgb` alone decides orientation, transparency and bit depth; an image over
    `limits.MAX_REQUEST_PIXELS` is refused before it is decoded, and the decode is kept for the
    request's other calls (`cir.ui.decoded`). (The check
    wraps this instance's `preprocess`: a gr.Image subclass would make Gradio write a .pyi stub
    beside this module on every import.)"""
    image = gr.Image(image_mode=None, **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        name = getattr(payload, "orig_name", None) or "the uploaded image"
        try:
            limits.data_url(getattr(payload, "url", None))
            if payload is not None and payload.path:
                with open_image(payload.path, name) as header:
                    limits.request_pixels(header.width * header.height, name)
                decoded(payload.path, name)  # the one decode of this upload, shared by the request's calls
            return gradio_preprocess(payload)
        except UserError as e:
            raise gr.Error(str(e)) from None
        except gr.Error:
            raise
        except Exception as e:  # a data: URL PIL cannot read, or anything else Gradio trips on
            raise gr.Error(f"cannot read image {name}: {type(e).__name__}: {' '.join(str(e).split())}") from None

    image.preprocess = preprocess
    return image


def top_k(k, n: int) -> int:
    """The slider's k as a whole number clamped to [1, n]: an int, or a float or string holding one
    (the API may send anything; "abc", 2.7 and True are refused)."""
    try:
        if isinstance(k, bool) or not float(k).is_integer():
            raise ValueError
        k = int(float(k))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"top k must be a whole number from 1 to {n}, got {k!r}") from None
    return min(max(1, k), max(1, n))


def top_k_slider(n: int, **kwargs) -> gr.Slider:
    """A gr.Slider for top k over `n` images whose value is read by `top_k` (Gradio's own check
    fails on a string with a hidden generic error, and passes 2.7 or True on)."""
    slider = gr.Slider(1, min(100, n), value=min(10, n), step=1, **kwargs)

    def preprocess(payload):
        try:
            return top_k(payload, n)
        except UserError as e:
            raise gr.Error(str(e)) from None

    slider.preprocess = preprocess
    return slider


def truncation_notice(ex: Explorer, caption: str) -> str:
    """'' or a sentence saying how much of a caption too long for the text encoder is used."""
    tok = ex.model.tokenizer
    if not caption or not tok.truncated(caption):
        return ""
    keep = tok.context_length - 2
    used = tok.encode_with_offsets(caption)[1][keep - 1][1]
    return (f" ⚠ **Caption truncated** to the model's {keep} tokens: only its first {used} of {len(caption):,} "
            "characters are used.")


# ---------------------------------------------------------------------------- retrieve tab
def example_items(ex: Explorer) -> list:
    return [(thumbnail(t.reference), t.caption) for t in ex.examples]


@shown
def pick_example(ex: Explorer, index: int):
    """Example `index` chosen -> (query path, query image, caption, targets, info, phrase rows, their
    caption): the Why panel starts from the example's own (gold) noun phrases when it has them."""
    t = ex.examples[index]
    info = f"Example **{markdown_literal(t.id)}**: {len(t.targets)} ground-truth target(s), marked ★ in the results."
    rows = [[p["text"], p["start"], p["end"]] for p in t.noun_phrases or []]
    return t.reference, thumbnail(t.reference), t.caption, t.targets, info, rows, t.caption if rows else None


@shown
def browse(ex: Explorer, text: str, page: int):
    """(thumbnails with file names, page, page info) of one gallery page."""
    paths, page, pages, total = ex.browse(text, page, PER_PAGE)
    return [(thumbnail(p), ex.label(p)) for p in paths], page, f"page {page + 1} of {pages} · {total} images"


@shown
def pick_browsed(ex: Explorer, text: str, page: int, index: int):
    """Image `index` of a gallery page chosen -> (query path, query image, targets, info)."""
    path = ex.browse(text, page, PER_PAGE)[0][index]
    info = f"Gallery image **{markdown_literal(ex.label(path))}**"
    t = ex.example_of(path)
    if t is not None:
        return path, thumbnail(path), [], info + (f": the reference of example **{markdown_literal(t.id)}**; pick it "
                                                  "under Examples for its caption and ground truth.")
    return path, thumbnail(path), [], info + " (no ground truth)."


def domain_notice(image) -> str:
    """'' or a warning that the query image looks unlike the model's training scenes."""
    return "" if looks_like_shapes(as_image(image)) else " " + OUT_OF_DOMAIN


@shown
def uploaded(image):
    """The user uploaded or cleared the query image: it is the query now, without ground truth."""
    return None, [], ("Uploaded image (no ground truth)." + domain_notice(image)) if image else ""


@shown
def run_retrieve(ex: Explorer, image, query_path, caption: str, k: int, targets):
    """-> (result thumbnails with rank and score, result table, status, result paths, maps image)."""
    source = query_path or image
    caption = limits.caption(caption)
    if not caption.strip():
        raise UserError("type a modification first: what should change in the query image?")
    t0 = time.perf_counter()
    query = ex.encode(source, caption)
    hits = ex.retrieve(source, caption, top_k(k, len(ex.index)), targets or [], query=query)
    ms = (time.perf_counter() - t0) * 1000
    status = (f"{len(hits)} results of **{markdown_literal(ex.name)}** in {ms:.0f} ms (encode + search) over "
              f"{len(ex.index)} images.")
    status += truncation_notice(ex, caption or "")
    if targets:
        found = ex.target_rank(source, caption or "", targets, query=query)
        status += f" Ground truth: rank **{found[0]}** of {found[1]}." if found else " Ground truth: not in this gallery."
    if not query_path:
        status += domain_notice(source)
    gallery = [(thumbnail(h.path), f"#{h.rank} · {h.score:.3f}" + (" · ★ target" if h.is_target else "")) for h in hits]
    table = [[h.rank, round(h.score, 4), ex.label(h.path), "★" if h.is_target else ""] for h in hits]
    return gallery, table, status, [h.path for h in hits], source


def retrieve_values(ex: Explorer, table: gr.Dataframe, status: gr.Markdown, image, query_path, caption: str, k: int,
                    targets):
    """`run_retrieve`'s outputs as the values its components send, for the retrieve event with
    `postprocess=False` (Gradio's postprocessing would handle the gallery's files twice per event)."""
    gallery, rows, text, paths, source = run_retrieve(ex, image, query_path, caption, k, targets)
    return gallery_value(gallery), table.postprocess(rows).model_dump(), status.postprocess(text), paths, source


def results_record(ex: Explorer, query, caption: str, hits: list[str], table, maps_over=None, maps=(),
                   layer: str = MEAN, head: str = MEAN, eps: float = DEFAULT_EPS) -> dict:
    """The retrieval and the Why panel's maps (`PhraseResult`s over the image `maps_over`) as one
    plain record (what the export writes)."""
    rows = [dict(zip(("rank", "score", "image", "target"), r)) for r in table or []]
    for row, path in zip(rows, hits or []):
        row["path"], row["target"] = path, bool(row.get("target"))
    as_list = lambda a: None if a is None else np.asarray(a, dtype=float).round(6).tolist()
    return {"model": ex.name, "checkpoint": ex.checkpoint, "query": query, "modification": caption,
            "results": rows, "maps": {"image": maps_over, "layer": layer, "head": head, "eps": float(eps), "phrases": [
                {"phrase": r.text, "start": r.start, "end": r.end, "cc": r.cc, "in_context": as_list(r.in_context),
                 "isolated": as_list(r.isolated)} for r in maps]}}


@shown
def export_results(ex: Explorer, exports: str, query, query_path, caption: str, hits, table, maps_over=None,
                   rows=None, rows_caption=None, layer: str = MEAN, head: str = MEAN, eps: float = DEFAULT_EPS):
    """Write the current results as CSV (one row per result) and JSON (results, and the Why panel's
    phrase maps and CC terms over `maps_over` as it shows them) into a fresh folder under `exports`
    -> (the two files for download, message)."""
    if not hits:
        raise UserError("retrieve first: there are no results to export")
    caption = limits.caption(caption)
    maps = []
    if maps_over and rows and caption == rows_caption:
        phrases = phrase_spans(caption, limits.phrase_rows(rows))
        maps = ex.phrase_maps(maps_over, caption, phrases, _choice(layer), _choice(head), float(eps))
    record = results_record(ex, query_path or query, caption, hits, table, maps_over, maps, layer, head, eps)
    folder = tempfile.mkdtemp(prefix="results-", dir=exports)
    text = io.StringIO()
    writer = csv.DictWriter(text, ["rank", "score", "image", "target", "path"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(record["results"])
    csv_path, json_path = os.path.join(folder, "results.csv"), os.path.join(folder, "results.json")
    write_text(csv_path, text.getvalue())
    write_text(json_path, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return gr.update(value=[csv_path, json_path], visible=True), f"Exported {len(record['results'])} results."


def render_maps(ex: Explorer, image, caption: str, phrases: list[dict], layer: str = MEAN, head: str = MEAN,
                eps: float = DEFAULT_EPS, opacity: float = ALPHA, upsampling: str = UPSAMPLING[0],
                other: Explorer | None = None, shared_scale: bool = False, boxes: dict | None = None,
                grid: bool = False):
    """(heatmap rows stacked into one image [H, W, 3] or None, CC table [[phrase, CC]]) of `phrases` over
    `image`; with `grid` each phrase shows its in-context maps of every layer and head instead; with
    `other` (another model's Explorer) each row shows both models' maps side by side;
    with `shared_scale` every difference panel uses one scale, ± the largest difference of all phrases;
    `boxes` {(start, end): box in `image` pixels} are outlined on their phrase's row."""
    results = ex.phrase_maps(image, caption, phrases, _choice(layer), _choice(head), float(eps))
    others = other.phrase_maps(image, caption, phrases, _choice(layer), _choice(head), float(eps)) \
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
    info = f"Maps over **{markdown_literal(os.path.basename(image))}** by **{by}** · {len(phrases)} phrase(s)" + (
        f" ({source})") + (f" · {outlined} known box(es) outlined" if outlined else "") + (
        f" · mean CC term (the loss) {sum(scores) / len(scores):.4f}" if scores else "") + truncation_notice(ex, caption)
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


def change_model(models: Models, name: str, other: str, layer: str, head: str, image, query_path, caption: str,
                 k, targets, hits):
    """The model `name` selected -> (model card, layer, head and "Compare with" choices, then the
    results outputs of `run_retrieve`): shown results are retrieved again with it (the status names
    the model); when that fails they are cleared, so no results stand under another model's name.
    Another model embeds the gallery here, the first time it is selected."""
    try:
        ex = models[name]
    except UserError as e:  # it cannot be loaded: say why, and show no results under its name
        return (gr.skip(),) * 4 + ([], [], f"⚠ {e}", [], None)
    kept = lambda choice, count: choice if _choice(choice) is None or _choice(choice) < count else MEAN
    controls = (model_card(ex), gr.update(choices=layer_choices(ex), value=kept(layer, ex.layers)),
                gr.update(choices=head_choices(ex), value=kept(head, ex.heads)),
                gr.update(choices=compare_choices(models, name), value=NO_COMPARE if other == name else other))
    if not hits:
        return controls + (gr.skip(),) * 5
    try:
        return controls + run_retrieve(ex, image, query_path, caption, k, targets)
    except gr.Error as e:
        return controls + ([], [], f"⚠ Results cleared: {e.message}", [], None)


# ---------------------------------------------------------------------------- review tab
@lru_cache(maxsize=8)
def _triplets(path: str, base: str | None, mtime: float):
    # images are not checked here: whether one may be read at all is FileAccess.image's call
    return read_triplets(path, skip_bad=True, check_images=False, base=base)


def missing_changes(t, caption: str) -> list[str] | None:
    """The changes between a triplet's reference and target that `caption` does not mention (the
    check of `python -m cir.synth report`); None when the triplet carries no scenes or stage outputs."""
    try:
        changes = changed_objects(t)[1]
    except (UserError, KeyError, TypeError, ValueError, IndexError):
        return None
    return [names[0] for names in changes if not mentions(caption, names)]


@lru_cache(maxsize=8)
def _flagged(path: str, base: str | None, mtime: float) -> frozenset[str]:
    return frozenset(t.id for t in _triplets(path, base, mtime)[0] if missing_changes(t, t.caption))


def review_items(state: dict):
    """(triplets, problems) of a review state's triplet file, re-read when it changes."""
    return _triplets(state["path"], state.get("base"), os.path.getmtime(state["path"]))


def markdown_literal(text: str) -> str:
    """`text` shown as itself in gr.Markdown: Markdown and HTML characters escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~<>&])", r"\\\1", text)


def highlight(caption: str, phrases: list[dict]) -> list[tuple[str, str | None]]:
    """Caption pieces for gr.HighlightedText: the innermost non-overlapping phrases marked."""
    taken: list[tuple[int, int]] = []
    for p in sorted(phrases, key=lambda p: p["end"] - p["start"]):
        if all(p["end"] <= s or p["start"] >= e for s, e in taken):
            taken.append((p["start"], p["end"]))
    pieces, pos = [], 0
    for s, e in sorted(taken):
        pieces += [(caption[pos:s], None)] if s > pos else []
        pieces.append((caption[s:e], "noun phrase"))
        pos = e
    return pieces + ([(caption[pos:], None)] if pos < len(caption) else [])


def _opened(path: str, base: str | None = None):
    """A review state at the first undecided item of a triplet file the app may open (its review store
    takes in a JSONL review log beside it when it has no decisions yet); relative image paths are taken
    from `base` (default: its folder)."""
    state = {"path": path, "base": base}
    triplets, problems = review_items(state)
    if not triplets:
        raise UserError(f"no usable triplets in {os.path.basename(path)}" + (f" ({problems[0]})" if problems else ""))
    decisions = review.open_store(review.store_path(path), review.log_path(path))
    if problems:
        gr.Warning(f"skipped {len(problems)} bad line(s); first: {problems[0]}")
    # "opened" makes reopening a changed state, so the page refreshes even at the same position
    return state | {"pos": review.first_undecided(triplets, decisions), "opened": time.time()}


@shown
def review_open(access: FileAccess, path: str):
    """Open a triplet file typed by the visitor: only inside the review folders."""
    path = (path or "").strip()
    if not path:
        raise UserError("type the path of a triplet file in a review folder, or upload one")
    return _opened(access.triplet_file(path))


@shown
def review_upload(ex: Explorer, access: FileAccess, uploaded: str | None):
    """Open an uploaded triplet file (a private copy; its review store and exports stay beside the copy);
    its relative image paths are taken from `upload_base`."""
    if not uploaded:
        raise UserError("upload a triplet file (.jsonl)")
    path = access.adopt_upload(uploaded)
    return _opened(path, upload_base(ex.root, access, path))


UPLOAD_BASE_LEVELS = 3  # folders above the gallery's folder tried as the base of an upload's relative paths


def upload_base(root: str, access: FileAccess, path: str) -> str:
    """The folder an uploaded triplet file's relative image paths are taken from: the gallery's folder
    `root`, or the nearest of its first UPLOAD_BASE_LEVELS parents from which the file's first
    triplet names an existing reference the app may show (a file written beside the gallery's image folder,
    like an examples file, names "images/x.png"); `root` when none does."""
    base = root
    for _ in range(UPLOAD_BASE_LEVELS + 1):
        triplets = read_triplets(path, skip_bad=True, check_images=False, base=base)[0]
        if triplets and os.path.isfile(triplets[0].reference) and access.image(triplets[0].reference):
            return base
        base = os.path.dirname(base)
    return root


def _current(state):
    """(triplets, decisions, current triplet or None past the end) of a review state."""
    triplets, _ = review_items(state)
    decisions = review.read_decisions(review.store_path(state["path"]), state.get("annotator", ""))
    pos = state["pos"]
    return triplets, decisions, (triplets[pos] if pos < len(triplets) else None)


def _caption_and_phrases(ex: Explorer, t, decision: dict | None) -> tuple[str, list[dict]]:
    """The item's caption as decided (an edit replaces it) and its noun phrases (the file's, else spaCy's)."""
    caption = decision["caption"] if decision and decision["decision"] == "edit" else t.caption
    return caption, t.noun_phrases if t.noun_phrases is not None and caption == t.caption else ex.noun_phrases(caption)


def _shown_image(access: FileAccess, path: str):
    """A thumbnail of an image a triplet file names, or None when the app may not show it."""
    return thumbnail(path) if access.image(path) else None


@shown
def review_show(ex: Explorer, access: FileAccess, state):
    """-> (reference, targets, highlighted caption, caption box, note box, status) of the current item."""
    if not state:
        return None, [], [], "", "", "Open a triplet file to review."
    triplets, decisions, t = _current(state)
    counts = {kind: sum(_shown_as(decisions.get(x.id)) == kind for x in triplets) for kind in SHOW[1:4]}
    counts["flagged"] = len(_flagged(state["path"], state.get("base"), os.path.getmtime(state["path"])))
    who = state.get("annotator", "")
    people, shared, agree = review.agreement(review.store_path(state["path"]))
    progress = (f"{len(triplets) - counts['undecided']} of {len(triplets)} decided"
                + (f" by **{markdown_literal(who)}**" if who else "") + " ("
                + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")"
                + f" · store {markdown_literal(review.store_path(state['path']).name)}"
                + (f" · {people} annotators, agreement {agree:.0%} on {shared} item(s) decided by several"
                   if agree is not None else ""))
    if t is None:
        show = state.get("show", SHOW[0])
        done = "All items decided." if show == SHOW[0] else f"No more {show} items."
        return None, [], [], "", "", f"**{done}** {progress}. Export the accepted ones, or step back."
    d = decisions.get(t.id)
    caption, phrases = _caption_and_phrases(ex, t, d)
    hidden = [p for p in (t.reference, *t.targets) if not access.image(p)]
    missing = missing_changes(t, caption)
    status = (f"Item **{state['pos'] + 1}** of {len(triplets)} · id {markdown_literal(t.id)} · "
              f"{'decided: **' + d['decision'] + '**' if d else 'undecided'} · {progress}"
              + (f" · {len(hidden)} image(s) {IMAGE_REFUSED}" if hidden else "")
              + (f"\n\n⚠ **The caption misses {len(missing)} change(s)** between reference and target: "
                 + ", ".join(markdown_literal(m) for m in missing) + "." if missing else ""))
    targets = [(im, os.path.basename(p)) for p in t.targets if (im := _shown_image(access, p)) is not None]
    return (_shown_image(access, t.reference), targets, highlight(caption, phrases), caption,
            d["note"] if d else "", status)


@shown
def review_details(ex: Explorer, access: FileAccess, state, over: str):
    """-> (heatmap rows of the item's noun phrases over its reference, where the model ranks its target).

    Ranking among the file's images embeds them on first use; only images the app may show count."""
    if not state:
        return None, ""
    triplets, decisions, t = _current(state)
    if t is None:
        return None, ""
    ident = markdown_literal(t.id)
    if not access.image(t.reference):
        return None, f"{ident}: reference {IMAGE_REFUSED}."
    caption, phrases = _caption_and_phrases(ex, t, decisions.get(t.id))
    maps, _ = render_maps(ex, t.reference, caption, phrases, boxes=grounding_boxes(t) if caption == t.caption else None)
    gallery = None
    if over == RANK_OVER[0]:
        gallery = [p for p in dict.fromkeys(p for x in triplets for p in (x.reference, *x.targets)) if access.image(p)]
    found = ex.target_rank(t.reference, caption, [p for p in t.targets if access.image(p)], gallery)
    return maps, (f"{ident}: the model ranks the target **#{found[0]}** of {found[1]} ({over})." if found
                  else f"{ident}: the target is not in the {over}.")


@shown
def review_decide(state, caption: str, note: str, kind: str):
    """Save a decision ("accept" becomes "edit" when the caption box was changed), then go to the next item."""
    if not state:
        raise UserError("open a triplet file first")
    triplets, _, t = _current(state)
    if t is None:
        raise UserError("all items are decided; step back to change one")
    caption, note = limits.caption(caption, "the caption"), limits.note(note)
    if kind == "accept" and caption.strip() != t.caption.strip():
        kind = "edit"
    review.append_decision(review.store_path(state["path"]),
                           review.decision(t.id, kind, note, caption.strip() if kind == "edit" else None,
                                           state.get("annotator", "")))
    return review_move(state, 1)


def _shown_as(decision: dict | None) -> str:
    """The SHOW filter an item with this decision belongs to (besides "all")."""
    return "undecided" if decision is None else "rejected" if decision["decision"] == "reject" else "accepted"


@shown
def review_move(state, step: int):
    """Go `step` items forward (negative: back) among those the state's filter shows; past the last
    one forward is the end (all shown items done), and back stops at the first."""
    if not state:
        return state
    triplets, decisions, _ = _current(state)
    show = state.get("show", SHOW[0])
    flagged = _flagged(state["path"], state.get("base"), os.path.getmtime(state["path"])) if show == "flagged" else ()
    shown_at = [i for i, t in enumerate(triplets) if show == SHOW[0] or t.id in flagged
                or _shown_as(decisions.get(t.id)) == show]
    pos = state["pos"]
    for _ in range(abs(step)):
        if step > 0:
            pos = next((i for i in shown_at if i > pos), len(triplets))
        else:
            pos = next((i for i in reversed(shown_at) if i < pos), pos)
    return {**state, "pos": pos}


@shown
def review_annotator(state, name: str):
    """Review as the annotator `name` ('' for unnamed): their own decisions are shown, saved and
    exported; go to their first undecided item."""
    if not state:
        return state
    state = {**state, "annotator": limits.annotator(name)}
    triplets, decisions, _ = _current(state)
    return {**state, "pos": review.first_undecided(triplets, decisions)}


@shown
def review_filter(state, show: str):
    """Show only the items of one kind (SHOW): go to the first of them."""
    if not state:
        return state
    if show not in SHOW:
        raise UserError(f"show one of {', '.join(SHOW)}")
    return review_move({**state, "show": show, "pos": -1}, 1)


@shown
def review_undo(state):
    """Take back the annotator's most recent decision still in effect (an "undo" decision), and go to its item."""
    if not state:
        raise UserError("open a triplet file first")
    undone = review.undo(review.store_path(state["path"]), state.get("annotator", ""))
    if undone is None:
        raise UserError("nothing to undo: no decision is in effect")
    triplets, _ = review_items(state)
    pos = next(i for i, t in enumerate(triplets) if t.id == undone) if any(t.id == undone for t in triplets) \
        else state["pos"]
    return {**state, "pos": pos, "show": SHOW[0]}


@shown
def review_export(state):
    """Write the accepted triplets and every annotator's decisions (JSONL) beside the input
    -> (downloads: those two files, message)."""
    if not state:
        raise UserError("open a triplet file first")
    triplets, decisions, _ = _current(state)
    out, log = review.export_path(state["path"]), review.log_path(state["path"])
    n = review.export_accepted(triplets, decisions, out)
    saved = review.export_log(review.store_path(state["path"]), log)
    return (gr.update(value=[str(out), str(log)], visible=True),
            f"Wrote {n} accepted triplet(s) to {markdown_literal(out.name)} and all {saved} decision(s) "
            f"to {markdown_literal(log.name)}.")


# ---------------------------------------------------------------------------- layout
def build_demo(models: Models | Explorer, access: FileAccess | None = None) -> gr.Blocks:
    """The explorer app over `models` (or one model's Explorer), queued; the caller launches it.
    The first model's gallery, examples and Review tab are the page's. `access` says which server
    files the Review tab may open (default: none, only uploads, and the gallery's images)."""
    models = models if isinstance(models, Models) else Models(models)
    ex = models.primary
    access = access or FileAccess(gallery_paths=ex.index.paths)
    exports = tempfile.mkdtemp(prefix="cir-exports-")
    p = functools.partial
    several = len(models) > 1
    n = len(ex.index)
    gr.set_static_paths([thumbnail.folder])  # thumbnails are made once and served as files
    thumbnail.prepare(ex.index.paths)
    # maps are drawn off-screen; Gradio asks matplotlib for its backend around every event, which
    # costs ~17 ms each time while none is chosen
    matplotlib.use("agg")
    # Gradio's queue rebuilds a pandas summary of its last (10,000 by default) event records after
    # every event, 5-18 ms each; it is read only by Gradio's monitoring route
    for name, value in limits.GRADIO_ANALYTICS.items():
        os.environ.setdefault(name, str(value))
    with gr.Blocks(title="ConText-CIR Explorer", delete_cache=limits.DELETE_CACHE) as demo:
        gr.Markdown("# ConText-CIR Explorer\nComposed image retrieval: a query image plus a text saying how to change it.")
        with gr.Accordion("About this model", open=False, elem_id="model-card"):
            card = gr.Markdown(model_card(ex))
        with gr.Tab("Retrieve"):
            query_path, targets, hits = gr.State(None), gr.State([]), gr.State([])
            with gr.Row():
                with gr.Column(scale=1):
                    image = query_image(label="Query image", type="filepath", format="png", height=260,
                                        sources=["upload", "clipboard"], elem_id="query-image")
                    query_info = gr.Markdown()
                    model_choice = gr.Dropdown(models.names, value=ex.name, label="Model", interactive=several,
                                               info=None if several else
                                               "one model loaded (app.py --checkpoint, repeatable)", elem_id="model")
                    caption = gr.Textbox(label="Modification", placeholder="e.g. make the red circle blue",
                                         elem_id="caption")
                    k = top_k_slider(n, label="Top k")
                    go = gr.Button("Retrieve", variant="primary", elem_id="retrieve")
                with gr.Column(scale=2):
                    with gr.Tab("Examples"):
                        examples = gr.Gallery(example_items(ex), label="Example queries (click one)", columns=4,
                                              height=340, allow_preview=False, elem_id="examples",
                                              visible=bool(ex.examples))
                        gr.Markdown(NO_EXAMPLES, visible=not ex.examples, elem_id="no-examples")
                    with gr.Tab("Gallery"):
                        with gr.Row():
                            search = gr.Textbox(label="File name contains", scale=3)
                            prev_page, next_page = gr.Button("◀ Previous", scale=1), gr.Button("Next ▶", scale=1)
                        first, page, page_info = browse(ex, "", 0)
                        page = gr.State(page)
                        pages_md = gr.Markdown(page_info)
                        browser = gr.Gallery(first, label="Gallery (click an image to query with it)", columns=6,
                                             height=340, allow_preview=False, elem_id="browser")
            status = gr.Markdown(elem_id="status")
            results = gr.Gallery(label="Results (click one to see the maps over it)", columns=5, height="auto",
                                 allow_preview=False, elem_id="results")
            with gr.Accordion("Scores and export", open=False):
                table = gr.Dataframe(headers=["rank", "score", "image", "target"], type="array", interactive=False)
                with gr.Row():
                    export_btn = gr.Button("Export results (CSV + JSON)", elem_id="export-results")
                    export_info = gr.Markdown(elem_id="export-info")
                export_files = gr.File(label="Results", file_count="multiple", interactive=False, visible=False,
                                       elem_id="export-files")
            with gr.Accordion("Why: per-phrase attention, in context vs isolated", open=True):
                maps_image, rows_caption = gr.State(None), gr.State(None)
                with gr.Row(elem_id="why-row"):
                    with gr.Column(scale=1, min_width=280):
                        phrases = gr.Dataframe(headers=["phrase", "start", "end"], datatype=["str", "number", "number"],
                                               type="array", interactive=True,
                                               label="Noun phrases (an example's gold ones, else spaCy's; editable)")
                        with gr.Row():
                            new_phrase = gr.Textbox(label="Add a phrase of the caption", scale=3)
                            add = gr.Button("Add", scale=1)
                        layer = gr.Dropdown(layer_choices(ex), value=MEAN, label="Layer")
                        head = gr.Dropdown(head_choices(ex), value=MEAN, label="Head")
                        eps = gr.Number(DEFAULT_EPS, label="ε of the CC term", minimum=0, step=0.001)
                        opacity = gr.Slider(0, 1, value=ALPHA, step=0.05, label="Heat opacity", elem_id="opacity")
                        upsampling = gr.Radio(list(UPSAMPLING), value=UPSAMPLING[0], label="Patches drawn as",
                                              elem_id="upsampling")
                        compare = gr.Dropdown(compare_choices(models, ex.name), value=NO_COMPARE,
                                              label="Compare with (its maps beside the model's)", interactive=several,
                                              elem_id="compare")
                        shared_scale = gr.Checkbox(False, label="One difference scale for all phrases",
                                                   elem_id="shared-scale")
                        grid = gr.Checkbox(False, label="Every layer and head (a grid of in-context maps)",
                                           elem_id="head-grid")
                        update = gr.Button("Update maps")
                        maps_info = gr.Markdown(elem_id="maps-info")
                        cc_table = gr.Dataframe(headers=["phrase", "CC term"], type="array", interactive=False,
                                                label="CC term: Σ over patches of ReLU(|A_ctx − A_iso| − ε)")
                    with gr.Column(scale=2, min_width=280):
                        gr.Markdown("Per phrase: in context | isolated (one colour scale) | their difference; "
                                    "a known box of the phrase is outlined in green")
                        heatmaps = image_output(show_label=False, format="png", interactive=False, elem_id="heatmaps")

        with gr.Tab("Review"):
            state = gr.State(None)
            with gr.Row():
                review_file = gr.Textbox(label="Triplet file (JSONL) in a review folder",
                                         placeholder=access.review_dirs[0] + "/out.jsonl" if access.review_dirs
                                         else "no review folder: upload a file", scale=4, elem_id="review-file")
                open_btn = gr.Button("Open", scale=1, elem_id="review-open")
                review_upload_file = gr.File(label="…or upload one", file_types=[".jsonl"], type="filepath", scale=2,
                                             elem_id="review-upload")
                over = gr.Radio(list(RANK_OVER), value=RANK_OVER[0], label="Rank the target among", scale=2)
                show_only = gr.Radio(list(SHOW), value=SHOW[0], label="Show", scale=2, elem_id="review-show")
                annotator = gr.Textbox(label="Annotator (your name)", scale=1, elem_id="review-annotator",
                                       max_length=limits.MAX_NAME_CHARS)
            review_status = gr.Markdown(elem_id="review-status")
            with gr.Row():
                reference = gr.Image(label="Reference", height=260, interactive=False, format="png")
                target_images = gr.Gallery(label="Target(s)", columns=1, height=260, object_fit="contain",
                                           allow_preview=False)  # one per row: the reference's size
                with gr.Column():
                    rank_md = gr.Markdown(elem_id="review-rank")
                    highlighted = gr.HighlightedText(label="Caption", color_map={"noun phrase": "#fcd34d"})
            edited = gr.Textbox(label="Caption (edit it, then accept, to record an edit)", elem_id="review-caption")
            note = gr.Textbox(label="Note", elem_id="review-note")
            with gr.Row():
                prev_btn = gr.Button("◀ Previous (p)", elem_id="review-prev")
                accept = gr.Button("Accept (a)", variant="primary", elem_id="review-accept")
                reject = gr.Button("Reject (r)", variant="stop", elem_id="review-reject")
                next_btn = gr.Button("Next ▶ (n)", elem_id="review-next")
                undo = gr.Button("Undo last decision (u)", elem_id="review-undo")
                export = gr.Button("Export accepted", elem_id="review-export")
            export_md = gr.Markdown()
            export_file = gr.File(label="Accepted triplets and the review log", file_count="multiple",
                                  interactive=False, visible=False, elem_id="review-downloads")
            gr.Markdown("Noun-phrase attention over the reference (mean over layers and heads): "
                        "in context | isolated (one colour scale) | their difference")
            review_maps = image_output(show_label=False, format="png", interactive=False, elem_id="review-maps")

        # ------------------------------------------------------------ wiring (only /retrieve is a public API)
        private = {"api_visibility": "private"}
        maps_inputs = [model_choice, maps_image, caption, phrases, rows_caption, layer, head, eps, opacity, upsampling,
                       compare, shared_scale, grid]
        maps_outputs = [phrases, rows_caption, heatmaps, cc_table, maps_info]
        results_outputs = [results, table, status, hits, maps_image]

        @shown
        def maps(name, image, caption, rows, rows_caption, layer, head, eps, opacity, upsampling, other, shared, grid):
            return attention(models[name], image, caption, rows, rows_caption, layer, head, eps, opacity, upsampling,
                             None if other in (NO_COMPARE, name) else models[other], shared, grid)

        @shown
        def on_retrieve(image, query_path, caption, k, targets, model):  # `model`: the API's name of the input
            return retrieve_values(models[model], table, status, image, query_path, caption, k, targets)

        @shown
        def on_export(name, *values):
            return export_results(models[name], exports, *values)

        def on_model(name, other, layer, head, image, query_path, caption, k, targets, hits,
                     progress=gr.Progress(track_tqdm=True)):  # shows the gallery's embedding progress
            return change_model(models, name, other, layer, head, image, query_path, caption, k, targets, hits)

        def on_example(evt: gr.SelectData):
            return pick_example(ex, evt.index)

        def on_browsed(text, pg, evt: gr.SelectData):
            return pick_browsed(ex, text, pg, evt.index)

        def on_result(paths, evt: gr.SelectData):
            return paths[evt.index]

        def on_details(state, over, progress=gr.Progress(track_tqdm=True)):  # shows embedding progress
            return review_details(ex, access, state, over)

        examples.select(on_example, None, [query_path, image, caption, targets, query_info, phrases, rows_caption],
                        **private)
        browser.select(on_browsed, [search, page], [query_path, image, targets, query_info], **private)
        search.change(lambda text: browse(ex, text, 0), search, [browser, page, pages_md], trigger_mode="always_last",
                      **private)
        prev_page.click(lambda text, pg: browse(ex, text, pg - 1), [search, page], [browser, page, pages_md], **private)
        next_page.click(lambda text, pg: browse(ex, text, pg + 1), [search, page], [browser, page, pages_md], **private)
        image.input(uploaded, image, [query_path, targets, query_info], **private)
        gr.on([go.click, caption.submit], on_retrieve, [image, query_path, caption, k, targets, model_choice],
              results_outputs, api_name="retrieve", concurrency_limit=RETRIEVE_CONCURRENCY, postprocess=False).success(
            maps, maps_inputs, maps_outputs, **private)
        model_choice.input(on_model, [model_choice, compare, layer, head, image, query_path, caption, k, targets,
                                      hits], [card, layer, head, compare, *results_outputs], **private).then(
            maps, maps_inputs, maps_outputs, **private)
        results.select(on_result, hits, maps_image, **private).success(maps, maps_inputs, maps_outputs, **private)
        gr.on([update.click, layer.change, head.change, eps.submit, opacity.release, upsampling.change, compare.change,
               shared_scale.change, grid.change],
              maps, maps_inputs, maps_outputs,
              trigger_mode="always_last", **private)
        export_btn.click(on_export, [model_choice, image, query_path, caption, hits, table, maps_image, phrases,
                                     rows_caption, layer, head, eps], [export_files, export_info], **private)
        add.click(add_phrase, [caption, phrases, new_phrase], [phrases, new_phrase], **private).success(
            maps, maps_inputs, maps_outputs, **private)

        # buttons and keys only move `state`; the item is shown from its latest value (no stale overwrites)
        gr.on([open_btn.click, review_file.submit], p(review_open, access), review_file, state, **private).success(
            review_annotator, [state, annotator], state, **private)  # a name typed before opening counts
        review_upload_file.upload(p(review_upload, ex, access), review_upload_file, state, **private).success(
            review_annotator, [state, annotator], state, **private)
        accept.click(p(review_decide, kind="accept"), [state, edited, note], state, **private)
        reject.click(p(review_decide, kind="reject"), [state, edited, note], state, **private)
        prev_btn.click(p(review_move, step=-1), state, state, **private)
        next_btn.click(p(review_move, step=1), state, state, **private)
        undo.click(review_undo, state, state, **private)
        show_only.input(review_filter, [state, show_only], state, **private)
        annotator.change(review_annotator, [state, annotator], state, trigger_mode="always_last", **private)
        state.change(p(review_show, ex, access), state, [reference, target_images, highlighted, edited, note, review_status],
                     trigger_mode="always_last", **private)
        gr.on([state.change, over.change], on_details, [state, over], [review_maps, rank_md],
              trigger_mode="always_last", **private)
        export.click(review_export, state, [export_file, export_md], **private)
        demo.load(None, js=PAGE_JS % json.dumps(CSS))
    return demo.queue(default_concurrency_limit=CONCURRENCY, status_update_rate=STATUS_UPDATE_S)
