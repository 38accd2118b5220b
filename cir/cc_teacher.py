"""Fixed CC targets from a frozen teacher: each training phrase's isolated map over its reference
image, f(reference, phrase) of a fixed checkpoint (e.g. the step-0 model), computed once over the
image cache and kept in the run folder. The CC loss then pulls the in-context maps towards targets
that training cannot move (`cir.train --cc-teacher CKPT`), and costs no isolated pass per step.

With a sharpening exponent gamma > 1 each target is the teacher's map raised to gamma and
renormalised: the same peak (pointing and distinctness unchanged), more of the mass on it.

Files: RUN/cc_targets.npz (maps [N, P] fp16, offsets [T + 1]: triplet i's phrases are rows
offsets[i]:offsets[i + 1]) and RUN/cc_targets.json (what they were computed from); a resumed run
reuses them when that matches.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cir.atomic import atomic_path, sha256_file, write_json
from cir.errors import UserError
from cir.image_cache import ImageCache, towers_hash
from cir.losses import reduce_maps
from cir.models.base import ComposedRetrieval, isolated_maps


def sharpened(maps: torch.Tensor, gamma: float) -> torch.Tensor:
    """maps [N, P] (non-negative, rows summing to 1) -> each row raised to `gamma`, renormalised."""
    if gamma == 1:
        return maps
    powered = maps.float().clamp_min(0) ** gamma
    return powered / powered.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def teacher_maps(teacher: ComposedRetrieval, cache: ImageCache, phrases: list[list[dict]], cc_maps: str,
                 sharpen: float = 1.0, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's isolated map of every phrase over its triplet's reference (cached tower
    outputs), reduced over layers (`cc_maps`: "mean" or "last") and heads, `sharpened` by `sharpen`.

    phrases[i]: triplet i's phrases ({"text", ...}). Returns (maps [N, P] fp16, offsets [T + 1])."""
    teacher.eval()
    offsets = np.cumsum([0] + [len(ps) for ps in phrases]).astype(np.int64)
    flat = [(i, p["text"]) for i, ps in enumerate(phrases) for p in ps]
    maps = np.zeros((len(flat), teacher.grid * teacher.grid), dtype=np.float16)
    for s in tqdm(range(0, len(flat), batch_size), desc="CC targets", unit="batch"):
        chunk = flat[s:s + batch_size]
        image = teacher.cached_image_tokens(cache.rows([cache.reference[i] for i, _ in chunk]))
        iso = isolated_maps(teacher, image, torch.arange(len(chunk)), [text for _, text in chunk])
        maps[s:s + len(chunk)] = sharpened(reduce_maps(iso, layers=cc_maps), sharpen).float().numpy()
    return maps, offsets


def run_cc_targets(run: Path, teacher_path: str, cache: ImageCache, phrases: list[list[dict]], phrase_source: dict,
                   cc_maps: str, sharpen: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """RUN/cc_targets.npz of teacher checkpoint `teacher_path` over `cache`'s references, computed
    unless the run folder holds them for the same teacher, cache, phrases, `cc_maps` and `sharpen`."""
    from cir.checkpoint import load_checkpoint

    made_from = {"teacher_sha256": sha256_file(teacher_path), "cache_train_sha256": cache.manifest["train"]["sha256"],
                 "towers_sha256": cache.manifest["towers_sha256"], "phrases": phrase_source, "cc_maps": cc_maps}
    if sharpen != 1:
        made_from["sharpen"] = sharpen
    npz, manifest = run / "cc_targets.npz", run / "cc_targets.json"
    if npz.is_file() and manifest.is_file() and json.loads(manifest.read_text()).get("made_from") == made_from:
        with np.load(npz) as f:
            return f["maps"], f["offsets"]
    teacher, _, _ = load_checkpoint(teacher_path)
    if towers_hash(teacher) != cache.manifest["towers_sha256"]:
        raise UserError(f"--cc-teacher {teacher_path}: its image tower is not the one the image cache was made with")
    maps, offsets = teacher_maps(teacher, cache, phrases, cc_maps, sharpen)
    run.mkdir(parents=True, exist_ok=True)
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, maps=maps, offsets=offsets)
    write_json(manifest, {"teacher": str(teacher_path), "made_from": made_from, "phrases": int(offsets[-1]),
                          "sha256": sha256_file(npz)})
    return maps, offsets
