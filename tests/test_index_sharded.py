"""`torchrun --nproc_per_node 2 -m cir.index build|update` (gloo, CPU): the index equals a
one-process build, and after one rank is killed a --resume run embeds only that rank's missing chunks."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cir.data.triplets import read_gallery
from cir.index import GalleryIndex, build_index, read_index

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SMALL = ["--chunk-size", "8", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run(args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def one_process_build(out: Path, gallery: list[str], ckpt: Path) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): the same arithmetic, bit for bit
    try:
        build_index(out, gallery, ckpt, chunk_size=8, batch_size=8)
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_index(got_dir: Path, want_dir: Path, exact: bool = True) -> None:
    got, want = GalleryIndex.load(got_dir), GalleryIndex.load(want_dir)
    assert got.paths == want.paths
    assert np.array_equal(read_index(got_dir)[2], read_index(want_dir)[2])
    if exact:
        assert np.array_equal(got.embeddings, want.embeddings)
    else:
        np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-6)
    assert np.array_equal(got.search(want.embeddings[:5], 3)[1], want.search(want.embeddings[:5], 3)[1])


def test_two_ranks_build_and_update_what_one_process_builds(tiny_checkpoint, shapes_data, tmp_path):
    images = read_gallery(shapes_data / "gallery_test.txt")[:40]
    (tmp_path / "first.txt").write_text("\n".join(images[:24]) + "\n")
    (tmp_path / "all.txt").write_text("\n".join(images) + "\n")
    reference = one_process_build(tmp_path / "one", images, tiny_checkpoint)

    out = tmp_path / "two"
    r = run(TORCHRUN_2 + ["-m", "cir.index", "build", "--checkpoint", str(tiny_checkpoint), "--gallery",
                          str(tmp_path / "all.txt"), "--out", str(out)] + SMALL)
    assert "40 images indexed" in r.stdout and r.stdout.count("wrote ") == 1  # rank 0 reports
    assert "rank 0: 24 embedded, 0 resumed" in r.stdout and "rank 1: 16 embedded, 0 resumed" in r.stdout
    assert_same_index(out, reference)

    grown = tmp_path / "grown"
    run(TORCHRUN_2 + ["-m", "cir.index", "build", "--checkpoint", str(tiny_checkpoint), "--gallery",
                      str(tmp_path / "first.txt"), "--out", str(grown)] + SMALL)
    r = run(TORCHRUN_2 + ["-m", "cir.index", "update", "--index", str(grown), "--gallery", str(tmp_path / "all.txt")]
            + SMALL)
    assert "(24 kept, 16 embedded," in r.stdout and "rank 0: 8 embedded" in r.stdout and "rank 1: 8 embedded" in r.stdout
    assert_same_index(grown, reference, exact=False)  # other batches


KILL_RANK_1 = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import cir.retrieval.embed as E
    write = E.atomic_path
    def hooked(path, *a, **k):
        # rank 1 dies before saving its second chunk (3), once rank 0 has saved all of its own (0, 2, 4)
        path = Path(path)
        if os.environ["RANK"] == "1" and path.name == "chunk-000003.npz":
            while not all((path.parent / f"chunk-{c:06d}.npz").exists() for c in (0, 2, 4)):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, *a, **k)
    E.atomic_path = hooked
    import cir.index as I
    sys.exit(I.main(sys.argv[1:]))
""")


def test_a_killed_rank_resumes_only_its_slice(tiny_checkpoint, shapes_data, tmp_path):
    images = read_gallery(shapes_data / "gallery_test.txt")[:40]
    (tmp_path / "all.txt").write_text("\n".join(images) + "\n")
    out, work = tmp_path / "idx", tmp_path / "idx.partial"
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    build = ["build", "--checkpoint", str(tiny_checkpoint), "--gallery", str(tmp_path / "all.txt"), "--out", str(out)]
    run(TORCHRUN_2 + [str(script)] + build + SMALL, ok=False)
    assert not out.exists()
    assert sorted(f.name for f in work.glob("chunk-*.npz")) == [f"chunk-{c:06d}.npz" for c in (0, 1, 2, 4)]

    r = run(TORCHRUN_2 + ["-m", "cir.index"] + build + SMALL + ["--resume"])
    assert "rank 0: 0 embedded, 24 resumed" in r.stdout  # rank 0's slice was complete: nothing read again
    assert "rank 1: 8 embedded, 8 resumed" in r.stdout  # rank 1 embeds only its unsaved chunk 3
    assert "(8 files read now, 32 resumed" in r.stdout and not work.exists()
    assert_same_index(out, one_process_build(tmp_path / "one", images, tiny_checkpoint))


def test_two_ranks_fill_a_milvus_collection(tiny_checkpoint, shapes_data, tmp_path):
    pytest.importorskip("milvus_lite")
    from cir.retrieval.milvus import MilvusIndex, MilvusTarget
    images = read_gallery(shapes_data / "gallery_test.txt")[:40]
    (tmp_path / "all.txt").write_text("\n".join(images) + "\n")
    db = str(tmp_path / "g.db")
    r = run(TORCHRUN_2 + ["-m", "cir.index", "build", "--backend", "milvus", "--uri", db, "--collection", "g",
                          "--checkpoint", str(tiny_checkpoint), "--gallery", str(tmp_path / "all.txt")] + SMALL)
    assert "rank 0: 24 embedded, 0 resumed" in r.stdout and "rank 1: 16 embedded, 0 resumed" in r.stdout
    collection = MilvusIndex(MilvusTarget(db, "g"))
    reference = GalleryIndex.load(one_process_build(tmp_path / "one", images, tiny_checkpoint))
    assert collection.paths == reference.paths
    np.testing.assert_allclose(collection.embeddings, reference.embeddings, atol=1e-6)
