"""The index folder on disk: its manifest (keys, types, integrity hashes), its image list (paths as
one byte array below the gallery root, confined to it; content hashes), the memory-mapped
embeddings, the checkpoint check, the atomic write of a new folder and the build lock."""
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
from cir.retrieval.confine import escaping
from cir.retrieval.pathlist import PathList

FORMAT = "context-cir-index/4"  # /4: the image list in its own files, memory-mapped, not in the manifest
FORMAT_NAME = FORMAT.rsplit("/", 1)[0]  # every version's format starts with it
MANIFEST, EMBEDDINGS, FAISS_FILE = "manifest.json", "embeddings.npy", "index.faiss"
# the image list: PathList's blob (uint8 [bytes], each path's UTF-8 below the gallery root) and table
# (int64 [3, N]: the paths' ends in the blob, their sorted keys, the row of each key); the images'
# content sha256 digests (uint8 [N, 32])
PATHS, PATH_TABLE, HASHES = "image_paths.npy", "image_path_table.npy", "image_sha256.npy"
IMAGE_FILES = (PATHS, PATH_TABLE, HASHES)


def open_embeddings(index_dir: str | os.PathLike, checkpoint_path: str | os.PathLike | None = None
                    ) -> tuple[dict, PathList, np.ndarray]:
    """(resolved manifest, image paths [N], embeddings [N, E] float32 memory-mapped) of INDEX_DIR,
    checked against each other. With `checkpoint_path`, its sha256 must be the one the index was built with."""
    index_dir = Path(index_dir)
    manifest, paths, _ = read_index(index_dir)
    if checkpoint_path is not None:
        check_checkpoint(manifest, checkpoint_path, index_dir)
    check_integrity(manifest, index_dir)
    shape = (manifest["count"], manifest["embedding"]["dim"])
    return manifest, paths, _mapped(index_dir, EMBEDDINGS, np.float32, shape)


def embeddings_of(index_dir: str | os.PathLike, paths: list[str], checkpoint_path: str | os.PathLike
                  ) -> np.ndarray:
    """The stored embeddings [len(paths), E] float32 of `paths` (absolute, normalised), in that order,
    from the index at INDEX_DIR built with `checkpoint_path`; a UserError naming the first path the
    index lacks."""
    _, stored, emb = open_embeddings(index_dir, checkpoint_path)
    rows = [stored.find(p) for p in paths]
    missing = [p for p, r in zip(paths, rows) if r is None]
    if missing:
        raise UserError(f"index {index_dir} lacks {len(missing)} of the {len(paths)} gallery images, e.g. "
                        f"{missing[0]}; build it over them with: python -m cir.index build --gallery ...")
    return np.ascontiguousarray(emb[rows], dtype=np.float32)


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


# key -> the type its value must have; "a.b" is key b of the dict at a
MANIFEST_FIELDS = {"checkpoint": dict, "checkpoint.path": str, "checkpoint.sha256": str, "config": dict, "root": str,
                   "embedding": dict, "embedding.dim": int, "index": dict, "index.params": dict,
                   "index.params.type": str, "index.requested": dict, "count": int, "integrity": dict,
                   "integrity.images": str, "integrity.embeddings": str, "integrity.faiss": str}


def _check_manifest_fields(manifest: dict, index_dir: Path) -> None:
    """A one-line UserError naming the first key of MANIFEST_FIELDS that is missing or of the wrong type."""
    for key, kind in MANIFEST_FIELDS.items():
        value = manifest
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            what = "lacks" if value is None else f"has a {type(value).__name__} at"
            raise UserError(f"{index_dir}: {MANIFEST} {what} {key!r} (expected {kind.__name__}); rebuild the index")


def images_hash(root: str, index_dir: Path) -> str:
    """The integrity hash of the image list as stored: sha256 over the gallery root (relative to
    the index folder) and the sha256 of each of INDEX_DIR's IMAGE_FILES."""
    stored = [root, [sha256_file(index_dir / name) if (index_dir / name).is_file() else None for name in IMAGE_FILES]]
    return hashlib.sha256(json.dumps(stored, ensure_ascii=False).encode()).hexdigest()


def digests(sha256: list[str]) -> np.ndarray:
    """Hex sha256 strings [N] -> their digests uint8 [N, 32]."""
    return np.frombuffer(bytes.fromhex("".join(sha256)), np.uint8).reshape(-1, 32)


def check_integrity(manifest: dict, index_dir: Path, files=(EMBEDDINGS,)) -> None:
    """Refuse (one line) an index whose data `files` (EMBEDDINGS, FAISS_FILE) are not the ones it was
    built with (`read_index` checks the image list)."""
    for name in files:
        key = "embeddings" if name == EMBEDDINGS else "faiss"
        if (index_dir / name).is_file() and sha256_file(index_dir / name) != manifest["integrity"][key]:
            raise UserError(f"{index_dir}: {name} is not the file the index was built with (its sha256 "
                            "differs); rebuild the index")


def _mapped(index_dir: Path, name: str, dtype, shape: tuple) -> np.ndarray:
    """INDEX_DIR/name memory-mapped; a one-line UserError unless it is a `dtype` array of `shape`
    (None: any length)."""
    try:
        array = np.load(index_dir / name, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # missing, truncated or not a .npy file
        raise UserError(f"{index_dir}: {name} cannot be read ({type(e).__name__}: "
                        f"{' '.join(str(e).split())}); rebuild the index") from None
    if array.dtype != dtype or len(array.shape) != len(shape) or any(w not in (None, h)
                                                                     for h, w in zip(array.shape, shape)):
        want = ", ".join("any" if w is None else str(w) for w in shape)
        raise UserError(f"{index_dir}: {name} holds {array.dtype} {tuple(array.shape)}, the manifest says "
                        f"{np.dtype(dtype)} ({want}); rebuild the index")
    return array


def read_index(index_dir: str | os.PathLike) -> tuple[dict, PathList, np.ndarray]:
    """(resolved manifest, image paths [N] (absolute, normalised; a PathList over the memory-mapped
    files), content sha256 digests [N, 32] uint8 memory-mapped) of INDEX_DIR; a one-line UserError
    naming it when the image files or the root are not the ones its integrity hash was made of, the
    files do not hold N paths, or an image resolves outside the gallery root."""
    index_dir = Path(index_dir)
    stored = read_index_manifest(index_dir)
    if images_hash(stored["root"], index_dir) != stored["integrity"]["images"]:
        raise UserError(f"{index_dir}: the image list ({', '.join(IMAGE_FILES)}: its paths or content hashes, or "
                        f"the root in {MANIFEST}) was changed after the build (its hash differs); rebuild the index")
    manifest, n = _resolved(stored, index_dir), stored["count"]
    blob, table = _mapped(index_dir, PATHS, np.uint8, (None,)), _mapped(index_dir, PATH_TABLE, np.int64, (3, n))
    sha256 = _mapped(index_dir, HASHES, np.uint8, (n, 32))
    ends, keys, order = table
    if not n or ends[0] < 1 or ends[-1] != len(blob) or (ends[1:] <= ends[:-1]).any() or (keys[1:] < keys[:-1]).any() \
            or order.min() < 0 or order.max() >= n:
        raise UserError(f"{index_dir}: {PATH_TABLE} does not describe the {n} paths in {PATHS}; rebuild the index")
    paths = PathList.stored(blob, table, manifest["root"])
    outside = escaping(paths, manifest["root"])
    if outside is not None:
        raise UserError(f"{index_dir}: the gallery image {os.path.normpath(outside)} lies outside the index's "
                        f"gallery root {manifest['root']} (links followed); refusing to open the index")
    return manifest, paths, sha256


def read_resolved_manifest(index_dir: Path) -> dict:
    """`read_index_manifest` with every file path in it absolute, taken from `index_dir` (the image
    list is `read_index`'s)."""
    return _resolved(read_index_manifest(index_dir), index_dir)


def _resolved(manifest: dict, index_dir: Path) -> dict:
    return _with_paths(manifest, lambda p: normalize_path(p, index_dir))


def gallery_root(paths: list[str]) -> str:
    """The gallery root of absolute `paths`: the deepest folder holding them all."""
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def _with_paths(manifest: dict, path) -> dict:
    """A copy of `manifest` with the function `path` applied to every file path in it: the skipped
    images', the checkpoint's, the gallery root's and the gallery's (None for a list of paths)."""
    m = dict(manifest, checkpoint=dict(manifest["checkpoint"], path=path(manifest["checkpoint"]["path"])))
    if "skipped" in m:
        m["skipped"] = [dict(im, path=path(im["path"])) for im in m["skipped"]]
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


def write_index(out: Path, work: Path, manifest: dict, paths: list[str], sha256: np.ndarray,
                embeddings: np.ndarray, index: faiss.Index) -> None:
    """Stage the index folder in `work`/staged, swap it onto `out`, then remove `work`: the image
    `paths` [N] (absolute, below the manifest's gallery "root") with their content `sha256` digests
    [N, 32] uint8, `embeddings` [N, E] and `index`. The paths are stored relative to the root, the
    manifest's other file paths relative to `out`."""
    listed = PathList(paths, manifest["root"])
    if listed.prefix != os.path.join(manifest["root"], ""):
        raise ValueError(f"an image lies outside the gallery root {manifest['root']}")
    stored = _with_paths(manifest, lambda p: os.path.relpath(p, normalize_path(out)))
    with staged_dir(out, work / "staged") as staged:
        for name, array in ((PATHS, listed.blob), (PATH_TABLE, listed.table), (HASHES, sha256),
                            (EMBEDDINGS, embeddings)):
            np.save(staged / name, array)
        faiss.write_index(index, str(staged / FAISS_FILE))
        stored["integrity"] = {"images": images_hash(stored["root"], staged),
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


