"""The triplet JSONL reader/writer: error rules of the spec, unknown fields, gallery normalisation."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from cir.data.triplets import Triplet, read_gallery, read_triplets, write_triplets
from cir.errors import UserError


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def line(**kw):
    base = {"id": "q1", "reference": "img/a.png", "caption": "make it red", "targets": ["img/b.png"]}
    return json.dumps(base | kw)


def write(folder, *lines):
    p = folder / "t.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_roundtrip_keeps_unknown_fields(folder):
    p = write(folder, line(extra_field={"x": 1}, meta={"num_modifications": 1},
                           noun_phrases=[{"text": "it", "start": 5, "end": 7}]),
              line(id="q2", targets=["img/b.png", "img/c.png"], subset=["img/a.png", "./img/../img/c.png"]))
    triplets, problems = read_triplets(p)
    assert problems == [] and [t.id for t in triplets] == ["q1", "q2"]
    assert triplets[0].reference == str((folder / "img" / "a.png").resolve())
    assert triplets[1].subset[1] == str((folder / "img" / "c.png").resolve())
    assert triplets[0].extra == {"extra_field": {"x": 1}}
    out = folder / "sub" / "out.jsonl"
    write_triplets(out, triplets)
    again, _ = read_triplets(out)
    assert again == triplets
    assert json.loads(out.read_text().splitlines()[0])["reference"] == "../img/a.png"


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "x", "reference": "img/a.png", "caption": "c"}), "missing required field 'targets'"),
    (json.dumps({"id": "x", "caption": "c", "targets": []}), "missing required field 'reference'"),
    (line(id="q9", reference="img/nope.png"), "image not found"),
    (line(id="q9", targets=["img/broken.png"]), "cannot be decoded"),
    (line(id="q9", noun_phrases=[{"text": "x", "start": 3, "end": 99}]), "not a span inside the caption"),
    (line(), "duplicate id 'q1'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(folder, bad, message):
    p = write(folder, line(), bad, line(id="q3"))
    with pytest.raises(UserError) as e:
        read_triplets(p)
    assert f"{p}:2:" in str(e.value) and message in str(e.value)
    triplets, problems = read_triplets(p, skip_bad=True)
    assert [t.id for t in triplets] == ["q1", "q3"]
    assert len(problems) == 1 and message in problems[0]


def test_not_utf8_and_missing_file(folder):
    p = folder / "bad.jsonl"
    p.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_triplets(p)
    with pytest.raises(UserError, match="triplet file not found"):
        read_triplets(folder / "missing.jsonl")


def test_gallery_folder_and_list_normalise_paths(folder):
    from_dir = read_gallery(folder / "img")
    assert len(from_dir) == 4 and from_dir == sorted(from_dir)
    lst = folder / "g.txt"
    lst.write_text("img/a.png\n./img/a.png\nimg/../img/b.png\n\n" + str(folder / "img" / "c.png") + "\n")
    assert read_gallery(lst) == [str((folder / "img" / n).resolve()) for n in ("a.png", "b.png", "c.png")]
    with pytest.raises(UserError, match="gallery not found"):
        read_gallery(folder / "nothing")


def test_triplet_to_json_relative():
    t = Triplet(id="1", reference="/d/x/a.png", caption="c", targets=["/d/y/b.png"])
    assert t.to_json("/d/x") == {"id": "1", "reference": "a.png", "caption": "c", "targets": ["../y/b.png"]}
