"""The Milvus backend on the embedded milvus-lite: build and update a collection from a gallery,
the same top 10 as the faiss flat index for 100 queries, one-line errors for an unreachable URI
and for a collection built by another checkpoint."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from cir.data.triplets import read_gallery  # noqa: E402
from cir.errors import UserError  # noqa: E402
from cir.index import GalleryIndex, build_index, main  # noqa: E402
from cir.retrieval.milvus import MilvusIndex, MilvusTarget  # noqa: E402
from cir.ui.explorer import Explorer  # noqa: E402

SMALL = ["--chunk-size", "8", "--batch-size", "8", "--workers", "0", "--device", "cpu"]


def test_build_search_update_and_errors(tiny_checkpoint, shapes_data, tmp_path, capsys):
    images = read_gallery(shapes_data / "gallery_test.txt")
    db = str(tmp_path / "gallery.db")
    target = MilvusTarget(db, "shapes")
    milvus = ["--backend", "milvus", "--uri", db, "--collection", "shapes", "--checkpoint", str(tiny_checkpoint)]
    assert main(["build", "--gallery", str(shapes_data / "gallery_test.txt")] + milvus + SMALL) == 0
    assert f"wrote {target}: {len(images)} images (0 kept, {len(images)} embedded" in capsys.readouterr().out
    build_index(tmp_path / "flat", images, tiny_checkpoint, index_type="flat", chunk_size=8, batch_size=8)
    flat, collection = GalleryIndex.load(tmp_path / "flat"), MilvusIndex(target, tiny_checkpoint)
    assert collection.paths == flat.paths and collection.dim == flat.dim
    np.testing.assert_allclose(collection.embeddings, flat.embeddings, atol=1e-6)
    queries = np.random.default_rng(0).standard_normal((100, flat.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    (scores, ids), (want_scores, want_ids) = collection.search(queries, 10), flat.search(queries, 10)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)

    changed = tmp_path / "changed.png"  # a new path with an old image's content; three images gone
    shutil.copy(images[0], changed)
    gallery = tmp_path / "gallery.txt"
    gallery.write_text("\n".join(images[3:] + [str(changed)]) + "\n")
    assert main(["update", "--gallery", str(gallery)] + milvus + SMALL) == 0
    assert f"({len(images) - 3} kept, 1 embedded, 0 resumed, 3 removed" in capsys.readouterr().out
    updated = MilvusIndex(target)
    assert updated.paths == images[3:] + [str(changed)]
    np.testing.assert_allclose(updated.embeddings[-1], flat.embeddings[0], atol=1e-5)
    ex = Explorer.load(tiny_checkpoint, f"milvus:{db}?collection=shapes", device="cpu")
    assert ex.index.paths == updated.paths and "Milvus collection 'shapes'" in capsys.readouterr().err

    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny_checkpoint.read_bytes() + b" ")
    for call, fragment in [
        (lambda: MilvusIndex(target, other), "was built with checkpoint sha256"),
        (lambda: main(["update", "--gallery", str(gallery)] + milvus[:-1] + [str(other)] + SMALL),
         "was built with checkpoint sha256"),
        (lambda: MilvusIndex(MilvusTarget(db, "none")), "no collection 'none'"),
        (lambda: MilvusIndex(MilvusTarget("http://127.0.0.1:9", "shapes")), "cannot reach Milvus at http://127.0.0.1:9"),
        (lambda: MilvusTarget.parse("milvus:gallery.db"), r"milvus:URI\?collection=NAME"),
    ]:
        with pytest.raises(UserError, match=fragment) as e:
            call()
        assert "\n" not in str(e.value)


def test_demo_gallery_same_top10_as_faiss_flat(tmp_path):
    """The shipped model's demo gallery in milvus-lite: its vectors are the demo index's, and 100
    queries get the top 10 of a faiss flat index over the same vectors."""
    from cir.checkpoint import DEFAULT_CHECKPOINT
    from cir.ui.explorer import DEFAULT_GALLERY, DEFAULT_INDEX
    target = MilvusTarget(str(tmp_path / "demo.db"), "demo")
    assert main(["build", "--backend", "milvus", "--uri", target.uri, "--collection", "demo", "--gallery",
                 str(DEFAULT_GALLERY), "--checkpoint", str(DEFAULT_CHECKPOINT), "--workers", "0", "--device", "cpu"]) == 0
    collection, shipped = MilvusIndex(target, DEFAULT_CHECKPOINT), GalleryIndex.load(DEFAULT_INDEX)
    assert collection.paths == shipped.paths and len(collection) == 272
    np.testing.assert_allclose(collection.embeddings, shipped.embeddings, atol=1e-4)
    flat = GalleryIndex.from_embeddings(collection.embeddings, collection.paths, "flat")
    queries = np.random.default_rng(1).standard_normal((100, flat.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    (scores, ids), (want_scores, want_ids) = collection.search(queries, 10), flat.search(queries, 10)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_a_row_outside_the_gallery_root_is_refused(tiny_checkpoint, shapes_data, tmp_path):
    """A row written into the collection behind the tool's back that names a file outside the
    gallery root (here the server's /etc/passwd), or a collection without a root, is refused when
    opened, in one line; the collection as built opens."""
    from cir.retrieval.milvus import connect
    images = read_gallery(shapes_data / "gallery_test.txt")
    target = MilvusTarget(str(tmp_path / "gallery.db"), "shapes")
    assert main(["build", "--gallery", str(shapes_data / "gallery_test.txt"), "--backend", "milvus", "--uri",
                 target.uri, "--collection", "shapes", "--checkpoint", str(tiny_checkpoint)] + SMALL) == 0
    collection = MilvusIndex(target, tiny_checkpoint)
    client = connect(target.uri)
    props = client.describe_collection("shapes")["properties"]
    assert props["root"] == str(shapes_data / "images" / "test") and len(collection) == len(images)
    client.insert("shapes", [{"id": len(images), "vector": collection.embeddings[0].tolist(), "path": "/etc/passwd",
                              "sha256": "0" * 64}])
    client.flush("shapes")
    with pytest.raises(UserError, match="the gallery image /etc/passwd lies outside its gallery root") as e:
        MilvusIndex(target, tiny_checkpoint)
    assert "\n" not in str(e.value)
    client.delete("shapes", ids=[len(images)])
    assert len(MilvusIndex(target, tiny_checkpoint)) == len(images)
    client.drop_collection_properties("shapes", ["root"])
    with pytest.raises(UserError, match="names no gallery root; build it again"):
        MilvusIndex(target, tiny_checkpoint)
