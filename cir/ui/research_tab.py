"""The Research tab: for the Retrieve tab's query (image, modification, top k, model), the gallery's
embedding map with the query, its top k, reference and targets; what masking each noun phrase does to
the ranking; prompt variants scored against results marked ideal (with a Rank-Δ heatmap, each
applicable to the query); and the make-up of the top k. Every view is measured (`cir.explain`,
`cir.projection`) and is an API endpoint: /embedding_map, /phrase_influence, /prompt_variants,
/results_makeup. The callbacks are plain functions of component values and an `Explorer`."""
from __future__ import annotations

import functools
import os
import tempfile
from types import SimpleNamespace

import gradio as gr
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cir.atomic import write_json
from cir.errors import UserError
from cir.explain import (Gallery, InfluenceConfig, QueryEncoder, VariantConfig, folder_makeup, llm_rewrites,
                         phrase_influence, prompt_variants, score_variants, shapes_makeup, shapes_scenes, top_rows)
from cir.projection import projection_of
from cir.synth.backends import OpenAIBackend
from cir.ui import limits
from cir.ui.components import markdown_literal, shown, top_k
from cir.ui.explorer import Explorer, as_image
from cir.ui.models import Models
from cir.ui.thumbnails import thumbnail

LLM_URL, LLM_MODEL = "CIR_LLM_URL", "CIR_LLM_MODEL"  # environment: the rewrites' server and model
KINDS = ["gallery", "top-k", "target", "reference", "query"]  # drawn in this order: the query on top
COLOURS = {"gallery": "#c8c8c8", "top-k": "#1f77b4", "target": "#2ca02c", "reference": "#ff7f0e", "query": "#d62728"}


@functools.lru_cache(maxsize=8)
def gallery_of(ex: Explorer) -> Gallery:
    return Gallery(np.asarray(ex.index.embeddings, dtype=np.float32), ex.index.paths)


@functools.lru_cache(maxsize=8)
def scenes_of(ex: Explorer) -> dict[str, dict]:
    """The CIR-Shapes scenes of the model's example queries' images ({} for a user's gallery)."""
    return shapes_scenes(ex.examples)


@functools.lru_cache(maxsize=8)
def map_of(ex: Explorer):
    """The gallery's 2D map (`cir.projection`: fitted once per index, stored with its hash)."""
    return projection_of(ex.index)


def query_of(ex: Explorer, image, query_path, caption: str):
    """(image file, caption, encoder, noun phrases, targets) of the query: targets are those of the
    example with this reference and caption, else none."""
    source = query_path or image
    caption = limits.caption(caption)
    if not source:
        raise UserError("choose a query image first")
    if not caption.strip():
        raise UserError("type a modification first: what should change in the query image?")
    encoder = QueryEncoder(ex.model, ex.preprocess(as_image(source)), ex.device, ex.lock)
    example = ex.example_of(source, caption)
    return source, caption, encoder, ex.caption_phrases(caption)[0], example.targets if example is not None else []


@shown
def embedding_map(ex: Explorer, image, query_path, caption: str, k):
    """-> (points: x, y, kind, image, rank — the gallery's, then the query's; the map's description;
    [x, rank, path] of each gallery point, for `picked_point`)."""
    source, caption, encoder, _, targets = query_of(ex, image, query_path, caption)
    gallery, projection = gallery_of(ex), map_of(ex)
    query = encoder([caption])
    scores = (query @ gallery.embeddings.T)[0]
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    k = top_k(k, len(gallery.paths))
    real = os.path.realpath(source)
    kind = np.where(rank <= k, "top-k", "gallery").astype(object)
    targets = set(targets)
    kind[[i for i, p in enumerate(gallery.paths) if p in targets]] = "target"
    kind[[i for i, p in enumerate(gallery.paths) if os.path.realpath(p) == real]] = "reference"
    point = projection.transform(query)[0]
    points = pd.DataFrame({"x": np.append(projection.points[:, 0], point[0]),
                           "y": np.append(projection.points[:, 1], point[1]),
                           "kind": np.append(kind, "query"),
                           "image": [ex.label(p) for p in gallery.paths] + ["(the composed query)"],
                           "rank": np.append(rank, 0)})
    points["order"] = points["kind"].map(KINDS.index)
    points = points.sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)
    where = f", stored at {markdown_literal(projection.file)}" if projection.file else ""
    info = (f"{projection.method.upper()} map of {len(gallery.paths)} gallery images{where}; the query is projected "
            f"with the same map. Top {k} in blue, targets green, the reference orange, the query red. "
            "Drag across the map to open the best-ranked image there.")
    picks = [[float(x), int(r), p] for x, r, p in zip(projection.points[:, 0], rank, gallery.paths)]
    return points, info, picks


@shown
def picked_point(ex: Explorer, picks: list, x_range) -> tuple:
    """The map brushed over `x_range` [x0, x1] -> (its best-ranked image's thumbnail, what it is, its
    path): the Why panel of the Retrieve tab draws its maps over it."""
    if not picks:
        raise UserError("draw the map first")
    x0, x1 = sorted(float(v) for v in x_range)
    inside = [(rank, path) for x, rank, path in picks if x0 <= x <= x1]
    if not inside:
        raise UserError("no gallery image there: drag across some points")
    rank, path = min(inside)
    info = (f"**{markdown_literal(ex.label(path))}**, rank {rank} ({len(inside)} images in the range); its maps "
            "are in the Retrieve tab's Why panel.")
    return thumbnail.or_missing(path), info, path


@shown
def influence_view(ex: Explorer, image, query_path, caption: str, k):
    """-> (bars: phrase, rank change; table rows; summary)."""
    source, caption, encoder, phrases, targets = query_of(ex, image, query_path, caption)
    if not phrases:
        raise UserError("the caption has no noun phrase to remove")
    out = phrase_influence(encoder, caption, phrases, gallery_of(ex), targets,
                           InfluenceConfig(top_k(k, len(ex.index))))
    bars = pd.DataFrame({"phrase": [p["phrase"] for p in out["phrases"]],
                         "rank change": [p["rank_change"] for p in out["phrases"]]})
    rows = [[p["phrase"], p["rank"], p["rank_change"], round(p["score"], 4), round(p["score_change"], 4),
             p["overlap"], p["overlap_change"]] for p in out["phrases"]]
    info = (f"Each phrase masked in turn. Followed: the {out['subject']} "
            f"**{markdown_literal(ex.label(out['subject_path']))}**, rank {out['rank']} "
            f"(score {out['score']:.4f}) with the whole caption; overlap: of its top {out['k']}.")
    return bars, rows, info


def ideal_choices(ex: Explorer, hits: list[str]):
    """The ideal-image choices: the shown results' labels."""
    return gr.update(choices=[ex.label(p) for p in hits or []], value=[])


def rank_heatmap(record: dict, labels: list[str]):
    """A matplotlib figure: each ideal image's rank (columns) under every variant (rows), coloured by
    its change from the caption's rank."""
    variants = record["variants"]
    ranks = np.array([v["ranks"] for v in variants])  # [V, R]
    change = ranks - ranks[:1]
    fig, ax = plt.subplots(figsize=(4.2 + 1.2 * len(labels), 0.9 + 0.38 * len(variants)), dpi=100,
                           layout="constrained")
    bound = max(1, int(np.abs(change).max()))
    ax.imshow(change, cmap="RdYlGn_r", vmin=-bound, vmax=bound, aspect="auto")
    for (i, j), r in np.ndenumerate(ranks):
        ax.text(j, i, f"{r} ({change[i, j]:+d})" if i else str(r), ha="center", va="center", fontsize=8)
    ax.set_yticks(range(len(variants)), [v["name"][:48] for v in variants], fontsize=8)
    ax.set_xticks(range(len(labels)), [os.path.basename(x) for x in labels], fontsize=8, rotation=20)
    ax.set_title("Rank of each ideal image (Δ vs the caption)", fontsize=9, loc="right")
    plt.close(fig)
    return fig


def variants_record(ex: Explorer, encoder, caption: str, phrases: list[dict], k: int, ideal: list[str]) -> dict:
    """`score_variants` of the query's variants against `ideal`: gallery labels (as the results show
    them). With $CIR_LLM_URL and $CIR_LLM_MODEL set (an OpenAI-compatible server; its key in
    $OPENAI_API_KEY), the LLM's rewrites are scored too."""
    by_label = {ex.label(p): p for p in ex.index.paths}
    unknown = [x for x in ideal or [] if x not in by_label]
    if unknown:
        raise UserError(f"not a gallery image: {unknown[0]}")
    config = VariantConfig(k, shapes=bool(scenes_of(ex)))
    variants = prompt_variants(caption, phrases, config)
    if os.environ.get(LLM_URL) and os.environ.get(LLM_MODEL):
        backend = OpenAIBackend(os.environ[LLM_URL], os.environ[LLM_MODEL], os.environ.get("OPENAI_API_KEY") or None,
                                timeout=30, max_attempts=2)
        variants += llm_rewrites(backend, caption, config.max_variants)
    return score_variants(encoder, variants, gallery_of(ex), [by_label[x] for x in ideal or []], config)


@shown
def variants_view(ex: Explorer, image, query_path, caption: str, k, ideal: list[str]):
    """-> (table rows, Rank-Δ heatmap, the variants' captions to apply, summary).
    `ideal`: gallery labels (as the results show them) marked ideal."""
    source, caption, encoder, phrases, _ = query_of(ex, image, query_path, caption)
    record = variants_record(ex, encoder, caption, phrases, top_k(k, len(ex.index)), ideal)
    rows = [[v["name"], v["caption"], round(v["ndcg"], 4), round(v["mrr"], 4), " ".join(map(str, v["ranks"]))]
            for v in record["variants"]]
    labels = [ex.label(p) for p in record["ideal"]]
    captions = [v["caption"] for v in record["variants"]]
    best = max(record["variants"], key=lambda v: (v["ndcg"], v["mrr"]))
    info = (f"{len(captions)} variants, each encoded and ranked over {len(ex.index)} images; best by "
            f"NDCG@{record['k']}: **{markdown_literal(best['name'])}** ({best['ndcg']:.3f}).")
    return rows, rank_heatmap(record, labels), gr.update(choices=captions, value=captions[0]), info


def makeup_record(ex: Explorer, encoder, caption: str, k: int) -> dict:
    """{"top": the top k's paths, "folders": their folder counts, "shapes": `shapes_makeup` where the
    gallery's CIR-Shapes scenes are known}."""
    gallery = gallery_of(ex)
    top = [gallery.paths[i] for i in top_rows(encoder([caption]) @ gallery.embeddings.T, k)[0]]
    record = {"top": top, "folders": folder_makeup(top)}
    if scenes_of(ex):
        record["shapes"] = shapes_makeup(top, scenes_of(ex))
    return record


@shown
def makeup_view(ex: Explorer, image, query_path, caption: str, k):
    """-> (bars: what, value, count; summary): shapes, colours and positions of the top k's
    objects where their CIR-Shapes scenes are known, else their folders."""
    source, caption, encoder, _, _ = query_of(ex, image, query_path, caption)
    k = top_k(k, len(ex.index))
    record = makeup_record(ex, encoder, caption, k)
    shapes = record.get("shapes")
    if shapes:
        counts = [(what, value, n) for what in ("shape", "colour", "position") for value, n in shapes[what].items()]
        info = (f"Objects in the top {k} by their CIR-Shapes scenes ({shapes['images']} images; "
                f"{shapes['unknown']} without a known scene).")
    else:
        counts = [("folder", value, n) for value, n in record["folders"].items()]
        info = f"The top {k} by folder."
    return pd.DataFrame(counts, columns=["what", "value", "count"]), info


def portable(ex: Explorer, value):
    """`value` (JSON-like) with every absolute path named as on the page: relative to the gallery's
    folder inside it, else by its file name, so an export holds no server path."""
    if isinstance(value, dict):
        return {portable(ex, k): portable(ex, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(ex, v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        label = ex.label(value)
        return os.path.basename(value) if os.path.isabs(label) else label
    return value


@shown
def export_research(ex: Explorer, exports: str, image, query_path, caption: str, k, ideal: list[str]):
    """Write the views of the query as research.json into a fresh folder under `exports`: the phrase
    influence, the make-up, the variants (when results are marked ideal) and the query's point on the
    map -> (the file for download, message)."""
    source, caption, encoder, phrases, targets = query_of(ex, image, query_path, caption)
    k = top_k(k, len(ex.index))
    projection = map_of(ex)
    record = {"model": ex.name, "checkpoint": ex.checkpoint, "query": source, "modification": caption, "k": k,
              "targets": targets,
              "influence": phrase_influence(encoder, caption, phrases, gallery_of(ex), targets, InfluenceConfig(k))
              if phrases else None,
              "variants": variants_record(ex, encoder, caption, phrases, k, ideal) if ideal else None,
              "makeup": makeup_record(ex, encoder, caption, k),
              "map": {"method": projection.method, "file": projection.file,
                      "query": projection.transform(encoder([caption]))[0].tolist()}}
    path = os.path.join(tempfile.mkdtemp(prefix="research-", dir=exports), "research.json")
    write_json(path, {k: v if k == "modification" else portable(ex, v) for k, v in record.items()})
    return gr.update(value=path, visible=True), "Exported the phrase influence, variants, make-up and map point."


def build_research_tab(models: Models, q: SimpleNamespace, exports: str) -> None:
    """The Research tab's components, inside the page's current gr.Tab, and their events; `q`: the
    Retrieve tab's components (image, query_path, caption, k, model_choice, hits, the Why panel's
    maps); exports go into fresh folders under `exports`."""
    query = [q.image, q.query_path, q.caption, q.k, q.model_choice]
    private = {"api_visibility": "private"}
    gr.Markdown("For the query of the Retrieve tab: each view re-encodes and ranks (nothing is approximated).")
    with gr.Accordion("Embedding map", open=True):
        map_btn = gr.Button("Draw the map", elem_id="map-draw")
        map_info = gr.Markdown(elem_id="map-info")
        points = gr.ScatterPlot(x="x", y="y", color="kind", color_map=COLOURS, tooltip=["image", "rank", "kind"],
                                height=420, label="Gallery map", elem_id="map-plot")
        with gr.Row():
            picked = gr.Image(label="Opened from the map", type="filepath", height=160, interactive=False,
                              scale=1, elem_id="map-picked")
            picked_info = gr.Markdown(elem_id="map-picked-info")
        picks = gr.State([])
    with gr.Accordion("What each phrase does", open=True):
        influence_btn = gr.Button("Mask each phrase", elem_id="influence-run")
        influence_info = gr.Markdown(elem_id="influence-info")
        with gr.Row(elem_id="influence-row"):
            bars = gr.BarPlot(x="phrase", y="rank change", height=280, label="Rank change when the phrase is masked",
                              min_width=280, elem_id="influence-plot")
            table = gr.Dataframe(headers=["phrase", "rank", "Δ rank", "score", "Δ score", "overlap", "Δ overlap"],
                                 type="array", interactive=False, elem_id="influence-table")
    with gr.Accordion("Prompt variants and Rank-Δ", open=True):
        ideal = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                            label="Results marked ideal (retrieve first, then pick)", elem_id="ideal")
        variants_btn = gr.Button("Score the variants", elem_id="variants-run")
        variants_info = gr.Markdown(elem_id="variants-info")
        variants_table = gr.Dataframe(headers=["variant", "caption", "NDCG@k", "MRR", "ideal ranks"], type="array",
                                      interactive=False, wrap=True, elem_id="variants-table")
        heatmap = gr.Plot(label="Rank-Δ", elem_id="variants-heatmap")
        with gr.Row():
            variant = gr.Dropdown([], label="Variant", scale=3, elem_id="variant-choice")
            apply = gr.Button("Use as the modification", scale=1, elem_id="variant-apply")
    with gr.Accordion("Make-up of the results", open=True):
        makeup_btn = gr.Button("Count the top k", elem_id="makeup-run")
        makeup_info = gr.Markdown(elem_id="makeup-info")
        makeup = gr.BarPlot(x="value", y="count", color="what", height=300, label="Top k's make-up",
                            elem_id="makeup-plot")
    with gr.Row():
        export_btn = gr.Button("Export the views (JSON)", elem_id="research-export")
        export_info = gr.Markdown(elem_id="research-export-info")
    export_file = gr.File(label="Research views", interactive=False, visible=False, elem_id="research-file")

    def on_map(image, query_path, caption, k, model):  # parameter names: the API's names of the inputs
        return embedding_map(models[model], image, query_path, caption, k)

    def on_influence(image, query_path, caption, k, model):
        return influence_view(models[model], image, query_path, caption, k)

    def on_variants(image, query_path, caption, k, model, ideal):
        return variants_view(models[model], image, query_path, caption, k, ideal)

    def on_makeup(image, query_path, caption, k, model):
        return makeup_view(models[model], image, query_path, caption, k)

    def on_export(image, query_path, caption, k, model, ideal):
        return export_research(models[model], exports, image, query_path, caption, k, ideal)

    def on_pick(model, rows, evt: gr.SelectData):
        return picked_point(models[model], rows, evt.index)

    map_btn.click(on_map, query, [points, map_info, picks], api_name="embedding_map")
    points.select(on_pick, [q.model_choice, picks], [picked, picked_info, q.maps_image], **private).success(
        q.redraw_maps, q.maps_inputs, q.maps_outputs, **private)
    influence_btn.click(on_influence, query, [bars, table, influence_info], api_name="phrase_influence")
    variants_btn.click(on_variants, query + [ideal], [variants_table, heatmap, variant, variants_info],
                       api_name="prompt_variants")
    makeup_btn.click(on_makeup, query, [makeup, makeup_info], api_name="results_makeup")
    export_btn.click(on_export, query + [ideal], [export_file, export_info], **private)
    q.hits.change(lambda model, hits: ideal_choices(models[model], hits), [q.model_choice, q.hits], ideal, **private)
    apply.click(lambda text: text, variant, q.caption, **private)
