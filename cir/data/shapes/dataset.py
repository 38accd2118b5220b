"""A CIR-Shapes dataset on disk: the splits' queries sampled, captioned, rendered and written
(`generate`, the job of `python -m cir.data.shapes`)."""
from __future__ import annotations

import json
import random
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from cir.atomic import atomic_path, remove_stale_temporaries, write_json, write_text
from cir.data.shapes.captions import HELDOUT_TEMPLATES, TEMPLATES, make_caption
from cir.data.shapes.partials import partial_subsets
from cir.data.shapes.render import render
from cir.data.shapes.scene import Scene, apply_all, random_scene, sample_operations


def _render_job(job: tuple[str, dict]) -> None:
    path, scene = job
    with atomic_path(path, bulk=True) as tmp:
        render(Scene.from_json(scene)).save(tmp, format="PNG")


def build_split(rng: random.Random, split: str, n: int, taken_keys: set, ks: tuple[int, ...], templates: dict,
                with_partials: bool, filler: float = 0.0, filler_rng: random.Random | None = None
                ) -> tuple[list[dict], list[tuple[str, dict]], list[str]]:
    """Sample n queries (`filler`, `filler_rng`: see `make_caption`). Returns (triplet json
    objects, render jobs (relpath, scene), gallery relpaths)."""
    triplets, jobs, gallery = [], [], []
    keys_here: set = set()
    while len(triplets) < n:
        scene = random_scene(rng)
        key = scene.key()
        if key in taken_keys or key in keys_here:
            continue
        k = rng.choice(ks)
        ops = sample_operations(rng, scene, k)
        if ops is None:
            continue
        keys_here.add(key)
        qid = f"{split}-{len(triplets):06d}"
        target = apply_all(scene, ops)
        ref_path, tgt_path = f"images/{split}/{qid}-ref.png", f"images/{split}/{qid}-tgt.png"
        jobs += [(ref_path, scene.to_json()), (tgt_path, target.to_json())]
        gallery += [ref_path, tgt_path]
        partials = []
        if with_partials:
            for sub in partial_subsets(k):  # none for k = 1
                p = f"images/{split}/{qid}-partial-{''.join(map(str, sub))}.png"
                jobs.append((p, apply_all(scene, [ops[i] for i in sub]).to_json()))
                gallery.append(p)
                partials.append({"path": p, "operations": list(sub)})
        b = make_caption(rng, ops, templates, filler, filler_rng)
        triplets.append({
            "id": qid, "reference": ref_path, "caption": b.text, "targets": [tgt_path],
            "noun_phrases": b.phrases,
            "meta": {"dataset": "cir-shapes", "num_modifications": k, "operations": [op.to_json() for op in ops],
                     "grounding": b.grounding, "partials": partials,
                     "reference_scene": scene.to_json(), "target_scene": target.to_json()},
        })
    taken_keys |= keys_here
    return triplets, jobs, gallery


def scene_keys(triplet_files) -> set:
    """Reference-scene keys of existing CIR-Shapes triplet files (to keep a new dataset apart)."""
    keys = set()
    for path in triplet_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    keys.add(Scene.from_json(json.loads(line)["meta"]["reference_scene"]).key())
    return keys


def generate(out: str | Path, sizes: dict[str, int], seed: int, ks=(1, 2, 3), phrasing: str = "default",
             workers: int = 2, progress: bool = True, exclude: set | None = None, filler: float = 0.25) -> dict:
    """Render a CIR-Shapes dataset into `out`; returns the manifest.

    `exclude`: reference-scene keys that no split may use (e.g. another dataset's). `filler`: the
    share of training clauses with random words in place of template words (`make_caption`); the
    scenes, operations and the other splits do not depend on it."""
    out = Path(out)
    templates = TEMPLATES if phrasing == "default" else HELDOUT_TEMPLATES
    rng = random.Random(seed)
    taken: set = set(exclude or ())
    all_jobs = []
    per_split = {}
    for split, n in sizes.items():
        if n <= 0:
            continue
        split_seed = rng.getrandbits(64)
        triplets, jobs, gallery = build_split(random.Random(split_seed), split, n, taken, ks, templates,
                                              with_partials=split != "train", filler=filler if split == "train" else 0.0,
                                              filler_rng=random.Random(f"filler-{split_seed}"))
        per_split[split] = (triplets, gallery)
        all_jobs += jobs
    for split in per_split:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / "images" / split)  # left by a killed earlier run
    jobs_abs = [(str(out / p), s) for p, s in all_jobs]
    bar = tqdm(total=len(jobs_abs), desc="rendering", unit="img", disable=not progress)
    if workers > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs_abs, chunksize=64):
                bar.update()
    else:
        for j in jobs_abs:
            _render_job(j)
            bar.update()
    bar.close()
    for split, (triplets, gallery) in per_split.items():
        with atomic_path(out / f"{split}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for t in triplets:
                f.write(json.dumps(t) + "\n")
        write_text(out / f"gallery_{split}.txt", "\n".join(gallery) + "\n")
    manifest = {"dataset": "cir-shapes", "seed": seed, "sizes": {s: len(v[0]) for s, v in per_split.items()},
                "num_modifications": list(ks), "phrasing": phrasing, "filler": filler, "spec": "docs/cir-shapes.md",
                "images": len(all_jobs)}
    write_json(out / "manifest.json", manifest)
    return manifest
