"""The Review tab: step through a triplet file (`cir.ui.review_file` opens and reads it), accept,
reject or edit each caption, see where the model ranks the target and its noun phrases' maps over
the reference, and export the accepted triplets with the review log. The review state (file,
position, filter, annotator, browser key) is a plain dict; the decisions live in the file's review
store (`cir.ui.review`), each annotator's name bound to the browser that first decides under it."""
from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import tempfile
from types import SimpleNamespace

import gradio as gr

from cir.errors import UserError
from cir.ui import limits, review
from cir.ui.access import IMAGE_REFUSED, FileAccess
from cir.ui.components import highlight, image_output, markdown_literal, shown
from cir.ui.explorer import Explorer, grounding_boxes
from cir.ui.review_file import flagged, missing_changes, review_items, review_open, review_upload
from cir.ui.thumbnails import thumbnail
from cir.ui.why_panel import render_maps

RANK_OVER = ("file images", "gallery index")
SHOW = ("all", "undecided", "accepted", "rejected", "flagged")  # the filter; "accepted" includes edits; "flagged":
# the caption misses a change between reference and target (as `python -m cir.synth report` finds)


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
    """A thumbnail of an image a triplet file names (the "image missing" tile when it is gone or
    unreadable), or None when the app may not show it."""
    return thumbnail.or_missing(path) if access.image(path) else None


def _present(access: FileAccess, paths) -> list[str]:
    """The images of `paths` the app may show and that exist."""
    return [p for p in paths if access.image(p) and os.path.isfile(p)]


@shown
def review_show(ex: Explorer, access: FileAccess, state):
    """-> (reference, targets, highlighted caption, caption box, note box, status) of the current item."""
    if not state:
        return None, [], [], "", "", "Open a triplet file to review."
    triplets, decisions, t = _current(state)
    counts = {kind: sum(_shown_as(decisions.get(x.id)) == kind for x in triplets) for kind in SHOW[1:4]}
    counts["flagged"] = len(flagged(state))
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
    gone = [p for p in (t.reference, *t.targets) if access.image(p) and not os.path.isfile(p)]
    missing = missing_changes(t, caption)
    status = (f"Item **{state['pos'] + 1}** of {len(triplets)} · id {markdown_literal(t.id)} · "
              f"{'decided: **' + d['decision'] + '**' if d else 'undecided'} · {progress}"
              + (f" · {len(hidden)} image(s) {IMAGE_REFUSED}" if hidden else "")
              + (f" · {len(gone)} image(s) missing: " + ", ".join(markdown_literal(os.path.basename(p)) for p in gone)
                 if gone else "")
              + (f"\n\n⚠ **The caption misses {len(missing)} change(s)** between reference and target: "
                 + ", ".join(markdown_literal(m) for m in missing) + "." if missing else ""))
    targets = [(im, os.path.basename(p)) for p in t.targets if (im := _shown_image(access, p)) is not None]
    return (_shown_image(access, t.reference), targets, highlight(caption, phrases), caption,
            d["note"] if d else "", status)


@shown
def review_details(ex: Explorer, access: FileAccess, state, over: str):
    """-> (heatmap rows of the item's noun phrases over its reference, where the model ranks its target).

    Ranking among the file's images embeds them on first use; only images the app may show, and that
    exist, count."""
    if not state:
        return None, ""
    triplets, decisions, t = _current(state)
    if t is None:
        return None, ""
    ident = markdown_literal(t.id)
    if not access.image(t.reference):
        return None, f"{ident}: reference {IMAGE_REFUSED}."
    if not os.path.isfile(t.reference):
        return None, f"{ident}: the reference image is missing ({markdown_literal(os.path.basename(t.reference))})."
    caption, phrases = _caption_and_phrases(ex, t, decisions.get(t.id))
    maps, _ = render_maps(ex, t.reference, caption, phrases, boxes=grounding_boxes(t) if caption == t.caption else None)
    gallery = None
    if over == RANK_OVER[0]:
        gallery = _present(access, dict.fromkeys(p for x in triplets for p in (x.reference, *x.targets)))
    found = ex.target_rank(t.reference, caption, _present(access, t.targets), gallery)
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
                                           state.get("annotator", "")), key=state.get("key", ""))
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
    marked = flagged(state) if show == "flagged" else ()
    shown_at = [i for i, t in enumerate(triplets) if show == SHOW[0] or t.id in marked
                or _shown_as(decisions.get(t.id)) == show]
    pos = state["pos"]
    for _ in range(abs(step)):
        if step > 0:
            pos = next((i for i in shown_at if i > pos), len(triplets))
        else:
            pos = next((i for i in reversed(shown_at) if i < pos), pos)
    return {**state, "pos": pos}


KEY = re.compile(r"[A-Za-z0-9_-]{22}")  # a browser key as `browser_key` makes it


def browser_key(key) -> str:
    """The browser's review key (kept in its localStorage): `key` when it is one, else a new one."""
    return key if isinstance(key, str) and KEY.fullmatch(key) else secrets.token_urlsafe(16)


@shown
def review_annotator(state, name: str, key: str = ""):
    """Review as the annotator `name` ('' for unnamed) from the browser with the review key `key`:
    their own decisions are shown, saved and exported; go to their first undecided item. A name
    bound to another browser (`cir.ui.review`) is refused."""
    if not state:
        return state
    name = limits.annotator(name)
    if review.bound_elsewhere(review.store_path(state["path"]), name, key):
        raise UserError(review.taken_message(name))
    state = {**state, "annotator": name, "key": key}
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
    undone = review.undo(review.store_path(state["path"]), state.get("annotator", ""), key=state.get("key", ""))
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
INTRO = ("Review a **triplet file**: a JSON Lines file (`.jsonl`) with one query per line, "
         '`{"id", "reference", "caption", "targets"}` (the reference image, the caption saying how to change '
         "it, the target image(s)), e.g. from `python -m cir.synth`. Accept, reject or edit each caption; "
         "decisions are saved as you go, and \"Export accepted\" writes the accepted triplets.")
FORMAT = """| field | type | meaning |
|---|---|---|
| `id` | string | unique within the file |
| `reference` | string | the query image's path: absolute, or relative to the file's folder (for an upload: to the \
gallery's folder) |
| `caption` | string | the modification: what should change in the reference |
| `targets` | list of strings | the image(s) the reference becomes |
| `noun_phrases` | list of `{"text", "start", "end"}`, optional | character spans of the caption's noun phrases |
| `meta` | object, optional | anything else (CIR-Shapes scenes, grounding boxes); kept as is |

The full format is `docs/triplets.md` in the project's repository."""
NAMES = ("Your decisions are saved under the name typed as Annotator, and that name then belongs to "
         "this browser: no other browser can decide or undo under it (decisions without a name, too).")
KEY_STORAGE, KEY_SECRET = "cir-review-key", "cir-review"  # where the browser keeps its review key; the
# browser encrypts it with KEY_SECRET, which keeps it readable across app restarts, not from the browser's owner
ITEM_BUTTONS = ("prev_btn", "accept", "reject", "next_btn", "undo", "export")  # live once a file is open


def build_review_tab(ex: Explorer, access: FileAccess, exports: str) -> None:
    """The Review tab's components, inside the page's current gr.Tab, and their events, over the
    primary model `ex`; `access` says which triplet files and images the tab may open; downloads
    are offered from fresh folders under `exports`."""
    c = SimpleNamespace()
    _layout(c, access)
    _wire(c, ex, access, exports)


def _layout(c: SimpleNamespace, access: FileAccess) -> None:
    """What a triplet file is; the file to open (a path box only where review folders are) and the
    options; the item (reference, targets, rank, caption); the decision buttons, live once a file is open."""
    c.state, c.key = gr.State(None), gr.BrowserState("", storage_key=KEY_STORAGE, secret=KEY_SECRET)
    gr.Markdown(INTRO, elem_id="review-intro")
    with gr.Accordion("The triplet file format", open=False, elem_id="triplet-format"):
        gr.Markdown(FORMAT)
    with gr.Row():
        c.upload = gr.File(label="Upload a triplet file (.jsonl)", file_types=[".jsonl"], type="filepath",
                           scale=2, min_width=240, elem_id="review-upload")
        with gr.Column(scale=3, min_width=240, visible=bool(access.review_dirs), elem_id="review-path"):
            c.review_file = gr.Textbox(label="…or a triplet file's path in a review folder",
                                       placeholder=access.review_dirs[0] + "/out.jsonl" if access.review_dirs else "",
                                       elem_id="review-file")
            c.open_btn = gr.Button("Open", elem_id="review-open")
    with gr.Row():
        c.over = gr.Radio(list(RANK_OVER), value=RANK_OVER[0], label="Rank the target among", scale=2)
        c.show_only = gr.Radio(list(SHOW), value=SHOW[0], label="Show", scale=3, elem_id="review-show")
        c.annotator = gr.Textbox(label="Annotator (your name)", scale=2, elem_id="review-annotator",
                                 max_length=limits.MAX_NAME_CHARS, info=NAMES)
    c.status = gr.Markdown(elem_id="review-status")
    with gr.Row():
        c.reference = gr.Image(label="Reference", height=260, interactive=False, format="png", min_width=290,
                               elem_id="review-reference")
        c.target_images = gr.Gallery(label="Target(s)", columns=1, height="auto", object_fit="contain",
                                     allow_preview=False, min_width=290, elem_id="review-targets")  # page.css: at
        # the reference's size
        with gr.Column():
            c.rank_md = gr.Markdown(elem_id="review-rank")
            c.highlighted = gr.HighlightedText(label="Caption", color_map={"noun phrase": "#fcd34d"})
    c.edited = gr.Textbox(label="Caption (edit it, then accept, to record an edit)", elem_id="review-caption")
    c.note = gr.Textbox(label="Note", elem_id="review-note")
    with gr.Row():
        c.prev_btn = gr.Button("◀ Previous (p)", interactive=False, elem_id="review-prev")
        c.accept = gr.Button("Accept (a)", variant="primary", interactive=False, elem_id="review-accept")
        c.reject = gr.Button("Reject (r)", variant="stop", interactive=False, elem_id="review-reject")
        c.next_btn = gr.Button("Next ▶ (n)", interactive=False, elem_id="review-next")
        c.undo = gr.Button("Undo last decision (u)", interactive=False, elem_id="review-undo")
        c.export = gr.Button("Export accepted", interactive=False, elem_id="review-export")
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
    buttons = [getattr(c, name) for name in ITEM_BUTTONS]

    def on_details(state, over, progress=gr.Progress(track_tqdm=True)):  # shows embedding progress
        return review_details(ex, access, state, over)

    for opened in (gr.on([c.open_btn.click, c.review_file.submit], p(review_open, access), c.review_file, c.state,
                         **private),
                   c.upload.upload(p(review_upload, ex, access), c.upload, c.state, **private)):
        opened.success(browser_key, c.key, c.key, **private).success(  # a name typed before opening counts
            review_annotator, [c.state, c.annotator, c.key], c.state, **private)
    c.accept.click(p(review_decide, kind="accept"), [c.state, c.edited, c.note], c.state, **private)
    c.reject.click(p(review_decide, kind="reject"), [c.state, c.edited, c.note], c.state, **private)
    c.prev_btn.click(p(review_move, step=-1), c.state, c.state, **private)
    c.next_btn.click(p(review_move, step=1), c.state, c.state, **private)
    c.undo.click(review_undo, c.state, c.state, **private)
    c.show_only.input(review_filter, [c.state, c.show_only], c.state, **private)
    c.annotator.change(review_annotator, [c.state, c.annotator, c.key], c.state, trigger_mode="always_last",
                       **private)
    c.state.change(p(review_show, ex, access), c.state,
                   [c.reference, c.target_images, c.highlighted, c.edited, c.note, c.status],
                   trigger_mode="always_last", **private)
    c.state.change(lambda state: [gr.update(interactive=bool(state))] * len(buttons), c.state, buttons, **private)
    gr.on([c.state.change, c.over.change], on_details, [c.state, c.over], [c.review_maps, c.rank_md],
          trigger_mode="always_last", **private)
    c.export.click(p(review_export, exports), c.state, [c.export_file, c.export_md], **private)
