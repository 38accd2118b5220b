"""Index parameters and the faiss index they describe: flat (exact), IVFFlat, IVF-PQ whose
candidates are re-ranked exactly against the stored vectors; `auto` picks by size and memory."""
from __future__ import annotations

import math
import os

import faiss
import numpy as np

from cir.errors import UserError
from cir.retrieval import FLAT_MAX, IVF_MAX, RERANK, TYPES

MEMORY_SHARE = 0.5  # auto: IVF-PQ whenever the float32 vectors exceed this share of the machine's memory
PQ_NBITS = 8


def memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_type(n: int, dim: int, memory: int | None = None) -> str:
    """flat below FLAT_MAX, ivf below IVF_MAX, else ivfpq; ivfpq also whenever n float32 vectors
    of `dim` exceed MEMORY_SHARE of `memory` (default: this machine's)."""
    if n * dim * 4 > MEMORY_SHARE * (memory or memory_bytes()):
        return "ivfpq"
    return "flat" if n < FLAT_MAX else "ivf" if n < IVF_MAX else "ivfpq"


def resolve_params(n: int, dim: int, index_type: str = "auto", nlist: int | None = None, pq_m: int | None = None,
                   train_sample: int | None = None, nprobe: int | None = None, rerank: int | None = None,
                   memory: int | None = None) -> dict:
    """Concrete index parameters for `n` vectors of `dim`: {"type", "nlist", "pq_m", "nbits",
    "train_sample", "nprobe", "rerank"} (None where the type has no such parameter). Defaults:
    nlist = 4 sqrt(n) (at most n/39, faiss' minimum training points per list), pq_m = dim/4 (bytes
    per code), train_sample = min(n, 64 nlist, for ivfpq at least 39 * 256), nprobe = max(16,
    nlist/32), rerank = RERANK (ivfpq: rerank * k candidates re-ranked exactly; 0: PQ scores only)."""
    if index_type not in TYPES:
        raise UserError(f"unknown index type {index_type!r}; choose from {', '.join(TYPES)}")
    if index_type == "auto":
        index_type = auto_type(n, dim, memory)
    params = {"type": index_type, "nlist": None, "pq_m": None, "nbits": None, "train_sample": None, "nprobe": None,
              "rerank": None}
    if index_type == "flat":
        return params
    nlist = nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    train = min(n, train_sample or max(64 * nlist, 39 * 2 ** PQ_NBITS if index_type == "ivfpq" else 0))
    if nlist < 1 or train < nlist:
        raise UserError(f"{index_type} with nlist={nlist} needs at least {nlist} training vectors, "
                        f"got {train} (of {n} images); lower --nlist or use --type flat")
    params.update(nlist=nlist, train_sample=train, nprobe=min(nlist, nprobe or max(16, nlist // 32)))
    if index_type == "ivfpq":
        pq_m = pq_m or max(1, dim // 4)
        if dim % pq_m:
            raise UserError(f"--pq-m {pq_m} must divide the embedding dim {dim}")
        if train < 2 ** PQ_NBITS:
            raise UserError(f"ivfpq needs at least {2 ** PQ_NBITS} training vectors, got {train}; use --type ivf or flat")
        params.update(pq_m=pq_m, nbits=PQ_NBITS, rerank=RERANK if rerank is None else rerank)
    return params


def make_faiss_index(embeddings: np.ndarray, params: dict, seed: int = 0) -> faiss.Index:
    """A trained faiss inner-product index holding embeddings [N, E] float32 (id = row), added in
    blocks (a memory-mapped array is never copied whole)."""
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
        index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
    add_rows(index, embeddings)
    return index


def add_rows(index: faiss.Index, embeddings: np.ndarray, block: int = 1 << 16) -> None:
    """index.add(embeddings) block by block."""
    for s in range(0, len(embeddings), block):
        index.add(np.ascontiguousarray(embeddings[s:s + block], dtype=np.float32))


def index_bytes(index: faiss.Index) -> int:
    """Bytes a loaded faiss index holds: codes (and ids for IVF), coarse centroids, PQ codebooks."""
    if isinstance(index, faiss.IndexIVF):
        quantizer = faiss.downcast_index(index.quantizer)
        pq = index.pq.M * index.pq.ksub * index.pq.dsub * 4 if isinstance(index, faiss.IndexIVFPQ) else 0
        return index.ntotal * (index.code_size + 8) + index_bytes(quantizer) + pq
    return index.ntotal * index.sa_code_size()
