"""Search a gallery index: faiss on CPU (IVF-PQ candidates re-ranked exactly against the
memory-mapped vectors), an fp16 matmul + top-k on CUDA."""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import torch

from cir.errors import UserError
from cir.retrieval.build import build_index
from cir.retrieval.params import index_bytes, make_faiss_index, resolve_params
from cir.retrieval.pathlist import PathList
from cir.retrieval.store import FAISS_FILE, EMBEDDINGS, check_integrity, open_embeddings

GPU_SCORE_BLOCK = 1 << 28  # max query x gallery scores materialised at once on the GPU
RERANK_BLOCK = 1 << 22  # max candidate vector values gathered at once for re-ranking


class GalleryIndex:
    """A gallery index loaded for search: `.paths` [N] (absolute, normalised; a `PathList`, so a
    million paths take no million Python strings), `.search(q, k)`; `.manifest` is the index's
    manifest (which holds no image list).

    On CPU it searches the faiss index, memory-mapped when loaded from disk; IVF-PQ's candidates
    are re-ranked by exact inner product against the stored vectors, read from the memory-mapped
    embeddings.npy row by row (only the candidates' pages become resident). On CUDA the gallery lives on the GPU as an fp16 matrix
    [N, E] and search is one matmul + topk (always exact; the faiss index is not loaded)."""

    def __init__(self, manifest: dict, paths: PathList, embeddings: np.ndarray, index: faiss.Index | None,
                 device="cpu"):
        self.paths, self.manifest = paths, manifest
        self.device = torch.device(device)
        self.nprobe = manifest["index"]["params"]["nprobe"]
        self.rerank = manifest["index"]["params"].get("rerank") or 0
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
        manifest, paths, emb = open_embeddings(index_dir, checkpoint_path)
        index = None
        if torch.device(device).type != "cuda":
            check_integrity(manifest, index_dir, files=(FAISS_FILE,))
            try:
                flat = manifest["index"]["params"]["type"] == "flat"  # faiss maps flat codes and IVF lists apart
                index = faiss.read_index(str(index_dir / FAISS_FILE), faiss.IO_FLAG_MMAP_IFC if flat else faiss.IO_FLAG_MMAP)
            except RuntimeError as e:  # faiss reports a missing or damaged file as RuntimeError
                first = (str(e).strip().splitlines() or ["damaged"])[0]
                raise UserError(f"{index_dir}: {FAISS_FILE} cannot be read ({first}); rebuild the index") from None
            if index.ntotal != len(emb):
                raise UserError(f"{index_dir}: {FAISS_FILE} holds {index.ntotal} vectors, {EMBEDDINGS} {len(emb)}; "
                                "rebuild the index")
        return GalleryIndex(manifest, paths, emb, index, device)

    @staticmethod
    def build(out: str | os.PathLike, gallery: str | os.PathLike | list[str], checkpoint=None, device="cpu",
              **options) -> "GalleryIndex":
        """`build_index(out, gallery, checkpoint, **options)`, then load the result on `device`."""
        build_index(out, gallery, checkpoint, device=device, **options)
        return GalleryIndex.load(out, device=device)

    @staticmethod
    def from_embeddings(embeddings: np.ndarray, paths: list[str] | None = None, index_type: str = "auto",
                        nlist: int | None = None, pq_m: int | None = None, train_sample: int | None = None,
                        nprobe: int | None = None, rerank: int | None = None, device="cpu") -> "GalleryIndex":
        """An index over embeddings [N, E] (rows L2-normalised by the caller), kept as they are when a
        float32 np.memmap (IVF-PQ then re-ranks from the mapped file); paths default to "0".."N-1"."""
        mapped = isinstance(embeddings, np.memmap) and embeddings.dtype == np.float32
        emb = embeddings if mapped else np.ascontiguousarray(embeddings, dtype=np.float32)
        params = resolve_params(len(emb), emb.shape[1], index_type, nlist, pq_m, train_sample, nprobe, rerank)
        manifest = {"count": len(emb), "embedding": {"dim": emb.shape[1], "normalization": "l2"},
                    "index": {"requested": {"type": index_type}, "params": params}}
        index = make_faiss_index(emb, params) if torch.device(device).type != "cuda" else None
        return GalleryIndex(manifest, PathList(paths or map(str, range(len(emb)))), emb, index, device)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10, nprobe: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, E] (L2-normalised) -> (scores [Q, k] float32, ids [Q, k] int64 into `.paths`),
        best first by inner product. k is capped at N; IVF search with a small nprobe may find
        fewer than k and pads with id -1. `nprobe` (IVF lists visited) defaults to `.nprobe`;
        `.rerank` (IVF-PQ: rerank * k candidates re-ranked exactly, 0: PQ scores) can be changed."""
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
        rerank = isinstance(self._index, faiss.IndexIVFPQ) and self.rerank > 0
        candidates = min(k * self.rerank, len(self)) if rerank else k
        try:
            if isinstance(self._index, faiss.IndexIVF):
                scores, ids = self._index.search(q, candidates,
                                                 params=faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe))
            else:
                scores, ids = self._index.search(q, k)
        finally:
            faiss.omp_set_num_threads(threads)
        if rerank:
            return self._rerank(q, ids.astype(np.int64, copy=False), k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def _rerank(self, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k of candidate `ids` [Q, C] (-1: none) by exact inner product with the stored rows."""
        scores = np.full(ids.shape, -np.inf, np.float32)
        step = max(1, RERANK_BLOCK // (ids.shape[1] * self.dim))
        for s in range(0, len(q), step):
            block = ids[s:s + step]
            found = block >= 0
            rows, where = np.unique(block[found], return_inverse=True)  # sorted: the mapped file read in order
            vectors = np.asarray(self._embeddings[rows], dtype=np.float32)
            scores[s:s + step][found] = np.einsum("ij,ij->i", vectors[where], np.repeat(q[s:s + step], found.sum(1), 0))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best, chosen = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        chosen[np.isneginf(best)] = -1
        return best, chosen

    def memory(self) -> dict:
        """{"index": bytes of the faiss structures (codes, ids, centroids) or the GPU matrix,
        "vectors": bytes of the stored vectors, "mapped": whether both are memory-mapped from the
        index folder (pages read on demand, never loaded whole)}."""
        if self._gpu is not None:
            return {"index": self._gpu.numel() * self._gpu.element_size(), "vectors": 0, "mapped": False}
        return {"index": index_bytes(self._index), "vectors": self._embeddings.nbytes,
                "mapped": isinstance(self._embeddings, np.memmap)}

    def describe(self) -> str:
        """One line: size, index type and memory."""
        m, params = self.memory(), self.manifest["index"]["params"]
        where = "memory-mapped from disk, pages read on demand" if m["mapped"] else "in memory"
        return (f"{len(self):,} images, {params['type']} index: faiss {m['index'] / 1e6:,.1f} MB and vectors "
                f"{m['vectors'] / 1e6:,.1f} MB, {where}")

    @torch.no_grad()
    def _search_gpu(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = queries.to(self._gpu.device, torch.float16)
        step = max(1, GPU_SCORE_BLOCK // max(1, len(self)))
        out = [(self._gpu.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=q.device))]
        for i in range(0, len(q), step):
            out.append((q[i:i + step] @ self._gpu.T).topk(k, dim=1))
        return (torch.cat([s for s, _ in out]).float().cpu().numpy(),
                torch.cat([i for _, i in out]).cpu().numpy().astype(np.int64))




def resident_memory() -> dict[str, int]:
    """This process's resident bytes: {"private": RssAnon (its own memory), "mapped": RssFile
    (pages of mapped files, shared with the page cache and dropped under pressure), "peak": VmHWM
    (the most it has held resident, both kinds)}; zeros where /proc is absent."""
    out = {"private": 0, "mapped": 0, "peak": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = {"RssAnon:": "private", "RssFile:": "mapped", "VmHWM:": "peak"}.get(line.split(":")[0] + ":")
                if key:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out
