"""Hostile image files at every entry point: the one loader (cir.data.images.load_rgb), triplet-file
reading, the gallery index build (folder and list), the app's in-memory gallery, the app's query
callbacks and the served upload. Each kind of tests/hostile_inputs.IMAGE_KINDS is either handled
correctly (the RGB picture a viewer shows) or rejected with a one-line reason naming the file."""
import io
import json
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from cir.checkpoint import load_checkpoint
from cir.data.images import MAX_IMAGE_PIXELS, BadImage, load_rgb, open_image
from cir.data.triplets import BadLine, read_gallery, read_triplets
from cir.errors import UserError
from cir.index import MANIFEST, GalleryIndex, build_index, read_index, read_resolved_manifest, update_index
from cir.ui import retrieve_tab, why_panel
from cir.ui.explorer import Explorer
from hostile_inputs import (BAD_KINDS, GOOD_KINDS, IMAGE_KINDS, one_line, png_declaring, served, triplet_line,
                            write_images)

SMALL = dict(chunk_size=8, batch_size=4, workers=0)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{kind: path} of one file per hostile kind, in a folder of their own."""
    return write_images(tmp_path_factory.mktemp("hostile") / "images")


# ---------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_loader_handles_or_rejects(hostile, kind):
    check = IMAGE_KINDS[kind][1]
    t0 = time.perf_counter()
    if check is not None:
        check(load_rgb(str(hostile[kind])))
        with open(hostile[kind], "rb") as f:  # a file object (the index build reads bytes) gives the same
            assert np.array_equal(np.asarray(load_rgb(f, name="x")), np.asarray(load_rgb(str(hostile[kind]))))
    else:
        with pytest.raises(BadImage) as e:
            load_rgb(str(hostile[kind]))
        assert isinstance(e.value, UserError) and isinstance(e.value, OSError)  # both kinds of handler catch it
        assert one_line(str(e.value)) and str(hostile[kind]) in str(e.value) and e.value.reason
    assert time.perf_counter() - t0 < 2.0  # bombs are refused from their header, never decoded


def test_pixel_limit_is_project_wide():
    """PIL's own guard carries the project's limit, so code outside cir (Gradio's upload handling)
    refuses bombs too; the loader's message names the limit."""
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match=f"{MAX_IMAGE_PIXELS:,}"):
        open_image(io.BytesIO(png_declaring(MAX_IMAGE_PIXELS // 1000 + 1, 1000)), name="bomb")
    open_image(io.BytesIO(png_declaring(MAX_IMAGE_PIXELS // 1000, 1000)), name="at the limit").close()


def test_every_image_is_opened_by_the_one_loader():
    """No code outside cir/data/images.py opens image files itself (so the limits, EXIF orientation
    and mode handling apply everywhere)."""
    root = Path(__file__).resolve().parent.parent
    files = [*root.joinpath("cir").rglob("*.py"), root / "app.py", *root.joinpath("scripts").glob("*.py")]
    openers = [f"{f.relative_to(root)}:{n}" for f in files if f.name != "images.py" or f.parent.name != "data"
               for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
               if "Image.open(" in line or "imageio" in line or "cv2.imread" in line]
    assert openers == []


# ---------------------------------------------------------------------------- triplet files
def test_triplet_file_reading(hostile, tmp_path):
    good = str(hostile["rgb-jpeg"])
    lines = [triplet_line(f"q-{k}", str(p), "make it red", [good]) for k, p in hostile.items()]
    lines += [triplet_line(f"t-{k}", good, "make it red", [str(hostile[k])]) for k in BAD_KINDS]  # bad targets too
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    triplets, problems = read_triplets(path, skip_bad=True)
    assert [t.id for t in triplets] == [f"q-{k}" for k in GOOD_KINDS]
    assert len(problems) == 2 * len(BAD_KINDS)
    for kind, why in zip(BAD_KINDS * 2, problems):
        assert one_line(why) and str(hostile[kind]) in why, why
    # without skip_bad the first bad line stops the read with a one-line error naming file and line
    with pytest.raises(BadLine) as e:
        read_triplets(path)
    first_bad = list(IMAGE_KINDS).index(BAD_KINDS[0]) + 1
    assert one_line(str(e.value)) and f"hostile.jsonl:{first_bad}:" in str(e.value)


# ---------------------------------------------------------------------------- index builds
def test_index_build_skips_and_lists_bad_files(hostile, tiny_checkpoint, shapes_data, tmp_path, capfd):
    gallery = tmp_path / "gallery"
    write_images(gallery)
    for p in read_gallery(shapes_data / "gallery_test.txt")[:6]:
        (gallery / ("shape-" + p.rsplit("/", 1)[1])).write_bytes(open(p, "rb").read())
    out = tmp_path / "idx"
    r = build_index(out, gallery, tiny_checkpoint, **SMALL)
    err = capfd.readouterr().err
    manifest, stored, _ = read_index(out)
    all_paths = read_gallery(gallery)
    bad = {str(gallery / hostile[k].name) for k in BAD_KINDS}
    assert r["skipped"] == len(BAD_KINDS) and r["images"] == len(all_paths) - len(BAD_KINDS)
    assert stored == [p for p in all_paths if p not in bad]
    assert {s["path"] for s in manifest["skipped"]} == bad
    assert all(one_line(s["reason"]) for s in manifest["skipped"])
    assert f"skipped {len(BAD_KINDS)} of {len(all_paths)}" in err and all(p in err for p in bad)

    # handled kinds are embedded as the loader sees them (EXIF applied, alpha over white, 16 bit scaled)
    index = GalleryIndex.load(out, checkpoint_path=tiny_checkpoint)
    model, preprocess, _ = load_checkpoint(tiny_checkpoint)
    rows = dict(zip(index.paths, np.asarray(index.embeddings)))
    for k in GOOD_KINDS:
        path = str(gallery / hostile[k].name)
        want = model.encode_gallery(preprocess(load_rgb(path))[None])[0].numpy()
        np.testing.assert_allclose(rows[path], want, atol=1e-5)
    assert np.isfinite(np.asarray(index.embeddings)).all()
    scores, ids = index.search(np.asarray(index.embeddings[:3]), 5)
    assert (ids[:, 0] >= 0).all()

    # update: a new unreadable file is skipped, the rest kept
    (gallery / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    r = update_index(out, gallery, tiny_checkpoint, **SMALL)
    assert r["kept"] == len(index) and r["skipped"] == len(BAD_KINDS) + 1
    assert str(gallery / "late.png") in {s["path"] for s in read_resolved_manifest(out)["skipped"]}

    # a gallery of nothing but bad files is a one-line error, and the index there is untouched
    only_bad = tmp_path / "only-bad"
    write_images(only_bad, BAD_KINDS)
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(UserError) as e:
        build_index(out, only_bad, tiny_checkpoint, **SMALL)
    assert one_line(str(e.value)) and "can be read" in str(e.value)
    assert (out / MANIFEST).read_bytes() == before


def test_index_build_summary_adds_up(hostile, tiny_checkpoint, tmp_path, capsys):
    """The CLI's one-line summary: images indexed + unreadable skipped = files read."""
    from cir.index import main

    gallery = tmp_path / "gallery"
    write_images(gallery)
    main(["build", "--gallery", str(gallery), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "idx"),
          "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    n = len(read_gallery(gallery))
    assert (f"{n - len(BAD_KINDS)} images indexed, {len(BAD_KINDS)} unreadable skipped ({n} files read now, "
            "0 resumed from an earlier run)") in line, line


def test_index_build_from_a_list_file_with_resume(hostile, tiny_checkpoint, tmp_path, capfd):
    """The skip list survives an interrupted build: chunks record their problems, a resumed build
    reports the same skipped files without reading them again."""
    listing = tmp_path / "gallery.txt"
    listing.write_text("\n".join(str(hostile[k]) for k in IMAGE_KINDS) + "\n")
    out = tmp_path / "idx"
    first = build_index(out, listing, tiny_checkpoint, **SMALL)
    work = tmp_path / "idx.partial"
    work.mkdir()
    # replay an interrupted build: its first chunk is on disk, then resume
    import cir.index as cix
    paths = read_gallery(listing)
    model, preprocess, _ = load_checkpoint(tiny_checkpoint)
    key = cix._plan_key(cix.model_hash(tiny_checkpoint), paths)
    cix.embed_images(model, preprocess, paths[:8], work, key, **{k: SMALL[k] for k in ("chunk_size", "batch_size")},
                     progress=False)
    (work / "plan.json").write_text(json.dumps({"key": key, "count": len(paths), "chunk_size": 8}))
    capfd.readouterr()
    again = build_index(out, listing, tiny_checkpoint, resume=True, **SMALL)
    assert again["resumed"] == 8 and again["skipped"] == first["skipped"] == len(BAD_KINDS)
    assert "skipped" in capfd.readouterr().err


# ---------------------------------------------------------------------------- the app
def test_app_gallery_skips_bad_files(hostile, tiny_checkpoint, capfd):
    ex = Explorer.load(tiny_checkpoint, gallery=hostile["rgb-jpeg"].parent, device="cpu")
    assert sorted(ex.index.paths) == sorted(str(hostile[k]) for k in GOOD_KINDS)
    err = capfd.readouterr().err
    assert all(str(hostile[k]) in err for k in BAD_KINDS)


def test_app_query_callbacks(ex, hostile):
    """The Retrieve tab's callbacks with each kind as the uploaded query image."""
    for kind, path in hostile.items():
        good = IMAGE_KINDS[kind][1] is not None
        if good:
            _, table, status, paths, maps_image = retrieve_tab.run_retrieve(ex, str(path), None, "make the circle red",
                                                                            5)
            assert len(paths) == 5 and maps_image == str(path), kind
            rows, _, image, cc, info = why_panel.attention(ex, str(path), "make the red circle blue", [], None, "mean",
                                                           "mean", 0.005)
            assert image is not None and "Maps over" in info, kind
        else:
            for call in (lambda: retrieve_tab.run_retrieve(ex, str(path), None, "make the circle red", 5),
                         lambda: why_panel.attention(ex, str(path), "make the red circle blue", [], None, "mean",
                                                     "mean", 0.005)):
                with pytest.raises(gr.Error) as e:
                    call()
                assert one_line(e.value.message) and path.name in e.value.message, (kind, e.value.message)


def test_served_upload(ex, hostile):
    """Through the served /retrieve endpoint (Gradio's upload, then its image preprocessing, then ours):
    handled kinds retrieve, the others fail with a one-line reason, and the server keeps serving."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    with served(ex) as url:
        client = Client(url, verbose=False)
        for kind, path in hostile.items():
            if IMAGE_KINDS[kind][1] is not None:
                _, table, status = client.predict(handle_file(str(path)), "make it red", 3, api_name="/retrieve")
                assert len(table["data"]) == 3, kind
            else:
                with pytest.raises(AppError) as e:
                    client.predict(handle_file(str(path)), "make it red", 3, api_name="/retrieve")
                message = str(e.value)
                assert one_line(message) and path.name in message and "cannot read image" in message, (kind, message)
                assert os.path.join(tempfile.gettempdir(), "gradio") not in message  # the server's paths stay private
        t = ex.examples[0]
        _, table, _ = client.predict(handle_file(t.reference), t.caption, 3, api_name="/retrieve")
        assert len(table["data"]) == 3
