"""The gallery's image paths held compactly (cir.retrieval.pathlist) by an opened index, memory-mapped
from its files, and the app; the check that they stay in the gallery root (cir.retrieval.confine)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cir.checkpoint import load_checkpoint
from cir.index import GalleryIndex
from cir.retrieval import confine
from cir.retrieval.confine import escaping
from cir.retrieval.pathlist import PathList
from cir.retrieval.store import FORMAT, write_index
from cir.ui.access import FileAccess
from cir.ui.explorer import Explorer


def test_rows_slices_lookups_and_root():
    odd = "/g/b/caf\udce9.png"  # a file name that is not UTF-8, as os.listdir gives it
    paths = PathList(["/g/a/1.png", "/g/b/2.png", "/g/a/1.png", odd])
    assert len(paths) == 4 and paths[1] == "/g/b/2.png" and paths[-1] == odd
    assert paths[1:3] == ["/g/b/2.png", "/g/a/1.png"] and list(paths) == ["/g/a/1.png", "/g/b/2.png", "/g/a/1.png", odd]
    assert paths.find("/g/a/1.png") == 0 and paths.find(odd) == 3 and paths.find("/g/a/2.png") is None
    assert "/g/b/2.png" in paths and "/g/b" not in paths
    assert paths.root == "/g" and PathList([]).root == "/"
    assert paths.prefix == "/g/" and paths.blob.nbytes == len("a/1.pngb/2.pnga/1.pngb/caf.png") + 1  # the byte 0xe9
    assert paths == ["/g/a/1.png", "/g/b/2.png", "/g/a/1.png", odd] and paths != ["/g/a/1.png"]
    with pytest.raises(IndexError):
        paths[4]


def synthetic_index(folder, n: int, dim: int) -> list[str]:
    """An index folder over `n` random vectors named as images under `folder`/gallery (absent)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = GalleryIndex.from_embeddings(vectors, index_type="flat")
    paths = [os.path.join(folder, "gallery", f"{i % 7}", f"{i:06d}.png") for i in range(n)]
    manifest = {"format": FORMAT, "checkpoint": {"path": str(folder / "none.safetensors"), "sha256": ""},
                "config": {}, "root": os.path.join(folder, "gallery"),
                "embedding": {"dim": dim, "normalization": "l2", "dtype": "float32"},
                "index": dict(built.manifest["index"], metric="inner_product"), "count": n, "skipped": []}
    (folder / "index.partial").mkdir()
    write_index(folder / "index", folder / "index.partial", manifest, paths, np.zeros((n, 32), np.uint8), vectors,
                built.faiss_index)
    return paths


def containers(obj, depth: int = 3):
    """Every list, tuple, set and dict reachable from `obj` through attributes and dict values."""
    if depth == 0:
        return
    if isinstance(obj, (list, tuple, set, frozenset, dict)):
        yield obj
        values = obj.values() if isinstance(obj, dict) else obj if len(obj) < 100 else ()
        for v in values:
            yield from containers(v, depth - 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            yield from containers(v, depth - 1)


def test_the_app_holds_no_python_object_per_gallery_image(tmp_path, tiny_checkpoint):
    n = 5000
    paths = synthetic_index(tmp_path, n, 32)
    index = GalleryIndex.load(tmp_path / "index")
    model, preprocess, manifest = load_checkpoint(tiny_checkpoint)
    ex = Explorer(model, preprocess, index, checkpoint=str(tiny_checkpoint), manifest=manifest)
    access = FileAccess([], ex.index.paths)
    assert isinstance(ex.index.paths, PathList) and access.gallery is ex.index.paths and "images" not in index.manifest
    assert isinstance(index.paths.blob, np.memmap) and isinstance(index.paths.table, np.memmap)
    assert ex.index.paths[1234] == paths[1234] and ex.index.paths.find(paths[4321]) == 4321
    assert ex.root == str(tmp_path / "gallery") and ex.label(paths[8]) == os.path.join("1", "000008.png")
    big = [c for obj in (ex, index, access) for c in containers(obj) if len(c) >= n]
    assert big == []  # no list, set or dict of the gallery's images
    assert index.paths.nbytes() < 40 * n  # the paths' bytes beside 24 bytes of offsets and hashes per image
    scores, ids = index.search(index.embeddings[[42]], 3)
    assert ids[0, 0] == 42 and ex.index.paths[int(ids[0, 0])] == paths[42]


def test_paths_out_of_the_root_as_written_or_through_links(tmp_path, monkeypatch):
    """`escaping` refuses a stored part below the root that is not in normal form (`..`, `.` or
    empty parts, absolute, a NUL byte), a folder or file linked out of the root, in blocks of any
    size; a link that stays inside, a name merely holding dots, or a folder gone are fine."""
    root = tmp_path / "g"
    for rel in ("a/1.png", "a/2.png", "b/c/3.png", "4.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.png").write_bytes(b"")
    good = [str(root / rel) for rel in ("a/1.png", "a/2.png", "b/c/3.png", "4.png", "a/..b", "...png", "gone/5.png")]

    def stored(rels: list[str]) -> PathList:
        """`good` and `rels` (parts below the root, as written) held as an opened index holds its paths."""
        listed = PathList(good + [f"{root}/{rel}" for rel in rels], str(root))
        return PathList.stored(listed.blob, listed.table, str(root))
    for block in (confine.BLOCK, 7):
        monkeypatch.setattr(confine, "BLOCK", block)
        assert escaping(good, str(root)) is None and escaping(stored([]), str(root)) is None
        for rel in ("../out/x.png", "a/../../out/x.png", "a/./1.png", "a//1.png", "/etc/passwd", "a/1.png/", "x\0.png"):
            assert escaping(stored([rel]), str(root)) == f"{root}/{rel}", rel
    assert escaping(good + ["/elsewhere/y.png"], str(root)) == "/elsewhere/y.png"
    (root / "a" / "2.png").unlink()
    (root / "a" / "2.png").symlink_to(root / "4.png")  # a link inside the root
    assert escaping(good, str(root)) is None
    (root / "a" / "2.png").unlink()
    (root / "a" / "2.png").symlink_to(tmp_path / "out" / "x.png")
    assert escaping(good, str(root)) == str(root / "a" / "2.png")
    (root / "a" / "2.png").unlink()
    (root / "b" / "c").rename(tmp_path / "out" / "c")
    (root / "b" / "c").symlink_to(tmp_path / "out" / "c")
    assert escaping(good, str(root)) == str(root / "b" / "c" / "3.png")
