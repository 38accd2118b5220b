"""The Retrieve tab: a model; a query from the examples, the gallery or an upload; the top k with
scores, exported as CSV and JSON; and the Why panel's per-phrase maps (`cir.ui.why_panel`) over the query
or a result. The callbacks are plain functions of component values and an `Explorer` (the selected
model's); `build_retrieve_tab` lays out the tab's components and wires their events."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np

from cir.atomic import write_text
from cir.errors import UserError
from cir.ui import limits
from cir.ui.card import OUT_OF_DOMAIN, looks_like_shapes, maps_trust, model_card
from cir.ui.components import (MEAN, choice_index, gallery_value, image_output, markdown_literal, query_image, shown,
                               top_k, top_k_slider)
from cir.ui.explorer import Explorer, as_image, phrase_spans
from cir.ui.heatmaps import ALPHA
from cir.ui.models import Models
from cir.ui.thumbnails import thumbnail
from cir.ui.why_panel import (DEFAULT_EPS, NO_COMPARE, UPSAMPLING, add_phrase, attention, compare_choices, head_choices,
                        layer_choices, truncation_notice)

PER_PAGE = 24
NO_EXAMPLES = ("No example queries with this gallery: start the app with `--examples triplets.jsonl` to add some, "
               "or pick a query under **Gallery** or upload one.")


def example_items(ex: Explorer) -> list:
    return [(thumbnail.or_missing(t.reference), t.caption) for t in ex.examples]


def query_note(ex: Explorer, query_path: str, caption: str | None) -> str:
    """The note under a gallery query image: an example's query (its reference and caption) has ground
    truth, marked ★ in the results; its reference with another caption, or any other image, has none."""
    t = ex.example_of(query_path, caption or "")
    if t is not None:
        return (f"Example **{markdown_literal(t.id)}**: {len(t.targets)} ground-truth target(s), marked ★ in the "
                "results.")
    info = f"Gallery image **{markdown_literal(ex.label(query_path))}**"
    t = ex.example_of(query_path)
    if t is not None:
        return info + (f": the reference of example **{markdown_literal(t.id)}**, with another modification, so no "
                       "ground truth; pick the example under Examples for its caption and ground truth.")
    return info + " (no ground truth)."


@shown
def pick_example(ex: Explorer, index: int):
    """Example `index` chosen -> (query path, query image, caption, info, phrase rows, their caption):
    the Why panel starts from the example's own (gold) noun phrases when it has them."""
    t = ex.examples[index]
    rows = [[p["text"], p["start"], p["end"]] for p in t.noun_phrases or []]
    return (t.reference, thumbnail(t.reference), t.caption, query_note(ex, t.reference, t.caption), rows,
            t.caption if rows else None)


@shown
def browse(ex: Explorer, text: str, page: int):
    """(thumbnails with file names, page, page info) of one gallery page."""
    paths, page, pages, total = ex.browse(text, page, PER_PAGE)
    items = [(thumbnail.or_missing(p), ex.label(p)) for p in paths]
    return items, page, f"page {page + 1} of {pages} · {total} images"


@shown
def pick_browsed(ex: Explorer, text: str, page: int, index: int, caption: str | None = None):
    """Image `index` of a gallery page chosen, with the modification `caption` -> (query path, query image, info)."""
    path = ex.browse(text, page, PER_PAGE)[0][index]
    return path, thumbnail(path), query_note(ex, path, caption)


@shown
def caption_edited(ex: Explorer, query_path: str | None, caption: str):
    """The modification changed (typed, an example's, a variant applied): a gallery query's note says
    again whether it has ground truth (an upload's is kept)."""
    return query_note(ex, query_path, limits.caption(caption)) if query_path else gr.skip()


def domain_notice(image) -> str:
    """'' or a warning that the query image looks unlike the model's training scenes."""
    return "" if looks_like_shapes(as_image(image)) else " " + OUT_OF_DOMAIN


@shown
def uploaded(image):
    """The user uploaded or cleared the query image: it is the query now, without ground truth."""
    return None, ("Uploaded image (no ground truth)." + domain_notice(image)) if image else ""


@shown
def run_retrieve(ex: Explorer, image, query_path, caption: str, k: int):
    """-> (result thumbnails with rank and score, result table, status, result paths, maps image). The
    ground truth (★, and its rank in the status) is the example's whose reference and caption the query is."""
    source = query_path or image
    caption = limits.caption(caption)
    if not caption.strip():
        raise UserError("type a modification first: what should change in the query image?")
    example = ex.example_of(source, caption)
    targets = example.targets if example is not None else []
    t0 = time.perf_counter()
    query = ex.encode(source, caption)
    hits = ex.retrieve(source, caption, top_k(k, len(ex.index)), targets, query=query)
    ms = (time.perf_counter() - t0) * 1000
    status = (f"{len(hits)} results of **{markdown_literal(ex.name)}** in {ms:.0f} ms (encode + search) over "
              f"{len(ex.index)} images.")
    status += truncation_notice(ex, caption or "")
    if targets:
        found = ex.target_rank(source, caption or "", targets, query=query)
        status += f" Ground truth: rank **{found[0]}** of {found[1]}." if found else " Ground truth: not in this gallery."
    if not query_path:
        status += domain_notice(source)
    gallery = [(thumbnail.or_missing(h.path), f"#{h.rank} · {h.score:.3f}" + (" · ★ target" if h.is_target else ""))
               for h in hits]
    table = [[h.rank, round(h.score, 4), ex.label(h.path), "★" if h.is_target else ""] for h in hits]
    return gallery, table, status, [h.path for h in hits], source


def retrieve_values(ex: Explorer, table: gr.Dataframe, status: gr.Markdown, image, query_path, caption: str, k: int):
    """`run_retrieve`'s outputs as the values its components send, for the retrieve event with
    `postprocess=False` (Gradio's postprocessing would handle the gallery's files twice per event)."""
    gallery, rows, text, paths, source = run_retrieve(ex, image, query_path, caption, k)
    return gallery_value(gallery), table.postprocess(rows).model_dump(), status.postprocess(text), paths, source


def results_record(ex: Explorer, query: str, caption: str, hits, maps_over=None, maps=(),
                   layer: str = MEAN, head: str = MEAN, eps: float = DEFAULT_EPS) -> dict:
    """The retrieval (`Hit`s) and the Why panel's maps (`PhraseResult`s over the image `maps_over`) as
    one plain record (what the export writes); images are named relative to the gallery's folder."""
    as_list = lambda a: None if a is None else np.asarray(a, dtype=float).round(6).tolist()
    return {"model": ex.name, "checkpoint": os.path.basename(ex.checkpoint or "") or None, "query": query,
            "modification": caption,
            "results": [{"rank": h.rank, "score": round(h.score, 4), "image": ex.label(h.path), "target": h.is_target}
                        for h in hits],
            "maps": {"image": maps_over and ex.label(maps_over), "layer": layer, "head": head, "eps": float(eps),
                     "phrases": [{"phrase": r.text, "start": r.start, "end": r.end, "cc": r.cc,
                                  "in_context": as_list(r.in_context), "isolated": as_list(r.isolated)} for r in maps]}}


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting so as a formula


def csv_cell(value):
    """`value` safe in a spreadsheet (OWASP CSV injection): text starting with FORMULA_STARTS gets a
    leading apostrophe; numbers and booleans are kept."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


@shown
def export_results(ex: Explorer, exports: str, query, query_path, caption: str, hits, maps_over=None,
                   rows=None, rows_caption=None, layer: str = MEAN, head: str = MEAN, eps: float = DEFAULT_EPS):
    """Write the current results as CSV (one row per result) and JSON (results, and the Why panel's
    phrase maps and CC terms over `maps_over` as it shows them) into a fresh folder under `exports`
    -> (the two files for download, message). The results are retrieved again on the server for the
    shown paths `hits` (never taken from the table the page sends); when they differ, the query,
    caption or model changed since the retrieve, and nothing is written."""
    if not hits:
        raise UserError("retrieve first: there are no results to export")
    caption = limits.caption(caption)
    example = ex.example_of(query_path or query, caption)
    found = ex.retrieve(query_path or query, caption, len(hits), example.targets if example is not None else [])
    if [h.path for h in found] != list(hits):
        raise UserError("the query, modification or model changed since these results: retrieve again, then export")
    maps = []
    if maps_over and rows and caption == rows_caption:
        phrases = phrase_spans(caption, limits.phrase_rows(rows))
        maps = ex.phrase_maps(maps_over, caption, phrases, choice_index(layer), choice_index(head), float(eps))
    record = results_record(ex, ex.label(query_path) if query_path else "uploaded image", caption, found, maps_over,
                            maps, layer, head, eps)
    folder = tempfile.mkdtemp(prefix="results-", dir=exports)
    text = io.StringIO()
    writer = csv.DictWriter(text, ["rank", "score", "image", "target"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in record["results"])
    csv_path, json_path = os.path.join(folder, "results.csv"), os.path.join(folder, "results.json")
    write_text(csv_path, text.getvalue())
    write_text(json_path, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return gr.update(value=[csv_path, json_path], visible=True), f"Exported {len(record['results'])} results."


def change_model(models: Models, name: str, other: str, layer: str, head: str, image, query_path, caption: str,
                 k, hits):
    """The model `name` selected -> (model card, layer, head and "Compare with" choices, then the
    results outputs of `run_retrieve`): shown results are retrieved again with it (the status names
    the model); when that fails they are cleared, so no results stand under another model's name.
    Another model embeds the gallery here, the first time it is selected."""
    try:
        ex = models[name]
    except UserError as e:  # it cannot be loaded: say why, and show no results under its name
        return (gr.skip(),) * 4 + ([], [], f"⚠ {e}", [], None)
    kept = lambda choice, count: choice if choice_index(choice) is None or choice_index(choice) < count else MEAN
    controls = (model_card(ex), gr.update(choices=layer_choices(ex), value=kept(layer, ex.layers)),
                gr.update(choices=head_choices(ex), value=kept(head, ex.heads)),
                gr.update(choices=compare_choices(models, name), value=NO_COMPARE if other == name else other))
    if not hits:
        return controls + (gr.skip(),) * 5
    try:
        return controls + run_retrieve(ex, image, query_path, caption, k)
    except gr.Error as e:
        return controls + ([], [], f"⚠ Results cleared: {e.message}", [], None)


# ---------------------------------------------------------------------------- layout and events
def build_retrieve_tab(models: Models, exports: str, card: gr.Markdown, concurrency: int) -> SimpleNamespace:
    """The Retrieve tab's components, inside the page's current gr.Tab, and their events: /retrieve
    is its public API, served `concurrency` events at once. `card` is the page's model card (a model
    change replaces it); exports go into fresh folders under `exports`. -> the components."""
    c = SimpleNamespace()
    _query_row(c, models)
    _results(c)
    _why_panel(c, models)
    _wire_query(c, models.primary)
    _wire_results(c, models, exports, card, concurrency)
    return c


def _query_row(c: SimpleNamespace, models: Models) -> None:
    """The query (image, model, modification, top k) beside its pickers (examples, gallery pages)."""
    ex, several = models.primary, len(models) > 1
    c.query_path, c.hits = gr.State(None), gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            c.image = query_image(label="Query image", type="filepath", format="png", height=260,
                                  sources=["upload", "clipboard"], elem_id="query-image")
            c.query_info = gr.Markdown(elem_id="query-info")
            c.model_choice = gr.Dropdown(models.names, value=ex.name, label="Model", interactive=several,
                                         info=None if several else
                                         "one model loaded (app.py --checkpoint, repeatable)", elem_id="model")
            c.caption = gr.Textbox(label="Modification", placeholder="e.g. make the red circle blue",
                                   elem_id="caption")
            c.k = top_k_slider(len(ex.index), label="Top k")
            c.go = gr.Button("Retrieve", variant="primary", elem_id="retrieve")
        with gr.Column(scale=2):
            with gr.Tab("Examples"):
                c.examples = gr.Gallery(example_items(ex), label="Example queries (click one)", columns=4,
                                        height=340, allow_preview=False, elem_id="examples",
                                        visible=bool(ex.examples))
                gr.Markdown(NO_EXAMPLES, visible=not ex.examples, elem_id="no-examples")
            with gr.Tab("Gallery"):
                with gr.Row():
                    c.search = gr.Textbox(label="File name contains", scale=3)
                    c.prev_page, c.next_page = gr.Button("◀ Previous", scale=1), gr.Button("Next ▶", scale=1)
                first, page, page_info = browse(ex, "", 0)
                c.page = gr.State(page)
                c.pages_md = gr.Markdown(page_info)
                c.browser = gr.Gallery(first, label="Gallery (click an image to query with it)", columns=6,
                                       height=340, allow_preview=False, elem_id="browser")


def _results(c: SimpleNamespace) -> None:
    """The status line, the result thumbnails, and their scores table and export."""
    c.status = gr.Markdown(elem_id="status")
    c.results = gr.Gallery(label="Results (click one to see the maps over it)", columns=5, height="auto",
                           allow_preview=False, elem_id="results")
    with gr.Accordion("Scores and export", open=False):
        c.table = gr.Dataframe(headers=["rank", "score", "image", "target"], type="array", interactive=False)
        with gr.Row():
            c.export_btn = gr.Button("Export results (CSV + JSON)", elem_id="export-results")
            c.export_info = gr.Markdown(elem_id="export-info")
        c.export_files = gr.File(label="Results", file_count="multiple", interactive=False, visible=False,
                                 elem_id="export-files")


def _why_panel(c: SimpleNamespace, models: Models) -> None:
    """The Why panel: the phrase rows and the maps' controls beside the maps, the drawing's opacity and
    patch style under them (`cir.ui.why_panel`)."""
    ex, several = models.primary, len(models) > 1
    with gr.Accordion("Why: per-phrase attention, in context vs isolated", open=True):
        c.trust = gr.Markdown(maps_trust(ex), elem_id="maps-trust")
        c.maps_image, c.rows_caption = gr.State(None), gr.State(None)
        with gr.Row(elem_id="why-row"):
            with gr.Column(scale=1, min_width=280):
                c.phrases = gr.Dataframe(headers=["phrase", "start", "end"], datatype=["str", "number", "number"],
                                         type="array", interactive=True, column_widths=["60%", "20%", "20%"],
                                         label="Noun phrases (an example's gold ones, else spaCy's; editable)",
                                         elem_id="phrases")
                with gr.Row():
                    c.new_phrase = gr.Textbox(label="Add a phrase of the caption", scale=3)
                    c.add = gr.Button("Add", scale=1)
                c.layer = gr.Dropdown(layer_choices(ex), value=MEAN, label="Layer")
                c.head = gr.Dropdown(head_choices(ex), value=MEAN, label="Head")
                c.eps = gr.Number(DEFAULT_EPS, label="ε of the CC term", minimum=0, step=0.001)
                c.compare = gr.Dropdown(compare_choices(models, ex.name), value=models.twin or NO_COMPARE,
                                        label="Compare with (its maps beside the model's)", interactive=several,
                                        elem_id="compare")
                c.shared_scale = gr.Checkbox(False, label="One difference scale for all phrases",
                                             elem_id="shared-scale")
                c.grid = gr.Checkbox(False, label="Every layer and head (one model's grid of in-context maps)",
                                     elem_id="head-grid")
                c.update = gr.Button("Update maps")
                c.maps_info = gr.Markdown(elem_id="maps-info")
                c.cc_table = gr.Dataframe(headers=["phrase", "CC term"], type="array", interactive=False,
                                          column_widths=["65%", "35%"], elem_id="cc-table",
                                          label="CC term: Σ over patches of ReLU(|A_ctx − A_iso| − ε)")
            with gr.Column(scale=2, min_width=280):
                gr.Markdown("Per phrase: in context | isolated (one colour scale) | their difference; "
                            "a known box of the phrase is outlined in green")
                c.heatmaps = image_output(show_label=False, format="png", interactive=False, elem_id="heatmaps")
                with gr.Row():  # the drawing's own controls, right under it (on a phone too)
                    c.opacity = gr.Slider(0, 1, value=ALPHA, step=0.05, label="Heat opacity", elem_id="opacity")
                    c.upsampling = gr.Radio(list(UPSAMPLING), value=UPSAMPLING[0], label="Patches drawn as",
                                            elem_id="upsampling")


def _wire_query(c: SimpleNamespace, ex: Explorer) -> None:
    """The query's events: an example, a gallery image or an upload becomes the query."""
    private = {"api_visibility": "private"}
    pages = [c.browser, c.page, c.pages_md]

    def on_example(evt: gr.SelectData):
        return pick_example(ex, evt.index)

    def on_browsed(text, pg, caption, evt: gr.SelectData):
        return pick_browsed(ex, text, pg, evt.index, caption)

    c.examples.select(on_example, None, [c.query_path, c.image, c.caption, c.query_info, c.phrases, c.rows_caption],
                      **private)
    c.browser.select(on_browsed, [c.search, c.page, c.caption], [c.query_path, c.image, c.query_info], **private)
    c.caption.change(lambda path, caption: caption_edited(ex, path, caption), [c.query_path, c.caption], c.query_info,
                     trigger_mode="always_last", **private)
    c.search.change(lambda text: browse(ex, text, 0), c.search, pages, trigger_mode="always_last", **private)
    c.prev_page.click(lambda text, pg: browse(ex, text, pg - 1), [c.search, c.page], pages, **private)
    c.next_page.click(lambda text, pg: browse(ex, text, pg + 1), [c.search, c.page], pages, **private)
    c.image.input(uploaded, c.image, [c.query_path, c.query_info], **private)


def _wire_results(c: SimpleNamespace, models: Models, exports: str, card: gr.Markdown, concurrency: int) -> None:
    """The retrieve (the public /retrieve API), model change, export and Why panel events; a retrieve, a
    model change, a result clicked or a control changed redraws the maps."""
    private = {"api_visibility": "private"}
    maps_inputs = [c.model_choice, c.maps_image, c.caption, c.phrases, c.rows_caption, c.layer, c.head, c.eps,
                   c.opacity, c.upsampling, c.compare, c.shared_scale, c.grid]
    maps_outputs = [c.phrases, c.rows_caption, c.heatmaps, c.cc_table, c.maps_info, c.trust]
    c.maps_inputs, c.maps_outputs = maps_inputs, maps_outputs  # for other tabs that open an image's maps
    results_outputs = [c.results, c.table, c.status, c.hits, c.maps_image]

    @shown
    def maps(name, image, caption, rows, rows_caption, layer, head, eps, opacity, upsampling, other, shared, grid):
        return (*attention(models[name], image, caption, rows, rows_caption, layer, head, eps, opacity, upsampling,
                           None if other in (NO_COMPARE, name) else models[other], shared, grid),
                maps_trust(models[name]))

    c.redraw_maps = maps

    @shown
    def on_retrieve(image, query_path, caption, k, model):  # `model`: the API's name of the input
        return retrieve_values(models[model], c.table, c.status, image, query_path, caption, k)

    @shown
    def on_export(name, *values):
        return export_results(models[name], exports, *values)

    def on_model(name, other, layer, head, image, query_path, caption, k, hits,
                 progress=gr.Progress(track_tqdm=True)):  # shows the gallery's embedding progress
        return change_model(models, name, other, layer, head, image, query_path, caption, k, hits)

    def on_result(paths, evt: gr.SelectData):
        return paths[evt.index]

    gr.on([c.go.click, c.caption.submit], on_retrieve, [c.image, c.query_path, c.caption, c.k, c.model_choice],
          results_outputs, api_name="retrieve", concurrency_limit=concurrency, postprocess=False).success(
        maps, maps_inputs, maps_outputs, **private)
    c.model_choice.input(on_model, [c.model_choice, c.compare, c.layer, c.head, c.image, c.query_path, c.caption, c.k,
                                    c.hits], [card, c.layer, c.head, c.compare, *results_outputs],
                         **private).then(maps, maps_inputs, maps_outputs, **private)
    c.results.select(on_result, c.hits, c.maps_image, **private).success(maps, maps_inputs, maps_outputs, **private)
    gr.on([c.update.click, c.layer.change, c.head.change, c.eps.submit, c.opacity.release, c.upsampling.change,
           c.compare.change, c.shared_scale.change, c.grid.change],
          maps, maps_inputs, maps_outputs,
          trigger_mode="always_last", **private)
    c.export_btn.click(on_export, [c.model_choice, c.image, c.query_path, c.caption, c.hits, c.maps_image,
                                   c.phrases, c.rows_caption, c.layer, c.head, c.eps], [c.export_files, c.export_info],
                       **private)
    c.add.click(add_phrase, [c.caption, c.phrases, c.new_phrase], [c.phrases, c.new_phrase], **private).success(
        maps, maps_inputs, maps_outputs, **private)
