"""CIRR and CIRCO on tiny datasets written in their official layouts: the readers, `cir.evaluate`
on the val splits and the test-server submission files of the test splits."""
import json
import os

import pytest
from PIL import Image

from cir.data.circo import read_circo
from cir.data.cirr import cirr_image_names, read_cirr
from cir.data.triplets import Triplet
from cir.errors import UserError

MEMBERS = [f"dev-0-{i}-img0" for i in range(6)]


def _image(path, fmt, n=0):
    """A 4 x 4 image whose colour depends on `n`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (37 * n % 256, 91 * n % 256, 53 * n % 256)).save(path, fmt)


def _json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def cirr(tmp_path):
    """The CIRR repository's layout. val: 2 queries over one 6-image set plus an image in no set;
    test1: 1 query without targets."""
    names = {**{m: f"./dev/{m}.png" for m in MEMBERS}, "dev-9-0-img0": "./dev/dev-9-0-img0.png"}
    test_members = [f"test1-0-{i}-img0" for i in range(6)]
    for split, imgs in (("val", names), ("test1", {m: f"./test1/{m}.png" for m in test_members})):
        _json(tmp_path / "image_splits" / f"split.rc2.{split}.json", imgs)
        for n, rel in enumerate(imgs.values()):
            _image(tmp_path / "img_raw" / rel, "PNG", n)
    img_set = {"id": 7, "members": MEMBERS, "reference_rank": 0, "target_rank": 2}
    _json(tmp_path / "captions" / "cap.rc2.val.json", [
        {"pairid": 10, "reference": MEMBERS[0], "target_hard": MEMBERS[2], "target_soft": {MEMBERS[2]: 1.0},
         "caption": "make it blue", "img_set": img_set},
        {"pairid": 11, "reference": MEMBERS[3], "target_hard": "dev-9-0-img0", "target_soft": {"dev-9-0-img0": 1.0},
         "caption": "two of them", "img_set": {**img_set, "reference_rank": 3, "target_rank": -1}},
    ])
    _json(tmp_path / "captions" / "cap.rc2.test1.json", [
        {"pairid": 3, "reference": test_members[1], "caption": "at night",
         "img_set": {"id": 2, "members": test_members, "reference_rank": 1}},
    ])
    return tmp_path


def test_read_cirr_val(cirr):
    triplets, gallery = read_cirr(cirr, "val")
    p = {name: os.path.join(str(cirr), "img_raw", "dev", f"{name}.png") for name in [*MEMBERS, "dev-9-0-img0"]}
    subset = [p[m] for m in MEMBERS]  # all six members, the reference included
    assert triplets == [
        Triplet(id="10", reference=p[MEMBERS[0]], caption="make it blue", targets=[p[MEMBERS[2]]], subset=subset,
                meta={"dataset": "cirr", "pairid": 10, "target_soft": {MEMBERS[2]: 1.0}, "img_set_id": 7}),
        Triplet(id="11", reference=p[MEMBERS[3]], caption="two of them", targets=[p["dev-9-0-img0"]], subset=subset,
                meta={"dataset": "cirr", "pairid": 11, "target_soft": {"dev-9-0-img0": 1.0}, "img_set_id": 7}),
    ]
    assert gallery == sorted(p.values())


def test_read_cirr_test1_has_no_targets(cirr):
    (t,), gallery = read_cirr(cirr, "test1")
    assert (t.id, t.targets, t.meta) == ("3", [], {"dataset": "cirr", "pairid": 3, "target_soft": {}, "img_set_id": 2})
    assert t.reference == os.path.join(str(cirr), "img_raw", "test1", "test1-0-1-img0.png")
    assert len(t.subset) == 6 and len(gallery) == 6


def _edit_val_entry(root, **changes):
    path = root / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    entries[1].update(changes)
    entries[1] = {k: v for k, v in entries[1].items() if v is not None}
    path.write_text(json.dumps(entries))


@pytest.mark.parametrize("changes, message", [
    ({"caption": None}, r"cap\.rc2\.val\.json: entry 1: missing field 'caption'"),
    ({"img_set": {"id": 7, "members": "dev-0-0-img0"}},
     r"cap\.rc2\.val\.json: entry 1: img_set: field 'members' must be a list of str"),
    ({"target_hard": "dev-5-5-img0"},
     r"cap\.rc2\.val\.json: entry 1: image 'dev-5-5-img0' is not listed in .*split\.rc2\.val\.json"),
    ({"pairid": 10}, r"cap\.rc2\.val\.json: entry 1: duplicate pairid 10"),
])
def test_read_cirr_malformed_entry(cirr, changes, message):
    _edit_val_entry(cirr, **changes)
    with pytest.raises(UserError, match=message):
        read_cirr(cirr, "val")


def test_read_cirr_missing_files(cirr):
    with pytest.raises(UserError, match=r"CIRR train captions not found: expected .*/captions/cap\.rc2\.train\.json "
                                        r"or .*/cirr/captions/cap\.rc2\.train\.json"):
        read_cirr(cirr, "train")
    (cirr / "img_raw" / "dev" / "dev-9-0-img0.png").unlink()
    with pytest.raises(UserError, match=r"split\.rc2\.val\.json: 1 of 7 images not found in .*img_raw, "
                                        r"e\.g\. .*dev-9-0-img0\.png"):
        read_cirr(cirr, "val")


def test_read_cirr_invalid_json(cirr):
    (cirr / "image_splits" / "split.rc2.val.json").write_text("{")
    with pytest.raises(UserError, match=r"split\.rc2\.val\.json: not valid JSON"):
        read_cirr(cirr, "val")
    _json(cirr / "captions" / "cap.rc2.test1.json", {"pairid": 3})
    with pytest.raises(UserError, match=r"cap\.rc2\.test1\.json: expected a JSON list, got dict"):
        read_cirr(cirr, "test1")


@pytest.fixture
def circo(tmp_path):
    """val: 2 queries (3 ground truths, then 1) over 5 COCO images; test: 1 query without targets."""
    for image_id in (1, 2, 3, 40, 500):
        _image(tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg", "JPEG")
    _json(tmp_path / "annotations" / "val.json", [
        {"id": 0, "reference_img_id": 1, "target_img_id": 2, "gt_img_ids": [2, 40, 500],
         "relative_caption": "is red", "shared_concept": "a dog", "semantic_aspects": ["color"]},
        {"id": 1, "reference_img_id": 40, "target_img_id": 3, "gt_img_ids": [3],
         "relative_caption": "has two cats", "shared_concept": "an animal", "semantic_aspects": ["cardinality"]},
    ])
    _json(tmp_path / "annotations" / "test.json", [
        {"id": 0, "reference_img_id": 3, "relative_caption": "at sea", "shared_concept": "a boat",
         "semantic_aspects": []},
    ])
    return tmp_path


def _coco(root, image_id):
    return os.path.join(str(root), "COCO2017_unlabeled", "unlabeled2017", f"{image_id:012d}.jpg")


def test_read_circo_val(circo):
    triplets, gallery = read_circo(circo, "val")
    assert triplets == [
        Triplet(id="0", reference=_coco(circo, 1), caption="is red", targets=[_coco(circo, i) for i in (2, 40, 500)],
                meta={"dataset": "circo", "shared_concept": "a dog", "semantic_aspects": ["color"]}),
        Triplet(id="1", reference=_coco(circo, 40), caption="has two cats", targets=[_coco(circo, 3)],
                meta={"dataset": "circo", "shared_concept": "an animal", "semantic_aspects": ["cardinality"]}),
    ]
    assert gallery == [_coco(circo, i) for i in (1, 2, 3, 40, 500)]


def test_read_circo_puts_target_img_id_first(circo):
    entries = json.loads((circo / "annotations" / "val.json").read_text())
    entries[0]["target_img_id"] = 500
    _json(circo / "annotations" / "val.json", entries)
    assert read_circo(circo, "val")[0][0].targets == [_coco(circo, i) for i in (500, 2, 40)]


def test_read_circo_test_and_image_dir(circo, tmp_path_factory):
    (t,), _ = read_circo(circo, "test")
    assert (t.id, t.reference, t.targets) == ("0", _coco(circo, 3), [])
    moved = tmp_path_factory.mktemp("coco")
    os.rename(circo / "COCO2017_unlabeled" / "unlabeled2017", moved / "images")
    (t,), gallery = read_circo(circo, "test", image_dir=moved / "images")
    assert t.reference == str(moved / "images" / "000000000003.jpg") and len(gallery) == 5


@pytest.mark.parametrize("entry, message", [
    ({"reference_img_id": 1, "relative_caption": "x", "shared_concept": "y"},
     r"val\.json: entry 0: missing field 'id'"),
    ({"id": 0, "reference_img_id": 1, "target_img_id": 2, "gt_img_ids": "2", "relative_caption": "x",
      "shared_concept": "y"}, r"val\.json: entry 0: field 'gt_img_ids' must be a list of int"),
    ({"id": 0, "reference_img_id": 1, "gt_img_ids": [2], "relative_caption": "x", "shared_concept": "y"},
     r"val\.json: entry 0: missing field 'target_img_id'"),
    ({"id": 0, "reference_img_id": 9, "target_img_id": 2, "gt_img_ids": [2], "relative_caption": "x",
      "shared_concept": "y"},
     r"val\.json: entry 0: image not found: .*000000000009\.jpg"),
    ("not an object", r"val\.json: entry 0: expected an object, got str"),
])
def test_read_circo_malformed_entry(circo, entry, message):
    _json(circo / "annotations" / "val.json", [entry])
    with pytest.raises(UserError, match=message):
        read_circo(circo, "val")


def test_read_circo_missing_files(circo, tmp_path):
    with pytest.raises(UserError, match=r"unknown CIRCO split 'train'; choose from val, test \(CIRCO has no training"):
        read_circo(circo, "train")
    (circo / "annotations" / "test.json").unlink()
    with pytest.raises(UserError, match=r"file not found: .*annotations/test\.json"):
        read_circo(circo, "test")
    with pytest.raises(UserError, match=r"CIRCO image folder not found: .*nowhere"):
        read_circo(circo, "val", image_dir=tmp_path / "nowhere")



def _to_clip4cir_layout(root):
    """CLIP4Cir's and SEARLE's layout: annotations under ROOT/cirr, images straight under ROOT."""
    (root / "cirr").mkdir()
    for folder in ("captions", "image_splits"):
        os.rename(root / folder, root / "cirr" / folder)
    for split in ("dev", "test1"):
        os.rename(root / "img_raw" / split, root / split)
    os.rmdir(root / "img_raw")


def test_read_cirr_clip4cir_layout_and_image_dir(cirr, tmp_path_factory):
    _to_clip4cir_layout(cirr)
    triplets, gallery = read_cirr(cirr, "val")
    assert triplets[0].reference == os.path.join(str(cirr), "dev", f"{MEMBERS[0]}.png") and len(gallery) == 7
    elsewhere = tmp_path_factory.mktemp("nlvr2")
    os.rename(cirr / "dev", elsewhere / "dev")
    with pytest.raises(UserError, match=r"CIRR val images not found: expected .*/cirr/img_raw/dev/dev-0-0-img0\.png "
                                        r"or .*/dev/dev-0-0-img0\.png; pass --images DIR"):
        read_cirr(cirr, "val")
    (t, _), gallery = read_cirr(cirr, "val", image_dir=elsewhere)
    assert t.reference == str(elsewhere / "dev" / f"{MEMBERS[0]}.png") and len(gallery) == 7


def test_cirr_image_names(cirr):
    names = cirr_image_names(cirr, "val")
    assert names[os.path.join(str(cirr), "img_raw", "dev", "dev-9-0-img0.png")] == "dev-9-0-img0"
    assert sorted(names.values()) == sorted([*MEMBERS, "dev-9-0-img0"])


def _run(*argv):
    """cir.evaluate's command line on the CPU."""
    from cir.evaluate import main
    return main([str(a) for a in argv] + ["--device", "cpu"])


def test_evaluate_cirr_val_prints_every_metric_of_one_ranking(cirr, tiny_checkpoint, tmp_path, capsys):
    out, files = tmp_path / "val.json", tmp_path / "submission"
    _run("--checkpoint", tiny_checkpoint, "--dataset", "cirr", "--root", cirr, "--split", "val",
         "--json", out, "--submission", files)
    printed = capsys.readouterr().out
    for label in ("R@1 ", "R@5 ", "R@10 ", "R@50 ", "Rs@1 ", "Rs@2 ", "Rs@3 ", "queries: 2 (reference removed)"):
        assert label in printed
    res = json.loads(out.read_text())
    recall = json.loads((files / "cirr-val-recall.json").read_text())
    subset = json.loads((files / "cirr-val-recall_subset.json").read_text())
    target = {"10": MEMBERS[2], "11": "dev-9-0-img0"}
    # the numbers are those of the rankings in the files, recomputed here by the protocol's definition
    for k in (1, 5, 10, 50):
        assert res["recall"][str(k)] == 100 * sum(target[q] in recall[q][:k] for q in target) / 2
    for k in (1, 2, 3):
        assert res["recall_subset"][str(k)] == 100 * sum(target[q] in subset[q][:k] for q in target) / 2
    # 7 images, the reference removed: all 6 others ranked; query 11's target is outside its img_set
    assert res["recall"]["50"] == 100.0 and res["recall_subset"]["3"] == 50.0


@pytest.fixture
def cirr_test1(tmp_path):
    """test1 in the CIRR repository's layout: 9 img_sets of 6 (54 images), 5 queries."""
    sets = [[f"test1-{s}-{i}-img{i % 2}" for i in range(6)] for s in range(9)]
    names = {m: f"./test1/{m}.png" for members in sets for m in members}
    _json(tmp_path / "image_splits" / "split.rc2.test1.json", names)
    for n, rel in enumerate(names.values()):
        _image(tmp_path / "img_raw" / rel, "PNG", n)
    queries = [(12063 + q, sets[s][r], s) for q, (s, r) in enumerate([(0, 0), (0, 3), (4, 1), (8, 5), (2, 2)])]
    _json(tmp_path / "captions" / "cap.rc2.test1.json", [
        {"pairid": pairid, "reference": ref, "caption": f"caption {pairid}",
         "img_set": {"id": s, "members": sets[s], "reference_rank": sets[s].index(ref)}}
        for pairid, ref, s in queries])
    return tmp_path, {str(pairid): (ref, sets[s]) for pairid, ref, s in queries}


def test_cirr_test1_submission_files(cirr_test1, tiny_checkpoint, tmp_path):
    root, queries = cirr_test1
    with pytest.raises(UserError, match=r"cirr test1 has no public ground truth.*pass --submission OUT_DIR"):
        _run("--checkpoint", tiny_checkpoint, "--dataset", "cirr", "--root", root, "--split", "test1")
    _run("--checkpoint", tiny_checkpoint, "--dataset", "cirr", "--root", root, "--split", "test1",
         "--submission", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["cirr-test1-recall.json", "cirr-test1-recall_subset.json"]
    recall = json.loads((tmp_path / "out" / "cirr-test1-recall.json").read_text())
    subset = json.loads((tmp_path / "out" / "cirr-test1-recall_subset.json").read_text())
    names = set(json.loads((root / "image_splits" / "split.rc2.test1.json").read_text()))
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    assert set(recall) == set(subset) == set(queries)  # every pairid of the captions file
    for pairid, (ref, members) in queries.items():
        top, top3 = recall[pairid], subset[pairid]
        assert len(top) == len(set(top)) == 50 and ref not in top and set(top) <= names
        assert len(top3) == len(set(top3)) == 3 and set(top3) <= set(members) - {ref}
        # the subset list is the recall ranking restricted to the members
        in_top = [n for n in top if n in members]
        assert top3[:len(in_top[:3])] == in_top[:3]


def test_circo_val_metrics_are_the_official_ones_of_its_ranking(circo, tiny_checkpoint, tmp_path, capsys):
    out, files = tmp_path / "val.json", tmp_path / "submission"
    _run("--checkpoint", tiny_checkpoint, "--dataset", "circo", "--root", circo, "--split", "val",
         "--json", out, "--submission", files)
    printed = capsys.readouterr().out
    for label in ("mAP@5 ", "mAP@10 ", "mAP@25 ", "mAP@50 ", "R@5 ", "R@10 ", "R@25 ", "R@50 ", "aspect color"):
        assert label in printed
    res = json.loads(out.read_text())
    predictions = json.loads((files / "circo-val.json").read_text())
    assert all(isinstance(i, int) for ids in predictions.values() for i in ids)
    annotations = {str(a["id"]): a for a in json.loads((circo / "annotations" / "val.json").read_text())}
    # CIRCO's evaluation: AP@k = sum of precision at each ground-truth rank <= k over min(#gt, k);
    # Recall@k counts target_img_id only
    for k in (5, 10, 25, 50):
        aps, hits = [], []
        for q, ids in predictions.items():
            gt = annotations[q]["gt_img_ids"]
            ranks = [r for r, i in enumerate(ids[:k], start=1) if i in gt]
            aps.append(sum(n / r for n, r in enumerate(ranks, start=1)) / min(len(gt), k))
            hits.append(annotations[q]["target_img_id"] in ids[:k])
        assert res["map"][str(k)] == pytest.approx(100 * sum(aps) / len(aps))
        assert res["recall"][str(k)] == 100 * sum(hits) / len(hits)
    assert "1" not in res["recall"]


def test_circo_test_submission_file(circo, tiny_checkpoint, tmp_path):
    for image_id in range(1000, 1055):  # 60 gallery images in all
        _image(circo / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg", "JPEG", image_id)
    _json(circo / "annotations" / "test.json", [
        {"id": q, "reference_img_id": ref, "relative_caption": f"caption {q}", "shared_concept": "a thing"}
        for q, ref in enumerate([3, 1010, 1054])])
    _run("--checkpoint", tiny_checkpoint, "--dataset", "circo", "--root", circo, "--split", "test",
         "--submission", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["circo-test.json"]
    predictions = json.loads((tmp_path / "out" / "circo-test.json").read_text())
    gallery = {1, 2, 3, 40, 500, *range(1000, 1055)}
    assert list(predictions) == ["0", "1", "2"]
    for ids in predictions.values():
        assert len(ids) == len(set(ids)) == 50 and all(type(i) is int for i in ids) and set(ids) <= gallery


def test_evaluate_reuses_an_index(cirr, tiny_checkpoint, tmp_path, monkeypatch):
    import cir.retrieval.evaluate
    from cir.index import build_index

    _run("--checkpoint", tiny_checkpoint, "--dataset", "cirr", "--root", cirr, "--json", tmp_path / "embedded.json")
    build_index(tmp_path / "index", cirr / "img_raw" / "dev", tiny_checkpoint)

    def no_embedding(*args, **kwargs):
        raise AssertionError("the gallery was embedded again")
    monkeypatch.setattr(cir.retrieval.evaluate, "embed_gallery", no_embedding)
    _run("--dataset", "cirr", "--root", cirr, "--index", tmp_path / "index", "--json", tmp_path / "indexed.json")
    embedded, indexed = (json.loads((tmp_path / f).read_text()) for f in ("embedded.json", "indexed.json"))
    assert indexed == embedded
    (cirr / "img_raw" / "dev" / "dev-9-0-img0.png").rename(tmp_path / "moved.png")
    build_index(tmp_path / "index", cirr / "img_raw" / "dev", tiny_checkpoint)
    (tmp_path / "moved.png").rename(cirr / "img_raw" / "dev" / "dev-9-0-img0.png")
    with pytest.raises(UserError, match=r"index .* lacks 1 of the 7 gallery images, e\.g\. .*dev-9-0-img0\.png"):
        _run("--dataset", "cirr", "--root", cirr, "--index", tmp_path / "index")


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "circo", "--root", ".", "--split", "train"], r"circo has the splits val, test, not 'train' \(CIRCO has no training split\)"),
    (["--dataset", "cirr"], r"--dataset cirr needs --root"),
    (["--triplets", "t.jsonl", "--gallery", "g", "--submission", "out"], r"--submission needs --dataset"),
    (["--dataset", "cirr", "--root", ".", "--triplets", "t.jsonl"], r"--triplets and --gallery are for triplet JSONL"),
    (["--dataset", "circo", "--root", ".", "--split", "test", "--submission", "o", "--json", "r.json"],
     r"circo test has no public ground truth.*\(not --json\)"),
    (["--dataset", "cirr", "--root", ".", "--split", "test1", "--submission", "o", "--reference", "keep"],
     r"--reference keep: CIRR's server takes rankings without the reference"),
])
def test_evaluate_flag_mistakes(argv, message):
    with pytest.raises(UserError, match=message):
        _run(*argv)


def test_export_cirr_as_triplet_files(cirr, tmp_path):
    from cir.data.benchmarks import main
    from cir.data.triplets import read_gallery, read_triplets

    main(["--dataset", "cirr", "--root", str(cirr), "--split", "val", "--out", str(tmp_path / "out")])
    triplets, gallery = read_cirr(cirr, "val")
    assert read_triplets(tmp_path / "out" / "val.jsonl")[0] == triplets
    assert read_gallery(tmp_path / "out" / "gallery_val.txt") == gallery
    with pytest.raises(UserError, match=r"circo has the splits val, test, not 'train' \(CIRCO has no training split\)"):
        main(["--dataset", "circo", "--root", str(cirr), "--split", "train", "--out", str(tmp_path / "out")])


def test_train_on_cirr_from_its_layout(cirr, tmp_path):
    """cir.train --dataset cirr: the train split (here the val split under the train names) is written
    once into OUT/data with its parsed noun phrases cached there; a resumed run reuses both."""
    import subprocess
    import sys
    train_names = {f"train-{m}": f"./train/{m}.png" for m in MEMBERS}
    _json(cirr / "image_splits" / "split.rc2.train.json", train_names)
    for n, rel in enumerate(train_names.values()):
        _image(cirr / "img_raw" / rel, "PNG", n)
    names = list(train_names)
    _json(cirr / "captions" / "cap.rc2.train.json", [
        {"pairid": 1, "reference": names[0], "target_hard": names[2], "target_soft": {names[2]: 1.0},
         "caption": "make the dog blue", "img_set": {"id": 1, "members": names, "reference_rank": 0, "target_rank": 2}},
        {"pairid": 2, "reference": names[3], "target_hard": names[4], "target_soft": {names[4]: 1.0},
         "caption": "two cats on a sofa", "img_set": {"id": 1, "members": names, "reference_rank": 3, "target_rank": 4}}])
    out = tmp_path / "run"
    train = [sys.executable, "-m", "cir.train", "--config", "context-cir-tiny", "--dataset", "cirr", "--root", str(cirr),
             "--out", str(out), "--batch-size", "2", "--warmup", "1", "--workers", "0", "--val-every", "2",
             "--save-every", "1", "--lambda-cc", "0.5"]
    r = subprocess.run(train + ["--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    triplets = read_triplets_of(out / "data" / "train.jsonl")
    assert [t.caption for t in triplets] == ["make the dog blue", "two cats on a sofa"]
    assert len(read_triplets_of(out / "data" / "val.jsonl")) == 2
    written = {f.name: f.stat().st_mtime_ns for f in (out / "data").iterdir()}
    assert any("phrase" in name or "np" in name for name in written), written  # the parsed phrases, cached
    assert "step 2: val R@1" in r.stdout + r.stderr
    r = subprocess.run(train + ["--steps", "3", "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {f.name: f.stat().st_mtime_ns for f in (out / "data").iterdir()} == written
    bad = subprocess.run(train[:5] + ["--dataset", "circo", "--root", str(cirr), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "CIRCO has no training split" in bad.stderr and "Traceback" not in bad.stderr


def read_triplets_of(path):
    from cir.data.triplets import read_triplets
    return read_triplets(path)[0]
