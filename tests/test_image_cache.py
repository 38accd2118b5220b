"""The cheaper grid-7 training step: cached image-tower outputs (cir.image_cache), fixed CC targets
from a frozen teacher (cir.cc_teacher) and the frozen prior tower (config `frozen_prior`).
Each gives what the step it replaces computed, and a run that uses them still resumes exactly."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cir.checkpoint import load_checkpoint, save_checkpoint
from cir.data.images import load_rgb
from cir.data.shapes.partials import has_partials, partial_subsets, render_partial
from cir.data.triplets import read_triplets
from cir.errors import UserError
from cir.image_cache import ImageCache, build_cache
from cir.models.base import isolated_maps
from cir.models.factory import build_model, load_config
from test_train import losses as log, run

PRIOR_CONFIG = {**load_config("context-cir-tiny").to_dict(), "attention_prior": 20.0, "frozen_prior": True}
TRAIN = [sys.executable, "-m", "cir.train", "--batch-size", "8", "--steps", "6", "--warmup", "2", "--workers", "0",
         "--val-every", "0", "--save-every", "2", "--lr", "1e-3", "--partial-negatives", "2", "--freeze-image"]


@pytest.fixture(scope="module")
def step0(tmp_path_factory):
    """A tiny frozen-prior model at step 0 (text and image towers random), as a checkpoint and its config file."""
    folder = tmp_path_factory.mktemp("prior")
    config = folder / "tiny-prior.json"
    config.write_text(json.dumps(PRIOR_CONFIG))
    torch.manual_seed(0)
    model, _ = build_model(str(config))
    path = folder / "step0.safetensors"
    save_checkpoint(path, model, {"config": model.config.to_dict(), "step": 0})
    return path, config


@pytest.fixture(scope="module")
def cache(step0, shapes_data, tmp_path_factory):
    model, preprocess, _ = load_checkpoint(step0[0])
    return build_cache(model, preprocess, shapes_data / "train.jsonl", tmp_path_factory.mktemp("c") / "cache", 16, 0)


def test_cache_rows_hold_the_tower_outputs_of_every_image_and_partial(step0, cache, shapes_data):
    model, preprocess, _ = load_checkpoint(step0[0])
    triplets, _ = read_triplets(shapes_data / "train.jsonl")
    multi = [i for i, t in enumerate(triplets) if has_partials(t.meta)]
    assert multi and len(multi) < len(triplets)
    assert [int(n) for n in cache.partial_count] == [len(partial_subsets(len(t.meta["operations"])))
                                                    if has_partials(t.meta) else 0 for t in triplets]
    i = multi[-1]
    t = triplets[i]
    subsets = partial_subsets(len(t.meta["operations"]))
    images = [load_rgb(t.reference), load_rgb(t.targets[0]), *(render_partial(t.meta, s) for s in subsets)]
    rows = [cache.reference[i], cache.target[i], *range(cache.partial_start[i], cache.partial_start[i] + len(subsets))]
    with torch.no_grad():
        want = model.image_tokens(torch.stack([preprocess(im) for im in images]))
        got = model.cached_image_tokens(cache.rows(rows))
    assert got.shape == want.shape == (len(images), 1 + model.grid ** 2, want.shape[-1])
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(got[0], got[1], atol=1e-2)  # rows differ: the reference is not the target
    reopened = ImageCache.open(cache.folder)
    assert torch.equal(reopened.rows(rows), cache.rows(rows))


def test_a_cache_is_refused_for_other_towers_or_another_file(step0, cache, shapes_data, tmp_path):
    model, _, _ = load_checkpoint(step0[0])
    cache.check(model, shapes_data / "train.jsonl")
    with pytest.raises(UserError, match="another triplet file"):
        cache.check(model, shapes_data / "val.jsonl")
    with torch.no_grad():
        model.clip.visual.proj.mul_(2)
    with pytest.raises(UserError, match="other image-tower weights"):
        cache.check(model, shapes_data / "train.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a complete cache"):
        ImageCache.open(tmp_path / "empty")


def test_cached_run_trains_as_the_image_run_and_resumes_exactly(step0, cache, shapes_data, tmp_path):
    """The same partial fulfilments are drawn from the cache's pool as rendered per step, so the
    losses match the image run's (up to the cache's fp16); a cached run resumed midway repeats itself."""
    ckpt, config = step0
    base = TRAIN + ["--config", str(config), "--init-from", str(ckpt), "--data", str(shapes_data)]
    run(base + ["--out", str(tmp_path / "images")])
    cached = base + ["--image-cache", str(cache.folder)]
    run(cached + ["--out", str(tmp_path / "cached")])
    run(cached + ["--out", str(tmp_path / "split"), "--stop-after", "3"])
    run(cached + ["--out", str(tmp_path / "split"), "--resume"])
    images, full, split = log(tmp_path / "images"), log(tmp_path / "cached"), log(tmp_path / "split")
    assert [r["step"] for r in full] == [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for a, b, c in zip(images, full, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert c["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert b["data_sec"] >= 0
    assert any(r["cc"] > 0 for r in full)


def test_teacher_targets_are_the_teachers_isolated_maps_and_stay_fixed(step0, cache, shapes_data, tmp_path):
    ckpt, config = step0
    base = TRAIN + ["--config", str(config), "--init-from", str(ckpt), "--data", str(shapes_data),
                    "--image-cache", str(cache.folder), "--lambda-cc", "1"]
    run(base + ["--out", str(tmp_path / "own")])
    run(base + ["--out", str(tmp_path / "teacher"), "--cc-teacher", str(ckpt), "--stop-after", "3"])
    targets = tmp_path / "teacher" / "cc_targets.npz"
    made = targets.stat().st_mtime_ns
    run(base + ["--out", str(tmp_path / "teacher"), "--cc-teacher", str(ckpt), "--resume"])
    assert targets.stat().st_mtime_ns == made  # reused on resume
    own, fixed = log(tmp_path / "own"), log(tmp_path / "teacher")
    # at step 1 the model is the teacher: its own isolated maps are the targets
    assert fixed[0]["cc"] == pytest.approx(own[0]["cc"], rel=1e-2)
    assert fixed[0]["cc"] > 0.01

    import numpy as np
    teacher, _, _ = load_checkpoint(ckpt)
    triplets, _ = read_triplets(shapes_data / "train.jsonl")
    with np.load(targets) as f:
        maps, offsets = f["maps"], f["offsets"]
    i = 5
    texts = [p["text"] for p in triplets[i].noun_phrases]
    assert offsets[i + 1] - offsets[i] == len(texts) > 0
    with torch.no_grad():
        image = teacher.cached_image_tokens(cache.rows([cache.reference[i]]))
        want = isolated_maps(teacher, image, torch.zeros(len(texts), dtype=torch.long), texts).mean((1, 2))
    assert torch.allclose(torch.from_numpy(maps[offsets[i]:offsets[i + 1]]).float(), want, atol=1e-3)
    assert torch.allclose(want.sum(1), torch.ones(len(texts)), atol=1e-4)
    # --cc-sharpen 2: the same maps squared and renormalised, same peaks, more mass on them
    run(base + ["--out", str(tmp_path / "sharp"), "--cc-teacher", str(ckpt), "--cc-sharpen", "2", "--stop-after", "1"])
    with np.load(tmp_path / "sharp" / "cc_targets.npz") as f:
        sharp = torch.from_numpy(f["maps"][offsets[i]:offsets[i + 1]]).float()
    assert torch.allclose(sharp, want ** 2 / (want ** 2).sum(1, keepdim=True), atol=1e-3)
    assert torch.equal(sharp.argmax(1), want.argmax(1)) and bool((sharp.max(1).values > want.max(1).values).all())


def test_frozen_prior_starts_as_the_loaded_text_tower_and_never_trains(step0, cache, shapes_data, tmp_path):
    ckpt, config = step0
    old = dict(PRIOR_CONFIG, frozen_prior=False)
    (tmp_path / "shared.json").write_text(json.dumps(old))
    torch.manual_seed(1)
    shared, _ = build_model(str(tmp_path / "shared.json"))
    start = tmp_path / "shared.safetensors"
    save_checkpoint(start, shared, {"config": shared.config.to_dict(), "step": 0})
    # grown from a model without the frozen copy: the copy is the loaded text tower
    run(TRAIN + ["--config", str(config), "--init-from", str(start), "--data", str(shapes_data), "--steps", "3",
                 "--lambda-cc", "1", "--out", str(tmp_path / "grown")])
    model, _, _ = load_checkpoint(tmp_path / "grown" / "last.safetensors")
    prior, text, before = model.prior_text.state_dict(), model.clip.state_dict(), shared.clip.state_dict()
    assert prior.keys() and all(torch.equal(prior[k], before[k]) for k in prior)  # frozen: as loaded
    assert any(not torch.equal(text[k], before[k]) for k in prior)  # while the text tower trained
    assert all(not p.requires_grad for p in model.prior_text.parameters())
    # the exported file keeps only the seen token rows of both towers and draws the same maps
    out = tmp_path / "export.safetensors"
    run([sys.executable, "-m", "cir.checkpoint", "export", "--checkpoint", str(tmp_path / "grown" / "last.safetensors"),
         "--out", str(out)])
    exported, preprocess, _ = load_checkpoint(out)
    t = read_triplets(shapes_data / "train.jsonl")[0][0]
    image = preprocess(load_rgb(t.reference))
    spans = [(p["start"], p["end"]) for p in t.noun_phrases]
    a, b = model.phrase_attention(image, t.caption, spans), exported.phrase_attention(image, t.caption, spans)
    for x, y in zip(a, b):
        assert torch.allclose(x.in_context, y.in_context, atol=2e-3) and torch.allclose(x.isolated, y.isolated, atol=2e-3)


def test_cache_and_teacher_flags_need_their_partners(shapes_data, tmp_path):
    for flags, message in ((["--image-cache", "x"], "--image-cache needs --freeze-image"),
                           (["--freeze-image", "--cc-teacher", "x"], "--cc-teacher needs --image-cache"),
                           (["--cc-sharpen", "2"], "--cc-sharpen needs --cc-teacher")):
        r = subprocess.run([sys.executable, "-m", "cir.train", "--data", str(shapes_data), "--out", str(tmp_path),
                            *flags], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
