"""Building and updating an index folder: list the gallery, embed it in resumable chunks (each
torchrun rank its own), then one step writes the faiss index, the vectors and the manifest."""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import faiss
import numpy as np

from cir.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, model_hash, read_manifest, versions
from cir.data.triplets import normalize_path, read_gallery
from cir.errors import UserError
from cir.retrieval.embed import embed_images, hash_files, plan_key
from cir.retrieval.params import add_rows, make_faiss_index, resolve_params
from cir.retrieval.shards import current_shard
from cir.retrieval.store import (EMBEDDINGS, FAISS_FILE, FORMAT, HASHES, MANIFEST, build_lock, check_checkpoint,
                                 check_integrity, check_out, digests, escaping, gallery_root, read_index,
                                 write_index)


def _report_skipped(skipped: dict[int, str], total: int, shown: int = 20) -> None:
    """Name the unreadable images on stderr (the first `shown`; the manifest lists them all)."""
    print(f"skipped {len(skipped)} of {total} gallery images that cannot be read (listed in the index's "
          f"{MANIFEST} under \"skipped\"):", file=sys.stderr)
    for reason in list(skipped.values())[:shown]:
        print(f"  skipped: {reason}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"  ... and {len(skipped) - shown} more", file=sys.stderr)


def drop_skipped(paths: list[str], emb: np.ndarray, hashes: list[str], skipped: dict[int, str], gallery,
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


def index_versions() -> dict:
    return versions() | {"faiss": faiss.__version__, "numpy": np.__version__}


def discard_unless_resuming(work: Path, resume: bool, progress: bool) -> None:
    """Discard the work folder of an interrupted run unless resuming it."""
    if work.exists() and not resume:
        if progress:
            print(f"discarding the interrupted build in {work} (pass --resume to continue it)", file=sys.stderr)
        shutil.rmtree(work)
    elif resume and not work.exists() and progress:
        print(f"nothing to resume in {work}; starting a fresh build", file=sys.stderr)


def gallery_paths(gallery) -> list[str]:
    """The gallery's image paths (absolute, normalised); a UserError when one is missing or
    resolves outside the gallery root (a link out of the deepest folder holding them all)."""
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
    root = gallery_root(paths)
    outside = escaping(paths, root)
    if outside is not None:
        raise UserError(f"gallery image {outside} links outside the gallery's folder {root}, which an index "
                        "refuses; list the file it links to instead")
    return paths


def build_index(out: str | os.PathLike, gallery: str | os.PathLike | list[str], checkpoint=None,
                index_type: str = "auto", nlist: int | None = None, pq_m: int | None = None,
                train_sample: int | None = None, nprobe: int | None = None, batch_size: int = 128,
                workers: int | None = 0, chunk_size: int = 4096, device="cpu", resume: bool = False,
                progress: bool = False, rerank: int | None = None) -> dict:
    """Embed every image of `gallery` (a folder, a list file, or a list of paths) with `checkpoint`
    (default: cir.checkpoint.DEFAULT_CHECKPOINT) and write the index folder `out` atomically.
    Under torchrun every rank calls it: each embeds its chunks, rank 0 lists, locks and writes.

    `workers`: DataLoader processes beside the model (None: `cir.retrieval.embed.embed_chunks` chooses).

    Returns {"images", "embedded", "resumed", "skipped", "type", "seconds", "embed_seconds" (reading
    the images to their vectors, assembled), "ranks": [(embedded, resumed)] per rank} on every rank."""
    t0 = time.time()
    out, checkpoint = Path(out), Path(checkpoint or DEFAULT_CHECKPOINT)
    shard = current_shard()
    work = out.with_name(out.name + ".partial")
    with build_lock(out) if shard.lead else nullcontext():
        def plan():
            check_out(out)
            paths = gallery_paths(gallery)
            config = read_manifest(checkpoint)["config"]
            resolve_params(len(paths), config["embed_dim"], index_type, nlist, pq_m, train_sample, nprobe, rerank)
            discard_unless_resuming(work, resume, progress)
            return paths, config, model_hash(checkpoint)
        paths, config, sha = shard.from_lead(plan)
        model, preprocess, _ = load_checkpoint(checkpoint, device)
        t_embed = time.time()
        emb, hashes, counts, skipped = embed_images(model, preprocess, paths, work, plan_key(sha, paths), chunk_size,
                                                    batch_size, workers, device, progress, shard)
        t_embed = time.time() - t_embed

        def finish():
            kept, vectors, sha256, dropped = drop_skipped(paths, emb, hashes, skipped, gallery)
            params = resolve_params(len(kept), config["embed_dim"], index_type, nlist, pq_m, train_sample, nprobe,
                                    rerank)
            requested = {"type": index_type, "nlist": nlist, "pq_m": pq_m, "train_sample": train_sample,
                         "nprobe": nprobe, "rerank": rerank}
            manifest = {"format": FORMAT, "checkpoint": {"path": normalize_path(checkpoint), "sha256": sha},
                        "config": config, "root": gallery_root(paths),
                        "embedding": {"dim": vectors.shape[1], "normalization": "l2", "dtype": "float32",
                                      "file": EMBEDDINGS},
                        "index": {"requested": requested, "params": params, "metric": "inner_product",
                                  "file": FAISS_FILE},
                        "count": len(kept), "gallery": str(gallery) if isinstance(gallery, (str, os.PathLike)) else None,
                        "skipped": dropped, "versions": index_versions(),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_index(out, work, manifest, kept, digests(sha256), vectors, make_faiss_index(vectors, params))
            return {"images": len(kept), "embedded": sum(e for e, _ in counts), "resumed": sum(r for _, r in counts),
                    "skipped": len(dropped), "type": params["type"], "seconds": time.time() - t0,
                    "embed_seconds": t_embed, "ranks": counts}
        return shard.from_lead(finish)


def update_index(index_dir: str | os.PathLike, gallery: str | os.PathLike | list[str], checkpoint=None,
                 retrain: bool = False, batch_size: int = 128, workers: int | None = 0, chunk_size: int = 4096,
                 device="cpu", resume: bool = False, progress: bool = False) -> dict:
    """Make the index at `index_dir` cover `gallery`: images whose path and content sha256 are
    unchanged keep their vectors, new or changed ones are embedded (under torchrun, each rank its
    chunks of them), missing ones dropped. The trained IVF/PQ structures are reused unless `retrain`
    or the automatic type changes.

    `checkpoint` defaults to the one recorded in the index and must match its sha256.
    Returns {"images", "kept", "embedded", "removed", "resumed", "skipped", "type", "seconds", "ranks"}."""
    t0 = time.time()
    index_dir = Path(index_dir)
    shard = current_shard()
    work = index_dir.with_name(index_dir.name + ".partial")
    with build_lock(index_dir) if shard.lead else nullcontext():
        def plan():
            manifest, old_paths, old_sha256 = read_index(index_dir)
            ckpt = Path(checkpoint or manifest["checkpoint"]["path"])
            if not ckpt.is_file():
                raise UserError(f"the index's checkpoint {ckpt} is gone; pass --checkpoint (same sha256 "
                                f"{manifest['checkpoint']['sha256']})")
            sha = check_checkpoint(manifest, ckpt, index_dir)
            check_integrity(manifest, index_dir, files=(EMBEDDINGS, FAISS_FILE))
            paths = gallery_paths(gallery)
            old = {p: i for i, p in enumerate(old_paths)}
            current = digests(hash_files(paths, max(workers or 0, 4), progress))
            keep = {p: old[p] for p, h in zip(paths, current) if p in old and (old_sha256[old[p]] == h).all()}
            changed = {p for p in paths if p in old and p not in keep}  # re-embedded; removed if now unreadable
            discard_unless_resuming(work, resume, progress)
            return manifest, ckpt, sha, paths, keep, len(old), changed
        manifest, ckpt, sha, paths, keep, old_count, changed = shard.from_lead(plan)
        new = [p for p in paths if p not in keep]
        counts, skipped = [(0, 0)] * shard.world, {}
        if new:
            model, preprocess, _ = load_checkpoint(ckpt, device)
            new_emb, new_hashes, counts, skipped = embed_images(model, preprocess, new, work, plan_key(sha, new),
                                                                chunk_size, batch_size, workers, device, progress,
                                                                shard)

        def finish():
            nonlocal paths, new, new_emb, new_hashes, skipped
            root = gallery_root(paths)  # of every listed image: the readable ones lie inside it
            old_emb, old_sha256 = (np.load(index_dir / name, mmap_mode="r") for name in (EMBEDDINGS, HASHES))
            if new:
                new, new_emb, new_hashes, skipped = drop_skipped(new, new_emb, new_hashes, skipped, gallery,
                                                                  must_keep_one=False)
                unreadable = {s["path"] for s in skipped}
                paths = [p for p in paths if p not in unreadable]
                if not paths:
                    raise UserError(f"no image of the gallery {gallery} can be read")
            else:
                new_emb, new_hashes, skipped = np.zeros((0, old_emb.shape[1]), np.float32), [], []
                work.mkdir(exist_ok=True)
            emb = np.empty((len(paths), old_emb.shape[1]), np.float32)
            hashes = np.empty((len(paths), 32), np.uint8)
            kept_rows = [i for i, p in enumerate(paths) if p in keep]
            old_rows = [keep[paths[i]] for i in kept_rows]
            new_rows = [i for i, p in enumerate(paths) if p not in keep]  # `new` is in gallery order
            emb[kept_rows], hashes[kept_rows] = old_emb[old_rows], old_sha256[old_rows]
            emb[new_rows], hashes[new_rows] = new_emb, digests(new_hashes)
            req = manifest["index"]["requested"]
            params = resolve_params(len(paths), emb.shape[1], req["type"], req["nlist"], req["pq_m"],
                                    req["train_sample"], req["nprobe"], req.get("rerank"))
            if retrain or params["type"] != manifest["index"]["params"]["type"]:
                index = make_faiss_index(emb, params)
            else:
                params = manifest["index"]["params"]
                index = faiss.read_index(str(index_dir / FAISS_FILE))
                index.reset()
                add_rows(index, emb)
            updated = dict(manifest, root=root, count=len(paths), skipped=skipped,
                           gallery=str(gallery) if isinstance(gallery, (str, os.PathLike)) else None,
                           versions=index_versions(), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            updated["index"] = dict(manifest["index"], params=params)
            write_index(index_dir, work, updated, paths, hashes, emb, index)
            removed = old_count - len(keep) - len(changed.intersection(paths))
            return {"images": len(paths), "kept": len(keep), "embedded": sum(e for e, _ in counts),
                    "removed": removed, "resumed": sum(r for _, r in counts),
                    "skipped": len(skipped), "type": params["type"], "seconds": time.time() - t0, "ranks": counts}
        return shard.from_lead(finish)
