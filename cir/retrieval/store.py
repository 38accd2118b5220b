"""The index folder on disk: its manifest (keys, types, integrity hashes, image paths confined to
the gallery root), the memory-mapped embeddings, the checkpoint check, the atomic write of a new
folder and the build lock."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from cir.atomic import sha256_file, staged_dir
from cir.checkpoint import model_hash, read_manifest
from cir.data.triplets import normalize_path
from cir.errors import UserError

FORMAT = "context-cir-index/3"  # /3: image paths relative to the gallery root, inside the integrity hash
FORMAT_NAME = FORMAT.rsplit("/", 1)[0]  # every version's format starts with it
MANIFEST, EMBEDDINGS, FAISS_FILE = "manifest.json", "embeddings.npy", "index.faiss"


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
MANIFEST_FIELDS = {"checkpoint": dict, "checkpoint.path": str, "checkpoint.sha256": str, "config": dict, "root": str,
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


def images_hash(root: str, images: list[dict]) -> str:
    """The integrity hash of an image list as stored: sha256 over the gallery root (relative to the
    index folder) and each image's path (relative to the root) and content hash, in row order."""
    stored = [root, [[im["path"], im["sha256"]] for im in images]]
    return hashlib.sha256(json.dumps(stored, ensure_ascii=False).encode()).hexdigest()


def check_integrity(manifest: dict, index_dir: Path, files=(EMBEDDINGS,)) -> None:
    """Refuse (one line) an index whose data `files` (EMBEDDINGS, FAISS_FILE) are not the ones it was
    built with (`read_resolved_manifest` checks the image list)."""
    for name in files:
        key = "embeddings" if name == EMBEDDINGS else "faiss"
        if (index_dir / name).is_file() and sha256_file(index_dir / name) != manifest["integrity"][key]:
            raise UserError(f"{index_dir}: {name} is not the file the index was built with (its sha256 "
                            "differs); rebuild the index")


def read_resolved_manifest(index_dir: Path) -> dict:
    """`read_index_manifest` with every file path in it absolute (the images' taken from the gallery
    root, the others from `index_dir`); a one-line UserError naming `index_dir` when the stored
    images and paths are not the ones its integrity hash was made of, or an image resolves outside
    the gallery root."""
    manifest = read_index_manifest(index_dir)
    if images_hash(manifest["root"], manifest["images"]) != manifest["integrity"]["images"]:
        raise UserError(f"{index_dir}: the image list in {MANIFEST} (its paths or content hashes) was changed after "
                        "the build (its hash differs); rebuild the index")
    root = normalize_path(manifest["root"], index_dir)
    manifest = _with_paths(manifest, lambda p: normalize_path(p, index_dir), lambda p: normalize_path(p, root),
                           copy=False)
    outside = escaping([im["path"] for im in manifest["images"]], root)
    if outside is not None:
        raise UserError(f"{index_dir}: the gallery image {outside} lies outside the index's gallery root {root} "
                        "(links followed); refusing to open the index")
    return manifest


def gallery_root(paths: list[str]) -> str:
    """The gallery root of absolute `paths`: the deepest folder holding them all."""
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def escaping(paths: list[str], root: str) -> str | None:
    """The first of the absolute `paths` that resolves outside `root` (symlinks followed), or None."""
    inside = os.path.join(os.path.realpath(root), "")
    return next((p for p in paths if not os.path.realpath(p).startswith(inside)), None)


def _with_paths(manifest: dict, path, image_path, copy: bool = True) -> dict:
    """`manifest` with the function `image_path` applied to its images' paths and `path` to every
    other file path in it: the skipped images', the checkpoint's, the gallery root's and the
    gallery's (None for a list of paths). `copy=False` changes the dicts in place (a manifest just
    read: a million images need no second set of dicts)."""
    m = dict(manifest, checkpoint=dict(manifest["checkpoint"])) if copy else manifest
    m["checkpoint"]["path"] = path(m["checkpoint"]["path"])
    for key, change in (("images", image_path), ("skipped", path)):
        if key in m:
            if copy:
                m[key] = [dict(im) for im in m[key]]
            for im in m[key]:
                im["path"] = change(im["path"])
    for key in ("root", "gallery"):
        if m.get(key) is not None:
            m[key] = path(m[key])
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


def check_out(out: Path) -> None:
    """Refuse to replace anything but an index (of any format version) or an empty folder."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_index(out))):
        raise UserError(f"refusing to replace {out}: it exists and is not a gallery index")


def _is_index(folder: Path) -> bool:
    """Whether `folder` holds a manifest naming an index format, of this version or another."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format")).startswith(FORMAT_NAME + "/")


def write_index(out: Path, work: Path, manifest: dict, embeddings: np.ndarray, index: faiss.Index) -> None:
    """Stage the index folder in `work`/staged, swap it onto `out`, then remove `work`. The
    manifest's images are stored relative to its gallery "root", its other file paths relative to `out`."""
    base = normalize_path(out)
    stored = _with_paths(manifest, lambda p: os.path.relpath(p, base), lambda p: os.path.relpath(p, manifest["root"]))
    with staged_dir(out, work / "staged") as staged:
        np.save(staged / EMBEDDINGS, embeddings)
        faiss.write_index(index, str(staged / FAISS_FILE))
        stored["integrity"] = {"images": images_hash(stored["root"], stored["images"]),
                               "embeddings": sha256_file(staged / EMBEDDINGS),
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


