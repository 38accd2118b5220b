"""The explorer's page: `build_demo(models)`, the Gradio Blocks of its tabs, queued.

Tabs: Retrieve (`cir.ui.retrieve_tab`: a model; query from examples, the gallery or an upload;
top-k with scores; per-phrase attention in context vs isolated with the CC term, beside another
model's when compared), Research (`cir.ui.research_tab`: the gallery's embedding map, each phrase's
effect on the ranking, prompt variants, the results' make-up, for the Retrieve tab's query) and Review (`cir.ui.review_tab`: step through a triplet file, accept /
reject / edit, export). The page's CSS and script are `page.css` and `page.js` beside this module.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import gradio as gr
import matplotlib

from cir.data.images import guard_pil
from cir.ui import cleanup, limits
from cir.ui.access import FileAccess
from cir.ui.card import model_card
from cir.ui.explorer import Explorer
from cir.ui.models import Models
from cir.ui.research_tab import build_research_tab
from cir.ui.retrieve_tab import build_retrieve_tab
from cir.ui.review_tab import build_review_tab
from cir.ui.thumbnails import thumbnail

CONCURRENCY = 4  # events of one kind served at once (model forwards still take turns, see Explorer.lock)
RETRIEVE_CONCURRENCY = 16  # retrieve events served at once: their queries share forwards (cir.ui.batching)
STATUS_UPDATE_S = 1.0  # waiting visitors get their queue position this often (Gradio's "auto" messages every
# waiting event each time one starts: quadratic in the queue's length)
PREPARED_THUMBNAILS = 1000  # gallery images whose thumbnails are made at start (the others on first view)
HERE = Path(__file__).parent


def page_js() -> str:
    """The page-load script (page.js) with the page's CSS (page.css) in it as a string literal."""
    css = (HERE / "page.css").read_text(encoding="utf-8")
    return (HERE / "page.js").read_text(encoding="utf-8").replace("PAGE_CSS", json.dumps(css))


def build_demo(models: Models | Explorer, access: FileAccess | None = None) -> gr.Blocks:
    """The explorer app over `models` (or one model's Explorer), queued; the caller launches it.
    The first model's gallery, examples and Review tab are the page's. `access` says which server
    files the Review tab may open (default: none, only uploads, and the gallery's images)."""
    models = models if isinstance(models, Models) else Models(models)
    ex = models.primary
    access = access or FileAccess(gallery_paths=ex.index.paths)
    exports = tempfile.mkdtemp(prefix="cir-exports-")
    guard_pil()  # Gradio decodes uploads itself: PIL refuses what the project's loader refuses
    gr.set_static_paths([thumbnail.folder])  # thumbnails are made once and served as files
    cleanup.start([access.upload_root, exports, thumbnail.folder])
    thumbnail.prepare(ex.index.paths[:PREPARED_THUMBNAILS])
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
            query = build_retrieve_tab(models, exports, card, RETRIEVE_CONCURRENCY)
        with gr.Tab("Research"):
            build_research_tab(models, query, exports)
        with gr.Tab("Review"):
            build_review_tab(ex, access, exports)
        demo.load(None, js=page_js())
    return demo.queue(default_concurrency_limit=CONCURRENCY, status_update_rate=STATUS_UPDATE_S)
