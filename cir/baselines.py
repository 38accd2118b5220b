"""Baselines for the CIR-Shapes results table, on towers pretrained here (python -m cir.towers).

    python -m cir.baselines train-combiner --clip RUN_DIR/clip.safetensors --data DATA_DIR --out RUN_DIR2
    python -m cir.baselines evaluate --clip CLIP_CKPT --triplets test.jsonl --gallery gallery_test.txt \\
        [--combiner RUN_DIR2/combiner.safetensors] [--json OUT]

`train-combiner` trains the Combiner of CLIP4Cir (Baldrati et al.) on frozen CLIP features of
(reference, caption) -> target, extracted once (cached in its run folder). `evaluate` scores image-only, text-only, the training-free sum
normalize(image + text) and the Combiner against the CLIP image embeddings of the gallery through
cir.evaluate.evaluate: same protocol, metrics and printout; the JSON maps each method name to
cir.evaluate's result object. Checkpoints are safetensors with the manifest embedded and a .json
copy beside them, written atomically.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from cir.cli import add_data_flags, add_device_flags, add_training_flags, parse_first, positive_int, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("train-combiner", allow_abbrev=False, help="train a CLIP4Cir Combiner on frozen CLIP features of the triplets")
    m.add_argument("--clip", required=True, help="towers checkpoint written by python -m cir.towers, or any model checkpoint (its towers)")
    m.add_argument("--limit", type=positive_int, default=None, help="use only the first N training triplets (default all)")
    m.add_argument("--projection-dim", type=positive_int, default=None, help="projection width (default 4 x CLIP embedding dim, as CLIP4Cir)")
    m.add_argument("--hidden-dim", type=positive_int, default=None, help="hidden width of both MLPs (default 8 x CLIP embedding dim)")
    m.add_argument("--dropout", type=float, default=0.5, help="dropout in the Combiner (default 0.5, as CLIP4Cir)")
    m.add_argument("--feature-batch-size", type=positive_int, default=256,
                   help="images or captions per CLIP forward pass when extracting features (default 256)")
    add_training_flags(m, steps=1200, batch=512, lr=1e-4, warmup=100, weight_decay=0.0)
    e = sub.add_parser("evaluate", allow_abbrev=False, help="score image-only, text-only, sum and (with --combiner) Combiner retrieval")
    e.add_argument("--clip", required=True, help="towers checkpoint written by python -m cir.towers, or any model checkpoint (its towers)")
    e.add_argument("--combiner", default=None, help="Combiner checkpoint written by train-combiner (on the same CLIP)")
    add_data_flags(e)  # --json writes {method: cir.evaluate's result object}
    add_device_flags(e)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.cmd != "evaluate" and not (a.data or a.train):
        p.error("give --data DIR or --train FILE")
    return a


parse_first(__name__, parse_args)  # `python -m cir.baselines`: --help and argument errors before torch loads

import safetensors
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from cir import precision
from cir.atomic import atomic_path, sha256_file, write_json
from cir.checkpoint import load_module, save_module
from cir.data.triplets import Triplet
from cir.errors import UserError
from cir.cli import read_data
from cir.retrieval.evaluate import embed_gallery, evaluate, format_results
from cir.towers import load_towers
from cir.data.triplets import read_training_triplets
from cir.training.loop import OptimConfig, epoch_order, fit

COMBINER_FORMAT = "cir-combiner-checkpoint/1"
METHODS = {"image": "image only", "text": "text only", "sum": "sum of image and text embeddings",
           "combiner": "CLIP4Cir Combiner"}


# ----------------------------------------------------------------------------- models

class Combiner(nn.Module):
    """CLIP4Cir's Combiner: ReLU projections of both features, concatenated; an MLP gives a residual
    and another a mixing weight lam in (0, 1); output normalize(lam * text + (1 - lam) * image + residual)."""

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5):
        super().__init__()
        proj = lambda: nn.Sequential(nn.Linear(feature_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.text_proj, self.image_proj = proj(), proj()
        self.residual = nn.Sequential(nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden_dim, feature_dim))
        self.mixing = nn.Sequential(nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.text_proj(text), self.image_proj(image)], -1)
        lam = self.mixing(x)
        return F.normalize(self.residual(x) + lam * text + (1 - lam) * image, dim=-1)


class Baseline(nn.Module):
    """One method behind ConTextCIR's inference API (encode_query, encode_gallery), so that
    cir.evaluate scores it by exactly the same code. All embeddings are L2-normalised CLIP ones."""

    def __init__(self, clip: nn.Module, tokenizer, method: str, combiner: Combiner | None = None):
        super().__init__()
        self.clip, self.tokenizer, self.method, self.combiner = clip, tokenizer, method, combiner

    @torch.no_grad()
    def encode_gallery(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=True)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(self.tokenizer(texts).to(self.clip.logit_scale.device), normalize=True)

    @torch.no_grad()
    def encode_query(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        if self.method == "text":
            return self.encode_text(texts)
        img = self.encode_gallery(images)
        if self.method == "image":
            return img
        txt = self.encode_text(texts)
        return F.normalize(img + txt, dim=-1) if self.method == "sum" else self.combiner(img, txt)


# ----------------------------------------------------------------------------- checkpoints

def load_combiner(path: str, clip_path: str) -> Combiner:
    combiner, manifest = load_module(path, COMBINER_FORMAT, lambda m: Combiner(**m["combiner"]))
    if manifest["clip"]["sha256"] != sha256_file(clip_path):
        raise UserError(f"{path} was trained on the features of {manifest['clip']['path']}, not of {clip_path}")
    return combiner


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def frozen_features(a, train_file: Path, triplets: list[Triplet], out: Path, device) -> dict:
    """Normalised CLIP features {"reference", "caption", "target"} [N, E], cached in OUT/features.safetensors
    (reused while the CLIP checkpoint and the triplets are the same)."""
    clip, preprocess, tokenizer = load_towers(a.clip)
    key = {"clip_sha256": sha256_file(a.clip), "train_sha256": sha256_file(train_file), "triplets": str(len(triplets))}
    cache = out / "features.safetensors"
    if cache.is_file():
        with safetensors.safe_open(str(cache), "pt") as f:
            if f.metadata() == key:
                print(f"using cached features {cache}")
                return {k: f.get_tensor(k).to(device) for k in f.keys()}
    encoder = Baseline(clip.to(device), tokenizer, "image")
    images = embed_gallery(encoder, [t.reference for t in triplets] + [t.targets[0] for t in triplets], preprocess,
                           device, a.feature_batch_size, a.workers, progress=True)
    captions = []
    for i in tqdm(range(0, len(triplets), a.feature_batch_size), desc="captions", unit="batch"):
        with precision.autocast(device):
            captions.append(encoder.encode_text([t.caption for t in triplets[i:i + a.feature_batch_size]]).float())
    n = len(triplets)
    feats = {"reference": images[:n], "caption": torch.cat(captions), "target": images[n:]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in feats.items()}, str(tmp), metadata=key)
    return feats


def train_combiner(a, device: torch.device) -> None:
    train_file, triplets = read_training_triplets(a.data, a.train)
    triplets = triplets[:a.limit] if a.limit else triplets
    if len(triplets) < a.batch_size:
        raise UserError(f"{len(triplets)} training triplets are fewer than one batch of {a.batch_size}")
    out = Path(a.out)
    feats = frozen_features(a, train_file, triplets, out, device)
    dim = feats["target"].shape[1]
    dims = {"feature_dim": dim, "projection_dim": a.projection_dim or 4 * dim, "hidden_dim": a.hidden_dim or 8 * dim,
            "dropout": a.dropout}
    torch.manual_seed(a.seed)
    combiner = Combiner(**dims).to(device)
    labels = torch.arange(a.batch_size, device=device)

    def batches():
        for epoch in itertools.count():
            yield from epoch_order(len(triplets), a.batch_size, a.seed, epoch).to(device).split(a.batch_size)

    def loss_of(idx):  # CLIP4Cir: cross-entropy over the batch's targets, logit scale 100
        pred = combiner(feats["reference"][idx], feats["caption"][idx])
        return F.cross_entropy(100 * pred @ feats["target"][idx].T, labels), {}

    last = fit(combiner, batches(), loss_of, OptimConfig.from_args(a), out / "log.jsonl", "train-combiner")
    save_module(out / "combiner.safetensors", combiner,
                 {"combiner": dims, "step": a.steps, "final_loss": last,
                  "clip": {"path": str(a.clip), "sha256": sha256_file(a.clip)},
                  "data": {"train": str(train_file), "sha256": sha256_file(train_file), "triplets": len(triplets)},
                  "args": vars(a)}, COMBINER_FORMAT)
    print(f"wrote {out / 'combiner.safetensors'}")


# ----------------------------------------------------------------------------- evaluation

def evaluate_baselines(a, device: torch.device) -> None:
    triplets, gallery, keep = read_data(a)
    clip, preprocess, tokenizer = load_towers(a.clip)
    clip.to(device)
    combiner = load_combiner(a.combiner, a.clip).to(device) if a.combiner else None
    gallery_emb = embed_gallery(Baseline(clip, tokenizer, "image"), gallery, preprocess, device, a.batch_size,
                                progress=True)
    results = {}
    for method, label in METHODS.items():
        if method == "combiner" and combiner is None:
            continue
        results[method] = evaluate(Baseline(clip, tokenizer, method, combiner), preprocess, triplets, gallery, device,
                                   keep, a.batch_size, with_grounding=False, progress=True, gallery_emb=gallery_emb)
        print(f"== {method}: {label}\n{format_results(results[method])}")
    if a.json:
        write_json(a.json, results)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    {"train-combiner": train_combiner, "evaluate": evaluate_baselines}[a.cmd](a, device)
    return 0


if __name__ == "__main__":
    run_cli(main)
