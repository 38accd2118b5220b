"""The gallery index on a small CIR-Shapes gallery embedded by a tiny random model: exact search
equals brute force, IVF recall, checkpoint mismatch, incremental update, kill-safe resumable build."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cir.checkpoint import load_checkpoint, save_checkpoint
from cir.data.images import load_rgb
from cir.data.shapes.dataset import generate
from cir.data.triplets import read_gallery, read_triplets
from cir.errors import UserError
from cir.index import GalleryIndex, build_index, main, read_index, resolve_params, update_index
from cir.models.factory import build_model, config_from_dict
from cir.retrieval import embed
from cir.retrieval.embed import choose_workers
from cir.retrieval.store import PATHS

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(chunk_size=8, batch_size=8, workers=0)  # several chunks; batches never straddle them


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(dataset folder, tiny checkpoint path, full index folder) shared by the tests below."""
    root = tmp_path_factory.mktemp("index")
    generate(root / "shapes", {"test": 8}, seed=3, workers=1, progress=False)
    config = config_from_dict(dict(json.loads((ROOT / "cir/models/configs/variants/context-cir-shapes-small.json").read_text()),
                                        fusion_layers=1))
    torch.manual_seed(0)
    model, _ = build_model(config)
    ckpt = root / "tiny.safetensors"
    save_checkpoint(ckpt, model, {"config": config.to_dict(), "step": 0})
    full = root / "full"
    build_index(full, root / "shapes" / "gallery_test.txt", ckpt, **SMALL)
    return root / "shapes", ckpt, full



def test_build_with_a_worker_equals_the_in_process_build(shapes, tmp_path):
    """A DataLoader worker decoding beside the model (its torch threads limited meanwhile) gives the
    vectors of the in-process build, and the thread count is restored afterwards."""
    data, ckpt, full = shapes
    threads = torch.get_num_threads()
    build_index(tmp_path / "w1", data / "gallery_test.txt", ckpt, **dict(SMALL, workers=1))
    assert torch.get_num_threads() == threads
    one, zero = GalleryIndex.load(tmp_path / "w1", ckpt), GalleryIndex.load(full, ckpt)
    assert one.paths == zero.paths
    np.testing.assert_allclose(np.asarray(one.embeddings), np.asarray(zero.embeddings), rtol=0, atol=1e-6)


def test_a_build_given_no_worker_count_chooses_on_its_first_two_batches(shapes, tmp_path, monkeypatch, capsys):
    """Workers None: the first two batches are prepared and embedded in the process while timing them
    (the second on a thread fewer), the count follows `choose_workers`, and the vectors are those of
    the in-process build either way."""
    data, ckpt, full = shapes
    assert choose_workers(0.03, 0.03, 0.04) == 1  # inputs cost as much as the forward: a worker
    assert choose_workers(0.001, 0.06, 0.11) == 0  # the forward dominates: every thread to the model
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # so that the choice is timed
    chosen = []
    monkeypatch.setattr(embed, "choose_workers", lambda *t: chosen.append(t) or 1)
    build_index(tmp_path / "auto", data / "gallery_test.txt", ckpt, **dict(SMALL, workers=None), progress=True)
    assert len(chosen) == 1 and all(t > 0 for t in chosen[0])
    assert "embedding with 1 DataLoader worker beside 1 torch thread(s) (chosen on the first two batches)" in capsys.readouterr().err
    auto, zero = GalleryIndex.load(tmp_path / "auto", ckpt), GalleryIndex.load(full, ckpt)
    assert auto.paths == zero.paths
    np.testing.assert_allclose(np.asarray(auto.embeddings), np.asarray(zero.embeddings), rtol=0, atol=1e-6)


def _rows(index: GalleryIndex) -> dict[str, np.ndarray]:
    return dict(zip(index.paths, np.asarray(index.embeddings)))


def assert_matches_brute_force(scores, ids, queries, gallery, k=10, tie=1e-5):
    """Same scores rank by rank as numpy's ranking, and the same ids wherever no near-tie could swap them."""
    exact = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(exact, order, 1)
    np.testing.assert_allclose(np.take_along_axis(exact, ids, 1), top, atol=1e-6)
    np.testing.assert_allclose(scores, top, atol=1e-5)
    gaps = np.abs(np.diff(np.sort(exact, axis=1)[:, ::-1][:, :k + 1], axis=1))
    clear = (gaps[:, :k] > tie) & np.concatenate([np.ones((len(ids), 1), bool), gaps[:, :k - 1] > tie], axis=1)
    assert clear.mean() > 0.5
    assert (ids[clear] == order[clear]).all()


def test_build_and_exact_search_match_brute_force(shapes):
    data, ckpt, full = shapes
    index = GalleryIndex.load(full, checkpoint_path=ckpt)
    manifest = index.manifest
    assert index.paths == read_gallery(data / "gallery_test.txt") and len(index) == 34
    assert manifest["index"]["params"]["type"] == "flat" and manifest["embedding"]["normalization"] == "l2"
    assert manifest["checkpoint"]["sha256"] and manifest["config"]["fusion_layers"] == 1
    assert "images" not in manifest and read_index(full)[2].shape == (34, 32)
    emb = np.asarray(index.embeddings)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert not (full.parent / "full.partial").exists()

    model, preprocess, _ = load_checkpoint(ckpt)
    triplets, _ = read_triplets(data / "test.jsonl")
    queries = model.encode_query(torch.stack([preprocess(load_rgb(t.reference)) for t in triplets]),
                                 [t.caption for t in triplets])
    scores, ids = index.search(queries, k=10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (8, 10)
    assert_matches_brute_force(scores, ids, queries.numpy(), emb)
    # a gallery image finds itself first, and the same search runs from the in-memory form
    self_scores, self_ids = GalleryIndex.from_embeddings(emb, index.paths, "flat").search(emb[:5], k=50)
    assert (self_ids[:, 0] == np.arange(5)).all() and self_ids.shape == (5, 34)


def _clustered(n, queries, dim, clusters, seed=0, noise=0.5):
    """n gallery and `queries` query vectors [., dim], L2-normalised, around the same random centers."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centers[rng.integers(clusters, size=n + queries)] + noise * rng.standard_normal((n + queries, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n], x[n:]


def test_ivf_recall_on_clustered_vectors(tmp_path):
    data, queries = _clustered(20000, 100, 64, 100, noise=1.5)  # clusters overlap: IVF must probe several lists
    np.save(tmp_path / "vectors.npy", data)
    mapped = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    exact = GalleryIndex.from_embeddings(data, index_type="flat").search(queries, 10)[1]
    ivf = GalleryIndex.from_embeddings(data, index_type="ivf", nlist=64, nprobe=16)
    recall = lambda ids: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall(ivf.search(queries, 10, nprobe=1)[1]) < recall(ivf.search(queries, 10)[1])
    assert recall(ivf.search(queries, 10)[1]) > 0.9
    assert recall(ivf.search(queries, 10, nprobe=64)[1]) == 1.0  # every list visited: exact
    pq = GalleryIndex.from_embeddings(mapped, index_type="ivfpq", nlist=64, pq_m=16, nprobe=32, train_sample=2560)
    assert pq.embeddings is mapped and pq.memory()["mapped"]  # re-ranking reads the mapped file
    assert pq.memory()["index"] == 20000 * (16 + 8) + 64 * 64 * 4 + 16 * 256 * 4 * 4  # codes+ids, lists, codebooks
    pq.rerank = 0  # PQ scores only
    assert recall(pq.search(queries, 10)[1]) < 0.7
    pq.rerank = 10  # the 100 best PQ candidates re-ranked against the stored vectors
    scores, ids = pq.search(queries, 10)
    assert recall(ids) > 0.95
    np.testing.assert_allclose(scores, np.einsum("qe,qke->qk", queries, data[ids]), atol=1e-5)  # exact scores
    assert (np.diff(scores, axis=1) <= 0).all()
    assert resolve_params(150_000, 256, memory=1 << 40)["type"] == "flat"
    assert resolve_params(300_000, 256, memory=1 << 40)["type"] == "ivf"
    assert resolve_params(6_000_000, 256, memory=1 << 40)["type"] == "ivfpq"
    small = resolve_params(150_000, 256, memory=150_000 * 256 * 4)  # the vectors take all of the memory
    assert small["type"] == "ivfpq" and small["rerank"] == 10 and small["pq_m"] == 64
    with pytest.raises(UserError, match="must divide"):
        resolve_params(20000, 64, "ivfpq", pq_m=7)


def test_index_on_disk_is_memory_mapped(shapes, tmp_path):
    """A folder written by the build is opened with its vectors and faiss lists memory-mapped, and
    says what it holds."""
    data, ckpt, full = shapes
    out = tmp_path / "ivf"
    build_index(out, data / "gallery_test.txt", ckpt, index_type="ivf", nlist=2, **SMALL)
    ivf, flat = GalleryIndex.load(out, ckpt), GalleryIndex.load(full, ckpt)
    assert isinstance(ivf.embeddings, np.memmap) and isinstance(flat.embeddings, np.memmap)
    queries = np.asarray(flat.embeddings[:8]) + 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert np.array_equal(ivf.search(queries, 10, nprobe=2)[1], flat.search(queries, 10)[1])
    memory = ivf.memory()
    assert memory["mapped"] and memory["vectors"] == 34 * ivf.dim * 4
    assert memory["index"] == 34 * (ivf.dim * 4 + 8) + 2 * ivf.dim * 4  # vectors + ids in the lists, centroids
    assert flat.describe().startswith("34 images, flat index: faiss 0.0 MB and vectors 0.0 MB, memory-mapped")


def test_checkpoint_mismatch_names_both_hashes(shapes, tmp_path):
    _, ckpt, full = shapes
    other = tmp_path / "other.safetensors"
    other.write_bytes(ckpt.read_bytes() + b" ")
    from cir.checkpoint import model_hash
    with pytest.raises(UserError) as e:
        GalleryIndex.load(full, checkpoint_path=other)
    assert model_hash(ckpt) in str(e.value) and model_hash(other) in str(e.value) and "\n" not in str(e.value)


def test_update_adds_removes_and_reembeds_changed(shapes, tmp_path):
    data, ckpt, full = shapes
    ref = _rows(GalleryIndex.load(full))
    paths = list(ref)
    index_dir = full.with_name(f"update-{tmp_path.name}")  # beside the original: its relative paths reach the same files
    shutil.copytree(full, index_dir)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    shutil.copy(paths[0], a)
    shutil.copy(paths[1], b)
    gallery = tmp_path / "gallery.txt"
    gallery.write_text("\n".join(paths[3:] + [str(a), str(b)]) + "\n")
    r = update_index(index_dir, gallery, **SMALL)
    assert (r["kept"], r["embedded"], r["removed"]) == (31, 2, 3)
    got = _rows(GalleryIndex.load(index_dir, ckpt))
    assert list(got) == paths[3:] + [str(a), str(b)]
    assert all(np.array_equal(got[p], ref[p]) for p in paths[3:])  # unchanged images keep their vectors
    np.testing.assert_allclose(got[str(a)], ref[paths[0]], atol=1e-5)
    np.testing.assert_allclose(got[str(b)], ref[paths[1]], atol=1e-5)

    shutil.copy(paths[2], a)  # a's content changes: only a is embedded again
    r = update_index(index_dir, gallery, **SMALL)
    assert (r["kept"], r["embedded"], r["removed"]) == (32, 1, 0)
    again = _rows(GalleryIndex.load(index_dir))
    np.testing.assert_allclose(again[str(a)], ref[paths[2]], atol=1e-5)
    assert np.array_equal(again[str(b)], got[str(b)])
    scores, ids = GalleryIndex.load(index_dir).search(again[str(a)][None], 1)
    assert ids[0, 0] == list(again).index(str(a))


def test_index_moved_with_its_images_and_checkpoint_embeds_nothing_again(shapes, tmp_path, capsys):
    """The manifest stores the gallery root and the checkpoint relative to the index folder and the
    images relative to the root: a copy of the whole tree (index, images, checkpoint) loads and
    updates on its own files; a checkpoint path written absolute still loads."""
    data, ckpt, full = shapes
    moved = tmp_path / "moved"
    shutil.copytree(full.parent, moved)
    index, gallery, checkpoint = moved / full.name, moved / data.name / "gallery_test.txt", moved / ckpt.name
    assert main(["update", "--index", str(index), "--gallery", str(gallery), "--device", "cpu", "--workers", "0"]) == 0
    assert "(34 kept, 0 embedded, 0 resumed, 0 removed," in capsys.readouterr().out
    copy = GalleryIndex.load(index, checkpoint_path=checkpoint)
    assert copy.paths == read_gallery(gallery) and all(p.startswith(str(moved) + os.sep) for p in copy.paths)
    assert copy.manifest["checkpoint"]["path"] == str(checkpoint)
    assert np.array_equal(copy.embeddings, GalleryIndex.load(full).embeddings)
    stored = json.loads((index / "manifest.json").read_text())
    assert stored["root"] == os.path.relpath(os.path.commonpath(copy.paths), index) and not os.path.isabs(
        stored["checkpoint"]["path"])
    root = os.path.join(moved, data.name, "images", "test")
    assert np.load(index / PATHS).tobytes() == "".join(os.path.relpath(p, root) for p in copy.paths).encode()

    stored["checkpoint"]["path"] = str(checkpoint)
    (index / "manifest.json").write_text(json.dumps(stored))
    assert GalleryIndex.load(index, checkpoint_path=checkpoint).paths == copy.paths


def test_killed_build_keeps_previous_index_and_resumes(shapes, tmp_path):
    data, ckpt, full = shapes
    out, partial = tmp_path / "idx", tmp_path / "idx.partial"
    first = tmp_path / "first.txt"
    first.write_text("\n".join(read_gallery(data / "gallery_test.txt")[:4]) + "\n")
    build_index(out, first, ckpt, **SMALL)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    cmd = [sys.executable, "-m", "cir.index", "build", "--checkpoint", str(ckpt), "--gallery",
           str(data / "gallery_test.txt"), "--out", str(out), "--chunk-size", "8", "--batch-size", "8", "--workers", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (partial / "chunk-000000.npz").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # the previous index, untouched

    r = build_index(out, data / "gallery_test.txt", ckpt, resume=True, **SMALL)
    assert r["resumed"] >= 8 and r["resumed"] + r["embedded"] == 34
    assert not partial.exists()
    resumed, reference = GalleryIndex.load(out), GalleryIndex.load(full)
    assert resumed.paths == reference.paths
    assert np.array_equal(resumed.embeddings, reference.embeddings)  # bit-identical to an uninterrupted build
    assert np.array_equal(read_index(out)[2], read_index(full)[2])


def test_user_mistakes_are_one_line_errors(shapes, tmp_path):
    data, ckpt, full = shapes
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    build = ["build", "--checkpoint", str(ckpt), "--gallery"]
    gallery = str(data / "gallery_test.txt")
    mistakes = [
        (build + [str(tmp_path / "nope"), "--out", str(tmp_path / "i")], "gallery not found"),
        (build + [gallery, "--out", str(tmp_path / "notes")], "refusing"),
        (build + [gallery, "--out", str(tmp_path / "i"), "--type", "ivfpq"], "ivfpq needs"),
        (build + [gallery, "--out", str(tmp_path / "i"), "--device", "gpu"], "not a torch device"),
        (["update", "--index", str(tmp_path / "none"), "--gallery", str(data / "gallery_test.txt")], "no gallery index"),
    ]
    for argv, message in mistakes:
        with pytest.raises(UserError, match=message) as e:
            main(argv)
        assert "\n" not in str(e.value)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    bad = tmp_path / "bad.txt"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad.write_text(f"{broken}\n")
    with pytest.raises(UserError, match="cannot be decoded"):
        build_index(tmp_path / "j", bad, ckpt, **SMALL)
    for cmd in ("build", "update"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
