"""Damaged or mismatched files the project owns: checkpoints (wrong architecture, truncated, not
safetensors, bad manifests), gallery indexes (built by another checkpoint, damaged parts), review
logs (a last line half-written by a crash, at every byte) and triplet files. Each is detected and
explained in one line (a UserError); a review log recovers every complete line. Gallery images
deleted or overwritten after the index was built are shown by the served app as missing."""
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cir.checkpoint import FORMAT, load_checkpoint, read_manifest, save_checkpoint
from cir.data.triplets import read_gallery, read_triplets, write_triplets
from cir.errors import UserError
from cir.index import EMBEDDINGS, FAISS_FILE, MANIFEST, GalleryIndex, build_index, update_index
from cir.models.factory import build_model, config_from_dict, load_config
from cir.retrieval.store import HASHES, PATH_TABLE, PATHS
from cir.ui import retrieve_tab, review, review_file, review_tab
from cir.ui.access import FileAccess
from cir.ui.explorer import Explorer
from cir.ui.thumbnails import thumbnail
from hostile_inputs import one_line, served

ROOT = Path(__file__).resolve().parent.parent
TINY = load_config("context-cir-tiny").to_dict()


def assert_user_error(call, *fragments):
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert one_line(message), message
    for f in fragments:
        assert f in message, (f, message)
    return message


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_with_the_wrong_architecture(tiny_checkpoint, tmp_path):
    torch.manual_seed(0)
    model, _ = build_model("context-cir-tiny")
    deeper = tmp_path / "deeper.safetensors"  # the manifest names 3 fusion layers, the weights have 2
    save_checkpoint(deeper, model, {"config": dict(TINY, fusion_layers=3), "step": 0})
    assert_user_error(lambda: load_checkpoint(deeper), str(deeper), "does not fit", "missing")
    narrow, _ = build_model(config_from_dict(dict(TINY, fusion_width=32)))
    wrong = tmp_path / "narrow.safetensors"  # weights of a narrower model under the tiny manifest
    save_checkpoint(wrong, narrow, {"config": TINY, "step": 0})
    assert_user_error(lambda: load_checkpoint(wrong), "does not fit", "wrong shape")
    nonsense = tmp_path / "nonsense.safetensors"
    save_checkpoint(nonsense, model, {"config": dict(TINY, fusion_heads=7), "step": 0})  # 64 not divisible by 7
    assert_user_error(lambda: load_checkpoint(nonsense), str(nonsense))
    unknown = tmp_path / "unknown.safetensors"
    save_checkpoint(unknown, model, {"config": dict(TINY, secret_layer=1), "step": 0})
    assert_user_error(lambda: load_checkpoint(unknown), "unknown model config keys")
    # and the app refuses it the same way
    assert_user_error(lambda: Explorer.load(wrong, gallery=tmp_path), "does not fit")


def test_a_manifest_claiming_a_large_model_is_refused_before_it_is_built(tiny_checkpoint, tmp_path):
    """A 76 KB file whose manifest names ViT-L-14 towers (1.7 GB in fp32) is checked against its
    tensors on the meta device and refused in one line, without the model ever being allocated."""
    manifest = read_manifest(tiny_checkpoint)
    manifest["config"].update(clip_model="ViT-L-14", context_length=77)
    liar = tmp_path / "liar.safetensors"
    save_file({"clip.logit_scale": torch.zeros(())}, str(liar), metadata={"manifest": json.dumps(manifest)})
    probe = ("import resource, sys\nfrom cir.checkpoint import load_checkpoint\nfrom cir.errors import UserError\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             f"try:\n    load_checkpoint({str(liar)!r})\nexcept UserError as e:\n    print('refused:', e)\n"
             "print('growth_mb', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    out = r.stdout.splitlines()
    assert out[0].startswith("refused: checkpoint") and "does not fit the architecture its manifest names" in out[0]
    assert float(out[1].split()[1]) < 300  # building the towers for real grows the process by over 1.5 GB


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_checkpoint_with_non_finite_weights(tmp_path, shapes_data, bad):
    """Served with --gallery, such a checkpoint used to give "0 results" silently."""
    torch.manual_seed(0)
    model, _ = build_model("context-cir-tiny")
    with torch.no_grad():
        model.fusion.blocks[0].text_to_image.q.weight[0, 0] = bad
    path = tmp_path / "broken.safetensors"
    save_checkpoint(path, model, {"config": TINY, "step": 0})
    assert_user_error(lambda: load_checkpoint(path), str(path), "non-finite", "fusion.blocks.0.text_to_image.q.weight")
    assert_user_error(lambda: Explorer.load(path, gallery=shapes_data / "gallery_test.txt"), "non-finite")


@pytest.mark.parametrize("manifest", [None, "{not json", "[1, 2]", json.dumps({"format": "other/9"}),
                                      json.dumps({"format": FORMAT}), "[" * 100_000])
def test_checkpoint_with_a_bad_manifest(tmp_path, manifest):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata=None if manifest is None else {"manifest": manifest})
    assert_user_error(lambda: load_checkpoint(path), str(path))


def test_checkpoint_show_takes_the_checkpoint_flag(tiny_checkpoint, capsys):
    """`show --checkpoint FILE` like every other tool; a positional file is an argument error."""
    from cir.checkpoint import main

    assert main(["show", "--checkpoint", str(tiny_checkpoint)]) == 0
    assert json.loads(capsys.readouterr().out) == read_manifest(tiny_checkpoint)
    with pytest.raises(SystemExit) as e:
        main(["show", str(tiny_checkpoint)])
    assert e.value.code == 2 and "--checkpoint" in capsys.readouterr().err


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    header = int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8, 60, header + 8, header + 9, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut-{cut}.safetensors"
        path.write_bytes(data[:cut])
        assert_user_error(lambda: load_checkpoint(path), str(path))
        path.unlink()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 4096)
    assert_user_error(lambda: read_manifest(junk), "not a complete safetensors file")
    # the command line says it in one line, exit status 2
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 3])
    run = subprocess.run([sys.executable, "-m", "cir.checkpoint", "export", "--checkpoint", str(cut), "--out",
                          str(tmp_path / "o.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and one_line(run.stderr) and "cut.safetensors" in run.stderr
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------------------- gallery indexes
@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_checkpoint, shapes_data):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(out, read_gallery(shapes_data / "gallery_test.txt")[:12], tiny_checkpoint, chunk_size=8, batch_size=8)
    return out


def test_index_built_by_another_checkpoint(index, tiny_checkpoint, shapes_data, tmp_path):
    torch.manual_seed(1)
    other_model, _ = build_model("context-cir-tiny")
    other = tmp_path / "other.safetensors"  # same architecture, other weights
    save_checkpoint(other, other_model, {"config": TINY, "step": 0})
    from cir.checkpoint import model_hash
    both = (model_hash(other), model_hash(tiny_checkpoint))
    assert_user_error(lambda: GalleryIndex.load(index, checkpoint_path=other), *both)
    assert_user_error(lambda: Explorer.load(other, index), *both)
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    before = {f.name: f.read_bytes() for f in copy.iterdir()}
    assert_user_error(lambda: update_index(copy, shapes_data / "gallery_test.txt", other), *both)
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before
    GalleryIndex.load(index, checkpoint_path=tiny_checkpoint)  # the right one still opens it


@pytest.mark.parametrize("damage", ["manifest-half", "manifest-deep", "manifest-binary", "embeddings-cut",
                                    "embeddings-junk", "faiss-cut", "faiss-junk", "faiss-missing", "paths-cut",
                                    "table-junk", "sha256-missing"])
def test_damaged_index(index, tiny_checkpoint, tmp_path, damage):
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    part, how = damage.split("-")
    path = copy / {"manifest": MANIFEST, "embeddings": EMBEDDINGS, "faiss": FAISS_FILE, "paths": PATHS,
                   "table": PATH_TABLE, "sha256": HASHES}[part]
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes({"half": data[: len(data) // 2], "cut": data[: len(data) - 100], "junk": b"\x93NUMPY junk" * 10,
                          "deep": b"[" * 100_000, "binary": b"\xff\xfe\x00garbage"}[how])
    assert_user_error(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), str(copy))


# ---------------------------------------------------------------------------- gallery images gone or broken
@pytest.fixture(scope="module")
def two_pages(tmp_path_factory, tiny_checkpoint, shapes_data):
    """A folder with `images`, two pages of the gallery browser (PER_PAGE + 2 images), and their `index`."""
    tree = tmp_path_factory.mktemp("two-pages")
    (tree / "images").mkdir()
    for p in read_gallery(shapes_data / "gallery_test.txt")[:retrieve_tab.PER_PAGE + 2]:
        shutil.copy(p, tree / "images")
    build_index(tree / "index", tree / "images", tiny_checkpoint)
    return tree


def served_with_damage(two_pages, tiny_checkpoint, tmp_path, damage: dict[int, bytes | None]) -> tuple:
    """The app over a copy of `two_pages` whose image of row i is, after its index was built, given
    the bytes `damage[i]` or deleted (None); served, it makes a retrieve that ranks every image.
    -> (explorer, labels of the served first gallery page's images shown as the "image missing"
    tile, labels of the results shown as that tile)."""
    from gradio_client import Client, handle_file

    shutil.copytree(two_pages, tmp_path / "tree")
    ex = Explorer.load(tiny_checkpoint, tmp_path / "tree" / "index", device="cpu")
    intact = next(p for i, p in enumerate(ex.index.paths) if i not in damage)
    for row, data in damage.items():
        if data is None:
            Path(ex.index.paths[row]).unlink()
        else:
            Path(ex.index.paths[row]).write_bytes(data)
    tile = Path(thumbnail.missing())
    with served(ex) as url:
        with urllib.request.urlopen(url + "config") as r:
            components = json.load(r)["components"]
        first = next(c for c in components if c.get("props", {}).get("elem_id") == "browser")["props"]["value"]
        on_page = [item for item in first if item["image"]["orig_name"] == tile.name]
        for item in on_page:
            with urllib.request.urlopen(item["image"]["url"]) as r:
                assert r.read() == tile.read_bytes()
        client = Client(url, verbose=False, download_files=False)
        items, table, status = client.predict(handle_file(intact), "make the circle red", len(ex.index),
                                              api_name="/retrieve")
    assert len(first) == retrieve_tab.PER_PAGE and Image.open(tile).size == (256, 256)
    assert f"{len(ex.index)} results" in status and len(items) == len(table["data"]) == len(ex.index)
    inline = thumbnail.data_url(tile)
    results = [row[2] for item, row in zip(items, table["data"]) if item["image"]["url"] == inline]
    return ex, [item["caption"] for item in on_page], results


def test_a_non_image_on_the_first_gallery_page_is_shown_as_missing(two_pages, tiny_checkpoint, tmp_path):
    """A gallery image overwritten with HTML after the build: the app starts, and its first gallery
    page and a retrieve that ranks it show it as missing."""
    ex, on_page, in_results = served_with_damage(two_pages, tiny_checkpoint, tmp_path, {1: b"<!doctype html><p>"})
    label = ex.label(ex.index.paths[1])
    assert on_page == in_results == [label]


@pytest.mark.parametrize("row", [0, retrieve_tab.PER_PAGE + 1], ids=["first-page", "second-page"])
def test_a_gallery_image_deleted_after_the_build_is_shown_as_missing(two_pages, tiny_checkpoint, tmp_path, row):
    """A gallery image deleted after the build: the app starts, its gallery page and a retrieve that
    ranks it show it as missing; the other images are shown."""
    ex, on_page, in_results = served_with_damage(two_pages, tiny_checkpoint, tmp_path, {row: None})
    label = ex.label(ex.index.paths[row])
    assert on_page == ([label] if row < retrieve_tab.PER_PAGE else []) and in_results == [label]
    page, _, _ = retrieve_tab.browse(ex, "", row // retrieve_tab.PER_PAGE)
    assert [name for tile, name in page if tile == thumbnail.missing()] == [label]


# ---------------------------------------------------------------------------- review logs and stores
def test_a_review_log_cut_at_every_byte_of_its_last_line_is_taken_in_whole(tmp_path):
    """A JSONL review log beside a triplet file is taken into its new store with every complete line,
    however a crash cut its last one."""
    complete = [review.decision("a", "accept"), review.decision("b", "reject", note="blurry, 模糊"),
                review.decision("c", "edit", caption="make the 🔴 circle blue", annotator="ada")]
    good = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in complete).encode("utf-8")
    last = (json.dumps(review.decision("d", "edit", note="ünïcödé ✓", caption="a new caption 🟦"),
                       ensure_ascii=False) + "\n").encode("utf-8")
    log = tmp_path / "x.review.jsonl"
    for cut in range(1, len(last)):  # every way a crash can cut the last write (the full line is below)
        log.write_bytes(good + last[:cut])
        store = tmp_path / f"x{cut}.review.sqlite"
        review.open_store(store, log)
        got = review.read_records(store)
        assert got == complete + ([json.loads(last)] if cut == len(last) - 1 else []), cut  # only the newline lost: kept
        review.append_decision(store, review.decision("e", "accept"))  # and decisions continue in the store
        assert set(review.read_decisions(store)) >= {"a", "b", "c", "e"}
    for tail in (b"\x00" * 300, b"\xff\xfe\xfd", b"[" * 100_000, b'{"id": "z", "decision": "acc'):
        log.write_bytes(good + tail)  # a power cut can leave zeros; anything unparsable at the end is dropped
        store = tmp_path / "tail.review.sqlite"
        store.unlink(missing_ok=True)
        assert review.open_store(store, log) == {r["id"]: r for r in complete}
    for bad in (b"\x00\x00\x00\n" + good, b'{"id": "q", "decision": "accept", "note": null}\n',
                b'{"id": "q", "decision": "edit", "caption": "\\ud800"}\n'):
        log.write_bytes(good + bad)  # damage in the middle, or a record the store cannot keep: reported
        assert_user_error(lambda: review.open_store(tmp_path / "bad.review.sqlite", log), "x.review.jsonl:4:")
    assert not (tmp_path / "bad.review.sqlite").exists() or review.read_records(tmp_path / "bad.review.sqlite") == []


@pytest.mark.parametrize("content", [b"", b"not a database" * 300, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_damaged_review_store_is_refused_in_one_line(shapes_data, tmp_path, content):
    src = tmp_path / "batch.jsonl"
    write_triplets(src, read_triplets(shapes_data / "test.jsonl")[0][:2])
    review.store_path(src).write_bytes(content)
    if not content:  # an empty file is an empty store
        assert review_file.review_open(FileAccess([tmp_path]), str(src))["pos"] == 0
        return
    assert_user_error(lambda: review.read_decisions(review.store_path(src)), "batch.review.sqlite: not a review store")
    with pytest.raises(Exception, match="batch.review.sqlite: not a review store"):
        review_file.review_open(FileAccess([tmp_path]), str(src))
    assert review.store_path(src).read_bytes() == content


def test_review_tab_opens_a_crashed_log(tiny_checkpoint, shapes_data, tmp_path):
    src = tmp_path / "batch.jsonl"
    triplets = read_triplets(shapes_data / "test.jsonl")[0][:4]
    write_triplets(src, triplets)
    log = review.log_path(src)
    log.write_text("".join(json.dumps(review.decision(t.id, kind)) + "\n"
                           for t, kind in zip(triplets, ("accept", "reject"))))
    log.write_bytes(log.read_bytes() + b'{"id": "' + triplets[2].id.encode() + b'", "decision": "acc')
    state = review_file.review_open(FileAccess([tmp_path]), str(src))
    store = review.store_path(src)
    assert state["pos"] == 2 and set(review.read_decisions(store)) == {triplets[0].id, triplets[1].id}
    state = review_tab.review_decide(state, triplets[2].caption, "", kind="accept")
    assert state["pos"] == 3 and review.read_decisions(store)[triplets[2].id]["decision"] == "accept"
    assert review_file.review_open(FileAccess([tmp_path]), str(src))["pos"] == 3  # the log is taken in once


# ---------------------------------------------------------------------------- triplet files
@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01binary", b'{"id": "1", "caption": "x"}\x00\n', b"[" * 100_000 + b"\n",
                                     b'"just a string"\n', b'{"id": 1, "reference": "a", "caption": "c", "targets": []}\n',
                                     b'{"id": "1", "reference": "a", "caption": "c", "targets": "a"}\n',
                                     b'{"id": "1", "reference": "a", "caption": "c", "targets": [],'
                                     b' "noun_phrases": [{"start": 0, "end": 99}]}\n'])
def test_broken_triplet_file(tmp_path, content):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    assert_user_error(lambda: read_triplets(path, check_images=False), "t.jsonl")
