"""The Review tab: step through a triplet file (one in a review folder, or an upload), accept,
reject or edit each caption, see where the model ranks the target and its noun phrases' maps over
the reference, and export the accepted triplets with the review log. The review state (file,
position, filter, annotator) is a plain dict; the decisions live in the file's review store
(`cir.ui.review`)."""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace

import gradio as gr

from cir.data.triplets import normalize_path, read_triplets
from cir.errors import UserError
from cir.synth.report import changed_objects, mentions
from cir.ui import limits, review
from cir.ui.access import IMAGE_REFUSED, FileAccess
from cir.ui.components import highlight, image_output, markdown_literal, shown
from cir.ui.explorer import Explorer, grounding_boxes
from cir.ui.thumbnails import thumbnail
from cir.ui.why_panel import render_maps

RANK_OVER = ("file images", "gallery index")
SHOW = ("all", "undecided", "accepted", "rejected", "flagged")  # the filter; "accepted" includes edits; "flagged":
# the caption misses a change between reference and target (as `python -m cir.synth report` finds)


@functools.lru_cache(maxsize=8)
def _triplets(path: str, base: str | None, mtime: float):
    """(triplets, problems) of a triplet file within the Review limits (cir.ui.limits): a file of too
    many lines is refused, a line too long or a triplet over a limit is skipped as a problem, and
    targets naming one file (by its real path) are merged. Images are not checked here: whether
    one may be read at all is FileAccess.image's call."""
    unplaced = lambda text: text.replace(path, os.path.basename(path))  # the page shows no server path
    try:
        triplets, problems = read_triplets(path, skip_bad=True, check_images=False, base=base,
                                           max_lines=limits.MAX_REVIEW_LINES, max_line_chars=limits.MAX_LINE_CHARS)
    except UserError as e:
        raise UserError(unplaced(str(e))) from None
    problems = [unplaced(p) for p in problems]
    kept = []
    for t in triplets:
        if (why := _over_limits(t)) is not None:
            problems.append(f"{os.path.basename(path)}: triplet {t.id!r}: {why}")
            continue
        real = {}
        for p in t.targets:
            real.setdefault(os.path.realpath(p), p)
        kept.append(replace(t, targets=list(real.values())))
    return kept, problems


def _over_limits(t) -> str | None:
    """Why a triplet is over the Review limits, or None."""
    if len(t.targets) > limits.MAX_TARGETS:
        return f"{len(t.targets):,} targets; at most {limits.MAX_TARGETS} are reviewed"
    scenes = t.meta.get("pair_meta") or t.meta
    for key in ("reference_scene", "target_scene"):
        scene = scenes.get(key) if isinstance(scenes, dict) else None
        objects = scene.get("objects") if isinstance(scene, dict) else None
        if isinstance(objects, list) and len(objects) > limits.MAX_SCENE_OBJECTS:
            return f"{len(objects):,} objects in its {key}; at most {limits.MAX_SCENE_OBJECTS} are compared"
    return None


def missing_changes(t, caption: str) -> list[str] | None:
    """The changes between a triplet's reference and target that `caption` does not mention (the
    check of `python -m cir.synth report`); None when the triplet carries no scenes or stage outputs."""
    try:
        changes = changed_objects(t)[1]
    except (UserError, KeyError, TypeError, ValueError, IndexError):
        return None
    return [names[0] for names in changes if not mentions(caption, names)]


@functools.lru_cache(maxsize=8)
def _flagged(path: str, base: str | None, mtime: float) -> frozenset[str]:
    return frozenset(t.id for t in _triplets(path, base, mtime)[0] if missing_changes(t, t.caption))


def review_items(state: dict):
    """(triplets, problems) of a review state's triplet file, re-read when it changes."""
    try:
        mtime = os.path.getmtime(state["path"])
    except FileNotFoundError:
        raise UserError(f"{os.path.basename(state['path'])} is gone (an upload unused for an hour is deleted); "
                        "open or upload it again") from None
    return _triplets(state["path"], state.get("base"), mtime)


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
    line names an existing reference the app may show (a file written beside the gallery's image folder,
    like an examples file, names "images/x.png"); `root` when none does. Only that line is read."""
    reference = _first_reference(path)
    base = root
    for _ in range(UPLOAD_BASE_LEVELS + 1 if reference else 0):
        found = normalize_path(reference, base)
        if os.path.isfile(found) and access.image(found):
            return base
        base = os.path.dirname(base)
    return root


def _first_reference(path: str) -> str | None:
    """The "reference" of a triplet file's first non-empty line (read up to MAX_LINE_CHARS), or None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while line := f.readline(limits.MAX_LINE_CHARS + 1):
            if line.strip():
                try:
                    reference = json.loads(line).get("reference")
                except (ValueError, AttributeError, RecursionError):
                    return None
                return reference if isinstance(reference, str) else None
    return None


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
def review_export(exports: str, state):
    """Write the accepted triplets and every annotator's decisions (JSONL) beside the input, image
    paths relative to where the file's own relative paths are taken from (so an uploaded file's
    export names images as the uploaded file did); offer for download, from a fresh folder under
    `exports`, a copy of the accepted triplets and the annotator's own decisions -> (downloads, message)."""
    if not state:
        raise UserError("open a triplet file first")
    triplets, decisions, _ = _current(state)
    store, out, log = review.store_path(state["path"]), review.export_path(state["path"]), review.log_path(state["path"])
    n = review.export_accepted(triplets, decisions, out, state.get("base"))
    review.export_log(store, log)
    folder = tempfile.mkdtemp(prefix="review-", dir=exports)
    mine = review.export_log(store, os.path.join(folder, log.name), state.get("annotator", ""))
    downloads = [shutil.copyfile(out, os.path.join(folder, out.name)), os.path.join(folder, log.name)]
    return (gr.update(value=downloads, visible=True),
            f"Wrote {n} accepted triplet(s) to {markdown_literal(out.name)} and every annotator's decisions to "
            f"{markdown_literal(log.name)}; the download holds your {mine} decision(s).")


# ---------------------------------------------------------------------------- layout and events
def build_review_tab(ex: Explorer, access: FileAccess, exports: str) -> None:
    """The Review tab's components, inside the page's current gr.Tab, and their events, over the
    primary model `ex`; `access` says which triplet files and images the tab may open; downloads
    are offered from fresh folders under `exports`."""
    c = SimpleNamespace()
    _layout(c, access)
    _wire(c, ex, access, exports)


def _layout(c: SimpleNamespace, access: FileAccess) -> None:
    """The file to open and the filters; the item (reference, targets, rank, caption); the decision buttons."""
    c.state = gr.State(None)
    with gr.Row():
        c.review_file = gr.Textbox(label="Triplet file (JSONL) in a review folder",
                                   placeholder=access.review_dirs[0] + "/out.jsonl" if access.review_dirs
                                   else "no review folder: upload a file", scale=4, elem_id="review-file")
        c.open_btn = gr.Button("Open", scale=1, elem_id="review-open")
        c.upload = gr.File(label="…or upload one", file_types=[".jsonl"], type="filepath", scale=2,
                           elem_id="review-upload")
        c.over = gr.Radio(list(RANK_OVER), value=RANK_OVER[0], label="Rank the target among", scale=2)
        c.show_only = gr.Radio(list(SHOW), value=SHOW[0], label="Show", scale=2, elem_id="review-show")
        c.annotator = gr.Textbox(label="Annotator (your name)", scale=1, elem_id="review-annotator",
                                 max_length=limits.MAX_NAME_CHARS)
    c.status = gr.Markdown(elem_id="review-status")
    with gr.Row():
        c.reference = gr.Image(label="Reference", height=260, interactive=False, format="png")
        c.target_images = gr.Gallery(label="Target(s)", columns=1, height=260, object_fit="contain",
                                     allow_preview=False)  # one per row: the reference's size
        with gr.Column():
            c.rank_md = gr.Markdown(elem_id="review-rank")
            c.highlighted = gr.HighlightedText(label="Caption", color_map={"noun phrase": "#fcd34d"})
    c.edited = gr.Textbox(label="Caption (edit it, then accept, to record an edit)", elem_id="review-caption")
    c.note = gr.Textbox(label="Note", elem_id="review-note")
    with gr.Row():
        c.prev_btn = gr.Button("◀ Previous (p)", elem_id="review-prev")
        c.accept = gr.Button("Accept (a)", variant="primary", elem_id="review-accept")
        c.reject = gr.Button("Reject (r)", variant="stop", elem_id="review-reject")
        c.next_btn = gr.Button("Next ▶ (n)", elem_id="review-next")
        c.undo = gr.Button("Undo last decision (u)", elem_id="review-undo")
        c.export = gr.Button("Export accepted", elem_id="review-export")
    c.export_md = gr.Markdown()
    c.export_file = gr.File(label="Accepted triplets and the review log", file_count="multiple",
                            interactive=False, visible=False, elem_id="review-downloads")
    gr.Markdown("Noun-phrase attention over the reference (mean over layers and heads): "
                "in context | isolated (one colour scale) | their difference")
    c.review_maps = image_output(show_label=False, format="png", interactive=False, elem_id="review-maps")


def _wire(c: SimpleNamespace, ex: Explorer, access: FileAccess, exports: str) -> None:
    """Buttons and keys only move the review state; the item is shown from its latest value (no stale overwrites)."""
    private = {"api_visibility": "private"}
    p = functools.partial

    def on_details(state, over, progress=gr.Progress(track_tqdm=True)):  # shows embedding progress
        return review_details(ex, access, state, over)

    gr.on([c.open_btn.click, c.review_file.submit], p(review_open, access), c.review_file, c.state, **private).success(
        review_annotator, [c.state, c.annotator], c.state, **private)  # a name typed before opening counts
    c.upload.upload(p(review_upload, ex, access), c.upload, c.state, **private).success(
        review_annotator, [c.state, c.annotator], c.state, **private)
    c.accept.click(p(review_decide, kind="accept"), [c.state, c.edited, c.note], c.state, **private)
    c.reject.click(p(review_decide, kind="reject"), [c.state, c.edited, c.note], c.state, **private)
    c.prev_btn.click(p(review_move, step=-1), c.state, c.state, **private)
    c.next_btn.click(p(review_move, step=1), c.state, c.state, **private)
    c.undo.click(review_undo, c.state, c.state, **private)
    c.show_only.input(review_filter, [c.state, c.show_only], c.state, **private)
    c.annotator.change(review_annotator, [c.state, c.annotator], c.state, trigger_mode="always_last", **private)
    c.state.change(p(review_show, ex, access), c.state,
                   [c.reference, c.target_images, c.highlighted, c.edited, c.note, c.status],
                   trigger_mode="always_last", **private)
    gr.on([c.state.change, c.over.change], on_details, [c.state, c.over], [c.review_maps, c.rank_md],
          trigger_mode="always_last", **private)
    c.export.click(p(review_export, exports), c.state, [c.export_file, c.export_md], **private)
