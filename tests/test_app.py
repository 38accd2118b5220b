"""The explorer app on a tiny random model and a demo built by scripts/build_demo_assets.py:
retrieval equals cir.evaluate's ranking (callbacks and the served /retrieve endpoint), for a second
model (tiny TMCIR) chosen in the selector too, heatmaps and CC terms, the compare view of two
models, noun-phrase editing, the review log (crash recovery, resume, export), flags and errors."""
import base64
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from cir.checkpoint import DEFAULT_CHECKPOINT, DEFAULT_TMCIR, DEFAULT_TWIN, save_checkpoint
from cir.data.images import load_rgb
from cir.data.triplets import Triplet, read_gallery, read_triplets, write_triplets
from cir.errors import UserError
from cir.retrieval.evaluate import embed_gallery, embed_queries, rank
from cir.losses import concept_consistency_loss, reduce_maps
from cir.models.factory import build_model
from cir.synth.report import changed_objects
from cir.ui import components, limits, retrieve_tab, review, review_file, review_tab, server, why_panel
from cir.ui.access import FileAccess
from cir.ui.card import looks_like_shapes, model_card
from cir.ui.explorer import Explorer, model_name, phrase_spans
from cir.ui.heatmaps import (BOX_COLOUR, GAP, HEIGHT, TOP, VIEW, compare_row, model_view, outline, overlay, phrase_row,
                             select, shared_norm, upsample, view_box)
from cir.ui.models import Models, default_checkpoints, model_names

ROOT = Path(__file__).resolve().parent.parent


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(demo folder, checkpoint): a tiny random model with its weight matrices scaled up, so that
    scores have no near-ties and attention maps are not uniform, and a 6-query demo built with it."""
    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    model, _ = build_model("context-cir-tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3)
    ckpt = root / "sharp.safetensors"
    save_checkpoint(ckpt, model, {"config": model.config.to_dict(), "step": 0})
    load_module(ROOT / "scripts" / "build_demo_assets.py").build(root / "demo", ckpt, queries=6, seed=7, progress=False)
    return root / "demo", ckpt


@pytest.fixture(scope="module")
def ex(demo):
    folder, ckpt = demo
    return Explorer.load(ckpt, folder / "index", examples=folder / "examples.jsonl", device="cpu")


@pytest.fixture(scope="module")
def models(ex, tiny_tmcir_checkpoint):
    """The demo's model and a tiny TMCIR model over the same gallery, as `python app.py --checkpoint
    DEMO_CKPT --index DEMO_INDEX --checkpoint TMCIR` serves them."""
    return Models(ex, {"TMCIR": tiny_tmcir_checkpoint})


def evaluation_ranking(ex: Explorer, triplets: list[Triplet], k: int) -> list[list[str]]:
    gallery = embed_gallery(ex.model, ex.index.paths, ex.preprocess, "cpu")
    return rank(embed_queries(ex.model, triplets, ex.preprocess, "cpu"), gallery, ex.index.paths, triplets, True, k)


# ---------------------------------------------------------------------------- demo assets
def test_demo_assets_are_small_relocatable_and_consistent(demo, tmp_path):
    folder, ckpt = demo
    triplets, problems = read_triplets(folder / "examples.jsonl")
    assert len(triplets) == 6 and not problems
    line = json.loads((folder / "examples.jsonl").read_text().splitlines()[0])
    assert not os.path.isabs(line["reference"])  # paths relative to the demo folder
    gallery = read_gallery(folder / "gallery.txt")
    assert all(t.reference in gallery and set(t.targets) <= set(gallery) for t in triplets)
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 2_000_000
    assert not list(folder.parent.glob("demo.staging*"))
    # the index stores paths relative to itself: a moved copy still finds its images
    moved = tmp_path / "elsewhere" / "demo"
    shutil.copytree(folder, moved)
    copy = Explorer.load(ckpt, moved / "index", examples=moved / "examples.jsonl", device="cpu")
    assert all(p.startswith(str(moved)) for p in copy.index.paths)
    assert set(copy.index.paths) == set(read_gallery(moved / "gallery.txt"))
    assert all(os.path.isfile(p) for p in copy.index.paths)


def test_build_demo_assets_user_errors(tmp_path):
    script = load_module(ROOT / "scripts" / "build_demo_assets.py")
    with pytest.raises(UserError, match="checkpoint not found"):
        script.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "demo")])


# ---------------------------------------------------------------------------- retrieval
def test_retrieve_equals_evaluation_ranking(ex, demo):
    k = 10
    expected = evaluation_ranking(ex, ex.examples, k)
    for t, want in zip(ex.examples, expected):
        hits = ex.retrieve(t.reference, t.caption, k, t.targets)
        assert [h.path for h in hits] == want
        assert [h.rank for h in hits] == list(range(1, k + 1))
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert [h.is_target for h in hits] == [p in t.targets for p in want]
    # --gallery without --index: an in-memory index ranks the same
    folder, ckpt = demo
    in_memory = Explorer.load(ckpt, gallery=folder / "gallery.txt", device="cpu")
    t = ex.examples[0]
    assert [h.path for h in in_memory.retrieve(t.reference, t.caption, k)] == expected[0]


def test_target_rank_and_retrieve_callback(ex):
    full = evaluation_ranking(ex, ex.examples, len(ex.index))
    for t, ranking in zip(ex.examples, full):
        assert ex.target_rank(t.reference, t.caption, t.targets) == (ranking.index(t.targets[0]) + 1, len(ex.index))
    # over an explicit gallery (the review tab's "file images")
    t = ex.examples[0]
    assert ex.target_rank(t.reference, t.caption, t.targets, [t.reference]) is None
    assert ex.target_rank(t.reference, t.caption, t.targets, [t.reference, *t.targets])[1] == 2
    # the page callback: uploaded image (no query path) with an example's ground truth
    gallery, table, status, paths, maps_image = retrieve_tab.run_retrieve(ex, t.reference, None, t.caption, 5)
    assert paths == full[0][:5] and [row[2] for row in table] == [ex.label(p) for p in paths]
    assert len(gallery) == 5 and maps_image == t.reference
    assert f"rank **{full[0].index(t.targets[0]) + 1}**" in status
    with pytest.raises(Exception, match="choose a query image"):
        retrieve_tab.run_retrieve(ex, None, None, "x", 5)
    # the served event (postprocess=False) sends the values Gradio's postprocessing would make
    headers = ["rank", "score", "image", "target"]
    results, values = retrieve_tab.retrieve_values(ex, gr.Dataframe(headers=headers, type="array"), gr.Markdown(),
                                                   t.reference, None, t.caption, 5)[:2]
    expected = gr.Gallery().postprocess(gallery).model_dump()
    for item in expected:  # small thumbnails travel inline: a data: URL of the file, no file marker
        del item["image"]["meta"]
        item["image"]["url"] = "data:image/png;base64," + base64.b64encode(Path(item["image"]["path"]).read_bytes()).decode()
    assert results == expected
    assert values == gr.Dataframe(headers=headers, type="array").postprocess(table).model_dump()


def test_browse_pages_and_filter(ex):
    paths, page, pages, total = ex.browse("", 0, per_page=4)
    assert paths == ex.index.paths[:4] and total == len(ex.index) and pages == -(-total // 4)
    assert ex.browse("", 99, per_page=4)[1] == pages - 1  # clamped
    tgt = ex.browse("TGT", 0, per_page=100)[0]
    assert tgt and all("-tgt" in os.path.basename(p) for p in tgt)
    assert ex.browse("no such file", 0)[3] == 0
    query_path, _, info = retrieve_tab.pick_browsed(ex, "tgt", 0, 1)
    assert query_path == tgt[1] and info.endswith("(no ground truth).")
    query_path, _, caption, info, rows, owner = retrieve_tab.pick_example(ex, 2)
    assert rows == [[p["text"], p["start"], p["end"]] for p in ex.examples[2].noun_phrases] and owner == caption
    assert (query_path, caption) == (ex.examples[2].reference, ex.examples[2].caption)
    assert f"{len(ex.examples[2].targets)} ground-truth target(s), marked ★" in info



def test_ground_truth_only_while_the_query_is_the_examples(ex):
    """An example's ground truth (★ and its rank) holds for its reference with its own caption: once the
    caption is edited, the note, the status and the results carry none; typed back, it returns."""
    t, n = ex.examples[0], len(ex.index)
    gallery, table, status, paths, _ = retrieve_tab.run_retrieve(ex, None, t.reference, t.caption, n)
    rank = paths.index(t.targets[0]) + 1
    assert f"Ground truth: rank **{rank}** of {n}." in status and gallery[rank - 1][1].endswith("★ target")
    edited = t.caption + " and make it bigger"
    gallery, table, status, paths, _ = retrieve_tab.run_retrieve(ex, None, t.reference, edited, n)
    assert "Ground truth" not in status and len(paths) == n
    assert not any("★" in label for _, label in gallery) and {row[3] for row in table} == {""}
    note = retrieve_tab.caption_edited(ex, t.reference, edited)
    assert f"reference of example **{components.markdown_literal(t.id)}**, with another modification, so no " \
           "ground truth" in note and "★" not in note
    assert retrieve_tab.caption_edited(ex, t.reference, t.caption) == retrieve_tab.pick_example(ex, 0)[3]
    assert retrieve_tab.caption_edited(ex, None, edited) == gr.skip()  # an upload's note stays
    assert retrieve_tab.pick_browsed(ex, "", 0, 0, edited)[2] == retrieve_tab.query_note(ex, ex.browse("", 0)[0][0],
                                                                                          edited)

# ---------------------------------------------------------------------------- attention
def test_cc_terms_equal_the_loss_on_the_same_maps(ex):
    t = ex.examples[0]
    phrases = ex.noun_phrases(t.caption)
    assert phrases and all(t.caption[p["start"]:p["end"]] == p["text"] for p in phrases)
    raw = ex.model.phrase_attention(ex.preprocess(load_rgb(t.reference)), t.caption,
                                    [(p["start"], p["end"]) for p in phrases])
    ctx = torch.stack([m.in_context for m in raw])  # [N, L, H, g, g]
    iso = torch.stack([m.isolated for m in raw])
    g = ex.model.grid
    for eps in (0.0, 0.005):
        results = ex.phrase_maps(t.reference, t.caption, phrases, eps=eps)
        assert all(r.in_context.shape == r.isolated.shape == (g, g) for r in results)
        c, i = reduce_maps(ctx.flatten(-2)), reduce_maps(iso.flatten(-2))
        for n, r in enumerate(results):
            np.testing.assert_allclose(r.in_context.ravel(), c[n].numpy(), rtol=1e-6)
            assert r.cc == pytest.approx(float(concept_consistency_loss(c[n:n + 1], i[n:n + 1], eps)), rel=1e-6)
        assert np.mean([r.cc for r in results]) == pytest.approx(float(concept_consistency_loss(c, i, eps)), rel=1e-5)
    assert max(r.cc for r in ex.phrase_maps(t.reference, t.caption, phrases)) > 0
    # one layer and head
    layer, head = ex.layers - 1, ex.heads - 1
    r = ex.phrase_maps(t.reference, t.caption, phrases[:1], layer=layer, head=head, eps=0.0)[0]
    np.testing.assert_allclose(r.in_context, ctx[0, layer, head].numpy())
    assert r.cc == pytest.approx(float((ctx[0, layer, head] - iso[0, layer, head]).abs().sum()), rel=1e-5)


def test_heatmaps_shapes_shared_scale_and_speed(ex):
    t = ex.examples[0]
    view = model_view(load_rgb(t.reference))
    rng = np.random.default_rng(0)
    ctx, iso = rng.random((9, 9)) * 0.2, rng.random((9, 9)) * 0.5
    row = phrase_row(view, ctx, iso, "“a phrase”")
    assert row.image.dtype == np.uint8 and row.image.ndim == 3 and row.image.shape[2] == 3
    assert (row.norm.vmin, row.norm.vmax) == (0.0, pytest.approx(max(ctx.max(), iso.max())))
    assert row.diff_norm.vmin == -row.diff_norm.vmax == pytest.approx(-np.abs(ctx - iso).max())
    maps = torch.rand(3, 2, 4, 9, 9)
    torch.testing.assert_close(select(maps).flatten(-2), reduce_maps(maps.flatten(-2)))
    # ten phrases through the page callback: one row each, stacked, within 3 s
    caption = ("move the red circle from the top left to the bottom right, make the blue square in the center large, "
               "add a green star at the bottom, recolor the yellow triangle on the left purple, remove the orange "
               "diamond on the right and change the background to pink")
    phrases = ex.noun_phrases(caption)[:10]
    assert len(phrases) == 10
    why_panel.render_maps(ex, t.reference, caption, phrases[:1])  # warm-up
    t0 = time.perf_counter()
    image, table = why_panel.render_maps(ex, t.reference, caption, phrases)
    assert time.perf_counter() - t0 < 3.0
    assert len(table) == 10 and image.shape == (10 * row.image.shape[0], *row.image.shape[1:])


def test_phrase_editing(ex):
    caption = "make the red circle blue and the red circle small"
    assert phrase_spans(caption, [["the red circle", 25, 39], ["", None, None], ["blue", None, None]]) == [
        {"text": "the red circle", "start": 5, "end": 19}, {"text": "blue", "start": 20, "end": 24}]  # stale span
    assert phrase_spans(caption, [["the red circle", 29, 43]])[0]["start"] == 29  # the second occurrence, kept
    with pytest.raises(UserError, match="does not occur"):
        phrase_spans(caption, [["a green star", None, None]])
    rows, cleared = why_panel.add_phrase(caption, [["blue", 20, 24]], "small")
    assert rows == [["blue", 20, 24], ["small", 44, 49]] and cleared == ""
    # the attention callback re-extracts phrases for a new caption (spaCy's: no example has it), keeps edited ones
    t = ex.examples[0]
    caption = t.caption + " please"
    rows, owner, image, table, info = why_panel.attention(ex, t.reference, caption, [], None, "mean", "mean", 0.005)
    assert owner == caption and [r[0] for r in rows] == [p["text"] for p in ex.noun_phrases(caption)]
    assert "(spaCy)" in info
    kept = why_panel.attention(ex, t.reference, caption, rows[:1], owner, "0", "1", 0.0)
    assert kept[0] == rows[:1] and len(kept[3]) == 1 and kept[2] is not None and "(edited)" in kept[4]
    assert "(spaCy)" in why_panel.attention(ex, t.reference, caption, rows, owner, "mean", "mean", 0.005)[4]


# ---------------------------------------------------------------------------- review
def test_review_store_saves_resumes_and_takes_in_a_log(demo, tmp_path):
    triplets = read_triplets(demo[0] / "examples.jsonl")[0]
    store = review.store_path(tmp_path / "x.jsonl")
    assert store == tmp_path / "x.review.sqlite" and review.log_path(tmp_path / "x.jsonl") == tmp_path / "x.review.jsonl"
    assert review.open_store(store, tmp_path / "x.review.jsonl") == {} and not store.exists()  # nothing to keep yet
    review.append_decision(store, review.decision(triplets[0].id, "accept"))
    review.append_decision(store, review.decision(triplets[1].id, "reject", note="blurry"))
    review.append_decision(store, review.decision(triplets[0].id, "edit", caption="a new caption"))
    d = review.read_decisions(store)
    assert d[triplets[0].id] | {"time": None} == {"id": triplets[0].id, "decision": "edit", "note": "",
                                                  "caption": "a new caption", "time": None}
    assert d[triplets[1].id]["note"] == "blurry" and review.first_undecided(triplets, d) == 2
    assert [r["decision"] for r in review.read_records(store)] == ["accept", "reject", "edit"]
    # the JSONL export holds every decision in order, and a new store takes such a log in, once
    log = tmp_path / "y.review.jsonl"
    assert review.export_log(store, log) == 3 and review.read_log(log) == review.read_records(store)
    log.write_bytes(log.read_bytes() + b'{"id": "' + triplets[2].id.encode() + b'", "decis')  # cut by a crash
    taken = tmp_path / "y.review.sqlite"
    assert review.open_store(taken, log) == d and review.open_store(taken, log) == d
    assert review.read_records(taken) == review.read_records(store)
    # a broken line in the middle is reported with its line number, never dropped silently
    log.write_bytes(b"not json\n" + log.read_bytes())
    with pytest.raises(UserError, match=r"y\.review\.jsonl:1:"):
        review.open_store(tmp_path / "z.review.sqlite", log)
    # a file that is no store is refused in one line, and left as it was
    damaged = tmp_path / "d.review.sqlite"
    damaged.write_bytes(b"not a database" * 100)
    with pytest.raises(UserError, match="d.review.sqlite: not a review store"):
        review.read_decisions(damaged)
    assert damaged.read_bytes() == b"not a database" * 100
    assert review.first_undecided(triplets, {t.id: {} for t in triplets}) == len(triplets)


def test_review_shows_a_missing_image_as_the_tile_and_ranks_without_it(ex, demo, tmp_path):
    """An image deleted after the triplet file was written: the "image missing" tile, named in the
    status; no maps for a missing reference; ranking among the file's images skips missing ones."""
    from dataclasses import replace

    from cir.ui.thumbnails import thumbnail
    triplets = read_triplets(demo[0] / "examples.jsonl")[0][:3]
    gone, kept = tmp_path / "gone.png", tmp_path / "kept.png"
    shutil.copyfile(triplets[0].reference, gone)
    shutil.copyfile(triplets[1].targets[0], kept)
    src = tmp_path / "batch.jsonl"
    write_triplets(src, [replace(triplets[0], reference=str(gone)),
                         replace(triplets[1], targets=[str(kept), str(tmp_path / "gone-target.png")]), triplets[2]])
    gone.unlink()
    access = FileAccess([tmp_path], ex.index.paths)
    state = review_file.review_open(access, str(src))
    reference, targets, _, _, _, status = review_tab.review_show(ex, access, state)
    assert reference == thumbnail.missing() and r"1 image(s) missing: gone\.png" in status
    assert all(im != thumbnail.missing() for im, _ in targets)
    maps, ranked = review_tab.review_details(ex, access, state, review_tab.RANK_OVER[0])
    assert maps is None and r"the reference image is missing (gone\.png)" in ranked
    state = review_tab.review_move(state, 1)
    reference, targets, _, _, _, status = review_tab.review_show(ex, access, state)
    assert [im == thumbnail.missing() for im, _ in targets] == [False, True] and r"missing: gone\-target\.png" in status
    files = {p for t in read_triplets(src, check_images=False)[0] for p in (t.reference, *t.targets) if os.path.isfile(p)}
    maps, ranked = review_tab.review_details(ex, access, state, review_tab.RANK_OVER[0])
    assert maps is not None and f"of {len(files)} (file images)" in ranked


def test_review_export(demo, tmp_path):
    triplets = read_triplets(demo[0] / "examples.jsonl")[0]
    assert triplets[1].noun_phrases and triplets[1].meta.get("grounding")
    decisions = {triplets[0].id: review.decision(triplets[0].id, "accept"),
                 triplets[1].id: review.decision(triplets[1].id, "edit", caption="make it all blue"),
                 triplets[2].id: review.decision(triplets[2].id, "reject")}
    out = review.export_path(demo[0] / "examples.jsonl")
    assert out.name == "examples.accepted.jsonl"
    out = tmp_path / "sub" / out.name
    assert review.export_accepted(triplets, decisions, out) == 2
    back = read_triplets(out)[0]
    assert [t.id for t in back] == [triplets[0].id, triplets[1].id]
    assert back[0] == triplets[0]
    edited = back[1]
    assert edited.caption == "make it all blue" and edited.noun_phrases is None and "grounding" not in edited.meta
    assert edited.meta["original_caption"] == triplets[1].caption
    assert (edited.reference, edited.targets) == (triplets[1].reference, triplets[1].targets)


def test_review_callbacks(ex, demo, tmp_path):
    src = tmp_path / "batch.jsonl"
    write_triplets(src, read_triplets(demo[0] / "examples.jsonl")[0][:3])
    triplets = read_triplets(src)[0]
    access = FileAccess([tmp_path], ex.index.paths)
    state = review_file.review_open(access, str(src))
    assert (state["path"], state["pos"]) == (os.path.realpath(src), 0)
    reference, targets, pieces, caption, note, status = review_tab.review_show(ex, access, state)
    assert caption == triplets[0].caption and "".join(text for text, _ in pieces) == caption
    assert any(label == "noun phrase" for _, label in pieces) and "Item **1** of 3" in status
    assert [label for _, label in targets] == [os.path.basename(p) for p in triplets[0].targets]  # short names
    image, ranked = review_tab.review_details(ex, access, state, review_tab.RANK_OVER[0])
    assert image is not None and "of 6 (file images)" in ranked
    assert "gallery index" in review_tab.review_details(ex, access, state, review_tab.RANK_OVER[1])[1]
    state = review_tab.review_decide(state, caption, "", kind="accept")
    state = review_tab.review_decide(state, "  a better caption ", "typo", kind="accept")  # changed caption: an edit
    log = review.read_decisions(review.store_path(src))
    assert log[triplets[0].id]["decision"] == "accept"
    assert log[triplets[1].id] | {"time": None} == {"id": triplets[1].id, "decision": "edit", "note": "typo",
                                                    "caption": "a better caption", "time": None}
    assert review_file.review_open(access, str(src))["pos"] == 2  # reopening resumes at the first undecided item
    assert review_tab.review_move(state, -5)["pos"] == 0 and review_tab.review_move(state, 9)["pos"] == 3
    # filters: only the items of one kind; undo takes the latest decision back and goes to its item
    undecided = review_tab.review_filter(state, "undecided")
    assert undecided["pos"] == 2 and review_tab.review_move(undecided, 1)["pos"] == 3 \
        and review_tab.review_move(undecided, -1)["pos"] == 2
    accepted = review_tab.review_filter(state, "accepted")
    assert accepted["pos"] == 0 and review_tab.review_move(accepted, 1)["pos"] == 1 \
        and review_tab.review_move(accepted, 2)["pos"] == 3
    assert "2 of 3 decided (1 undecided, 2 accepted, 0 rejected, " in review_tab.review_show(ex, access, state)[5]
    assert "No more rejected items" in review_tab.review_show(ex, access,
                                                              review_tab.review_filter(state, "rejected"))[5]
    undone = review_tab.review_undo(state)
    assert undone["pos"] == 1 and triplets[1].id not in review.read_decisions(review.store_path(src))
    assert review_tab.review_undo(undone)["pos"] == 0 and review.read_decisions(review.store_path(src)) == {}
    with pytest.raises(Exception, match="nothing to undo"):
        review_tab.review_undo(undone)
    state = review_tab.review_decide(
        review_tab.review_decide(undone | {"pos": 0}, triplets[0].caption, "", kind="accept"),
        "  a better caption ", "typo", kind="accept")
    update, message = review_tab.review_export(str(tmp_path), state)
    accepted_file, log_file = update["value"]
    assert [t.caption for t in read_triplets(review.export_path(src))[0]] == [triplets[0].caption, "a better caption"]
    assert Path(accepted_file).read_text() == review.export_path(src).read_text()
    assert Path(log_file).read_bytes() == review.log_path(src).read_bytes() and "your 6 decision(s)" in message
    assert [(r["id"], r["decision"]) for r in review.read_log(log_file)] == [
        (triplets[0].id, "accept"), (triplets[1].id, "edit"), (triplets[1].id, "undo"), (triplets[0].id, "undo"),
        (triplets[0].id, "accept"), (triplets[1].id, "edit")]
    with pytest.raises(Exception, match="not found"):
        review_file.review_open(access, str(tmp_path / "missing.jsonl"))


def test_two_annotators_on_one_file_at_once(ex, demo, tmp_path):
    """Two annotators decide every item of one file at the same time: both sets of decisions are kept
    under their names, each sees only their own, and the agreement is reported."""
    import threading

    src = tmp_path / "shared.jsonl"
    triplets = read_triplets(demo[0] / "examples.jsonl")[0][:6]
    write_triplets(src, triplets)
    access = FileAccess([tmp_path], ex.index.paths)
    plans = {"ada": ["accept"] * 6, "bob": ["accept", "reject", "accept", "accept", "reject", "accept"]}

    def annotate(name: str):
        state = review_tab.review_annotator(review_file.review_open(access, str(src)), name)
        for kind in plans[name]:
            state = review_tab.review_decide(state, triplets[state["pos"]].caption, f"by {name}", kind=kind)

    workers = [threading.Thread(target=annotate, args=(name,)) for name in plans]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    log = review.store_path(src)
    for name, kinds in plans.items():
        mine = review.read_decisions(log, name)
        assert [mine[t.id]["decision"] for t in triplets] == kinds and all(r["annotator"] == name for r in mine.values())
    assert review.agreement(log) == (2, 6, pytest.approx(4 / 6))
    state = review_tab.review_annotator(review_file.review_open(access, str(src)), "bob")
    status = review_tab.review_show(ex, access, review_tab.review_move(state, -6))[5]
    assert "by **bob**" in status and "2 annotators, agreement 67% on 6 item(s)" in status
    assert "(0 undecided, 4 accepted, 2 rejected" in status
    carol = review_tab.review_annotator(state, "carol")  # a third annotator starts from the beginning
    assert carol["pos"] == 0 and "(6 undecided" in review_tab.review_show(ex, access, carol)[5]
    with pytest.raises(gr.Error, match="at most"):
        review_tab.review_annotator(state, "x" * 200)
    # undo takes back only the annotator's own latest decision
    review_tab.review_undo(state)
    assert triplets[5].id not in review.read_decisions(log, "bob") and triplets[5].id in review.read_decisions(log, "ada")
    # bob's export: his accepted triplets and only his decisions to download; everyone's beside the file
    update, message = review_tab.review_export(str(tmp_path), state)
    accepted_file, log_file = update["value"]
    assert {r.get("annotator") for r in review.read_log(log_file)} == {"bob"} and len(review.read_log(log_file)) == 7
    assert {r.get("annotator") for r in review.read_log(review.log_path(src))} == {"ada", "bob"}
    assert "your 7 decision(s)" in message and len(Path(accepted_file).read_text().splitlines()) == 3


def test_an_annotators_name_belongs_to_the_browser_that_first_decides_under_it(ex, demo, tmp_path):
    """A name is bound to the browser key of its first decision: another browser can neither take the
    name, nor decide or undo under it; the same browser, after reopening, can. The unnamed one too."""
    src = tmp_path / "batch.jsonl"
    triplets = read_triplets(demo[0] / "examples.jsonl")[0][:3]
    write_triplets(src, triplets)
    store, access = review.store_path(src), FileAccess([tmp_path], ex.index.paths)
    mine, theirs = review_tab.browser_key(None), review_tab.browser_key("not a key")
    assert len(mine) == 22 and mine != theirs and review_tab.browser_key(mine) == mine
    alice = review_tab.review_annotator(review_file.review_open(access, str(src)), "alice", mine)
    review_tab.review_decide(alice, triplets[0].caption, "", kind="accept")
    opened = review_file.review_open(access, str(src))
    with pytest.raises(gr.Error, match="the name 'alice' is another browser's"):
        review_tab.review_annotator(opened, "alice", theirs)
    forged = review_tab.review_annotator(opened, "mallory", theirs) | {"annotator": "alice", "pos": 0}
    for call in (lambda: review_tab.review_undo(forged),
                 lambda: review_tab.review_decide(forged, triplets[0].caption, "", kind="reject")):
        with pytest.raises(gr.Error, match="another browser's"):
            call()
    assert {i: d["decision"] for i, d in review.read_decisions(store, "alice").items()} == {triplets[0].id: "accept"}
    again = review_tab.review_annotator(review_file.review_open(access, str(src)), "alice", mine)
    assert review_tab.review_undo(again)["pos"] == 0 and review.read_decisions(store, "alice") == {}
    review_tab.review_decide(review_tab.review_annotator(opened, "", mine), triplets[0].caption, "", kind="accept")
    with pytest.raises(gr.Error, match="decisions without a name are another browser's"):
        review_tab.review_annotator(opened, "", theirs)
    assert review.bound_elsewhere(store, "alice", theirs) and not review.bound_elsewhere(store, "bob", theirs)


def test_review_tab_explains_triplet_files_and_offers_only_what_applies(demo, tmp_path):
    """The Review tab says what a triplet file is and shows its format; the path box and Open are
    there only with review folders; the item's buttons start disabled (a file opened enables them)."""
    folder, ckpt = demo
    ex = Explorer.load(ckpt, gallery=folder / "gallery.txt", device="cpu")
    for dirs in ([], [tmp_path]):
        page = server.build_demo(ex, FileAccess(dirs, ex.index.paths))
        by_id = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
        path = by_id["review-path"]
        assert path.visible is bool(dirs) and {by_id["review-file"], by_id["review-open"]} <= set(
            b for b in page.blocks.values() if b.parent is path or getattr(b.parent, "parent", None) is path)
        assert all(by_id[f"review-{name}"].interactive is False
                   for name in ("prev", "accept", "reject", "next", "undo", "export"))
    assert "**triplet file**: a JSON Lines file" in by_id["review-intro"].value
    fields = [b.value for b in by_id["triplet-format"].children if isinstance(b, gr.Markdown)][0]
    assert all(f"| `{field}` |" in fields for field in ("id", "reference", "caption", "targets")) \
        and "docs/triplets.md" in fields
    assert "no other browser can decide or undo under it" in by_id["review-annotator"].info

def test_review_flags_captions_that_miss_a_change(ex, demo, tmp_path):
    """The check of `python -m cir.synth report` reaches the Review tab: a caption that misses a change
    between reference and target is flagged in the status and found by the "flagged" filter."""
    from dataclasses import replace

    triplets = read_triplets(demo[0] / "examples.jsonl")[0][:4]
    vague = replace(triplets[1], caption="make it nicer", noun_phrases=None,
                    meta={k: v for k, v in triplets[1].meta.items() if k != "grounding"})
    src = tmp_path / "batch.jsonl"
    write_triplets(src, [triplets[0], vague, *triplets[2:]])
    changes = changed_objects(vague)[1]
    assert review_file.missing_changes(vague, vague.caption) == [names[0] for names in changes] and changes
    expected = [i for i, t in enumerate(read_triplets(src)[0]) if review_file.missing_changes(t, t.caption)]
    assert 1 in expected and all(not review_file.missing_changes(t, t.caption)
                                 for i, t in enumerate(triplets) if i not in expected)
    access = FileAccess([tmp_path], ex.index.paths)
    state = review_file.review_open(access, str(src))
    flagged = review_tab.review_filter(state, "flagged")
    assert flagged["pos"] == expected[0]
    status = review_tab.review_show(ex, access, flagged | {"pos": 1})[5]
    assert f"The caption misses {len(changes)} change(s)" in status and changes[0][0] in status
    assert f"{len(expected)} flagged)" in status
    visited = [flagged["pos"]]
    while (flagged := review_tab.review_move(flagged, 1))["pos"] < len(triplets):
        visited.append(flagged["pos"])
    assert visited == expected
    assert review_file.missing_changes(replace(vague, meta={}), "x") is None  # nothing to check against


# ---------------------------------------------------------------------------- the served app
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_retrieve_endpoint(ex, models):
    """/retrieve without a model (the first one's results, as every existing caller calls it) and with one."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    port = free_port()
    demo = server.build_demo(models)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        t = ex.examples[1]
        _, table, status = client.predict(handle_file(t.reference), t.caption, 7, api_name="/retrieve")
        want = evaluation_ranking(ex, [t], 7)[0]
        assert [row[2] for row in table["data"]] == [ex.label(p) for p in want]
        assert "7 results" in status
        for name in models.names:
            _, table, status = client.predict(handle_file(t.reference), t.caption, 7, name, api_name="/retrieve")
            want = evaluation_ranking(models[name], [t], 7)[0]
            assert [row[2] for row in table["data"]] == [ex.label(p) for p in want]
            assert f"7 results of **{components.markdown_literal(name)}**" in status
        assert evaluation_ranking(models["TMCIR"], [t], 7)[0] != evaluation_ranking(ex, [t], 7)[0]
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(handle_file(t.reference), t.caption, 7, "no such model", api_name="/retrieve")
    finally:
        demo.close()


def test_app_flags_and_one_line_errors(tmp_path, capsys):
    app = load_module(ROOT / "app.py")
    with pytest.raises(SystemExit):
        app.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--checkpoint", "--index", "--gallery", "--examples", "--device", "--port", "--share"):
        assert flag in help_text
    assert app.parse_args(["--checkpoint", "a", "--checkpoint", "b"]).checkpoint == ["a", "b"]
    assert app.parse_args([]).checkpoint is None  # the shipped models (cir.ui.models.default_checkpoints)
    with pytest.raises(UserError, match="not both"):
        app.main(["--index", "x", "--gallery", "y"])
    for argv, message in ((["--port", "99999"], "from 1 to 65535, got '99999'"), (["--port", "http"], "got 'http'"),
                          (["--gal", "x"], "unrecognized arguments: --gal")):  # no abbreviations of --gallery
        with pytest.raises(SystemExit) as e:
            app.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    # the address: flags, else the environment (as Spaces set it), else 127.0.0.1:7860
    assert (lambda a: (a.host, a.port))(app.parse_args([])) == ("127.0.0.1", 7860)
    assert (lambda a: (a.host, a.port))(app.parse_args(["--host", "0.0.0.0", "--port", "8080"])) == ("0.0.0.0", 8080)
    os.environ["PORT"] = "9001"
    try:
        assert app.parse_args([]).port == 9001 and app.parse_args(["--port", "9002"]).port == 9002
        os.environ["PORT"] = "99999"
        with pytest.raises(UserError, match="PORT .*from 1 to 65535"):
            app.parse_args([])
    finally:
        del os.environ["PORT"]
    # a taken port is told in terms of the flags, in one line
    import gradio as gr
    with gr.Blocks() as blank:
        gr.Markdown("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match=r"cannot serve on 127\.0\.0\.1:\d+: the port is in use .*--port"):
            app.launch(blank, "127.0.0.1", busy.getsockname()[1], False, {"max_file_size": "1mb"})
    # --help parses before the model code is imported
    probe = ("import runpy, sys; sys.argv = ['app.py', '--help']\ntry: runpy.run_path('app.py', run_name='__main__')\n"
             "except SystemExit: pass\nprint(sorted(m for m in ('torch', 'gradio', 'cir.ui.server') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "--host" in run.stdout and run.stdout.strip().endswith("[]"), run.stdout[-300:]
    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(tmp_path / "none.safetensors"),
                          "--gallery", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "checkpoint not found" in run.stderr


def test_every_argument_parser_refuses_abbreviations():
    """`--step 2` is an error, never `--steps 2`: every parser of the project is built with allow_abbrev=False."""
    sources = [*ROOT.joinpath("cir").rglob("*.py"), ROOT / "app.py", *ROOT.joinpath("bench").glob("*.py"),
               *ROOT.joinpath("scripts").glob("*.py")]
    calls = [(path.relative_to(ROOT), m.group(0)) for path in sources
             for m in re.finditer(r"(?<!class )\b(ArgumentParser|_Parser|add_parser)\((?:[^()]|\([^()]*\))*\)", path.read_text())]
    assert len(calls) >= 12 and [c for c in calls if "allow_abbrev=False" not in c[1]] == []


def test_data_url_images_are_size_limited():
    from gradio.data_classes import FileData

    big = "data:image/png;base64," + "A" * (4 * limits.MAX_FILE_MB * 2 ** 20 // 3 + 8)
    with pytest.raises(UserError, match=f"at most {limits.MAX_FILE_MB} MB"):
        limits.data_url(big)
    limits.data_url(big[:1_000_000])
    limits.data_url("/a/file.png")
    with pytest.raises(gr.Error, match=f"at most {limits.MAX_FILE_MB} MB"):
        components.query_image().preprocess(FileData(path="query.png", url=big))


def test_model_names():
    assert model_name({"args": {"lambda_cc": 0.08}, "config": {}}) == "ConText-CIR λ = 0.08"
    assert model_name({"args": {"lambda_cc": 0}, "config": {"method": "context-cir"}}) == "ConText-CIR λ = 0"
    assert model_name({"args": {"lambda_cc": 0.08}, "config": {"method": "tmcir"}}) == "TMCIR"
    assert model_name({"config": {}}) == "ConText-CIR" and model_name({"args": {"lambda_cc": True}}) == "ConText-CIR"
    cc, tm = {"args": {"lambda_cc": 0.08}}, {"config": {"method": "tmcir"}}
    assert model_names(["a/cc.safetensors", "a/nocc.safetensors", "b/tm.safetensors"], [cc, {}, tm]) == [
        "ConText-CIR λ = 0.08", "ConText-CIR", "TMCIR"]
    assert model_names(["a/cc.safetensors", "b/cc2.safetensors", "t.safetensors"], [cc, cc, tm]) == [
        "ConText-CIR λ = 0.08 (cc)", "ConText-CIR λ = 0.08 (cc2)", "TMCIR"]  # the stem where names repeat
    assert model_names(["a/cc.safetensors", "b/cc.safetensors"], [cc, cc]) == [
        "ConText-CIR λ = 0.08 (a/cc.safetensors)", "ConText-CIR λ = 0.08 (b/cc.safetensors)"]
    with pytest.raises(UserError, match="given twice"):
        model_names(["a/cc.safetensors", "a/cc.safetensors"], [cc, cc])
    # without --checkpoint: the shipped model, then the shipped lambda = 0 and TMCIR models that exist
    assert default_checkpoints() == [DEFAULT_CHECKPOINT] + [p for p in (DEFAULT_TWIN, DEFAULT_TMCIR) if p.is_file()]


def test_model_selector_retrieves_with_each_models_own_embeddings(ex, demo, tiny_tmcir_checkpoint):
    """A second model embeds the gallery once, when first asked for, with its own encode_gallery, and
    the page's results for it are its own encode_query + cosine ranking (cir.evaluate's)."""
    folder, ckpt = demo
    both = Models.load([ckpt, tiny_tmcir_checkpoint], folder / "index", examples=folder / "examples.jsonl",
                       device="cpu")
    assert both.names == ["ConText-CIR", "TMCIR"] and both["ConText-CIR"] is both.primary
    assert set(both._explorers) == {"ConText-CIR"}  # nothing of TMCIR is loaded or embedded at start
    with ThreadPoolExecutor(2) as pool:  # asked for twice at once: built once
        first, second = pool.map(lambda _: both["TMCIR"], range(2))
    tm = first
    assert tm is second is both["TMCIR"] and tm.model.config.method == "tmcir" and tm.name == "TMCIR"
    assert tm.index.paths == both.primary.index.paths and tm.examples == both.primary.examples
    pixels = torch.stack([tm.preprocess(load_rgb(p)) for p in tm.index.paths[:4]])
    with torch.no_grad():
        np.testing.assert_allclose(tm.index.embeddings[:4], tm.model.encode_gallery(pixels).numpy(), atol=1e-5)
    with pytest.raises(UserError, match="no model named 'x'"):
        both["x"]
    # the page: TMCIR selected with results shown retrieves again with it, and its layer / head choices
    t = ex.examples[2]
    want = evaluation_ranking(tm, [t], len(tm.index))[0]
    card, layer, head, compare, gallery, table, status, hits, maps_image = retrieve_tab.change_model(
        both, "TMCIR", "none", "1", "1", None, t.reference, t.caption, 6, ["earlier results"])
    assert hits == want[:6] and maps_image == t.reference and "results of **TMCIR**" in status
    assert f"rank **{min(want.index(p) for p in t.targets) + 1}**" in status
    assert "tmcir-tiny.safetensors" in card and "token merging" in card
    assert (layer["choices"], layer["value"]) == ([("mean over layers", "mean"), ("layer 1", "0")], "mean")
    assert (head["choices"], head["value"]) == ([("mean over heads", "mean"), ("head 1", "0")], "mean")
    assert compare["choices"] == [("none", "none"), ("ConText-CIR", "ConText-CIR")] and compare["value"] == "none"
    # the first model again, compared with TMCIR; without results nothing is retrieved
    *controls, gallery, table, status, hits, maps_image = retrieve_tab.change_model(
        both, "ConText-CIR", "TMCIR", "1", "mean", None, t.reference, t.caption, 6, [])
    assert [c["value"] for c in controls[1:]] == ["1", "mean", "TMCIR"] and "sharp.safetensors" in controls[0]
    assert all(v == gr.skip() for v in (gallery, table, status, hits, maps_image))
    # results that cannot be retrieved again are cleared, never shown under the other model's name
    cleared = retrieve_tab.change_model(both, "TMCIR", "none", "mean", "mean", None, t.reference, " ", 6, want[:6])[4:]
    assert cleared[0] == [] and cleared[3] == [] and "Results cleared" in cleared[2]


def test_compare_view_opacity_and_upsampling(ex, models):
    """The compare view draws each model's own maps (its `phrase_attention`) side by side, on one
    colour scale even where the models' patch grids differ."""
    tm = models["TMCIR"]
    t = ex.examples[0]
    phrases = t.noun_phrases[:2]
    own, other = ex.phrase_maps(t.reference, t.caption, phrases), tm.phrase_maps(t.reference, t.caption, phrases)
    spans = [(p["start"], p["end"]) for p in phrases]
    for e, maps in ((ex, own), (tm, other)):
        with torch.no_grad():
            want = e.model.phrase_attention(e.preprocess(load_rgb(t.reference)), t.caption, spans)
        for r, w in zip(maps, want):
            np.testing.assert_allclose(r.in_context, select(w.in_context).numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(r.isolated, select(w.isolated).numpy(), rtol=1e-5, atol=1e-7)
    single, _ = why_panel.render_maps(ex, t.reference, t.caption, phrases)
    both, table = why_panel.render_maps(ex, t.reference, t.caption, phrases, other=tm)
    assert both.shape[0] == single.shape[0] and both.shape[1] > single.shape[1] and len(table) == 2
    view = model_view(load_rgb(t.reference))
    rows = [compare_row(view, {ex.name: (a.in_context, a.isolated), tm.name: (b.in_context, b.isolated)},
                        f"“{a.text}”   CC term {a.cc:.4f} ({ex.name}) · {b.cc:.4f} ({tm.name})").image
            for a, b in zip(own, other)]
    assert np.array_equal(both, np.concatenate(rows))
    # the page's callback: the model and the one compared with chosen by name
    image = why_panel.attention(ex, t.reference, t.caption, [], None, "mean", "mean", 0.005, other=tm)[2]
    assert image.shape[1] == both.shape[1]
    # every layer and head is one model's grid, and the info says the comparison is off while it is shown
    _, _, grid, _, info = why_panel.attention(ex, t.reference, t.caption, [], None, "mean", "mean", 0.005, other=tm,
                                              grid=True)
    assert np.array_equal(grid, why_panel.render_maps(ex, t.reference, t.caption, ex.caption_phrases(t.caption)[0],
                                                      boxes=ex.boxes(t.reference, t.caption), grid=True)[0])
    assert f"by **{components.markdown_literal(ex.name)}** ·" in info
    assert f"every layer and head is one model's: untick it to compare with **{tm.name}**" in info
    # two models with different patch grids (3 x 3, 7 x 7): each drawn over the whole view, on one scale
    rng = np.random.default_rng(0)
    coarse, fine = (rng.random((3, 3)), rng.random((3, 3))), (rng.random((7, 7)) * 2, rng.random((7, 7)))
    row = compare_row(view, {"A": coarse, "B": fine}, "grids")
    assert row.norm.vmax == pytest.approx(max(fine[0].max(), coarse[0].max(), coarse[1].max(), fine[1].max()))
    background = np.asarray(view, dtype=np.float32)
    for i, heat in enumerate((*coarse, *fine)):
        left = GAP + i * (VIEW + GAP)
        panel = row.image[TOP:TOP + VIEW, left:left + VIEW]
        assert np.abs(panel.astype(int) - overlay(background, heat, row.norm, "inferno").astype(int)).max() <= 1
    # opacity 0 leaves the image as it is; flat patches are blocks, bilinear holds the patch centres' values
    view = np.asarray(model_view(load_rgb(t.reference)), dtype=np.float32)
    heat = np.arange(9.0).reshape(3, 3)
    norm = shared_norm(heat)
    assert (overlay(view, heat, norm, "inferno", alpha=0.0) == view.round()).all()
    flat, smooth = upsample(heat, 6), upsample(heat, 6, smooth=True)
    assert (flat == np.repeat(np.repeat(heat, 2, 0), 2, 1)).all()
    assert smooth[0, 0] == heat[0, 0] and smooth[-1, -1] == heat[-1, -1] and 0 < smooth[0, 1] - smooth[0, 0] < 1
    assert not np.array_equal(flat, smooth)


def test_gold_phrases_boxes_and_shared_difference_scale(ex):
    t = next(x for x in ex.examples if x.noun_phrases and x.meta.get("grounding"))
    # a typed caption that is an example's: its gold phrases, not spaCy's re-parse
    rows, owner, image, table, info = why_panel.attention(ex, t.reference, t.caption, [], None, "mean", "mean", 0.005)
    assert rows == [[p["text"], p["start"], p["end"]] for p in t.noun_phrases] and "(gold)" in info
    boxes = ex.boxes(t.reference, t.caption)
    assert boxes == {(g["start"], g["end"]): g["box"] for g in t.meta["grounding"]}
    assert f"{sum((p['start'], p['end']) in boxes for p in t.noun_phrases)} known box(es) outlined" in info
    assert ex.boxes(t.targets[0], t.caption) == {}  # a box belongs to the reference only
    assert "(spaCy)" in why_panel.attention(ex, t.reference, t.caption + " now", [], None, "mean", "mean", 0.005)[4]
    # the outline: a box in image pixels -> view pixels of the centre crop, drawn inside the panel
    assert view_box([0, 0, 64, 64], (128, 128)) == (0, 0, VIEW // 2, VIEW // 2)
    assert view_box([50, 0, 100, 100], (200, 100)) == (0, 0, VIEW // 2, VIEW - 1)  # 50 px cut on each side
    panel = outline(np.zeros((VIEW, VIEW, 3), np.uint8), (10, 20, 30, 40))
    assert (panel[20, 10:31] == BOX_COLOUR).all() and (panel[30, 10] == BOX_COLOUR).all() and not panel[30, 20].any()
    with_boxes, _ = why_panel.render_maps(ex, t.reference, t.caption, t.noun_phrases, boxes=boxes)
    without, _ = why_panel.render_maps(ex, t.reference, t.caption, t.noun_phrases)
    assert with_boxes.shape == without.shape and not np.array_equal(with_boxes, without)
    # one difference scale: every difference panel on +- the largest difference of all phrases
    maps = ex.phrase_maps(t.reference, t.caption, t.noun_phrases)
    largest = max(float(np.abs(r.in_context - r.isolated).max()) for r in maps)
    view = model_view(load_rgb(t.reference))
    rows_shared = [phrase_row(view, r.in_context, r.isolated, f"“{r.text}”   CC term {r.cc:.4f}",
                              diff_scale=largest) for r in maps]
    assert all(r.diff_norm.vmax == pytest.approx(largest) for r in rows_shared)
    shared, _ = why_panel.render_maps(ex, t.reference, t.caption, t.noun_phrases, shared_scale=True)
    assert np.array_equal(shared, np.concatenate([r.image for r in rows_shared]))
    assert not np.array_equal(shared, without)
    # the per-head grid: one row of H panels per layer, each panel the overlay of that head's in-context map
    grid, table = why_panel.render_maps(ex, t.reference, t.caption, t.noun_phrases[:1], grid=True)
    heads = maps[0].heads
    assert heads.shape[:2] == (ex.layers, ex.heads) and len(table) == 1
    assert grid.shape[0] == ex.layers * HEIGHT
    norm = shared_norm(*heads.reshape(-1, *heads.shape[-2:]))
    background = np.asarray(view, dtype=np.float32)
    for layer, head in ((0, 0), (ex.layers - 1, ex.heads - 1)):
        top, left = layer * HEIGHT + TOP, GAP + head * (VIEW + GAP)
        want = overlay(background, heads[layer, head], norm, "inferno")
        panel = grid[top:top + VIEW, left:left + VIEW]
        assert np.abs(panel.astype(int) - want.astype(int)).max() <= 1


def test_queries_labels_card_and_export(ex, demo, tmp_path):
    t = ex.examples[0]
    with pytest.raises(gr.Error, match="type a modification"):
        retrieve_tab.run_retrieve(ex, t.reference, None, "  ", 5)
    assert retrieve_tab.example_items(ex)[0][1] == t.caption  # whole captions, never cut
    # a gallery image that is an example's reference says so
    page = next(p for p in range(9) if t.reference in ex.browse("", p, retrieve_tab.PER_PAGE)[0])
    info = retrieve_tab.pick_browsed(ex, "", page, ex.browse("", page, retrieve_tab.PER_PAGE)[0].index(t.reference))[2]
    assert f"reference of example **{components.markdown_literal(t.id)}**" in info
    # the model card and the notice for photos
    card = model_card(ex)
    assert "sharp.safetensors" in card and "synthetic scenes" in card and f"{len(ex.index):,} images" in card
    assert looks_like_shapes(load_rgb(t.reference))
    x, y = np.meshgrid(np.linspace(0, 1, 96), np.linspace(0, 1, 96))
    photo = tmp_path / "photo.png"
    Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8)).save(photo)
    assert "unlike the training data" in retrieve_tab.uploaded(str(photo))[1]
    assert "unlike" not in retrieve_tab.uploaded(t.reference)[1]
    assert "unlike the training data" in retrieve_tab.run_retrieve(ex, str(photo), None, "make it red", 3)[2]
    # export: CSV rows and a JSON record of exactly the shown results (retrieved again on the server,
    # never read from the page's table) and CC terms, images named relative to the gallery's folder
    gallery, table, status, paths, _ = retrieve_tab.run_retrieve(ex, None, t.reference, t.caption, 4)
    rows = [[p["text"], p["start"], p["end"]] for p in t.noun_phrases[:2]]
    update, message = retrieve_tab.export_results(ex, str(tmp_path), None, t.reference, t.caption, paths,
                                                  paths[1], rows, t.caption, "0", "mean", 0.0)
    csv_path, json_path = update["value"]
    lines = Path(csv_path).read_text().splitlines()
    assert lines[0] == "rank,score,image,target" and len(lines) == 5
    assert lines[1].split(",") == ["1", str(table[0][1]), ex.label(paths[0]), str(paths[0] in t.targets)]
    record = json.loads(Path(json_path).read_text())
    assert [r["image"] for r in record["results"]] == [os.path.relpath(p, ex.root) for p in paths]
    assert record["modification"] == t.caption
    assert all(ex.root not in Path(f).read_text() for f in (csv_path, json_path))  # no server paths
    assert [r["target"] for r in record["results"]] == [p in t.targets for p in paths]
    assert record["query"] == os.path.relpath(t.reference, ex.root) and record["maps"]["image"] == ex.label(paths[1])
    assert record["checkpoint"] == os.path.basename(ex.checkpoint)
    want = ex.phrase_maps(paths[1], t.caption, t.noun_phrases[:2], layer=0, eps=0.0)
    got = record["maps"]["phrases"]
    assert [(m["phrase"], m["start"], m["end"]) for m in got] == [tuple(r) for r in rows]
    assert [m["cc"] for m in got] == pytest.approx([r.cc for r in want])
    np.testing.assert_allclose(got[1]["in_context"], want[1].in_context, atol=1e-6)
    np.testing.assert_allclose(got[0]["isolated"], want[0].isolated, atol=1e-6)
    with pytest.raises(gr.Error, match="retrieve first"):
        retrieve_tab.export_results(ex, str(tmp_path), None, None, "", [])
    other = next(x.reference for x in ex.examples if x.reference != t.reference)
    with pytest.raises(gr.Error, match="retrieve again"):  # the shown results are another query's
        retrieve_tab.export_results(ex, str(tmp_path), None, other, t.caption, paths)
    cells = ["=HYPERLINK(\"http://x\")", "@SUM(1,1)", "+1", "-1+2", "\tx", "\rx", "a=b", "", -0.5, True]
    assert [retrieve_tab.csv_cell(c) for c in cells] == ["'=HYPERLINK(\"http://x\")", "'@SUM(1,1)", "'+1", "'-1+2",
                                                          "'\tx", "'\rx", "a=b", "", -0.5, True]


def test_gallery_without_examples_shows_an_empty_state(demo):
    folder, ckpt = demo
    bare = Explorer.load(ckpt, gallery=folder / "gallery.txt", device="cpu")
    demo_app = server.build_demo(bare)
    by_id = {b.elem_id: b for b in demo_app.blocks.values() if getattr(b, "elem_id", None)}
    assert not by_id["examples"].visible and by_id["no-examples"].visible
    assert "--examples" in by_id["no-examples"].value


def test_the_card_and_the_why_header_state_the_models_measured_figures(tiny_checkpoint, shapes_data, tmp_path):
    """`python -m cir.evaluate --json x.eval.json` beside a checkpoint puts its test figures, rounded,
    in the model card and its measured grounding in the Why panel's header; figures of another file
    (a changed checkpoint) are never shown, and without figures the header says the maps are unmeasured."""
    from cir.ui.card import evaluation_path, maps_trust
    ckpt = tmp_path / "measured.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    ex = Explorer.load(ckpt, gallery=shapes_data / "gallery_test.txt", examples=shapes_data / "test.jsonl", device="cpu")
    assert "not measured" in maps_trust(ex) and "Measured" not in model_card(ex)
    subprocess.run([sys.executable, "-m", "cir.evaluate", "--checkpoint", str(ckpt), "--triplets",
                    str(shapes_data / "test.jsonl"), "--gallery", str(shapes_data / "gallery_test.txt"),
                    "--json", str(evaluation_path(ckpt))], check=True, capture_output=True)
    res = json.loads(evaluation_path(ckpt).read_text())
    objects = res["grounding"]["objects"]
    card, trust = model_card(ex), maps_trust(ex)
    assert f"**Measured** on `{shapes_data.name}` (16 queries): R@1 {res['recall']['1']:.1f}, " in card
    assert f"for {objects['pointing']['in_context']:.0f} % of phrases in context " in trust
    assert f"({objects['pointing']['isolated']:.0f} % alone)" in trust and trust in card
    assert f"apart in {objects['distinct']['in_context']:.0f} % of captions" in trust
    assert f"{objects['count']:,} phrases" in trust
    ex.manifest["metrics"] = {"step": 3, "val_recall": {"1": 2 / 3}}
    assert "**Validation** R@1 0.7 (at step 3)." in model_card(ex)  # rounded, never 0.666667
    with open(ckpt, "ab") as f:  # another file now: its figures are stale
        f.write(b" ")
    assert "not measured" in maps_trust(ex) and "Measured" not in model_card(ex)


def test_compare_with_opens_on_the_lambda0_twin(tiny_checkpoint, tiny_tmcir_checkpoint, shapes_data, tmp_path):
    """Of the models offered, the one trained as the primary was (same config, data, steps) but
    with lambda = 0 is its twin, and the Why panel's "Compare with" opens on it; without a twin it
    opens on none."""
    from cir.checkpoint import load_checkpoint
    model, _, manifest = load_checkpoint(tiny_checkpoint)
    run = {"config": manifest["config"], "data": {"train": "t.jsonl", "sha256": "x"}, "step": 5}
    for name, lam in (("cc", 0.08), ("nocc", 0.0), ("other", 0.0)):
        save_checkpoint(tmp_path / f"{name}.safetensors", model,
                        dict(run, args={"lambda_cc": lam}, step=6 if name == "other" else 5))
    names = ["ConText-CIR λ = 0.08", "ConText-CIR λ = 0", "ConText-CIR λ = 0 (other)"]
    primary = Explorer.load(tmp_path / "cc.safetensors", gallery=shapes_data / "gallery_test.txt", device="cpu",
                            name=names[0])
    paired = Models(primary, {names[2]: tmp_path / "other.safetensors", names[1]: tmp_path / "nocc.safetensors",
                              "TMCIR": tiny_tmcir_checkpoint})
    assert paired.twin == names[1]
    compare = lambda demo: next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "compare")
    assert compare(server.build_demo(paired)).value == names[1]
    alone = Models(primary, {"TMCIR": tiny_tmcir_checkpoint})
    assert alone.twin is None and compare(server.build_demo(alone)).value == "none"
