"""A gallery in a Milvus collection: the embedded milvus-lite (a local .db file) or a Milvus
cluster given by URL, through the same pymilvus client (optional: requirements-milvus.txt).

Each row holds an id, the L2-normalised vector, the image path and its content sha256; the
collection's properties name the checkpoint's sha256, the format and the gallery root, the folder
every image path must resolve inside (a collection holding a path outside it is refused when opened). `sync_collection` builds or
updates it with the chunked, resumable, torchrun-sharded embedding of cir.retrieval.embed (work
files beside a .db file, else in the current folder); `MilvusIndex` searches it by inner product
with the interface of GalleryIndex. A build fills a staging collection and renames it onto NAME."""
from __future__ import annotations

import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cir.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, model_hash, read_manifest
from cir.errors import UserError
from cir.retrieval.build import discard_unless_resuming, drop_skipped, gallery_paths
from cir.retrieval.embed import embed_images, hash_files, plan_key
from cir.retrieval.pathlist import PathList
from cir.retrieval.shards import current_shard
from cir.retrieval.store import build_lock, escaping, gallery_root

FORMAT = "context-cir-milvus/1"
PREFIX, COLLECTION = "milvus:", "?collection="  # milvus:URI?collection=NAME, as the app's --index
INSERT_ROWS = 2048
PATH_LENGTH = 4096


@dataclass(frozen=True)
class MilvusTarget:
    uri: str  # a milvus-lite .db file or http(s)://host:port
    collection: str

    @staticmethod
    def parse(spec: str) -> "MilvusTarget":
        """"milvus:URI?collection=NAME" -> MilvusTarget(URI, NAME)."""
        uri, _, name = spec.removeprefix(PREFIX).partition(COLLECTION)
        if not spec.startswith(PREFIX) or not uri or not name:
            raise UserError(f"a Milvus index is named milvus:URI?collection=NAME, got {spec!r}")
        return MilvusTarget(uri, name)

    @property
    def local(self) -> bool:
        return "://" not in self.uri

    @property
    def anchor(self) -> Path:
        """The local path whose .partial folder holds the work files and whose .lock the build lock."""
        base = Path(self.uri).resolve().parent if self.local else Path.cwd()
        stem = Path(self.uri).name if self.local else "milvus"
        return base / f"{stem}.{self.collection}"

    def __str__(self) -> str:
        return f"{PREFIX}{self.uri}{COLLECTION}{self.collection}"


def connect(uri: str):
    """A pymilvus MilvusClient for `uri`; one-line UserErrors when pymilvus is absent or `uri` cannot be reached."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError("the Milvus backend needs pymilvus (and milvus-lite for a local .db): "
                        "pip install -r requirements-milvus.txt") from None
    try:
        return MilvusClient(uri=uri, timeout=10)
    except Exception as e:  # pymilvus raises MilvusException, grpc and OS errors alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot reach Milvus at {uri}: {first}") from None


def _properties(client, name: str) -> dict:
    return client.describe_collection(name).get("properties", {})


def _check_collection(client, target: MilvusTarget, sha: str | None) -> dict:
    """The collection's properties; a one-line UserError if it is missing, not ours, or (with `sha`)
    built by another checkpoint."""
    if not client.has_collection(target.collection):
        raise UserError(f"no collection {target.collection!r} at {target.uri}; build it with: python -m cir.index "
                        f"build --backend milvus --uri {target.uri} --collection {target.collection} --gallery ...")
    props = _properties(client, target.collection)
    if props.get("format") != FORMAT:
        raise UserError(f"collection {target.collection!r} at {target.uri} is not a gallery index ({FORMAT})")
    if sha is not None and props.get("checkpoint_sha256") != sha:
        raise UserError(f"collection {target.collection!r} at {target.uri} was built with checkpoint sha256 "
                        f"{props.get('checkpoint_sha256')}, not {sha}; build it again with this checkpoint")
    client.load_collection(target.collection)  # a collection is searched once loaded
    return props


def _rows(client, name: str, fields: list[str]) -> list[dict]:
    """Every row of the collection with `fields` (and id), in id order."""
    it = client.query_iterator(name, batch_size=16384, filter="id >= 0", output_fields=fields)
    rows = []
    while batch := it.next():
        rows += batch
    it.close()
    return sorted(rows, key=lambda r: r["id"])


def create_collection(client, name: str, dim: int, sha: str, root: str) -> None:
    """An empty gallery collection `name` of `dim`-d vectors (exact inner-product search) for
    checkpoint `sha`, its images inside the folder `root`."""
    from pymilvus import DataType, MilvusClient
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("path", DataType.VARCHAR, max_length=PATH_LENGTH)
    schema.add_field("sha256", DataType.VARCHAR, max_length=64)
    params = client.prepare_index_params()
    params.add_index("vector", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=params,
                             properties={"format": FORMAT, "checkpoint_sha256": sha, "dim": str(dim), "root": root})


def insert_rows(client, name: str, first_id: int, paths: list[str], hashes: list[str], emb: np.ndarray) -> None:
    """Rows first_id, first_id + 1, ... of paths, content hashes and vectors [len(paths), E], then a flush."""
    for s in range(0, len(paths), INSERT_ROWS):
        client.insert(name, [{"id": first_id + i, "vector": emb[i].tolist(), "path": paths[i], "sha256": hashes[i]}
                             for i in range(s, min(s + INSERT_ROWS, len(paths)))])
    client.flush(name)


def sync_collection(target: MilvusTarget, gallery, checkpoint=None, replace: bool = True, batch_size: int = 128,
                    workers: int | None = 0, chunk_size: int = 4096, device="cpu", resume: bool = False,
                    progress: bool = False) -> dict:
    """Make collection `target` hold the embeddings of every image of `gallery`. `replace`: build it
    anew (the `build` command); else update it (the `update` command): rows whose path and content
    are unchanged stay, new or changed images are embedded, missing ones deleted. Under torchrun
    every rank calls it (each embeds its chunks; rank 0 talks to Milvus).
    Returns {"images", "kept", "embedded", "removed", "resumed", "skipped", "seconds", "ranks"}."""
    t0 = time.time()
    checkpoint = Path(checkpoint or DEFAULT_CHECKPOINT)
    shard = current_shard()
    work = target.anchor.with_name(target.anchor.name + ".partial")
    with build_lock(target.anchor) if shard.lead else nullcontext():
        def plan():
            client = connect(target.uri)
            sha = model_hash(checkpoint)
            old = {}
            if not replace:
                _check_collection(client, target, sha)
                old = {r["path"]: (r["id"], r["sha256"]) for r in _rows(client, target.collection, ["path", "sha256"])}
            elif client.has_collection(target.collection) and \
                    _properties(client, target.collection).get("format") != FORMAT:
                raise UserError(f"refusing to replace collection {target.collection!r} at {target.uri}: "
                                "it is not a gallery index")
            paths = gallery_paths(gallery)
            current = hash_files(paths, max(workers or 0, 4), progress) if old else []
            keep = {p for p, h in zip(paths, current) if p in old and old[p][1] == h}
            discard_unless_resuming(work, resume, progress)
            return paths, sha, old, keep
        paths, sha, old, keep = shard.from_lead(plan)
        new = [p for p in paths if p not in keep]
        counts, emb, hashes, skipped = [(0, 0)] * shard.world, None, [], {}
        if new:
            model, preprocess, _ = load_checkpoint(checkpoint, device)
            emb, hashes, counts, skipped = embed_images(model, preprocess, new, work, plan_key(sha, new), chunk_size,
                                                        batch_size, workers, device, progress, shard)

        def finish():
            added, vectors, sha256, dropped = drop_skipped(new, emb, hashes, skipped, gallery, must_keep_one=replace)
            client = connect(target.uri)
            dim = read_manifest(checkpoint)["config"]["embed_dim"]
            gone = [i for p, (i, _) in old.items() if p not in keep]
            if replace:
                staging = f"{target.collection}__staging"
                if client.has_collection(staging):
                    client.drop_collection(staging)
                create_collection(client, staging, dim, sha, gallery_root(added))
                insert_rows(client, staging, 0, added, sha256, vectors)
                if client.has_collection(target.collection):
                    client.drop_collection(target.collection)
                client.rename_collection(staging, target.collection)
                client.load_collection(target.collection)
            else:
                if gone:
                    client.delete(target.collection, ids=gone)
                insert_rows(client, target.collection, max((i for i, _ in old.values()), default=-1) + 1, added,
                            sha256, vectors)
                client.alter_collection_properties(target.collection, {"root": gallery_root([*keep, *added])})
            if work.exists():
                shutil.rmtree(work)
            return {"images": len(keep) + len(added), "kept": len(keep), "embedded": sum(e for e, _ in counts),
                    "removed": len(set(old) - set(paths)),
                    "resumed": sum(r for _, r in counts), "skipped": len(dropped), "seconds": time.time() - t0,
                    "ranks": counts}
        return shard.from_lead(finish)


class MilvusIndex:
    """A Milvus collection opened for search, with GalleryIndex's interface: `.paths` (row order by
    id), `.search(q, k)`, `.embeddings` (fetched on first use), `.dim`, `len()`, `describe()`."""

    def __init__(self, target: MilvusTarget, checkpoint_path: str | os.PathLike | None = None):
        self.target, self._client = target, connect(target.uri)
        props = _check_collection(self._client, target, model_hash(checkpoint_path) if checkpoint_path else None)
        self.dim = int(props["dim"])
        rows = _rows(self._client, target.collection, ["path"])
        if "root" not in props:
            raise UserError(f"collection {target.collection!r} at {target.uri} names no gallery root; build it again")
        outside = escaping([r["path"] for r in rows], props["root"])
        if outside is not None:
            raise UserError(f"collection {target.collection!r} at {target.uri}: the gallery image {outside} lies "
                            f"outside its gallery root {props['root']}")
        self.paths = PathList(r["path"] for r in rows)
        self._position = {r["id"]: i for i, r in enumerate(rows)}
        self._embeddings = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embeddings(self) -> np.ndarray:
        """Every stored vector [N, E] float32, in `.paths` order (fetched from Milvus once)."""
        if self._embeddings is None:
            rows = _rows(self._client, self.target.collection, ["vector"])
            self._embeddings = np.array([r["vector"] for r in rows], np.float32).reshape(len(rows), self.dim)
        return self._embeddings

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, E] -> (scores [Q, k] float32, ids [Q, k] int64 into `.paths`), best first by
        inner product; fewer than k found are padded with score -inf and id -1."""
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(queries.shape)}")
        k = min(k, len(self))
        scores, ids = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        hits = self._client.search(self.target.collection, data=np.asarray(queries, np.float32).tolist(), limit=k,
                                   search_params={"metric_type": "IP"}) if k else []
        for q, found in enumerate(hits):
            for r, hit in enumerate(found):
                scores[q, r], ids[q, r] = hit["distance"], self._position[hit["id"]]
        return scores, ids

    def describe(self) -> str:
        return f"{len(self):,} images in Milvus collection {self.target.collection!r} at {self.target.uri}"
