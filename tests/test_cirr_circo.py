"""The official CIRR and CIRCO readers on tiny datasets written in their exact layouts."""
import json
import os

import pytest
from PIL import Image

from cir.data.circo import read_circo
from cir.data.cirr import read_cirr
from cir.data.triplets import Triplet
from cir.errors import UserError

MEMBERS = [f"dev-0-{i}-img0" for i in range(6)]


def _image(path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path, fmt)


def _json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def cirr(tmp_path):
    """val: 2 queries over one 6-image set plus an image in no set; test1: 1 query without targets."""
    names = {**{m: f"./dev/{m}.png" for m in MEMBERS}, "dev-9-0-img0": "./dev/dev-9-0-img0.png"}
    test_members = [f"test1-0-{i}-img0" for i in range(6)]
    for split, imgs in (("val", names), ("test1", {m: f"./test1/{m}.png" for m in test_members})):
        _json(tmp_path / "image_splits" / f"split.rc2.{split}.json", imgs)
        for rel in imgs.values():
            _image(tmp_path / rel, "PNG")
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
    p = {name: os.path.join(str(cirr), "dev", f"{name}.png") for name in [*MEMBERS, "dev-9-0-img0"]}
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
    assert t.reference == os.path.join(str(cirr), "test1", "test1-0-1-img0.png")
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
    with pytest.raises(UserError, match=r"file not found: .*captions/cap\.rc2\.train\.json"):
        read_cirr(cirr, "train")
    (cirr / "dev" / "dev-9-0-img0.png").unlink()
    with pytest.raises(UserError, match=r"split\.rc2\.val\.json: 1 of 7 images not found, e\.g\. .*dev-9-0-img0\.png"):
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
    ({"id": 0, "reference_img_id": 1, "gt_img_ids": "2", "relative_caption": "x", "shared_concept": "y"},
     r"val\.json: entry 0: field 'gt_img_ids' must be a list of int"),
    ({"id": 0, "reference_img_id": 9, "gt_img_ids": [2], "relative_caption": "x", "shared_concept": "y"},
     r"val\.json: entry 0: image not found: .*000000000009\.jpg"),
    ("not an object", r"val\.json: entry 0: expected an object, got str"),
])
def test_read_circo_malformed_entry(circo, entry, message):
    _json(circo / "annotations" / "val.json", [entry])
    with pytest.raises(UserError, match=message):
        read_circo(circo, "val")


def test_read_circo_missing_files(circo, tmp_path):
    with pytest.raises(UserError, match=r"file not found: .*annotations/train\.json"):
        read_circo(circo, "train")
    with pytest.raises(UserError, match=r"CIRCO image folder not found: .*nowhere"):
        read_circo(circo, "val", image_dir=tmp_path / "nowhere")

