"""CIR-Shapes: files, determinism, pixel colours against the spec, gold boxes, partial fulfilments."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cir.data.shapes.dataset import generate
from cir.data.shapes.partials import partial_subsets, random_partials
from cir.data.shapes.pretraining_texts import CELL_CONTENTS, patch_contents, patch_distribution_of_box
from cir.data.shapes.render import render
from cir.data.shapes.scene import BACKGROUNDS, CELLS, COLORS, Obj, Operation, Scene, apply_all
from cir.data.triplets import read_gallery, read_triplets

SPEC_COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20),
               "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (25, 25, 25), "cyan": (30, 190, 200)}
SPEC_BACKGROUNDS = {"white": (255, 255, 255), "gray": (200, 200, 200), "beige": (240, 225, 190), "pink": (250, 205, 215)}


def test_vocabulary_is_the_spec():
    assert COLORS == SPEC_COLORS and BACKGROUNDS == SPEC_BACKGROUNDS
    assert CELLS[0] == "top left" and CELLS[4] == "center" and CELLS[8] == "bottom right"


def test_patch_contents_and_the_patches_of_a_box():
    assert len(CELL_CONTENTS) == 2 * 8 * 5 + 4 == len(set(CELL_CONTENTS))
    # 7 x 7 patches over the 128 px canvas: centres at 9.14, 27.43, 45.71, 64, 82.29, 100.57, 118.86
    circle, star = Obj("circle", "red", "large", 0), Obj("star", "cyan", "small", 8)
    assert circle.box() == pytest.approx([3.2, 3.2, 39.47, 39.47], abs=0.01)  # holds the centres 9.14 and 27.43
    assert star.box() == pytest.approx([97.07, 97.07, 116.27, 116.27], abs=0.01)  # holds 100.57 only
    contents = [CELL_CONTENTS[i] for i in patch_contents(Scene("pink", (circle, star)), 7)]
    expected = ["pink background"] * 49
    for j in (0, 1, 7, 8):
        expected[j] = "large red circle"
    expected[5 * 7 + 5] = "small cyan star"
    assert contents == expected
    assert patch_distribution_of_box(circle.box(), 7) == [0.25 if j in (0, 1, 7, 8) else 0.0 for j in range(49)]
    # no patch centre inside: the nearest one, (45.71, 45.71) for a box centred at (52.5, 52.5)
    assert patch_distribution_of_box([50, 50, 55, 55], 7) == [1.0 if j == 2 * 7 + 2 else 0.0 for j in range(49)]


def test_files_and_format(shapes_data):
    for split, n in (("train", 48), ("val", 12), ("test", 16)):
        triplets, problems = read_triplets(shapes_data / f"{split}.jsonl")
        assert len(triplets) == n and not problems
        gallery = set(read_gallery(shapes_data / f"gallery_{split}.txt"))
        for t in triplets:
            assert t.reference in gallery and t.targets[0] in gallery
            k = t.meta["num_modifications"]
            assert 1 <= k <= 3 and len(t.meta["operations"]) == k
            for np_ in t.noun_phrases:
                assert t.caption[np_["start"]:np_["end"]] == np_["text"]
    assert json.loads((shapes_data / "manifest.json").read_text())["sizes"] == {"train": 48, "val": 12, "test": 16}


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, {"test": 6}, seed=5, workers=1, progress=False)
    generate(b, {"test": 6}, seed=5, workers=2, progress=False)
    generate(c, {"test": 6}, seed=6, workers=1, progress=False)
    assert _digest(a) == _digest(b) != _digest(c)


def test_rerun_after_a_killed_render_removes_its_temporaries(tmp_path):
    """Images are written without the per-file folder scan (which made n files cost O(n^2)); a
    temporary left by a killed renderer (dead pid) goes at the next run, a live writer's stays."""
    out = tmp_path / "d"
    generate(out, {"test": 3}, seed=5, workers=1, progress=False)
    before = _digest(out)
    folder = out / "images" / "test"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".test-000000-ref.png.{dead.stdout.strip()}.abc123.tmp"
    live = folder / f".test-000000-ref.png.{os.getpid()}.def456.tmp"
    stale.write_bytes(b"half a png")
    live.write_bytes(b"being written")
    generate(out, {"test": 3}, seed=5, workers=1, progress=False)
    assert not stale.exists() and live.exists()
    live.unlink()
    assert _digest(out) == before


def test_pixels_match_spec_colors_and_boxes(shapes_data):
    triplets, _ = read_triplets(shapes_data / "test.jsonl")
    checked = 0
    for t in triplets:
        for which, path in (("reference_scene", t.reference), ("target_scene", t.targets[0])):
            scene = t.meta[which]
            img = np.asarray(Image.open(path).convert("RGB")).astype(int)
            assert img.shape == (128, 128, 3)
            bg = SPEC_BACKGROUNDS[scene["background"]]
            assert tuple(img[0, 0]) == bg or any(o["cell"] == 0 for o in scene["objects"])
            for o in scene["objects"]:
                x0, y0, x1, y1 = Scene.from_json({"background": "white", "objects": [o]}).objects[0].box()
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                assert np.abs(img[cy, cx] - SPEC_COLORS[o["color"]]).max() <= 1, (t.id, o)
                # every non-background pixel of the object's cell lies inside its gold box (1 px anti-aliasing)
                r, c = divmod(o["cell"], 3)
                cell = img[int(r * 128 / 3) + 1:int((r + 1) * 128 / 3) - 1, int(c * 128 / 3) + 1:int((c + 1) * 128 / 3) - 1]
                ys, xs = np.nonzero(np.abs(cell - bg).max(-1) > 8)
                ys, xs = ys + int(r * 128 / 3) + 1, xs + int(c * 128 / 3) + 1
                assert len(xs) > 0
                assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1
                small = o["size"] == "small"
                assert abs((x1 - x0) - (0.45 if small else 0.85) * 128 / 3) < 1e-6
                checked += 1
    assert checked > 30


def test_grounding_boxes_hold_their_objects(shapes_data):
    triplets, _ = read_triplets(shapes_data / "test.jsonl")
    for t in triplets:
        objs = {(o["color"], o["shape"]): o for o in t.meta["reference_scene"]["objects"]}
        for g in t.meta["grounding"]:
            text = t.caption[g["start"]:g["end"]]
            if g["kind"] == "object":
                key = next(k for k in objs if f"{k[0]} {k[1]}" in text)
                box = Scene.from_json({"background": "white", "objects": [objs[key]]}).objects[0].box()
                assert [round(v, 2) for v in box] == g["box"]
            else:
                assert text.startswith("the ") and text[4:] in CELLS


def test_partial_fulfilments_in_gallery(shapes_data):
    triplets, _ = read_triplets(shapes_data / "test.jsonl")
    gallery = set(read_gallery(shapes_data / "gallery_test.txt"))
    multi = [t for t in triplets if t.meta["num_modifications"] >= 2]
    assert multi
    for t in multi:
        k = t.meta["num_modifications"]
        partials = t.meta["partials"]
        assert len(partials) == 2 ** k - 2
        target = np.asarray(Image.open(t.targets[0]))
        for p in partials:
            path = str((shapes_data / p["path"]).resolve())
            assert path in gallery
            # the partial image is the reference scene with exactly those operations applied
            ops = [Operation.from_json(t.meta["operations"][i]) for i in p["operations"]]
            scene = apply_all(Scene.from_json(t.meta["reference_scene"]), ops)
            assert np.array_equal(np.asarray(render(scene)), np.asarray(Image.open(path)))
            assert not np.array_equal(np.asarray(Image.open(path)), target)


def test_random_partials_are_gallery_partials(shapes_data):
    """The training hard negatives (--partial-negatives N|all) are pixel-equal to partial fulfilments
    the evaluation gallery holds: N distinct ones per draw, over draws every one of them, and with
    count 6 all 6 of a 3-operation query, in the gallery's order."""
    triplets, _ = read_triplets(shapes_data / "test.jsonl")
    three = next(t for t in triplets if t.meta["num_modifications"] == 3)
    files = {p["path"]: np.asarray(Image.open(shapes_data / p["path"])) for p in three.meta["partials"]}
    assert [tuple(p["operations"]) for p in three.meta["partials"]] == partial_subsets(3)
    match = lambda img: [p for p, a in files.items() if np.array_equal(a, np.asarray(img))]
    seen = set()
    for seed in range(60):
        drawn = random_partials(three.meta, random.Random(seed))
        assert len(drawn) == 1 and len(match(drawn[0])) == 1
        seen.add(match(drawn[0])[0])
    assert seen == set(files)  # all 6 proper non-empty subsets are drawn
    two = [m for img in random_partials(three.meta, random.Random(0), count=2) for m in match(img)]
    assert len(two) == 2 and two[0] != two[1]
    assert [m for img in random_partials(three.meta, random.Random(0), count=6) for m in match(img)] == list(files)
    one = next(t for t in triplets if t.meta["num_modifications"] == 1)
    assert random_partials(one.meta, random.Random(0)) == [] and random_partials({}, random.Random(0)) == []
    assert partial_subsets(1) == [] and partial_subsets(2) == [(0,), (1,)]


def test_captions_name_every_operation(shapes_data):
    triplets, _ = read_triplets(shapes_data / "train.jsonl")
    for t in triplets:
        for op in t.meta["operations"]:
            if "object" in op:
                assert f"{op['object']['color']} {op['object']['shape']}" in t.caption
            if op["type"] == "recolor":
                assert op["after"]["color"] in t.caption
            if op["type"] in ("move", "add"):
                assert op["after"]["cell_name"] in t.caption
            if op["type"] == "background":
                assert op["background"] in t.caption


def test_splits_do_not_share_reference_scenes(shapes_data):
    keys = {}
    for split in ("train", "val", "test"):
        triplets, _ = read_triplets(shapes_data / f"{split}.jsonl", check_images=False)
        keys[split] = {Scene.from_json(t.meta["reference_scene"]).key() for t in triplets}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cir.data.shapes", "--out", str(tmp_path / "o"), "--test", "3", "--seed", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "o" / "test.jsonl").read_text().splitlines()) == 3
    bad = subprocess.run([sys.executable, "-m", "cir.data.shapes", "--out", str(tmp_path / "x"), "--num-modifications", "4", "--test", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_filler_words_replace_template_words_only_in_training_captions(tmp_path):
    from cir.data.shapes.captions import HELDOUT_TEMPLATES, filler_words

    words = set(filler_words())
    heldout = {w for ts in HELDOUT_TEMPLATES.values() for t in ts for w in t.replace("{", " ").replace("}", " ").split()}
    assert len(words) > 5000 and not words & heldout and not words & (set(COLORS) | set(BACKGROUNDS) | {"circle", "star"})
    assert "transforms" not in words and "bringing" not in words  # a held-out word's forms are never seen either
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    generate(plain, {"train": 60, "val": 20}, seed=4, workers=1, progress=False, filler=0.0)
    generate(mixed, {"train": 60, "val": 20}, seed=4, workers=1, progress=False, filler=0.5)
    for split in ("train", "val"):
        a, _ = read_triplets(plain / f"{split}.jsonl")
        b, _ = read_triplets(mixed / f"{split}.jsonl")
        assert [t.meta["operations"] for t in a] == [t.meta["operations"] for t in b]  # same scenes and edits
        changed = sum(x.caption != y.caption for x, y in zip(a, b))
        if split == "val":
            assert changed == 0
            continue
        assert 10 < changed < 60
        for x, y in zip(a, b):  # the slots (noun phrases and their boxes) are kept, only template words differ
            assert [p["text"] for p in x.noun_phrases] == [p["text"] for p in y.noun_phrases]
            assert [g["box"] for g in x.meta["grounding"]] == [g["box"] for g in y.meta["grounding"]]
            for p in y.noun_phrases:
                assert y.caption[p["start"]:p["end"]] == p["text"]
            new = set(y.caption.replace(".", " ").replace(",", " ").replace(";", " ").split()) - \
                set(x.caption.replace(".", " ").replace(",", " ").replace(";", " ").split())
            assert new <= words
