"""cir.explain and cir.projection on known cases, with the shipped model over the demo gallery:
removing the only phrase that names the changed object moves a CIR-Shapes target down and removing
a filler phrase does not; prompt variants rank the ideal image as the influence does; the results'
make-up counts the scenes' objects; the gallery's map is stable, stored with the index's hash, and
puts each query among its top k."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cir.errors import UserError
from cir.explain import (Gallery, InfluenceConfig, QueryEncoder, VariantConfig, folder_makeup, llm_rewrites, masked,
                         ndcg_at_k, operations, phrase_influence, prompt_variants, score_variants, shapes_makeup, shapes_scenes,
                         synonyms, top_rows)
from cir.index import GalleryIndex
from cir import projection
from cir.projection import FILE, ProjectionConfig, fit_pca, projection_of
from cir.ui.explorer import Explorer, as_image


@pytest.fixture(scope="module")
def ex():
    return Explorer.load(device="cpu")  # the shipped model and demo gallery


@pytest.fixture(scope="module")
def gallery(ex):
    return Gallery(np.asarray(ex.index.embeddings, dtype=np.float32), ex.index.paths)


def example(ex, id_):
    return next(t for t in ex.examples if t.id == id_)


def encoder(ex, t):
    return QueryEncoder(ex.model, ex.preprocess(as_image(t.reference)))


def phrase(caption, text):
    start = caption.index(text)
    return {"text": text, "start": start, "end": start + len(text)}


def test_masking_keeps_the_other_phrases_offsets():
    assert masked("make the red circle blue", 5, 19) == "make " + " " * 14 + " blue"


def test_removing_the_phrase_naming_the_added_object_moves_the_target_down(ex, gallery):
    # "... then the top left should get a small blue star": the star is named only by its phrase
    t = example(ex, "test-000000")
    phrases = [phrase(t.caption, "the small orange star"), phrase(t.caption, "a small blue star")]
    out = phrase_influence(encoder(ex, t), t.caption, phrases, gallery, t.targets, InfluenceConfig(k=10))
    assert out["subject"] == "target" and out["subject_path"] == t.targets[0] and out["rank"] == 1
    star = out["phrases"][1]
    assert star["rank"] > 5 and star["rank_change"] == star["rank"] - 1 and star["score_change"] < -0.3
    assert star["overlap"] < 5 and star["overlap_change"] == star["overlap"] - 10
    assert out["phrases"][0]["rank_change"] < star["rank_change"]


def test_removing_a_filler_phrase_leaves_the_target_in_place(ex, gallery):
    t = example(ex, "test-000004")  # "please reshape the large purple square into a circle"
    filler, shape = phrase(t.caption, "please"), phrase(t.caption, "a circle")
    out = phrase_influence(encoder(ex, t), t.caption, [filler, shape], gallery, t.targets)
    kept, removed = out["phrases"]
    assert out["rank"] == 1 and kept["rank_change"] == 0 and abs(kept["score_change"]) < 0.05 and kept["overlap"] >= 8
    assert removed["rank_change"] > 0


def test_without_a_target_the_top1_is_followed(ex, gallery):
    t = example(ex, "test-000000")
    enc = encoder(ex, t)
    out = phrase_influence(enc, t.caption, [phrase(t.caption, "a small blue star")], gallery)
    top1 = gallery.paths[int(top_rows(enc([t.caption]) @ gallery.embeddings.T, 1)[0, 0])]
    assert out["subject"] == "top-1" and out["subject_path"] == top1 and out["rank"] == 1


def test_variants_drop_phrases_reorder_operations_and_use_template_synonyms():
    caption = "make the red circle blue and remove the green star."
    phrases = [phrase(caption, "the red circle"), phrase(caption, "the green star")]
    assert operations(caption) == ["make the red circle blue", "remove the green star"]
    assert "paint the red circle blue" in synonyms("make the red circle blue")
    assert synonyms("make the purple triangle small") == [  # resize, not recolor: "small" is a size
        "change the size of the purple triangle to small", "the purple triangle needs to be small",
        "alter the size of the purple triangle so it is small"]
    variants = prompt_variants(caption, phrases, VariantConfig(max_variants=20, shapes=True))
    captions = [v["caption"] for v in variants]
    assert captions[:4] == [caption, "make blue and remove the green star.", "make the red circle blue and remove.",
                            "remove the green star and make the red circle blue"]
    assert "paint the red circle blue and remove the green star" in captions
    assert "make the red circle blue and delete the green star" in captions
    assert len(set(captions)) == len(captions)
    assert len(prompt_variants(caption, phrases, VariantConfig(max_variants=3, shapes=True))) == 4


def test_ndcg_and_mrr_of_known_ranks():
    assert ndcg_at_k(np.array([1]), 10) == 1.0
    assert ndcg_at_k(np.array([10]), 10) == pytest.approx(1 / math.log2(11))
    assert ndcg_at_k(np.array([11]), 10) == 0.0
    assert ndcg_at_k(np.array([2, 1]), 10) == 1.0  # both ideal images on top, in either order


def test_variant_scores_rank_the_ideal_image_under_every_variant(ex, gallery):
    t = example(ex, "test-000000")
    phrases = [phrase(t.caption, "a small blue star")]
    variants = prompt_variants(t.caption, phrases, VariantConfig(shapes=True))
    out = score_variants(encoder(ex, t), variants, gallery, t.targets, VariantConfig(k=10))
    original, drop = out["variants"][:2]
    assert original["ranks"] == [1] and original["ndcg"] == 1.0 and original["mrr"] == 1.0
    assert drop["name"] == "drop “a small blue star”" and drop["ranks"][0] > 5
    assert drop["mrr"] == 1 / drop["ranks"][0] and drop["rank_change"] == [drop["ranks"][0] - 1]
    assert drop["ndcg"] == pytest.approx(ndcg_at_k(np.array(drop["ranks"]), 10))
    synonym = [v for v in out["variants"] if v["name"].startswith("synonym")]
    assert synonym and all(v["ranks"][0] <= 3 for v in synonym)  # a template rewording keeps the target near the top


def test_makeup_counts_the_scenes_objects(ex):
    t = example(ex, "test-000000")
    scenes = shapes_scenes(ex.examples)
    partial = os.path.join(os.path.dirname(t.reference), "test-000000-partial-0.png")  # the reshape only
    out = shapes_makeup([t.targets[0], partial, "/elsewhere/photo.jpg"], scenes)
    assert out["images"] == 2 and out["unknown"] == 1
    assert out["shape"] == {"triangle": 2, "diamond": 2, "square": 2, "star": 1}
    assert out["colour"] == {"orange": 4, "yellow": 2, "blue": 1} and out["position"]["top left"] == 1
    assert out["background"] == {"white": 2}
    assert folder_makeup(["/a/x/1.png", "/a/x/2.png", "/b/y/3.png"]) == {"x": 2, "y": 1}


def test_projection_is_stable_stored_with_the_index_hash_and_refitted_when_it_changes(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32) * np.linspace(3, 0.1, 16, dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    first, again = fit_pca(emb), fit_pca(emb.copy())
    assert np.array_equal(first.points, again.points)
    assert first.points[:, 0].var() >= first.points[:, 1].var() > 0
    assert np.allclose(first.transform(emb), first.points, atol=1e-5)
    index = GalleryIndex.from_embeddings(emb)
    stored = projection_of(index, tmp_path, ProjectionConfig("pca"))
    assert stored.file == str(tmp_path / FILE) and np.allclose(stored.points, first.points, atol=1e-6)
    mtime = os.stat(tmp_path / FILE).st_mtime_ns
    read = projection_of(index, tmp_path, ProjectionConfig("pca"))
    assert os.stat(tmp_path / FILE).st_mtime_ns == mtime and np.array_equal(read.points, stored.points)
    changed = GalleryIndex.from_embeddings(emb[:200])
    refitted = projection_of(changed, tmp_path, ProjectionConfig("pca"))
    assert refitted.points.shape == (200, 2) and os.stat(tmp_path / FILE).st_mtime_ns != mtime


def test_each_query_projects_among_its_top_k(ex, gallery):
    projection = fit_pca(gallery.embeddings)
    inside, ratios = 0, []
    for t in ex.examples:
        query = encoder(ex, t)([t.caption])
        point = projection.transform(query)[0]
        top = projection.points[top_rows(query @ gallery.embeddings.T, 10)[0]]
        ratios.append(np.linalg.norm(top - point, axis=1).mean() / np.linalg.norm(projection.points - point,
                                                                                    axis=1).mean())
        inside += bool(((point >= top.min(0)) & (point <= top.max(0))).all())
    assert max(ratios) < 1 and np.mean(ratios) < 0.6, ratios  # nearer its top k than the gallery at large
    assert inside >= 0.85 * len(ex.examples)  # inside the box of its top k


def test_cli_prints_json_and_one_line_errors(tmp_path):
    t = json.loads(open("assets/demo/examples.jsonl").readline())
    image = os.path.join("assets/demo", t["reference"])
    run = lambda *args: subprocess.run([sys.executable, "-m", "cir.explain", *args], capture_output=True, text=True)
    out = run("influence", "--image", image, "--caption", t["caption"], "--threads", "1")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["subject"] == "target" and [p["phrase"] for p in record["phrases"]] == [
        p["text"] for p in t["noun_phrases"]]
    bad = run("variants", "--image", image, "--caption", t["caption"], "--ideal", str(tmp_path / "none.png"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: mark at least one result")
    assert "Traceback" not in bad.stderr
    assert run("project", "--image", image).returncode == 2


def test_research_export_holds_every_view(ex, tmp_path):
    from cir.ui.research_tab import export_research

    t = example(ex, "test-000000")
    files, _ = export_research(ex, str(tmp_path), t.reference, None, t.caption, 5, [ex.label(t.targets[0])])
    text = open(files["value"]).read()
    record = json.loads(text)
    assert ex.root not in text and str(tmp_path) not in text  # images named as the page names them
    assert record["targets"] == [ex.label(p) for p in t.targets] and record["k"] == 5
    assert record["checkpoint"] == os.path.basename(ex.checkpoint) and record["query"] == ex.label(t.reference)
    assert [p["phrase"] for p in record["influence"]["phrases"]] == [p["text"] for p in t.noun_phrases]
    assert record["influence"]["phrases"][-1]["rank_change"] > 0  # "a small blue star", as above
    assert record["variants"]["ideal"] == [ex.label(t.targets[0])] and record["variants"]["variants"][0]["ranks"] == [1]
    assert len(record["makeup"]["top"]) == 5 and record["makeup"]["top"][0] == ex.label(t.targets[0])
    assert record["makeup"]["shapes"]["images"] == 5 and record["map"]["method"] == "pca"
    assert len(record["map"]["query"]) == 2


def chat_server(replies: list[str]):
    """An OpenAI-compatible chat-completions server on 127.0.0.1 answering `replies` in turn -> (url, prompts)."""
    prompts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompts.append(body["messages"][0]["content"][0]["text"])
            data = json.dumps({"choices": [{"message": {"content": replies[len(prompts) - 1]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", prompts


def test_llm_rewrites_are_scored_beside_the_offline_variants(ex, monkeypatch):
    from cir.synth.backends import OpenAIBackend
    from cir.ui import research_tab

    t = example(ex, "test-000000")
    rewrites = ["add a small blue star at the top left and turn the small orange star into a triangle",
                "make the small orange star a triangle"]  # the second leaves the star out
    url, prompts = chat_server(["```json\n" + json.dumps({"rewrites": rewrites}) + "\n```", "no JSON here"])
    monkeypatch.setenv(research_tab.LLM_URL, url)
    monkeypatch.setenv(research_tab.LLM_MODEL, "any")
    record = research_tab.variants_record(ex, encoder(ex, t), t.caption, [], 10, [ex.label(t.targets[0])])
    assert t.caption in prompts[0]
    scored = {v["name"]: v for v in record["variants"]}
    assert scored["LLM rewrite 1"]["caption"] == rewrites[0] and scored["LLM rewrite 1"]["ranks"][0] <= 3
    assert scored["LLM rewrite 2"]["ranks"][0] > scored["LLM rewrite 1"]["ranks"][0]
    with pytest.raises(UserError, match="the LLM gave no rewrites"):
        llm_rewrites(OpenAIBackend(url, "any", max_attempts=1), t.caption, 3)


def test_umap_is_used_where_installed_and_kept_in_memory(tmp_path, monkeypatch):
    """With a stand-in `umap` module: "auto" fits it with the seed, queries go through its transform,
    and nothing is stored (its reducer is not a file format)."""
    class UMAP:
        def __init__(self, n_components, metric, random_state):
            self.seed = random_state

        def fit_transform(self, x):
            return x[:, :2] + self.seed

        def transform(self, x):
            return x[:, :2] - 1

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=UMAP))
    monkeypatch.setattr(projection, "umap_available", lambda: True)
    emb = np.eye(4, dtype=np.float32)
    out = projection_of(GalleryIndex.from_embeddings(emb), tmp_path, ProjectionConfig("auto", seed=3))
    assert out.method == "umap" and out.file is None and not (tmp_path / FILE).exists()
    assert np.array_equal(out.points, emb[:, :2] + 3) and np.array_equal(out.transform(emb[:1]), [[0, -1]])
