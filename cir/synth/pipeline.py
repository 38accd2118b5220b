"""Running the pipeline over a pairs file: pairs in, triplets out, resumable.

A pairs file holds one JSON object per line, `{"id", "reference", "target", ["meta"]}`, image paths
relative to the file's folder (or absolute). Pairs are described (steps 1-3) by a thread pool;
each finished pair's captions (step 4) are appended to the output and flushed at once, so an
interrupted run loses nothing finished: a rerun skips the pairs already in the output and gets
the steps of the others from the cache.
"""
from __future__ import annotations

import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from cir.atomic import write_text
from cir.data.triplets import Triplet, image_problem, normalize_path, read_triplets
from cir.errors import UserError
from cir.synth.backends import PairFailed
from cir.synth.stages import Asker, Cache, Composition, Prompts, describe_pair, join_differences

SHAPES_META = ("reference_scene", "target_scene", "operations")


@dataclass(frozen=True)
class Pair:
    id: str
    reference: str  # absolute, normalised paths
    target: str
    meta: dict = field(default_factory=dict)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read and check a pairs file; a bad line is a UserError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pairs file not found: {path}")
    base, pairs, ids = path.parent.resolve(), [], set()
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("id", "reference", "target"))
                and isinstance(obj.get("meta", {}), dict)):
            raise UserError(f'{where}: expected {{"id", "reference", "target"}} strings and an optional "meta" object')
        if obj["id"] in ids:
            raise UserError(f"{where}: duplicate id {obj['id']!r}")
        ids.add(obj["id"])
        pair = Pair(obj["id"], normalize_path(obj["reference"], base), normalize_path(obj["target"], base), obj.get("meta", {}))
        for image in (pair.reference, pair.target):
            if (why := image_problem(image)) is not None:
                raise UserError(f"{where}: {why}")
        pairs.append(pair)
    return pairs


def pairs_from_shapes(data: str | os.PathLike, split: str, out: str | os.PathLike) -> int:
    """Write a pairs file of a CIR-Shapes split (each triplet's reference and target, the scenes and
    operations in meta); returns the number of pairs."""
    triplets, _ = read_triplets(Path(data) / f"{split}.jsonl")
    base = Path(out).parent.resolve()
    lines = []
    for t in triplets:
        if not all(k in t.meta for k in SHAPES_META):
            raise UserError(f"{data}/{split}.jsonl: triplet {t.id!r} is not CIR-Shapes (meta lacks {', '.join(SHAPES_META)})")
        lines.append(json.dumps({"id": t.id, "reference": os.path.relpath(t.reference, base),
                                 "target": os.path.relpath(t.targets[0], base), "meta": {k: t.meta[k] for k in SHAPES_META}}))
    write_text(out, "".join(line + "\n" for line in lines))
    return len(lines)


def _resume(out: Path, generator: dict) -> set[str]:
    """Pair ids already in `out` (a line cut off by an interruption is dropped); the file must have
    been written with the same generator settings."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    done = set()
    for n, line in enumerate(keep.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)["meta"]
            pair_id, written_by = meta["pair_id"], meta["generator"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{out}:{n}: not a line written by cir.synth; choose another --out") from None
        if written_by != generator:
            changed = ", ".join(k for k in generator if written_by.get(k) != generator[k])
            raise UserError(f"{out} was written with other settings ({changed}); rerun with those or choose another --out")
        done.add(pair_id)
    if len(keep) < len(data):
        with open(out, "r+b") as f:
            f.truncate(len(keep))
    return done


def _triplets(pair: Pair, index: int, stages: dict, composition: Composition, generator: dict, base: Path) -> list[dict]:
    rng = random.Random(f"{composition.seed}:{pair.id}")
    out = []
    for j, order in enumerate(composition.plan(len(stages["differences"]), index, rng)):
        caption, phrases = join_differences(stages["differences"], order, rng)
        meta = {"dataset": "good4cir", "pair_id": pair.id, "num_modifications": len(order), "conditions": order,
                "stages": stages, "generator": generator, "pair_meta": pair.meta}
        out.append(Triplet(f"{pair.id}-c{j}", pair.reference, caption, [pair.target], noun_phrases=phrases,
                           meta=meta).to_json(base))
    return out


def generate(pairs: list[Pair], backend, out: str | os.PathLike, cache: str | os.PathLike,
             composition: Composition = Composition(), prompts: Prompts | None = None, concurrency: int = 4,
             max_attempts: int = 4, progress: bool = True) -> dict:
    """Write the triplets of `pairs` to `out` (appending; pairs already there are skipped).

    Returns counts: pairs, skipped (already done), done, triplets, failed (messages), calls, cached,
    malformed. A pair that fails is reported on stderr and left for a rerun."""
    if concurrency < 1 or max_attempts < 1:
        raise UserError("--concurrency and --max-attempts must be at least 1")
    out, prompts = Path(out), prompts or Prompts()
    generator = {"backend": backend.name, "model": backend.model, "prompts": prompts.hashes, **asdict(composition)}
    done = _resume(out, generator)
    todo = [(index, pair) for index, pair in enumerate(pairs) if pair.id not in done]
    asker = Asker(backend, Cache(cache), max_attempts)
    counts = {"pairs": len(pairs), "skipped": len(pairs) - len(todo), "done": 0, "triplets": 0, "failed": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(concurrency)
    try:
        with open(out, "a", encoding="utf-8") as f:
            futures = {pool.submit(describe_pair, asker, prompts, pair.reference, pair.target): (index, pair)
                       for index, pair in todo}
            for future in tqdm(as_completed(futures), total=len(futures), desc="pairs", unit="pair", disable=not progress):
                index, pair = futures[future]
                try:
                    stages = future.result()
                except PairFailed as e:
                    counts["failed"].append(f"{pair.id}: {e}")
                    print(f"pair {pair.id} failed: {e}", file=sys.stderr)
                    continue
                lines = _triplets(pair, index, stages, composition, generator, out.parent.resolve())
                f.write("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in lines))
                f.flush()
                counts["done"] += 1
                counts["triplets"] += len(lines)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return counts | {k: asker.stats[k] for k in ("calls", "cached", "malformed")}
