"""The gallery's 2D embedding map: a projection fitted once per index and stored with the index's hash.

    projection = projection_of(index, "INDEX_DIR")     # INDEX_DIR/projection.npz, refitted when the index changes
    projection.points                                  # [N, 2] float32, one per gallery image
    projection.transform(query_embeddings)             # [Q, E] -> [Q, 2], the same map

PCA (the top two principal axes of the centred embeddings, each axis's sign fixed so that its
largest loading is positive) is exact and deterministic; UMAP (`umap-learn`) is used where installed
and asked for ("auto" or "umap"): its fitted reducer maps queries, so it is not stored (the caller
keeps it). A PCA map of an index without a folder is stored in the temporary folder, named by the
index's hash.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cir.atomic import atomic_path
from cir.errors import UserError

FILE = "projection.npz"  # beside the index's manifest
FORMAT = "context-cir-projection/1"


@dataclass(frozen=True)
class ProjectionConfig:
    method: str = "auto"  # "auto" (UMAP where installed, else PCA), "pca" or "umap"
    seed: int = 0  # UMAP's random state (PCA needs none)


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def resolved_method(config: ProjectionConfig) -> str:
    """"pca" or "umap": auto is UMAP where umap-learn is installed; UMAP asked for without it is an error."""
    if config.method == "auto":
        return "umap" if umap_available() else "pca"
    if config.method == "umap" and not umap_available():
        raise UserError("UMAP needs umap-learn (pip install umap-learn); use --method pca")
    return config.method


@dataclass
class Projection:
    """A fitted map: `points` [N, 2] of the gallery; `mean` [E] and `axes` [E, 2] for PCA, `reducer`
    (a fitted umap.UMAP) for UMAP; `file`: where it is stored (None: not stored)."""

    method: str
    points: np.ndarray
    mean: np.ndarray | None = None
    axes: np.ndarray | None = None
    reducer: object = None
    file: str | None = None

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings [Q, E] -> their points [Q, 2] under the same map."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if self.method == "pca":
            return ((embeddings - self.mean) @ self.axes).astype(np.float32)
        return np.asarray(self.reducer.transform(embeddings), dtype=np.float32)


def fit_pca(embeddings: np.ndarray) -> Projection:
    """The top two principal axes of embeddings [N, E] (eigenvectors of the covariance, float64)."""
    x = np.asarray(embeddings, dtype=np.float64)
    mean = x.mean(0)
    centred = x - mean
    values, vectors = np.linalg.eigh(centred.T @ centred)
    axes = vectors[:, np.argsort(values)[::-1][:2]]  # [E, 2]
    axes *= np.sign(axes[np.abs(axes).argmax(0), [0, 1]])  # the largest loading of each axis positive
    return Projection("pca", (centred @ axes).astype(np.float32), mean.astype(np.float32), axes.astype(np.float32))


def fit_umap(embeddings: np.ndarray, seed: int) -> Projection:
    import umap

    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
    return Projection("umap", reducer.fit_transform(np.asarray(embeddings, dtype=np.float32)).astype(np.float32),
                      reducer=reducer)


def fit(embeddings: np.ndarray, config: ProjectionConfig = ProjectionConfig()) -> Projection:
    """The map of embeddings [N, E] by `config`'s method (not stored)."""
    method = resolved_method(config)
    return fit_pca(embeddings) if method == "pca" else fit_umap(embeddings, config.seed)


def index_hash(index) -> str:
    """The hash of a `GalleryIndex`: its manifest's integrity hashes (embeddings, images) when built on
    disk, else a digest of its embeddings and paths."""
    integrity = index.manifest.get("integrity")
    if integrity:
        return hashlib.sha256(f"{integrity['embeddings']}\n{integrity['images']}".encode()).hexdigest()
    h = hashlib.sha256(np.ascontiguousarray(index.embeddings, dtype=np.float32).tobytes())
    h.update("\n".join(index.paths).encode())
    return h.hexdigest()


def stored_file(index, index_dir=None) -> Path:
    """Where the map of `index` is stored: INDEX_DIR/projection.npz, or for an index without a
    folder the temporary folder's cir-projections/HASH.npz."""
    if index_dir is not None:
        return Path(index_dir) / FILE
    return Path(tempfile.gettempdir()) / "cir-projections" / f"{index_hash(index)[:32]}.npz"


def _key(index, config: ProjectionConfig) -> str:
    return f"{FORMAT} {index_hash(index)} {resolved_method(config)} seed={config.seed}"


def read(path: Path, key: str) -> Projection | None:
    """The PCA map stored at `path` under `key`; None when missing, unreadable or of another index."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return Projection("pca", z["points"], z["mean"], z["axes"], file=str(path))
    except (OSError, KeyError, ValueError, EOFError):
        return None


def write(path: Path, key: str, projection: Projection) -> None:
    """Store a PCA map atomically (a read-only folder: not stored)."""
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), points=projection.points, mean=projection.mean, axes=projection.axes)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
        projection.file = str(path)
    except OSError:
        pass


def projection_of(index, index_dir=None, config: ProjectionConfig = ProjectionConfig()) -> Projection:
    """The map of a `GalleryIndex` (stored at `stored_file(index, index_dir)`): read when stored for
    this index (its hash), method and seed, else fitted and stored."""
    path, key = stored_file(index, index_dir), _key(index, config)
    projection = read(path, key) if resolved_method(config) == "pca" else None
    if projection is None:
        projection = fit(index.embeddings, config)
        if projection.method == "pca":
            write(path, key, projection)
    return projection
