"""Gallery-index cost: embedding throughput, query latency, search speed and recall, memory.

    python -m bench.index_bench [--checkpoint CKPT] [--device cpu|cuda] [--images N] [--quick]
                                [--tower-images N] [--build-only | --tower-only | --mapped-only]

Prints one table:
  * images/s of the bare encoder forward (preprocessed batch in memory) vs a full `build_index`
    (checkpoint loading, reading, hashing, decoding, preprocessing in the DataLoader workers the
    build chooses on its first batch, embedding, writing; `--images` rendered CIR-Shapes images, default 4,096) and the
    build's share of the forward, whole and in its embedding phase (checkpoint load and index writing left out);
  * the same for a realistically sized image tower, where the forward dominates: a randomly
    initialised `context-vit-b-32` (open_clip ViT-B-32, 224 x 224; nothing downloaded) on
    `--tower-images` of the rendered images (default 256; 0 skips it), built with the workers it
    chooses and with one worker forced;
  * query latency p50/p95 of encode (real image + caption through the model) + search, over
    galleries of 1k/10k/100k clustered random vectors;
  * the same build run by `torchrun --nproc_per_node 2` (processes started included) and its
    speed-up over one process;
  * search-only latency p50/p95 (one query at a time) and recall@10 against exact search for
    exact, IVF, IVF-PQ re-ranked against the stored vectors (the default) and IVF-PQ scores alone,
    at 100k and 1M clustered vectors, with the memory-bandwidth bound of exact search (bytes
    scanned / numpy copy bandwidth) and the bytes per image the faiss index holds;
  * with milvus-lite installed (requirements-milvus.txt), the 100k gallery (20k with --quick) inserted
    into a local Milvus collection: rows/s inserted, single-query latency and recall@10;
  * the largest IVF-PQ gallery written as an index folder and opened by a fresh process: the
    seconds opening takes (its checks included), search latency with the vectors memory-mapped, the
    process's resident memory (private, and pages of the mapped files, which the page cache shares
    and drops under pressure) against the vectors' size, and its peak;
    `--mapped-only` measures this part alone.
`--build-only` measures the build rows alone (both models), `--tower-only` the ViT-B-32 ones.
`--quick` shrinks every size to check the script in seconds; its numbers mean little.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cir.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, read_manifest, save_checkpoint
from cir.data.images import load_rgb
from cir.data.shapes.dataset import generate
from cir.data.triplets import read_gallery, read_triplets
from cir.precision import autocast
from cir.index import GalleryIndex, build_index
from cir.models.factory import build_model, load_config
from cir.retrieval.params import index_bytes
from cir.retrieval.store import FORMAT, write_index

ROOT = Path(__file__).resolve().parent.parent
OPEN_AND_SEARCH = """
import json, sys, time
import numpy as np
from bench.index_bench import single_queries
from cir.index import GalleryIndex
from cir.retrieval.search import resident_memory
base = resident_memory()
t0 = time.perf_counter()
index = GalleryIndex.load(sys.argv[1])
opening = time.perf_counter() - t0
opened = resident_memory()
seconds = single_queries(index, np.load(sys.argv[2]))
print(json.dumps({"base": base, "opened": opened, "searched": resident_memory(), "seconds": seconds,
                  "opening": opening, "describe": index.describe()}))
"""

def clustered(n: int, queries: int, dim: int, seed: int = 0, noise: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Gallery [n, dim] and queries [queries, dim], L2-normalised, around sqrt(n) shared random centers."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, int(n ** 0.5)), dim), dtype=np.float32)
    out = np.empty((n + queries, dim), np.float32)
    for s in range(0, n + queries, 1 << 18):  # in blocks: no second full-size temporary
        e = min(s + (1 << 18), n + queries)
        x = centers[rng.integers(len(centers), size=e - s)] + noise * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out[:n], out[n:]


def percentiles(seconds: list[float]) -> str:
    return f"{np.percentile(seconds, 50) * 1e3:.2f} / {np.percentile(seconds, 95) * 1e3:.2f}"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def single_queries(index: GalleryIndex, queries: np.ndarray) -> list[float]:
    """Seconds of each search of one query [1, E] for top 10, after one warm-up."""
    index.search(queries[:1], 10)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], 10)
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(nbytes: int = 1 << 28) -> float:
    """Bytes moved per second (read + write) by a numpy copy of `nbytes`, best of 3."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(timed(lambda: np.copyto(dst, src), 3))
    return 2 * nbytes / best


def recall_at_10(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))


def build_seconds(command: list[str]) -> float:
    """Wall seconds of an index build run as its own command (process start included)."""
    t0 = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.perf_counter() - t0


def milvus_rows(tmp: Path, data: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[tuple[str, str, str]]:
    """Insert rate, search latency and recall@10 of `data` in a milvus-lite collection; [] without milvus-lite."""
    if importlib.util.find_spec("milvus_lite") is None:
        return []
    from cir.retrieval.milvus import MilvusIndex, MilvusTarget, connect, create_collection, insert_rows
    target, n = MilvusTarget(str(tmp / "bench.db"), "bench"), len(data)
    client = connect(target.uri)
    create_collection(client, target.collection, data.shape[1], "", str(tmp))
    t0 = time.perf_counter()
    insert_rows(client, target.collection, 0, [str(tmp / f"{i}.png") for i in range(n)], [""] * n, data)
    rate = n / (time.perf_counter() - t0)
    index = MilvusIndex(target)
    setting = f"milvus-lite FLAT, {n:,}"
    return [("rows/s inserted", setting, f"{rate:,.0f}"),
            ("search ms p50 / p95", setting, percentiles(single_queries(index, queries))),
            ("recall@10 vs exact", setting, f"{recall_at_10(index.search(queries, 10)[1], truth):.3f}")]


def opened_from_disk(tmp: Path, index: GalleryIndex, queries: np.ndarray) -> dict:
    """Write `index` (IVF-PQ over a memory-mapped array) as an index folder under synthetic image
    names, then open and search it in a fresh process: its resident memory and latencies."""
    n = len(index)
    manifest = {"format": FORMAT, "checkpoint": {"path": str(tmp / "none.safetensors"), "sha256": ""},
                "config": {}, "root": str(tmp), "embedding": {"dim": index.dim, "normalization": "l2", "dtype": "float32"},
                "index": dict(index.manifest["index"], metric="inner_product"), "count": n, "skipped": []}
    (tmp / "mapped.partial").mkdir()
    write_index(tmp / "mapped", tmp / "mapped.partial", manifest, [str(tmp / f"{i}.png") for i in range(n)],
                np.zeros((n, 32), np.uint8), index.embeddings, index.faiss_index)
    np.save(tmp / "queries.npy", queries)
    out = subprocess.run([sys.executable, "-c", OPEN_AND_SEARCH, str(tmp / "mapped"), str(tmp / "queries.npy")],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


Rows = list[tuple[str, str, str]]  # (measure, setting, value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.index_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="model checkpoint; default: the shipped one, or a random context-cir-shapes "
                        "(same speed) when it is absent")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--images", type=int, default=None,
                   help="rendered gallery images the build embeds (default 4096; 32 with --quick)")
    p.add_argument("--tower-images", type=int, default=None,
                   help="of those, the ones the ViT-B-32 builds embed (default 256; 0 with --quick; 0 skips them)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that the bench runs")
    p.add_argument("--build-only", action="store_true", help="only the build throughput rows")
    p.add_argument("--tower-only", action="store_true", help="only the ViT-B-32 build throughput rows")
    p.add_argument("--mapped-only", action="store_true",
                   help="only the largest IVF-PQ gallery written as an index folder and opened by a fresh process")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_checkpoint(checkpoint: str | None, tmp: Path) -> Path:
    """`checkpoint`, else the shipped one, else a random context-cir-shapes saved in `tmp`."""
    ckpt = Path(checkpoint or DEFAULT_CHECKPOINT)
    if checkpoint is None and not ckpt.is_file():
        log(f"{ckpt} is absent: benchmarking a random context-cir-shapes")
        torch.manual_seed(0)
        model, _ = build_model("context-cir-shapes")
        ckpt = tmp / "random.safetensors"
        save_checkpoint(ckpt, model, {"config": model.config.to_dict(), "step": 0})
    return ckpt


def forward_and_builds(tmp: Path, gallery: list[str], ckpt: Path, batch: int, dev: torch.device, repeats: int,
                       workers: list[int | None], name: str) -> tuple[Rows, Path]:
    """Images/s of a full build_index of `gallery` with each count of `workers` (None: the build
    chooses) and of the bare encoder forward (batch `batch` in memory, median of `repeats`): each
    build's share of the forward, whole and in its embedding phase alone (reading the images to
    their vectors; the checkpoint load and the index writing left out); -> (rows, the last index built)."""
    results = [build_index(tmp / f"index-{name}-{w}", gallery, ckpt, batch_size=batch, device=dev, workers=w)
               for w in workers]
    model, preprocess, _ = load_checkpoint(ckpt, dev)
    images = torch.stack([preprocess(load_rgb(p)) for p in gallery[:batch]]).to(dev)

    def forward():
        with autocast(dev):
            model.encode_gallery(images)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    fwd = batch / np.median(timed(forward, repeats))
    rows = [("images/s", f"{name}: encoder forward only, batch {batch}", f"{fwd:.1f}")]
    for w, result in zip(workers, results):
        built, embedding = result["images"] / result["seconds"], result["images"] / result["embed_seconds"]
        rows.append(("images/s", f"{name}: full build of {len(gallery)} images (load, decode, hash, write; "
                     f"{'workers chosen' if w is None else f'{w} workers'})", f"{built:.1f} ({built / fwd:.0%} of the "
                     f"forward; embedding phase {embedding:.1f}, {embedding / fwd:.0%})"))
    return rows, tmp / f"index-{name}-{workers[-1]}"


def tower_rows(tmp: Path, gallery: list[str], dev: torch.device, batch: int = 32) -> Rows:
    """`forward_and_builds` for a randomly initialised context-vit-b-32 (saved fp16), with no
    worker count given (the build chooses) and with one worker."""
    torch.manual_seed(0)
    model, _ = build_model(replace(load_config("context-vit-b-32"), pretrained=None))
    ckpt = tmp / "vit-b-32.safetensors"
    save_checkpoint(ckpt, model, {"config": model.config.to_dict(), "step": 0}, dtype="fp16")
    del model
    return forward_and_builds(tmp, gallery, ckpt, batch, dev, 3, [None, 1], "ViT-B-32")[0]


def throughput_rows(tmp: Path, gallery: list[str], ckpt: Path, batch: int, dev: torch.device, repeats: int
                    ) -> tuple[Rows, GalleryIndex]:
    """`forward_and_builds` of the benchmarked checkpoint, its workers chosen by the build, and (on CPU) the
    command build in one process and under torchrun with two; -> (rows, the built index)."""
    rows, out = forward_and_builds(tmp, gallery, ckpt, batch, dev, max(2, repeats // 10), [None],
                                   "model")
    if dev.type == "cpu":
        log("sharded build")
        (tmp / "gallery.txt").write_text("\n".join(gallery) + "\n")
        cmd = ["-m", "cir.index", "build", "--checkpoint", str(ckpt), "--gallery", str(tmp / "gallery.txt"),
               "--batch-size", str(batch), "--chunk-size", str(batch), "--workers", "0", "--device", "cpu"]
        one = build_seconds([sys.executable] + cmd + ["--out", str(tmp / "one")])
        two = build_seconds([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                            + cmd + ["--out", str(tmp / "two")])
        rows.append(("images/s", f"command build, 1 process (1 thread), {len(gallery)} images", f"{len(gallery) / one:.1f}"))
        rows.append(("images/s", f"torchrun build, 2 processes (1 thread each), {len(gallery)} images",
                     f"{len(gallery) / two:.1f} ({one / two:.2f}x)"))
    return rows, GalleryIndex.load(out, ckpt)


def query_rows(ckpt: Path, triplet, dim: int, sizes: tuple[int, ...], dev: torch.device, repeats: int) -> Rows:
    """Encode (a real image and caption) + search latency over clustered galleries of each size."""
    model, preprocess, _ = load_checkpoint(ckpt, dev)
    query_image, caption = load_rgb(triplet.reference), triplet.caption
    rows = []
    for n in sizes:
        data, _ = clustered(n, 0, dim)
        gallery_index = GalleryIndex.from_embeddings(data, device=dev)

        def query():
            with autocast(dev):
                q = model.encode_query(preprocess(query_image)[None].to(dev), [caption])
            gallery_index.search(q.float(), 10)
        rows.append(("query ms p50 / p95", f"encode + search, {n:,} ({gallery_index.manifest['index']['params']['type']})",
                     percentiles(timed(query, repeats))))
    return rows


def memory_mapped(tmp: Path, data: np.ndarray) -> np.ndarray:
    """`data` saved in `tmp` and memory-mapped back."""
    np.save(tmp / "vectors.npy", data)
    return np.load(tmp / "vectors.npy", mmap_mode="r")


def search_rows(tmp: Path, n: int, n_queries: int, dim: int, dev: torch.device, bandwidth: float, milvus: bool
                ) -> tuple[Rows, GalleryIndex, np.ndarray, np.ndarray]:
    """Exact, IVF and re-ranked IVF-PQ search at `n` clustered vectors: latency, recall@10 against
    exact, build time and bytes per image (and milvus-lite's rows when `milvus`);
    -> (rows, the IVF-PQ index, the vectors, the queries)."""
    data, queries = clustered(n, n_queries, dim, seed=1)
    exact = GalleryIndex.from_embeddings(data, index_type="flat")
    truth = exact.search(queries, 10)[1]
    one_by_one = lambda idx: percentiles(single_queries(idx, queries))
    rows = [("search ms p50 / p95", f"exact, {n:,}", one_by_one(exact)),
            ("search ms bound", f"exact, {n:,}: {data.nbytes / 1e6:.0f} MB scanned / bandwidth",
             f"{data.nbytes / bandwidth * 1e3:.2f}")]
    if dev.type == "cuda":
        gpu = GalleryIndex.from_embeddings(data, device=dev)
        rows.append(("search ms p50 / p95", f"exact on GPU fp16, {n:,}", one_by_one(gpu)))
        rows.append(("recall@10 vs exact", f"exact on GPU fp16, {n:,}",
                     f"{recall_at_10(gpu.search(queries, 10)[1], truth):.3f}"))
    sizes = {"exact": index_bytes(exact.faiss_index) / n}
    del exact
    mapped = memory_mapped(tmp, data)  # IVF-PQ re-ranks from the file
    for kind in ("ivf", "ivfpq"):
        t0 = time.perf_counter()
        idx = GalleryIndex.from_embeddings(mapped if kind == "ivfpq" else data, index_type=kind)
        build_s = time.perf_counter() - t0
        params = idx.manifest["index"]["params"]
        setting = f"{kind} nlist {params['nlist']} nprobe {params['nprobe']}" + (
            f" m {params['pq_m']} rerank {params['rerank']}x" if kind == "ivfpq" else "") + f", {n:,}"
        rows.append(("search ms p50 / p95", setting, one_by_one(idx)))
        rows.append(("recall@10 vs exact", setting, f"{recall_at_10(idx.search(queries, 10)[1], truth):.3f}"))
        rows.append(("train + add s", setting, f"{build_s:.1f}"))
        sizes[kind] = index_bytes(idx.faiss_index) / n
    idx.rerank = 0
    rows.append(("search ms p50 / p95", f"ivfpq scores only (rerank 0), {n:,}", one_by_one(idx)))
    rows.append(("recall@10 vs exact", f"ivfpq scores only (rerank 0), {n:,}",
                 f"{recall_at_10(idx.search(queries, 10)[1], truth):.3f}"))
    idx.rerank = params["rerank"]
    if milvus:
        log(f"milvus-lite at {n:,}")
        rows += milvus_rows(tmp, data, queries, truth)
    rows.append(("bytes / image in memory", f"exact / ivf / ivfpq, {n:,}",
                 " / ".join(f"{v:.0f}" for v in sizes.values()) + f" (ivfpq + {4 * dim} on disk for re-ranking)"))
    return rows, idx, data, queries


def mapped_rows(tmp: Path, idx: GalleryIndex, data: np.ndarray, queries: np.ndarray) -> Rows:
    """The IVF-PQ index written as a folder and opened by a fresh process: the seconds opening
    takes, search latency with the vectors memory-mapped, and that process's resident memory
    against the vectors' size."""
    n = len(data)
    log(f"memory-mapped ivfpq at {n:,}, opened by a fresh process")
    opened = opened_from_disk(tmp, idx, queries)
    rows = [("open s", f"ivfpq opened from disk ({n:,} images; checks included)", f"{opened['opening']:.2f}"),
            ("search ms p50 / p95", f"ivfpq opened from disk, vectors memory-mapped, {n:,}",
             percentiles(opened["seconds"]))]
    for kind in ("private", "mapped", "peak"):
        rows.append((f"resident MB, {kind}", f"that process: imports / opened / after {len(queries)} searches "
                     f"(vectors {data.nbytes / 1e6:.0f} MB)",
                     " / ".join(f"{opened[k][kind] / 1e6:.0f}" for k in ("base", "opened", "searched"))))
    return rows


def table(rows: Rows, dev: torch.device, quick: bool) -> str:
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{'measure':<{w0}}  {'setting':<{w1}}  value   (device {dev}{', quick' if quick else ''})"]
    return "\n".join(lines + [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}" for r in rows])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    dev = torch.device(a.device)
    n_images, batch, repeats, n_tower = (32, 16, 5, 0) if a.quick else (4096, 64, 50, 256)
    n_images = a.images or n_images
    n_tower = min(n_images, n_tower if a.tower_images is None else a.tower_images)
    query_sizes = (1_000, 5_000) if a.quick else (1_000, 10_000, 100_000)
    search_sizes = (20_000,) if a.quick else (100_000, 1_000_000)
    n_queries = 50 if a.quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = bench_checkpoint(a.checkpoint, tmp)
        if a.mapped_only:
            n = search_sizes[-1]
            log(f"ivfpq at {n:,}")
            data, queries = clustered(n, n_queries, read_manifest(ckpt)["config"]["embed_dim"], seed=1)
            idx = GalleryIndex.from_embeddings(memory_mapped(tmp, data), index_type="ivfpq")
            print(table(mapped_rows(tmp, idx, data, queries), dev, a.quick))
            return 0
        log(f"rendering {n_images} gallery images")
        generate(tmp / "shapes", {"test": n_images // 4 + 1}, seed=0, progress=False)
        gallery = read_gallery(tmp / "shapes" / "gallery_test.txt")[:n_images]
        triplets, _ = read_triplets(tmp / "shapes" / "test.jsonl", check_images=False)
        rows = []
        if not a.tower_only:
            log("embedding throughput")
            found, index = throughput_rows(tmp, gallery, ckpt, batch, dev, repeats)
            rows += found
        if n_tower:
            log(f"embedding throughput of ViT-B-32 on {n_tower} images")
            rows += tower_rows(tmp, gallery[:n_tower], dev)
        if a.build_only or a.tower_only:
            print(table(rows, dev, a.quick))
            return 0
        log("query latency")
        rows += query_rows(ckpt, triplets[0], index.dim, query_sizes, dev, repeats)
        bandwidth = copy_bandwidth()
        rows.append(("copy bandwidth", "numpy copy, read + write", f"{bandwidth / 1e9:.1f} GB/s"))
        for n in search_sizes:
            log(f"search at {n:,}")
            found, idx, data, queries = search_rows(tmp, n, n_queries, index.dim, dev, bandwidth,
                                                    milvus=n == search_sizes[0])
            rows += found
        rows += mapped_rows(tmp, idx, data, queries)
    print(table(rows, dev, a.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
