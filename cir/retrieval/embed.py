"""Embedding gallery images in resumable chunks: f(image, "") with each file read once for both
its pixels and its sha256, saved chunk by chunk so a killed build resumes where it stopped; under
torchrun each rank embeds the chunks it owns. Reading, hashing, decoding and preprocessing run in
DataLoader workers ahead of the model (on CPU the model then runs on the CPUs the workers leave
it), and chunk files are written by a background thread, so the model's forward is never left
waiting on them."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor
from tqdm import tqdm

from cir.atomic import atomic_path, sha256_file, write_json
from cir.data.datasets import ImageDataset
from cir.data.images import BadImage, load_rgb
from cir.errors import UserError
from cir.precision import autocast
from cir.retrieval.shards import Shard

ASSEMBLED = "embeddings.npy"  # the work folder's memory-mapped array of every chunk's rows


def plan_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class _HashedImages(ImageDataset):
    """Item i -> (image [3, S, S] or None, sha256 of the file's bytes, problem or None)."""

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
            image = self.preprocess(load_rgb(io.BytesIO(data), name=path))
        except FileNotFoundError:
            return None, None, f"gallery image not found: {path}"
        except BadImage as e:
            return None, None, f"gallery image cannot be decoded: {path} ({e.reason})"
        except Exception as e:  # preprocessing, or reading the file
            return None, None, f"gallery image cannot be decoded: {path} ({type(e).__name__}: {' '.join(str(e).split())})"
        return image, hashlib.sha256(data).hexdigest(), None


def choose_workers(prepare_s: float, forward_s: float, forward_fewer_s: float) -> int:
    """Workers for a CPU build whose first batch took `prepare_s` to read, decode and preprocess and
    `forward_s` to embed on every torch thread (`forward_fewer_s` on one thread fewer): one worker
    preparing batches beside the model gives a batch every max(prepare, fewer-thread forward), none
    gives one every prepare + forward. A tower whose forward dominates keeps every thread (0); a
    small one whose inputs cost as much as its forward gets a worker (1)."""
    return 1 if max(prepare_s, forward_fewer_s) < prepare_s + forward_s else 0


def _embedded(model, images: torch.Tensor | None, problems: list[str], dev: torch.device) -> np.ndarray:
    """f(image, "") of a batch's good `images` [g, 3, S, S] as rows [n, E] float32, L2-normalised; the
    rows of the items with a problem stay NaN."""
    out = np.full((len(problems), model.config.embed_dim), np.nan, np.float32)
    if images is not None:
        with autocast(dev):
            emb = model.encode_gallery(images.to(dev, non_blocking=True))
        out[[i for i, p in enumerate(problems) if not p]] = F.normalize(emb.float(), dim=-1).cpu().numpy()
    return out


def _first_batch_workers(model, dataset, collate, batches: list[list[int]], dev: torch.device
                         ) -> tuple[int, list[tuple]]:
    """Workers for a CPU build with no worker count given, chosen while its first two `batches` are
    embedded: the first on every torch thread, the second on one fewer, each timed (nothing is
    embedded twice). -> (workers, [(rows [n, E], sha256 per item, problem per item)] of the batches
    embedded). With a CPU the model's threads leave idle, one worker (it costs the model nothing)
    after the first batch; with one CPU or a single batch, none; else `choose_workers`."""
    cpus, threads = os.cpu_count() or 1, torch.get_num_threads()
    t0 = time.perf_counter()
    images, hashes, problems = collate([dataset[i] for i in batches[0]])
    t1 = time.perf_counter()
    done = [(_embedded(model, images, problems, dev), hashes, problems)]
    t2 = time.perf_counter()
    if cpus < 2 or threads < cpus or images is None or len(batches) < 2:
        return int(threads < cpus and len(batches) > 1), done
    second = collate([dataset[i] for i in batches[1]])
    if second[0] is None:  # nothing readable to time it on
        done.append((_embedded(model, None, second[2], dev), second[1], second[2]))
        return 0, done
    torch.set_num_threads(threads - 1)
    try:
        t3 = time.perf_counter()
        done.append((_embedded(model, second[0], second[2], dev), second[1], second[2]))
        t4 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    scale = len(images) / len(second[0])  # the second batch's forward scaled to the first's readable images
    return choose_workers(t1 - t0, t2 - t1, (t4 - t3) * scale), done


def _threads_beside(workers: int) -> int:
    """The torch threads a CPU model keeps beside `workers` DataLoader processes: the CPUs they leave
    it, at least one, at most its current count."""
    threads = torch.get_num_threads()
    return max(1, min(threads, (os.cpu_count() or 1) - workers)) if workers else threads


@contextmanager
def model_threads(device, workers: int):
    """On CPU, the model's torch threads limited to `_threads_beside(workers)` while the block runs: a
    worker decoding beside as many threads as CPUs stalls the model's parallel regions (1,024-image
    builds on 2 CPUs with one worker: 400-470 images/s with 2 threads, 530-590 with 1)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(_threads_beside(workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def split_preprocess(preprocess) -> tuple:
    """(per-image part, per-batch part or None) of `preprocess`. A torchvision Compose ending in
    ToTensor, Normalize gives each image as uint8 [3, S, S] and scales and normalises the stacked
    batch [B, 3, S, S] in one op (the same float32 values as per image)."""
    steps = preprocess.transforms if isinstance(preprocess, Compose) else []
    if len(steps) >= 2 and isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize):
        return Compose([*steps[:-2], PILToTensor()]), _Scaled(steps[-1])
    return preprocess, None


class _Scaled:
    """uint8 batch [B, 3, S, S] -> `normalize`(batch / 255) float32, as ToTensor then Normalize give it."""

    def __init__(self, normalize: Normalize):
        self.normalize = normalize

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images.float().div_(255))


class _Collate:
    """items -> (the good images stacked [g, 3, S, S], `batched` when given, or None; sha256 per
    item; problem per item ("" if none))."""

    def __init__(self, batched=None):
        self.batched = batched

    def __call__(self, items):
        good = [im for im, _, p in items if p is None]
        images = torch.stack(good) if good else None
        if images is not None and self.batched is not None:
            images = self.batched(images)
        return images, [h or "" for _, h, _ in items], [p or "" for _, _, p in items]


def _spans(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _chunk(work: Path, paths: list[str], span: tuple[int, int], c: int) -> dict | None:
    """Chunk c's arrays if its file holds the paths of `span`, else None."""
    f = work / f"chunk-{c:06d}.npz"
    if not f.is_file():
        return None
    with np.load(f) as z:
        if z["paths"].tolist() != paths[slice(*span)]:
            return None
        return {"embeddings": z["embeddings"], "sha256": z["sha256"].tolist(),
                "problems": z["problems"].tolist() if "problems" in z else [""] * (span[1] - span[0])}


def _save_chunk(work: Path, c: int, rows: list[np.ndarray], paths: list[str], hashes: list[str],
                problems: list[str]) -> None:
    """Write chunk c: its embeddings [n, E] (the batches' `rows` joined), paths, sha256 and problems."""
    with atomic_path(work / f"chunk-{c:06d}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, embeddings=np.concatenate(rows), paths=np.array(paths), sha256=np.array(hashes),
                 problems=np.array(problems))


@torch.no_grad()
def embed_chunks(model, preprocess, paths: list[str], work: Path, key: str, chunk_size: int = 4096,
                 batch_size: int = 128, workers: int | None = 0, device="cpu", progress: bool = True,
                 shard: Shard = Shard()) -> tuple[int, int]:
    """f(image, "") for the paths of the chunks `shard` owns, each chunk saved to
    `work`/chunk-NNNNNN.npz (embeddings [n, E], the paths, sha256 and problems it covers); chunks
    already there under the same `key` are kept. Returns (images embedded now, images kept).
    Batches never straddle chunks, so a resumed build gives the same vectors as an uninterrupted one.
    `workers` None: min(8, CPUs) on CUDA; on CPU chosen on the first two batches (`_first_batch_workers`)."""
    work.mkdir(parents=True, exist_ok=True)
    plan = {"key": key, "count": len(paths), "chunk_size": chunk_size}
    plan_file = work / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise UserError(f"--resume: the interrupted build in {work} was for another checkpoint, gallery or "
                        "--chunk-size; run without --resume to start over")
    write_json(plan_file, plan)
    spans = _spans(len(paths), chunk_size)
    mine = [c for c in range(len(spans)) if shard.owns(c)]
    todo = [c for c in mine if _chunk(work, paths, spans[c], c) is None]
    total = sum(spans[c][1] - spans[c][0] for c in mine)
    resumed = total - sum(spans[c][1] - spans[c][0] for c in todo)
    batches = [list(range(b, min(b + batch_size, spans[c][1])))
               for c in todo for b in range(spans[c][0], spans[c][1], batch_size)]
    dev = torch.device(device)
    per_image, per_batch = split_preprocess(preprocess)
    dataset, collate = _HashedImages(paths, per_image), _Collate(per_batch)
    first = []  # the first batches, embedded while choosing the workers
    if workers is None and dev.type == "cuda":
        workers = min(8, os.cpu_count() or 1)
    elif workers is None and batches:
        workers, first = _first_batch_workers(model, dataset, collate, batches[:2], dev)
        if progress:
            print(f"embedding with {workers} DataLoader worker{'s' * (workers != 1)} beside "
                  f"{_threads_beside(workers)} torch thread(s) (chosen on the first two batches)", file=sys.stderr)
    loader = DataLoader(dataset, batch_sampler=batches[len(first):], num_workers=workers or 0,
                        pin_memory=dev.type == "cuda", collate_fn=collate, prefetch_factor=4 if workers else None)
    embedded = ((_embedded(model, images, p, dev), h, p) for images, h, p in loader)
    rows, hashes, problems, todo_iter, saving = [], [], [], iter(todo), []
    c = next(todo_iter, None)
    desc = "embedding" if shard.world == 1 else f"embedding (rank {shard.rank} of {shard.world})"
    with tqdm(total=total, initial=resumed, desc=desc, unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(1) as writer, model_threads(dev, workers):
        for out, batch_hashes, batch_problems in itertools.chain(first, embedded if batches[len(first):] else ()):
            rows.append(out)
            hashes += batch_hashes
            problems += batch_problems
            bar.update(len(batch_hashes))
            if len(hashes) == spans[c][1] - spans[c][0]:
                saving.append(writer.submit(_save_chunk, work, c, rows, paths[slice(*spans[c])], hashes, problems))
                rows, hashes, problems, c = [], [], [], next(todo_iter, None)
        for done in saving:
            done.result()  # a failed write is raised here
    if shard.world > 1 and progress:
        print(f"rank {shard.rank} of {shard.world}: {total - resumed} images embedded, {resumed} kept from "
              "an earlier run", file=sys.stderr)
    return total - resumed, resumed


def read_chunks(work: Path, paths: list[str], chunk_size: int, dim: int
                ) -> tuple[np.ndarray, list[str], dict[int, str]]:
    """Every chunk of `work` assembled: (embeddings [N, E] float32, memory-mapped from
    `work`/ASSEMBLED, sha256 per path, {i: one-line reason} of the paths that could not be read:
    their rows are NaN, their sha256 "")."""
    emb = np.lib.format.open_memmap(work / ASSEMBLED, "w+", np.float32, (len(paths), dim))
    hashes, problems = [], []
    for c, span in enumerate(_spans(len(paths), chunk_size)):
        z = _chunk(work, paths, span, c)
        if z is None:
            raise UserError(f"{work}: chunk {c} is missing or is not this gallery's; run again with --resume")
        emb[span[0]:span[1]] = z["embeddings"]
        hashes += z["sha256"]
        problems += z["problems"]
    emb.flush()
    return emb, hashes, {i: p for i, p in enumerate(problems) if p}


def embed_images(model, preprocess, paths: list[str], work: Path, key: str, chunk_size: int = 4096,
                 batch_size: int = 128, workers: int | None = 0, device="cpu", progress: bool = True,
                 shard: Shard = Shard()
                 ) -> tuple[np.ndarray | None, list[str] | None, list[tuple[int, int]], dict[int, str] | None]:
    """`embed_chunks` on every rank, then on the lead rank `read_chunks`: (embeddings, sha256 per
    path, [(embedded, kept)] per rank, {i: reason} of the unreadable); on the other ranks
    (None, None, [(embedded, kept)] per rank, None)."""
    counts = shard.gather(embed_chunks(model, preprocess, paths, work, key, chunk_size, batch_size, workers,
                                       device, progress, shard))
    if not shard.lead:
        return None, None, counts, None
    emb, hashes, skipped = read_chunks(work, paths, chunk_size, model.config.embed_dim)
    return emb, hashes, counts, skipped


def hash_files(paths: list[str], workers: int = 4, progress: bool = True) -> list[str]:
    """sha256 of each file's content, read in parallel."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(sha256_file, paths), total=len(paths), desc="hashing", unit="img", disable=not progress))


