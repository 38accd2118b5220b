"""A damaged gallery index is refused with one line when it is opened, never searched with wrong
answers: a reordered or cut image list, swapped image paths, an edited content hash, changed
vector files, missing manifest keys, a config that is not the checkpoint's, an index of an older
format. An image that resolves outside the index's gallery root (a `../` path, a link out of it,
a folder linked out of it) is refused even when the hash was made again, as is an image list whose
table does not describe its paths. Two builds to one folder never run at once."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from cir.data.triplets import read_gallery
from cir.errors import UserError
from cir.index import EMBEDDINGS, FAISS_FILE, MANIFEST, GalleryIndex, build_index, build_lock, update_index
from cir.retrieval.pathlist import PathList
from cir.retrieval.store import FORMAT, HASHES, PATH_TABLE, PATHS, digests, images_hash
from cir.ui.explorer import Explorer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_checkpoint, shapes_data):
    out = tmp_path_factory.mktemp("integrity") / "idx"
    build_index(out, read_gallery(shapes_data / "gallery_test.txt")[:12], tiny_checkpoint, chunk_size=8, batch_size=8)
    return out


@pytest.fixture
def copy(index, tmp_path):
    shutil.copytree(index, tmp_path / "idx")
    return tmp_path / "idx"


def edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def stored_images(folder) -> tuple[list[str], list[str]]:
    """(each image's path as stored, relative to the gallery root; its content sha256 in hex)."""
    blob, ends = np.load(folder / PATHS), np.load(folder / PATH_TABLE)[0]
    paths = [blob[s:e].tobytes().decode() for s, e in zip([0, *ends[:-1]], ends)]
    return paths, [h.tobytes().hex() for h in np.load(folder / HASHES)]


def edit_images(folder, change, rehash: bool = False) -> None:
    """Store `change(paths, sha256)` -> (paths, sha256) as the image list (both as `stored_images` gives
    them); `rehash` makes the manifest's integrity hash again, as an attacker can."""
    paths, sha256 = change(*stored_images(folder))
    listed = PathList(paths, "")  # stored as given: the root "" is no prefix
    for name, array in ((PATHS, listed.blob), (PATH_TABLE, listed.table), (HASHES, digests(sha256))):
        np.save(folder / name, array)
    if rehash:
        edit_manifest(folder, lambda m: m["integrity"].update(images=images_hash(m["root"], folder)))


def refused(call, *fragments) -> str:
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_an_intact_index_opens_and_its_hashes_are_stored(index, tiny_checkpoint, capsys):
    loaded = GalleryIndex.load(index, checkpoint_path=tiny_checkpoint)
    assert len(loaded) == 12 and set(loaded.manifest["integrity"]) == {"images", "embeddings", "faiss"}
    scores, ids = loaded.search(loaded.embeddings[:3], k=1)
    assert ids[:, 0].tolist() == [0, 1, 2]  # each vector finds itself
    Explorer.load(tiny_checkpoint, index, device="cpu")  # the app says what the index holds in memory
    err = capsys.readouterr().err
    assert "12 images, flat index: faiss 0.0 MB and vectors 0.0 MB, memory-mapped" in err and "MB private" in err


def test_reordered_image_list(copy, tiny_checkpoint):
    edit_images(copy, lambda paths, sha256: (paths[::-1], sha256[::-1]))
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), "image list", "rebuild")


def test_swapped_image_paths(copy, tiny_checkpoint):
    """Two images' paths swapped (their content hashes left in place): each vector would show the
    other image."""
    edit_images(copy, lambda paths, sha256: ([paths[1], paths[0], *paths[2:]], sha256))
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), str(copy), "image list", "paths",
            "rebuild")
    refused(lambda: Explorer.load(tiny_checkpoint, copy, device="cpu"), str(copy), "image list", "paths")


@pytest.mark.parametrize("edit", [
    lambda folder: edit_images(folder, lambda paths, sha256: (paths, sha256[:5] + ["0" * 64] + sha256[6:])),
    lambda folder: edit_manifest(folder, lambda m: m.update(root=m["root"] + "/elsewhere")),
], ids=["content hash", "root"])
def test_an_edited_content_hash_or_root(copy, tiny_checkpoint, edit):
    """A content hash edited (an update would keep a vector of other content), or the manifest's
    root moved: refused as a changed image list."""
    edit(copy)
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), str(copy), "image list", "rebuild")


def test_a_table_that_does_not_describe_the_paths(copy, tiny_checkpoint):
    """Path ends out of order in the table, the hash made again: refused in one line, not read past the paths."""
    table = np.load(copy / PATH_TABLE)
    table[0, [2, 3]] = table[0, [3, 2]]
    np.save(copy / PATH_TABLE, table)
    edit_manifest(copy, lambda m: m["integrity"].update(images=images_hash(m["root"], copy)))
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), str(copy), PATH_TABLE, "rebuild")


def private_image(tmp_path) -> Path:
    """A real image outside every gallery: what an attacker would have the app serve."""
    outside = tmp_path / "outside" / "private.png"
    outside.parent.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(outside)
    return outside


@pytest.mark.parametrize("rehashed", [False, True])
def test_a_path_out_of_the_gallery_root_is_refused(copy, tiny_checkpoint, tmp_path, rehashed):
    """An image pointed at `../../…/outside/private.png` from the gallery root: refused by the
    integrity hash, and, with the hash made again as an attacker can, by the root's confinement."""
    outside = private_image(tmp_path)
    loaded = GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint)
    root = os.path.normpath(copy / json.loads((copy / MANIFEST).read_text())["root"])
    edit_images(copy, lambda paths, sha256: ([*paths[:3], os.path.relpath(outside, root), *paths[4:]], sha256),
                rehashed)
    assert stored_images(copy)[0][3].startswith("../")
    fragments = ("outside the index's gallery root", str(outside)) if rehashed else ("image list", "rebuild")
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), str(copy), *fragments)
    refused(lambda: update_index(copy, loaded.paths, tiny_checkpoint), str(copy), *fragments)


def test_app_py_refuses_an_index_pointing_outside_its_root(copy, tiny_checkpoint, tmp_path):
    """`python app.py --index` over an index whose image (hash made again) points outside its root
    exits with one line naming the index, before serving anything."""
    outside = private_image(tmp_path)
    edit_images(copy, lambda paths, sha256: ([os.path.join(*[".."] * 12, *outside.parts[1:]), *paths[1:]], sha256),
                rehash=True)
    with socket.socket() as busy:  # an app that got as far as serving would stop at its port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        run = subprocess.run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(tiny_checkpoint), "--index",
                              str(copy), "--port", str(busy.getsockname()[1])], capture_output=True, text=True,
                             timeout=300)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr, run.stderr
    assert str(copy) in run.stderr and "outside the index's gallery root" in run.stderr and str(outside) in run.stderr


def test_a_link_out_of_the_gallery_root_is_refused(tiny_checkpoint, shapes_data, tmp_path):
    """A gallery image replaced by a symlink to a file outside the gallery root after the build is
    refused when the index opens; a gallery holding such a link is refused before a build embeds it."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for p in read_gallery(shapes_data / "gallery_test.txt")[:4]:
        shutil.copy(p, gallery)
    out = tmp_path / "idx"
    build_index(out, gallery, tiny_checkpoint)
    outside = private_image(tmp_path)
    linked = sorted(gallery.iterdir())[1]
    linked.unlink()
    linked.symlink_to(outside)
    refused(lambda: GalleryIndex.load(out, checkpoint_path=tiny_checkpoint), str(out), str(linked),
            "outside the index's gallery root")
    refused(lambda: build_index(tmp_path / "other", gallery, tiny_checkpoint), str(linked), "links outside")
    assert not (tmp_path / "other").exists()


def test_a_folder_linked_out_of_the_gallery_root_is_refused(tiny_checkpoint, shapes_data, tmp_path):
    """A gallery's subfolder replaced by a link to a folder outside the root after the build (the
    same file names there) is refused when the index opens."""
    gallery = tmp_path / "gallery"
    for i, p in enumerate(read_gallery(shapes_data / "gallery_test.txt")[:4]):
        (gallery / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, gallery / f"part{i % 2}")
    out = tmp_path / "idx"
    build_index(out, gallery, tiny_checkpoint)
    outside = tmp_path / "outside"
    (gallery / "part1").rename(outside)
    (gallery / "part1").symlink_to(outside)
    refused(lambda: GalleryIndex.load(out, checkpoint_path=tiny_checkpoint), str(out), str(gallery / "part1"),
            "outside the index's gallery root")


def test_an_index_of_the_previous_format_is_refused_and_rebuilt_in_place(copy, tiny_checkpoint, index):
    """A /3 index (its image list inside manifest.json) is refused; a build over it writes the current format."""
    edit_manifest(copy, lambda m: m.update(format="context-cir-index/3", images=[{"path": "a.png", "sha256": ""}]))
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), str(copy),
            f"unsupported index format 'context-cir-index/3' (expected {FORMAT})", "rebuild")
    paths = GalleryIndex.load(index).paths
    build_index(copy, paths, tiny_checkpoint)  # the advice works: a build replaces it
    assert GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint).paths == paths


def test_image_list_cut_to_ten(copy, tiny_checkpoint):
    edit_images(copy, lambda paths, sha256: (paths[:10], sha256[:10]), rehash=True)
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint),
            f"{PATH_TABLE} holds int64 (3, 10), the manifest says int64 (3, 12)")


def test_scrambled_embeddings(copy, tiny_checkpoint):
    emb = np.load(copy / EMBEDDINGS)
    np.save(copy / EMBEDDINGS, emb[::-1].copy())  # same shape and norms, rows swapped
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), EMBEDDINGS, "rebuild")


def test_scrambled_faiss_vectors(index, copy, tiny_checkpoint):
    emb = np.load(copy / EMBEDDINGS)
    scrambled = faiss.IndexFlatIP(emb.shape[1])
    scrambled.add(np.ascontiguousarray(emb[::-1]))
    faiss.write_index(scrambled, str(copy / FAISS_FILE))
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), FAISS_FILE, "rebuild")
    before = (copy / MANIFEST).read_bytes()
    refused(lambda: update_index(copy, GalleryIndex.load(index).paths, tiny_checkpoint), FAISS_FILE)
    assert (copy / MANIFEST).read_bytes() == before


@pytest.mark.parametrize("damage, key", [
    (lambda m: m.pop("count"), "'count'"),
    (lambda m: m.pop("checkpoint"), "'checkpoint'"),
    (lambda m: m["integrity"].pop("images"), "'integrity.images'"),
    (lambda m: m.update(count="12"), "has a str at 'count'"),
    (lambda m: m.pop("integrity"), "'integrity'"),
])
def test_missing_or_mistyped_manifest_keys(copy, tiny_checkpoint, damage, key):
    edit_manifest(copy, damage)
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), MANIFEST, key)
    cli = subprocess.run([sys.executable, "-m", "cir.index", "update", "--index", str(copy), "--gallery", str(copy)],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and key in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr


def test_manifest_config_that_is_not_the_checkpoints(copy, tiny_checkpoint):
    edit_manifest(copy, lambda m: m["config"].update(clip_model="ViT-L-14"))
    refused(lambda: GalleryIndex.load(copy, checkpoint_path=tiny_checkpoint), "model config")
    refused(lambda: Explorer.load(tiny_checkpoint, copy, device="cpu"), "model config")


def test_a_second_build_to_the_same_folder_is_refused(tiny_checkpoint, shapes_data, tmp_path):
    out = tmp_path / "busy"
    with build_lock(out):
        cli = subprocess.run([sys.executable, "-m", "cir.index", "build", "--checkpoint", str(tiny_checkpoint),
                              "--gallery", str(shapes_data / "gallery_test.txt"), "--out", str(out)],
                             capture_output=True, text=True)
        assert cli.returncode == 2 and "another build or update" in cli.stderr and "Traceback" not in cli.stderr
        refused(lambda: build_index(out, shapes_data / "gallery_test.txt", tiny_checkpoint), "another build or update")
    assert not out.exists() and not (tmp_path / "busy.lock").exists()
    build_index(out, read_gallery(shapes_data / "gallery_test.txt")[:4], tiny_checkpoint)  # free again
    assert len(GalleryIndex.load(out)) == 4 and not (tmp_path / "busy.lock").exists()
