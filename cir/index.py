"""The gallery index: embed every gallery image once with f(image, ""), then search it fast.

    python -m cir.index build --checkpoint CKPT --gallery FOLDER_OR_LIST --out INDEX_DIR [--type auto]
    python -m cir.index build ... --resume            # continue a build that was killed
    python -m cir.index update --index INDEX_DIR --gallery FOLDER_OR_LIST
    torchrun --nproc_per_node N -m cir.index build ...  # N processes, each embedding its share
    python -m cir.index build|update --backend milvus --uri gallery.db --collection NAME --gallery ...

INDEX_DIR holds `manifest.json` (checkpoint sha256, model config, embedding dim, normalisation,
index type and parameters, the gallery root, the image count, integrity hashes, versions), the
image list (`image_paths.npy`: each image's path below the root as UTF-8 bytes, one after another;
`image_path_table.npy`: where each path ends and sorted lookup keys; `image_sha256.npy`: each
image's content sha256), `embeddings.npy` ([N, E] float32, L2-normalised, row i = image i) and
`index.faiss` (a faiss index over the rows).
Index types: `flat` (exact inner product), `ivf` (IVFFlat) and `ivfpq` (IVF with product
quantisation; its rerank*k best candidates are re-ranked by exact inner product against
embeddings.npy). `auto`: flat below 200k images, ivf below 5M, ivfpq above or whenever the
vectors take more than half of this machine's memory. Search memory-maps both files: a gallery
larger than memory is searched with only the IVF-PQ codes and the candidates' rows resident; the
image list is memory-mapped too (no Python object per image).
Embeddings are kept so updates and re-indexing never re-embed. The manifest stores the gallery
root (the deepest folder holding every image), the checkpoint and the gallery relative to INDEX_DIR
(`../` where need be) and each image relative to the root; they are resolved against them on
reading, so an index moved or copied together with its images and checkpoint keeps working.

Unreadable images (corrupt, truncated, not images, over the pixel limit of cir.data.images) are
skipped: the build completes with the others, names them on stderr and lists them, with their
one-line reasons, under "skipped" in manifest.json.

A build embeds in chunks saved to INDEX_DIR.partial/ (`--resume` skips finished chunks), stages
the new folder there and swaps it onto INDEX_DIR in one rename: a kill at any moment leaves the
previous index intact. `update` re-embeds only images whose path or content changed. Under
torchrun (gloo process group; across nodes with torchrun's rendezvous flags and INDEX_DIR on a
shared file system) rank r embeds chunks r, r+N, ...; rank 0 lists the gallery, holds the lock and
writes the one index. A rank that was killed leaves its missing chunks: run the same command with
--resume and only those are embedded again.

`--backend milvus` keeps the gallery in a Milvus collection instead (cir.retrieval.milvus):
milvus-lite's local .db file or a server URL, the same embedding steps, rows of vector, path and
content sha256, the checkpoint's sha256 recorded; the app opens it as milvus:URI?collection=NAME.

Opening an index checks it: the manifest's keys and types, its image count, and the "integrity"
hashes stored at build (one of the root and the image list's files, one of each data file), so a
reordered, cut or re-pointed image list or a changed vector file is refused with one line instead
of giving wrong results; an image whose path resolves (links followed) outside the gallery root is
refused too (each path checked below the root as written, then the real path of each folder and
the links among its entries), and a build refuses a gallery holding a link out of its root. An
index of an older format is refused with one line saying to rebuild it; `build --out` replaces it.
A build or update holds an exclusive lock (INDEX_DIR.lock); a second one to the same folder is
refused while it runs.
"""
from __future__ import annotations

import argparse
import os

from cir.cli import parse_first, positive_int, run_cli
from cir.errors import UserError
from cir.retrieval import FLAT_MAX, IVF_MAX, RERANK, TYPES
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", allow_abbrev=False, help="embed a gallery and write a new index folder")
    b.add_argument("--checkpoint", default=None, help="model checkpoint (.safetensors); default: the shipped one in assets/")
    b.add_argument("--gallery", required=True, help="gallery: a folder of images or a text file of paths")
    b.add_argument("--out", default=None,
                   help="index folder to write (an existing index there is replaced atomically); faiss backend")
    b.add_argument("--type", choices=TYPES, default="auto",
                   help=f"faiss index: flat (exact), ivf (IVFFlat), ivfpq (IVF-PQ); auto: flat below {FLAT_MAX:,} "
                        f"images, ivf below {IVF_MAX:,}, else ivfpq (also when the vectors take over half the memory)")
    b.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default 4*sqrt(N), at most N/39)")
    b.add_argument("--pq-m", type=positive_int, default=None,
                   help="IVF-PQ sub-quantisers = bytes per vector code; must divide the embedding dim (default dim/4)")
    b.add_argument("--train-sample", type=positive_int, default=None,
                   help="vectors sampled to train IVF/PQ (default min(N, 64*nlist), for ivfpq at least 9984)")
    b.add_argument("--nprobe", type=positive_int, default=None,
                   help="default IVF lists visited per query, stored in the index; GalleryIndex.nprobe changes it "
                        "at search time (default max(16, nlist/32))")
    b.add_argument("--rerank", type=int, default=None,
                   help=f"ivfpq: re-rank the RERANK*k best IVF-PQ candidates by exact inner product against the "
                        f"stored vectors; 0: PQ scores only; GalleryIndex.rerank changes it (default {RERANK})")
    _add_embedding_flags(b)
    u = sub.add_parser("update", allow_abbrev=False, help="bring an index up to date with a changed gallery (embeds only new images)")
    u.add_argument("--index", default=None, help="index folder written by `build`; faiss backend")
    u.add_argument("--gallery", required=True, help="the gallery now: a folder of images or a text file of paths")
    u.add_argument("--checkpoint", default=None,
                   help="the index's checkpoint, if it moved (its sha256 must match; default: the recorded path)")
    u.add_argument("--retrain", action="store_true", help="re-train IVF/PQ on the updated gallery instead of reusing it")
    _add_embedding_flags(u)
    a = p.parse_args(argv)
    folder = "out" if a.cmd == "build" else "index"
    if a.backend == "faiss" and getattr(a, folder) is None:
        (b if a.cmd == "build" else u).error(f"the faiss backend needs --{folder}")
    if a.backend == "milvus" and (a.uri is None or a.collection is None):
        (b if a.cmd == "build" else u).error("--backend milvus needs --uri and --collection")
    if a.workers is not None and a.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {a.workers}")
    if getattr(a, "rerank", None) is not None and a.rerank < 0:
        raise UserError(f"--rerank must be 0 or more, got {a.rerank}")
    return a


def _add_embedding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("faiss", "milvus"), default="faiss",
                   help="faiss: an index folder (--out / --index); milvus: a Milvus collection (--uri, --collection; "
                        "pip install -r requirements-milvus.txt). Default faiss")
    p.add_argument("--uri", default=None,
                   help="milvus: a milvus-lite database file (e.g. gallery.db, made if absent) or a server URL "
                        "(http://host:19530)")
    p.add_argument("--collection", default=None, help="milvus: the collection holding the gallery")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes reading, hashing and decoding images ahead of the model (default: min(8, "
                        "CPUs) on CUDA; on CPU, chosen on the first two batches: one where preparing images costs as much "
                        "as the forward, none where the forward dominates and needs every core)")
    p.add_argument("--chunk-size", type=positive_int, default=4096,
                   help="images per saved chunk in INDEX_DIR.partial/ (the unit --resume skips; default 4096)")
    p.add_argument("--device", default=None,
                   help="torch device for embedding; bf16 autocast on CUDA (default: cuda if available)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its finished chunks instead of starting over")


parse_first(__name__, parse_args)  # `python -m cir.index`: --help and argument errors before torch loads

import torch  # noqa: E402  (heavy imports after the command line is parsed)

from cir.checkpoint import model_hash  # noqa: E402
from cir.retrieval.build import build_index, update_index  # noqa: E402
from cir.retrieval.embed import embed_images, plan_key as _plan_key  # noqa: E402
from cir.retrieval.milvus import MilvusTarget, sync_collection  # noqa: E402
from cir.retrieval.params import resolve_params  # noqa: E402
from cir.retrieval.search import GalleryIndex  # noqa: E402
from cir.retrieval.shards import current_shard  # noqa: E402
from cir.retrieval.store import (EMBEDDINGS, FAISS_FILE, MANIFEST, build_lock, embeddings_of,  # noqa: E402
                                 read_index, read_resolved_manifest)

# the library's names, as `cir.index` has always offered them
__all__ = ["EMBEDDINGS", "FAISS_FILE", "MANIFEST", "GalleryIndex", "build_index", "build_lock", "embed_images",
           "embeddings_of", "main", "model_hash", "read_index", "read_resolved_manifest", "resolve_params",
           "update_index", "_plan_key"]


# ---------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    a.device = a.device or ("cuda" if cuda else "cpu")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise UserError(f"--device: not a torch device: {a.device!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    shard = current_shard()
    if device.type == "cuda" and device.index is None and shard.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU per rank
    common = dict(batch_size=a.batch_size, workers=a.workers, chunk_size=a.chunk_size, device=device,
                  resume=a.resume, progress=True)
    if a.backend == "milvus":
        target = MilvusTarget(a.uri, a.collection)
        r = sync_collection(target, a.gallery, a.checkpoint, replace=a.cmd == "build", **common)
        line = (f"{'wrote' if a.cmd == 'build' else 'updated'} {target}: {r['images']} images ({r['kept']} kept, "
                f"{r['embedded']} embedded, {r['resumed']} resumed, {r['removed']} removed, {r['skipped']} unreadable "
                f"skipped), {r['seconds']:.1f} s")
    elif a.cmd == "build":
        r = build_index(a.out, a.gallery, a.checkpoint, a.type, a.nlist, a.pq_m, a.train_sample, a.nprobe,
                        rerank=a.rerank, **common)
        line = (f"wrote {a.out}: {r['images']} images indexed, {r['skipped']} unreadable skipped ({r['embedded']} "
                f"files read now, {r['resumed']} resumed from an earlier run), {r['type']} index, {r['seconds']:.1f} s")
    else:
        r = update_index(a.index, a.gallery, a.checkpoint, a.retrain, **common)
        line = (f"updated {a.index}: {r['images']} images ({r['kept']} kept, {r['embedded']} embedded, "
                f"{r['resumed']} resumed, {r['removed']} removed, {r['skipped']} unreadable skipped), "
                f"{r['type']} index, {r['seconds']:.1f} s")
    if shard.lead:
        print(line)
        for rank, (embedded, resumed) in enumerate(r["ranks"] if shard.world > 1 else ()):
            print(f"  rank {rank}: {embedded} embedded, {resumed} resumed")
    shard.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
