"""The gallery index: embed every gallery image once with f(image, ""), then search it fast.

    python -m cir.index build --checkpoint CKPT --gallery FOLDER_OR_LIST --out INDEX_DIR [--type auto]
    python -m cir.index build ... --resume            # continue a build that was killed
    python -m cir.index update --index INDEX_DIR --gallery FOLDER_OR_LIST

INDEX_DIR holds `manifest.json` (checkpoint sha256, model config, embedding dim, normalisation,
index type and parameters, every image with its content sha256, integrity hashes, versions), `embeddings.npy`
([N, E] float32, L2-normalised, row i = image i) and `index.faiss` (a faiss index over the rows).
Index types: `flat` (exact inner product; auto below 200k images), `ivf` (IVFFlat; auto below
5M) and `ivfpq` (IVF with product quantisation). Embeddings are kept so updates and
re-indexing never re-embed. The manifest stores the paths of the images, the checkpoint and the
gallery relative to INDEX_DIR (`../` where need be) and they are resolved against it on reading,
so an index moved or copied together with its images and checkpoint keeps working; absolute
paths (in older indexes) are read as they are.

Unreadable images (corrupt, truncated, not images, over the pixel limit of cir.data.images) are
skipped: the build completes with the others, names them on stderr and lists them, with their
one-line reasons, under "skipped" in manifest.json.

A build embeds in chunks saved to INDEX_DIR.partial/ (`--resume` skips finished chunks), stages
the new folder there and swaps it onto INDEX_DIR in one rename: a kill at any moment leaves the
previous index intact. `update` re-embeds only images whose path or content changed.

Opening an index checks it: the manifest's keys and types, its image count, and the "integrity"
hashes stored at build (one of the ordered image content hashes, one of each data file), so a
reordered or cut image list or a changed vector file is refused with one line instead of giving
wrong results. A build or update holds an exclusive lock (INDEX_DIR.lock); a second one to the
same folder is refused while it runs.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cir.cli import parse_first, positive_int, run_cli
from cir.errors import UserError

TYPES = ("auto", "flat", "ivf", "ivfpq")
FLAT_MAX = 200_000  # auto: exact search below this many images
IVF_MAX = 5_000_000  # auto: IVFFlat below this many, IVF-PQ above


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", allow_abbrev=False, help="embed a gallery and write a new index folder")
    b.add_argument("--checkpoint", default=None, help="model checkpoint (.safetensors); default: the shipped one in assets/")
    b.add_argument("--gallery", required=True, help="gallery: a folder of images or a text file of paths")
    b.add_argument("--out", required=True, help="index folder to write (an existing index there is replaced atomically)")
    b.add_argument("--type", choices=TYPES, default="auto",
                   help=f"faiss index: flat (exact), ivf (IVFFlat), ivfpq (IVF-PQ); auto: flat below {FLAT_MAX:,} "
                        f"images, ivf below {IVF_MAX:,}, else ivfpq")
    b.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default 4*sqrt(N), at most N/39)")
    b.add_argument("--pq-m", type=positive_int, default=None,
                   help="IVF-PQ sub-quantisers = bytes per vector code; must divide the embedding dim (default dim/8)")
    b.add_argument("--train-sample", type=positive_int, default=None,
                   help="vectors sampled to train IVF/PQ (default min(N, 64*nlist), for ivfpq at least 9984)")
    b.add_argument("--nprobe", type=positive_int, default=None,
                   help="default IVF lists visited per query, stored in the index; GalleryIndex.nprobe changes it "
                        "at search time (default max(16, nlist/32))")
    _add_embedding_flags(b)
    u = sub.add_parser("update", allow_abbrev=False, help="bring an index up to date with a changed gallery (embeds only new images)")
    u.add_argument("--index", required=True, help="index folder written by `build`")
    u.add_argument("--gallery", required=True, help="the gallery now: a folder of images or a text file of paths")
    u.add_argument("--checkpoint", default=None,
                   help="the index's checkpoint, if it moved (its sha256 must match; default: the recorded path)")
    u.add_argument("--retrain", action="store_true", help="re-train IVF/PQ on the updated gallery instead of reusing it")
    _add_embedding_flags(u)
    a = p.parse_args(argv)
    if a.workers is not None and a.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {a.workers}")
    return a


def _add_embedding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: min(8, CPUs) on CUDA, 0 on CPU)")
    p.add_argument("--chunk-size", type=positive_int, default=4096,
                   help="images per saved chunk in INDEX_DIR.partial/ (the unit --resume skips; default 4096)")
    p.add_argument("--device", default=None,
                   help="torch device for embedding; bf16 autocast on CUDA (default: cuda if available)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its finished chunks instead of starting over")


parse_first(__name__, parse_args)  # `python -m cir.index`: --help and argument errors before torch loads

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from contextlib import contextmanager

from cir.atomic import atomic_path, sha256_file, staged_dir, write_json
from cir.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, model_hash, read_manifest, versions
from cir.data.datasets import ImageDataset
from cir.data.images import BadImage, load_rgb
from cir.data.triplets import normalize_path, read_gallery
from cir.precision import autocast

FORMAT = "context-cir-index/2"  # /2: integrity hashes in the manifest
PQ_NBITS = 8
MANIFEST, EMBEDDINGS, FAISS_FILE = "manifest.json", "embeddings.npy", "index.faiss"
GPU_SCORE_BLOCK = 1 << 28  # max query x gallery scores materialised at once on the GPU


# ---------------------------------------------------------------------------------------- faiss indexes
def resolve_params(n: int, dim: int, index_type: str = "auto", nlist: int | None = None, pq_m: int | None = None,
                   train_sample: int | None = None, nprobe: int | None = None) -> dict:
    """Concrete index parameters for `n` vectors of `dim`: {"type", "nlist", "pq_m", "nbits",
    "train_sample", "nprobe"} (None where the type has no such parameter). Defaults:
    nlist = 4 sqrt(n) (at most n/39, faiss' minimum training points per list), pq_m = dim/8 (bytes
    per code), train_sample = min(n, 64 nlist, for ivfpq at least 39 * 256), nprobe = max(16, nlist/32)."""
    if index_type not in TYPES:
        raise UserError(f"unknown index type {index_type!r}; choose from {', '.join(TYPES)}")
    if index_type == "auto":
        index_type = "flat" if n < FLAT_MAX else "ivf" if n < IVF_MAX else "ivfpq"
    params = {"type": index_type, "nlist": None, "pq_m": None, "nbits": None, "train_sample": None, "nprobe": None}
    if index_type == "flat":
        return params
    nlist = nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    train = min(n, train_sample or max(64 * nlist, 39 * 2 ** PQ_NBITS if index_type == "ivfpq" else 0))
    if nlist < 1 or train < nlist:
        raise UserError(f"{index_type} with nlist={nlist} needs at least {nlist} training vectors, "
                        f"got {train} (of {n} images); lower --nlist or use --type flat")
    params.update(nlist=nlist, train_sample=train, nprobe=min(nlist, nprobe or max(16, nlist // 32)))
    if index_type == "ivfpq":
        pq_m = pq_m or max(1, dim // 8)
        if dim % pq_m:
            raise UserError(f"--pq-m {pq_m} must divide the embedding dim {dim}")
        if train < 2 ** PQ_NBITS:
            raise UserError(f"ivfpq needs at least {2 ** PQ_NBITS} training vectors, got {train}; use --type ivf or flat")
        params.update(pq_m=pq_m, nbits=PQ_NBITS)
    return params


def make_faiss_index(embeddings: np.ndarray, params: dict, seed: int = 0) -> faiss.Index:
    """A trained faiss inner-product index holding embeddings [N, E] float32 (id = row)."""
    n, dim = embeddings.shape
    if params["type"] == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if params["type"] == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["nbits"],
                                     faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        rows = np.sort(np.random.default_rng(seed).choice(n, params["train_sample"], replace=False))
        index.train(np.ascontiguousarray(embeddings[rows]))
    index.add(np.ascontiguousarray(embeddings))
    return index


# ---------------------------------------------------------------------------------------- search
class GalleryIndex:
    """A gallery index loaded for search: `.paths` [N] (absolute, normalised), `.search(q, k)`.

    On CPU it searches the faiss index; on CUDA the gallery lives on the GPU as an fp16 matrix
    [N, E] and search is one matmul + topk (always exact; the faiss index is not loaded)."""

    def __init__(self, manifest: dict, embeddings: np.ndarray, index: faiss.Index | None, device="cpu"):
        self.manifest = manifest
        self.paths = [im["path"] for im in manifest["images"]]
        self.device = torch.device(device)
        self.nprobe = manifest["index"]["params"]["nprobe"]
        self._embeddings, self._index, self._gpu = embeddings, index, None
        if self.device.type == "cuda":
            self._gpu = torch.from_numpy(np.ascontiguousarray(embeddings)).to(self.device, torch.float16)
            self._index = None

    @property
    def embeddings(self) -> np.ndarray:
        """The stored gallery embeddings [N, E] float32 (memory-mapped when loaded from disk)."""
        return self._embeddings

    @property
    def faiss_index(self) -> faiss.Index | None:
        """The faiss index searched on CPU (None on CUDA)."""
        return self._index

    @property
    def dim(self) -> int:
        return self.manifest["embedding"]["dim"]

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def load(index_dir: str | os.PathLike, checkpoint_path: str | os.PathLike | None = None,
             device: str | torch.device = "cpu") -> "GalleryIndex":
        """Open INDEX_DIR. With `checkpoint_path`, its sha256 must be the one the index was built with."""
        index_dir = Path(index_dir)
        manifest, emb = open_embeddings(index_dir, checkpoint_path)
        index = None
        if torch.device(device).type != "cuda":
            check_integrity(manifest, index_dir, files=(FAISS_FILE,))
            try:
                index = faiss.read_index(str(index_dir / FAISS_FILE))
            except RuntimeError as e:  # faiss reports a missing or damaged file as RuntimeError
                first = (str(e).strip().splitlines() or ["damaged"])[0]
                raise UserError(f"{index_dir}: {FAISS_FILE} cannot be read ({first}); rebuild the index") from None
            if index.ntotal != len(emb):
                raise UserError(f"{index_dir}: {FAISS_FILE} holds {index.ntotal} vectors, {EMBEDDINGS} {len(emb)}; "
                                "rebuild the index")
        return GalleryIndex(manifest, emb, index, device)

    @staticmethod
    def build(out: str | os.PathLike, gallery: str | os.PathLike | list[str], checkpoint=None, device="cpu",
              **options) -> "GalleryIndex":
        """`build_index(out, gallery, checkpoint, **options)`, then load the result on `device`."""
        build_index(out, gallery, checkpoint, device=device, **options)
        return GalleryIndex.load(out, device=device)

    @staticmethod
    def from_embeddings(embeddings: np.ndarray, paths: list[str] | None = None, index_type: str = "auto",
                        nlist: int | None = None, pq_m: int | None = None, train_sample: int | None = None,
                        nprobe: int | None = None, device="cpu") -> "GalleryIndex":
        """An in-memory index over embeddings [N, E] (rows L2-normalised by the caller); paths default to "0".."N-1"."""
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        params = resolve_params(len(emb), emb.shape[1], index_type, nlist, pq_m, train_sample, nprobe)
        manifest = {"images": [{"path": p} for p in (paths or map(str, range(len(emb))))], "count": len(emb),
                    "embedding": {"dim": emb.shape[1], "normalization": "l2"},
                    "index": {"requested": {"type": index_type}, "params": params}}
        index = make_faiss_index(emb, params) if torch.device(device).type != "cuda" else None
        return GalleryIndex(manifest, emb, index, device)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10, nprobe: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, E] (L2-normalised) -> (scores [Q, k] float32, ids [Q, k] int64 into `.paths`),
        best first by inner product. k is capped at N; IVF search with a small nprobe may find
        fewer than k and pads with id -1. `nprobe` (IVF lists visited) defaults to `.nprobe`."""
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy() if self._gpu is None else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(queries.shape)}")
        k = min(k, len(self))
        if self._gpu is not None:
            return self._search_gpu(torch.as_tensor(queries), k)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        threads = faiss.omp_get_max_threads()
        # faiss spreads few queries over threads one query each: more threads than queries only add
        # an OpenMP barrier, which costs a whole scheduler slice on a busy machine
        faiss.omp_set_num_threads(max(1, min(threads, len(q))))
        try:
            if isinstance(self._index, faiss.IndexIVF):
                scores, ids = self._index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe))
            else:
                scores, ids = self._index.search(q, k)
        finally:
            faiss.omp_set_num_threads(threads)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    @torch.no_grad()
    def _search_gpu(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = queries.to(self._gpu.device, torch.float16)
        step = max(1, GPU_SCORE_BLOCK // max(1, len(self)))
        out = [(self._gpu.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=q.device))]
        for i in range(0, len(q), step):
            out.append((q[i:i + step] @ self._gpu.T).topk(k, dim=1))
        return (torch.cat([s for s, _ in out]).float().cpu().numpy(),
                torch.cat([i for _, i in out]).cpu().numpy().astype(np.int64))


def open_embeddings(index_dir: str | os.PathLike, checkpoint_path: str | os.PathLike | None = None
                    ) -> tuple[dict, np.ndarray]:
    """(resolved manifest, embeddings [N, E] float32 memory-mapped) of INDEX_DIR, checked against each
    other. With `checkpoint_path`, its sha256 must be the one the index was built with."""
    index_dir = Path(index_dir)
    manifest = read_resolved_manifest(index_dir)
    if checkpoint_path is not None:
        check_checkpoint(manifest, checkpoint_path, index_dir)
    check_integrity(manifest, index_dir)
    try:
        emb = np.load(index_dir / EMBEDDINGS, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # missing, truncated or not a .npy file
        raise UserError(f"{index_dir}: {EMBEDDINGS} cannot be read ({type(e).__name__}: "
                        f"{' '.join(str(e).split())}); rebuild the index") from None
    if emb.shape != (manifest["count"], manifest["embedding"]["dim"]):
        raise UserError(f"{index_dir}: {EMBEDDINGS} has shape {emb.shape}, the manifest says "
                        f"({manifest['count']}, {manifest['embedding']['dim']}); rebuild the index")
    return manifest, emb


def embeddings_of(index_dir: str | os.PathLike, paths: list[str], checkpoint_path: str | os.PathLike
                  ) -> np.ndarray:
    """The stored embeddings [len(paths), E] float32 of `paths` (absolute, normalised), in that order,
    from the index at INDEX_DIR built with `checkpoint_path`; a UserError naming the first path the
    index lacks."""
    manifest, emb = open_embeddings(index_dir, checkpoint_path)
    row = {im["path"]: i for i, im in enumerate(manifest["images"])}
    missing = [p for p in paths if p not in row]
    if missing:
        raise UserError(f"index {index_dir} lacks {len(missing)} of the {len(paths)} gallery images, e.g. "
                        f"{missing[0]}; build it over them with: python -m cir.index build --gallery ...")
    return np.ascontiguousarray(emb[[row[p] for p in paths]], dtype=np.float32)


def read_index_manifest(index_dir: Path) -> dict:
    path = index_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"no gallery index at {index_dir} (build one with: python -m cir.index build ...)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8, or nested too deeply
        raise UserError(f"{path} is not a valid index manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise UserError(f"{index_dir}: unsupported index format {manifest.get('format')!r} (expected {FORMAT}); "
                        "rebuild it with: python -m cir.index build")
    _check_manifest_fields(manifest, index_dir)
    return manifest


# key -> the type its value must have; "a.b" is key b of the dict at a, "images[]" every list item
MANIFEST_FIELDS = {"checkpoint": dict, "checkpoint.path": str, "checkpoint.sha256": str, "config": dict,
                   "embedding": dict, "embedding.dim": int, "index": dict, "index.params": dict,
                   "index.params.type": str, "index.requested": dict, "count": int, "images": list,
                   "images[]": dict, "images[].path": str, "images[].sha256": str, "integrity": dict,
                   "integrity.images": str, "integrity.embeddings": str, "integrity.faiss": str}


def _check_manifest_fields(manifest: dict, index_dir: Path) -> None:
    """A one-line UserError naming the first key of MANIFEST_FIELDS that is missing or of the wrong type."""
    for key, kind in MANIFEST_FIELDS.items():
        values = [manifest]
        for part in key.split("."):
            items = part.endswith("[]")
            values = [v.get(part.removesuffix("[]")) if isinstance(v, dict) else None for v in values]
            if items:
                values = [x for v in values if isinstance(v, list) for x in v]
        bad = next((v for v in values if not isinstance(v, kind) or (kind is int and isinstance(v, bool))), ...)
        if bad is not ...:
            what = "lacks" if bad is None else f"has a {type(bad).__name__} at"
            raise UserError(f"{index_dir}: {MANIFEST} {what} {key!r} (expected {kind.__name__}); rebuild the index")
    if len(manifest["images"]) != manifest["count"]:
        raise UserError(f"{index_dir}: {MANIFEST} lists {len(manifest['images'])} images but its count is "
                        f"{manifest['count']}; rebuild the index")


def images_hash(images: list[dict]) -> str:
    """The integrity hash of an image list: sha256 over the images' content hashes, in row order."""
    return hashlib.sha256("\n".join(im["sha256"] for im in images).encode()).hexdigest()


def check_integrity(manifest: dict, index_dir: Path, files=(EMBEDDINGS,)) -> None:
    """Refuse (one line) an index whose image list or whose data `files` (EMBEDDINGS, FAISS_FILE)
    are not the ones it was built with."""
    if images_hash(manifest["images"]) != manifest["integrity"]["images"]:
        raise UserError(f"{index_dir}: the image list in {MANIFEST} was changed after the build (its hash "
                        "differs); rebuild the index")
    for name in files:
        key = "embeddings" if name == EMBEDDINGS else "faiss"
        if (index_dir / name).is_file() and sha256_file(index_dir / name) != manifest["integrity"][key]:
            raise UserError(f"{index_dir}: {name} is not the file the index was built with (its sha256 "
                            "differs); rebuild the index")


def read_resolved_manifest(index_dir: Path) -> dict:
    """`read_index_manifest` with every file path in it absolute: stored relative paths are taken
    from `index_dir`."""
    return _with_paths(read_index_manifest(index_dir), lambda p: normalize_path(p, index_dir))


def _with_paths(manifest: dict, path) -> dict:
    """A copy of `manifest` with the function `path` applied to every file path in it: the images',
    the skipped images', the checkpoint's and the gallery's (None for a list of paths)."""
    m = dict(manifest, checkpoint=dict(manifest["checkpoint"], path=path(manifest["checkpoint"]["path"])))
    for key in ("images", "skipped"):
        if key in m:
            m[key] = [dict(im, path=path(im["path"])) for im in m[key]]
    if m.get("gallery") is not None:
        m["gallery"] = path(m["gallery"])
    return m


def check_checkpoint(manifest: dict, checkpoint_path, index_dir: Path) -> str:
    """The sha256 of `checkpoint_path`; a UserError naming both hashes unless it built the index."""
    if not Path(checkpoint_path).is_file():
        raise UserError(f"checkpoint not found: {checkpoint_path}")
    have, want = model_hash(checkpoint_path), manifest["checkpoint"]["sha256"]
    if have != want:
        raise UserError(f"checkpoint {checkpoint_path} (sha256 {have}) is not the one index {index_dir} was built "
                        f"with (sha256 {want}); rebuild the index with: python -m cir.index build")
    if manifest["config"] != read_manifest(checkpoint_path)["config"]:
        raise UserError(f"{index_dir}: the model config in {MANIFEST} is not its checkpoint's; rebuild the index")
    return have


# ---------------------------------------------------------------------------------------- embedding
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


def _collate(items):
    """-> (the good images stacked [g, 3, S, S] or None, sha256 per item, problem per item ("" if none))."""
    good = [im for im, _, p in items if p is None]
    return (torch.stack(good) if good else None), [h or "" for _, h, _ in items], [p or "" for _, _, p in items]


@torch.no_grad()
def embed_images(model, preprocess, paths: list[str], work: Path, key: str, chunk_size: int = 4096,
                 batch_size: int = 128, workers: int = 0, device="cpu", progress: bool = True
                 ) -> tuple[np.ndarray, list[str], int, dict[int, str]]:
    """f(image, "") for every path, chunk by chunk into `work`/chunk-NNNNNN.npz (embeddings [n, E],
    the paths, sha256 and problems they cover); chunks already there under the same `key` are reused.

    Returns (embeddings [N, E] float32 L2-normalised, sha256 per path, images taken from old chunks,
    {i: one-line reason} of the paths that could not be read: their rows are NaN, their sha256 "").
    Batches never straddle chunks, so a resumed build gives the same vectors as an uninterrupted one."""
    work.mkdir(parents=True, exist_ok=True)
    plan = {"key": key, "count": len(paths), "chunk_size": chunk_size}
    plan_file = work / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise UserError(f"--resume: the interrupted build in {work} was for another checkpoint, gallery or "
                        "--chunk-size; run without --resume to start over")
    write_json(plan_file, plan)
    spans = [(s, min(s + chunk_size, len(paths))) for s in range(0, len(paths), chunk_size)]
    done: dict[int, tuple[np.ndarray, list[str], list[str]]] = {}
    for c, (s, e) in enumerate(spans):
        f = work / f"chunk-{c:06d}.npz"
        if f.is_file():
            with np.load(f) as z:
                if z["paths"].tolist() == paths[s:e]:
                    done[c] = (z["embeddings"], z["sha256"].tolist(),
                               z["problems"].tolist() if "problems" in z else [""] * (e - s))
    resumed = sum(len(h) for _, h, _ in done.values())
    todo = [c for c in range(len(spans)) if c not in done]
    batches = [list(range(b, min(b + batch_size, spans[c][1])))
               for c in todo for b in range(spans[c][0], spans[c][1], batch_size)]
    dev = torch.device(device)
    loader = DataLoader(_HashedImages(paths, preprocess), batch_sampler=batches, num_workers=workers,
                        pin_memory=dev.type == "cuda", collate_fn=_collate)
    rows, hashes, problems, todo_iter = [], [], [], iter(todo)
    c = next(todo_iter, None)
    dim = model.config.embed_dim
    with tqdm(total=len(paths), initial=resumed, desc="embedding", unit="img", disable=not progress) as bar:
        for images, batch_hashes, batch_problems in loader:
            out = np.full((len(batch_hashes), dim), np.nan, np.float32)  # unreadable images stay NaN
            if images is not None:
                with autocast(dev):
                    emb = model.encode_gallery(images.to(dev, non_blocking=True))
                out[[i for i, p in enumerate(batch_problems) if not p]] = F.normalize(emb.float(), dim=-1).cpu().numpy()
            rows.append(out)
            hashes += batch_hashes
            problems += batch_problems
            bar.update(len(batch_hashes))
            if len(hashes) == spans[c][1] - spans[c][0]:
                done[c] = (np.concatenate(rows), hashes, problems)
                with atomic_path(work / f"chunk-{c:06d}.npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, embeddings=done[c][0], paths=np.array(paths[slice(*spans[c])]),
                             sha256=np.array(hashes), problems=np.array(problems))
                rows, hashes, problems, c = [], [], [], next(todo_iter, None)
    emb = np.concatenate([done[c][0] for c in range(len(spans))])
    every = [p for c in range(len(spans)) for p in done[c][2]]
    return emb, [h for c in range(len(spans)) for h in done[c][1]], resumed, {i: p for i, p in enumerate(every) if p}


def _report_skipped(skipped: dict[int, str], total: int, shown: int = 20) -> None:
    """Name the unreadable images on stderr (the first `shown`; the manifest lists them all)."""
    print(f"skipped {len(skipped)} of {total} gallery images that cannot be read (listed in the index's "
          f"{MANIFEST} under \"skipped\"):", file=sys.stderr)
    for reason in list(skipped.values())[:shown]:
        print(f"  skipped: {reason}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"  ... and {len(skipped) - shown} more", file=sys.stderr)


def _drop_skipped(paths: list[str], emb: np.ndarray, hashes: list[str], skipped: dict[int, str], gallery,
                  must_keep_one: bool = True) -> tuple[list[str], np.ndarray, list[str], list[dict]]:
    """The readable images only: (paths, embeddings, sha256, [{"path", "reason"}] of the skipped)."""
    if not skipped:
        return paths, emb, hashes, []
    _report_skipped(skipped, len(paths))
    keep = [i for i in range(len(paths)) if i not in skipped]
    if not keep and must_keep_one:
        raise UserError(f"no image of the gallery {gallery} can be read: {next(iter(skipped.values()))}"
                        + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    return ([paths[i] for i in keep], emb[keep], [hashes[i] for i in keep],
            [{"path": paths[i], "reason": r} for i, r in skipped.items()])


def hash_files(paths: list[str], workers: int = 4, progress: bool = True) -> list[str]:
    """sha256 of each file's content, read in parallel."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(sha256_file, paths), total=len(paths), desc="hashing", unit="img", disable=not progress))


# ---------------------------------------------------------------------------------------- writing
def _check_out(out: Path) -> None:
    """Refuse to replace anything but an index or an empty folder."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise UserError(f"refusing to replace {out}: it exists and is not a gallery index")
    if (out / MANIFEST).is_file():
        read_index_manifest(out)


def _write_index(out: Path, work: Path, manifest: dict, embeddings: np.ndarray, index: faiss.Index) -> None:
    """Stage the index folder in `work`/staged, swap it onto `out`, then remove `work`. The
    manifest's file paths are stored relative to `out`."""
    base = normalize_path(out)
    stored = _with_paths(manifest, lambda p: os.path.relpath(p, base))
    with staged_dir(out, work / "staged") as staged:
        np.save(staged / EMBEDDINGS, embeddings)
        faiss.write_index(index, str(staged / FAISS_FILE))
        stored["integrity"] = {"images": images_hash(stored["images"]), "embeddings": sha256_file(staged / EMBEDDINGS),
                               "faiss": sha256_file(staged / FAISS_FILE)}
        (staged / MANIFEST).write_text(json.dumps(stored, indent=1, ensure_ascii=False), encoding="utf-8")
    shutil.rmtree(work)


@contextmanager
def build_lock(out: Path):
    """Hold OUT.lock exclusively while a build or update writes OUT; a second one is refused. The
    file is removed on release (a holder that locked a file already removed checks the inode)."""
    lock = out.with_name(out.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not lock.exists() or os.stat(lock).st_ino != os.fstat(f.fileno()).st_ino:
                raise BlockingIOError
        except BlockingIOError:
            raise UserError(f"another build or update of {out} is running (it holds {lock}); wait for it") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)


def _versions() -> dict:
    return versions() | {"faiss": faiss.__version__, "numpy": np.__version__}


def _work_dir(out: Path, resume: bool, progress: bool) -> Path:
    work = out.with_name(out.name + ".partial")
    if work.exists() and not resume:
        if progress:
            print(f"discarding the interrupted build in {work} (pass --resume to continue it)", file=sys.stderr)
        shutil.rmtree(work)
    elif resume and not work.exists() and progress:
        print(f"nothing to resume in {work}; starting a fresh build", file=sys.stderr)
    return work


def _gallery_paths(gallery) -> list[str]:
    if isinstance(gallery, (str, os.PathLike)):
        paths = read_gallery(gallery)
    else:
        paths = list(dict.fromkeys(map(normalize_path, gallery)))
    if not paths:
        raise UserError(f"the gallery {gallery} holds no images")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"gallery image not found: {missing[0]}{more}")
    return paths


def _plan_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def build_index(out: str | os.PathLike, gallery: str | os.PathLike | list[str], checkpoint=None,
                index_type: str = "auto", nlist: int | None = None, pq_m: int | None = None,
                train_sample: int | None = None, nprobe: int | None = None, batch_size: int = 128,
                workers: int = 0, chunk_size: int = 4096, device="cpu", resume: bool = False,
                progress: bool = False) -> dict:
    """Embed every image of `gallery` (a folder, a list file, or a list of paths) with `checkpoint`
    (default: cir.checkpoint.DEFAULT_CHECKPOINT) and write the index folder `out` atomically.

    Returns {"images", "embedded", "resumed", "type", "seconds"}."""
    t0 = time.time()
    out, checkpoint = Path(out), Path(checkpoint or DEFAULT_CHECKPOINT)
    with build_lock(out):
        _check_out(out)
        paths = _gallery_paths(gallery)
        config = read_manifest(checkpoint)["config"]
        params = resolve_params(len(paths), config["embed_dim"], index_type, nlist, pq_m, train_sample, nprobe)
        model, preprocess, _ = load_checkpoint(checkpoint, device)
        sha = model_hash(checkpoint)
        work = _work_dir(out, resume, progress)
        emb, hashes, resumed, skipped = embed_images(model, preprocess, paths, work, _plan_key(sha, paths), chunk_size,
                                                     batch_size, workers, device, progress)
        paths, emb, hashes, skipped = _drop_skipped(paths, emb, hashes, skipped, gallery)
        if skipped:
            params = resolve_params(len(paths), config["embed_dim"], index_type, nlist, pq_m, train_sample, nprobe)
        requested = {"type": index_type, "nlist": nlist, "pq_m": pq_m, "train_sample": train_sample, "nprobe": nprobe}
        manifest = {"format": FORMAT, "checkpoint": {"path": normalize_path(checkpoint), "sha256": sha},
                    "config": config,
                    "embedding": {"dim": emb.shape[1], "normalization": "l2", "dtype": "float32", "file": EMBEDDINGS},
                    "index": {"requested": requested, "params": params, "metric": "inner_product", "file": FAISS_FILE},
                    "count": len(paths), "gallery": str(gallery) if isinstance(gallery, (str, os.PathLike)) else None,
                    "images": [{"path": p, "sha256": h} for p, h in zip(paths, hashes)], "skipped": skipped,
                    "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_index(out, work, manifest, emb, make_faiss_index(emb, params))
        return {"images": len(paths), "embedded": len(paths) + len(skipped) - resumed, "resumed": resumed,
                "skipped": len(skipped), "type": params["type"], "seconds": time.time() - t0}


def update_index(index_dir: str | os.PathLike, gallery: str | os.PathLike | list[str], checkpoint=None,
                 retrain: bool = False, batch_size: int = 128, workers: int = 0, chunk_size: int = 4096,
                 device="cpu", resume: bool = False, progress: bool = False) -> dict:
    """Make the index at `index_dir` cover `gallery`: images whose path and content sha256 are
    unchanged keep their vectors, new or changed ones are embedded, missing ones dropped. The
    trained IVF/PQ structures are reused unless `retrain` or the automatic type changes.

    `checkpoint` defaults to the one recorded in the index and must match its sha256.
    Returns {"images", "kept", "embedded", "removed", "resumed", "type", "seconds"}."""
    t0 = time.time()
    index_dir = Path(index_dir)
    with build_lock(index_dir):
        manifest = read_resolved_manifest(index_dir)
        checkpoint = Path(checkpoint or manifest["checkpoint"]["path"])
        if not checkpoint.is_file():
            raise UserError(f"the index's checkpoint {checkpoint} is gone; pass --checkpoint (same sha256 "
                            f"{manifest['checkpoint']['sha256']})")
        sha = check_checkpoint(manifest, checkpoint, index_dir)
        check_integrity(manifest, index_dir, files=(EMBEDDINGS, FAISS_FILE))
        paths = _gallery_paths(gallery)
        old_rows = {im["path"]: (i, im["sha256"]) for i, im in enumerate(manifest["images"])}
        current = hash_files(paths, max(workers, 4), progress)
        keep = {p: old_rows[p][0] for p, h in zip(paths, current) if p in old_rows and old_rows[p][1] == h}
        new = [p for p in paths if p not in keep]
        old_emb = np.load(index_dir / EMBEDDINGS, mmap_mode="r")
        work = _work_dir(index_dir, resume, progress)
        if new:
            model, preprocess, _ = load_checkpoint(checkpoint, device)
            new_emb, new_hashes, resumed, skipped = embed_images(model, preprocess, new, work, _plan_key(sha, new),
                                                                 chunk_size, batch_size, workers, device, progress)
            attempted = len(new)
            new, new_emb, new_hashes, skipped = _drop_skipped(new, new_emb, new_hashes, skipped, gallery, must_keep_one=False)
            unreadable = {s["path"] for s in skipped}
            paths = [p for p in paths if p not in unreadable]
            if not paths:
                raise UserError(f"no image of the gallery {gallery} can be read")
        else:
            new_emb, new_hashes, resumed, skipped, attempted = np.zeros((0, old_emb.shape[1]), np.float32), [], 0, [], 0
            work.mkdir(exist_ok=True)
        emb = np.empty((len(paths), old_emb.shape[1]), np.float32)
        kept_rows = [i for i, p in enumerate(paths) if p in keep]
        emb[kept_rows] = old_emb[[keep[paths[i]] for i in kept_rows]]
        emb[[i for i, p in enumerate(paths) if p not in keep]] = new_emb  # `new` is in gallery order
        fresh = iter(new_hashes)
        hashes = [old_rows[p][1] if p in keep else next(fresh) for p in paths]
        req = manifest["index"]["requested"]
        params = resolve_params(len(paths), emb.shape[1], req["type"], req["nlist"], req["pq_m"], req["train_sample"], req["nprobe"])
        if retrain or params["type"] != manifest["index"]["params"]["type"]:
            index = make_faiss_index(emb, params)
        else:
            params = manifest["index"]["params"]
            index = faiss.read_index(str(index_dir / FAISS_FILE))
            index.reset()
            index.add(emb)
        manifest = dict(manifest, count=len(paths), images=[{"path": p, "sha256": h} for p, h in zip(paths, hashes)],
                        skipped=skipped,
                        gallery=str(gallery) if isinstance(gallery, (str, os.PathLike)) else None,
                        versions=_versions(), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        manifest["index"] = dict(manifest["index"], params=params)
        removed = len(set(old_rows) - set(paths))
        _write_index(index_dir, work, manifest, emb, index)
        return {"images": len(paths), "kept": len(keep), "embedded": attempted - resumed, "removed": removed,
                "resumed": resumed, "skipped": len(skipped), "type": params["type"], "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    a.device = a.device or ("cuda" if cuda else "cpu")
    a.workers = (min(8, os.cpu_count() or 1) if cuda else 0) if a.workers is None else a.workers
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise UserError(f"--device: not a torch device: {a.device!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    common = dict(batch_size=a.batch_size, workers=a.workers, chunk_size=a.chunk_size, device=device,
                  resume=a.resume, progress=True)
    if a.cmd == "build":
        r = build_index(a.out, a.gallery, a.checkpoint, a.type, a.nlist, a.pq_m, a.train_sample, a.nprobe, **common)
        print(f"wrote {a.out}: {r['images']} images indexed, {r['skipped']} unreadable skipped ({r['embedded']} "
              f"files read now, {r['resumed']} resumed from an earlier run), {r['type']} index, {r['seconds']:.1f} s")
    else:
        r = update_index(a.index, a.gallery, a.checkpoint, a.retrain, **common)
        print(f"updated {a.index}: {r['images']} images ({r['kept']} kept, {r['embedded']} embedded, "
              f"{r['resumed']} resumed, {r['removed']} removed, {r['skipped']} unreadable skipped), "
              f"{r['type']} index, {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
