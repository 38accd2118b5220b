"""Train ConText-CIR: contrastive loss (query image as an extra negative) + lambda * CC loss.

    python -m cir.train --data DATA_DIR --out runs/NAME

DATA_DIR holds train.jsonl, and val.jsonl + gallery_val.txt for periodic validation (as written by
`python -m cir.data.shapes`); or give --train/--val/--val-gallery. Noun phrases come from each
triplet's `noun_phrases` field, else from the parser (cached next to the data). Checkpoints:
RUN_DIR/last.safetensors (+ .json) with optimizer and RNG state; `--resume` continues from it and
reproduces the loss curve of an uninterrupted run. Multi-GPU: `torchrun --nproc_per_node N -m cir.train ...`.

TMCIR (cir/models/tmcir.py) trains here too, its stage 2: `--init-from` the stage-1 output of
`python -m cir.align`, with `--lambda-cc 0 --no-query-negative` for the paper's loss.

Defaults differ from the paper's (lr 2e-5 .. 2e-7 for fine-tuning pretrained CLIP): the fusion and
pooling start from scratch and the shipped towers from a short CLIP-style pretraining on CIR-Shapes
(`python -m cir.towers`), which needs a larger peak lr (3e-4 here,
down to 3e-6).
"""
from __future__ import annotations

import argparse
import functools
import math
import random
from pathlib import Path

from cir import precision
from cir.cli import differing_flags, parse_first, run_cli
from cir.data.shapes.partials import has_partials, partial_subsets

MAX_PHRASES = 10
MAX_PARTIALS = len(partial_subsets(3))  # CIR-Shapes queries have at most 3 operations


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="model config name (cir/models/configs/) or JSON path (default context-cir-shapes, the shipped design; with "
                        "--init-from: the checkpoint's own, or this one, grown from the checkpoint's weights)")
    p.add_argument("--pretrained", default=None, help="override the config's open_clip pretrained tag or weights file")
    p.add_argument("--data", default=None, help="folder with train.jsonl, val.jsonl, gallery_val.txt")
    p.add_argument("--dataset", choices=("cirr", "circo"), default=None,
                   help="train on a benchmark read from its official layout (--root): its train split, validated "
                        "on val; written once as triplet files into OUT/data, where the parsed noun phrases are "
                        "cached too (CIRCO has no training split)")
    p.add_argument("--root", default=None, help="with --dataset: the dataset folder (see python -m cir.evaluate --help)")
    p.add_argument("--images", default=None, help="with --dataset: the image folder, if not the layout's own")
    p.add_argument("--train", default=None, help="training triplets JSONL (default DATA/train.jsonl)")
    p.add_argument("--val", default=None, help="validation triplets JSONL (default DATA/val.jsonl if present)")
    p.add_argument("--val-gallery", default=None, help="validation gallery (default DATA/gallery_val.txt)")
    p.add_argument("--out", required=True, help="run folder for checkpoints and logs")
    p.add_argument("--steps", type=int, default=3000, help="total optimizer steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=64, help="triplets per step, over all processes (default 64)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate after warm-up (default 3e-4)")
    p.add_argument("--min-lr", type=float, default=3e-6, help="learning rate at the end of the cosine (default 3e-6)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default 200)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 1e-2)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping, 0 = off (default 1.0)")
    p.add_argument("--lambda-cc", type=float, default=0.08, help="weight of the CC loss; 0 disables it (default 0.08)")
    p.add_argument("--eps", type=float, default=0.005, help="CC slack per patch on |A_ctx - A_iso| (default 0.005)")
    p.add_argument("--cc-maps", choices=["mean", "last"], default="mean",
                   help="CC maps averaged over all fusion layers, or the last layer only (heads averaged)")
    p.add_argument("--partial-negatives", nargs="?", const=1, default=None, type=partials_count, metavar="N|all",
                   help="CIR-Shapes: for each multi-operation query render N partial fulfilments (distinct random "
                        "non-empty proper subsets of its operations applied to its reference scene, redrawn every "
                        "epoch; 'all' = every one, 2 for 2 operations, 6 for 3) and use them as negatives for every "
                        "query of the batch (the flag alone: N = 1)")
    p.add_argument("--image-cache", default=None, metavar="DIR",
                   help="with --freeze-image: take every training image's tower outputs (and the partial "
                        "fulfilments' fixed pool) from this cache of python -m cir.image_cache instead of "
                        "decoding, rendering and encoding them each step")
    p.add_argument("--cc-teacher", default=None, metavar="CKPT",
                   help="with --image-cache: the CC loss's targets are this frozen checkpoint's isolated maps "
                        "(computed once, kept in OUT/cc_targets.npz), not the trained model's own")
    p.add_argument("--cc-sharpen", type=float, default=1.0, metavar="GAMMA",
                   help="with --cc-teacher: each target map raised to GAMMA and renormalised (same peak, more mass on "
                        "it); default 1, the teacher's maps as they are")
    p.add_argument("--no-query-negative", action="store_true", help="ablation: drop the query image as an extra negative")
    p.add_argument("--freeze-text", action="store_true", help="ablation: freeze the CLIP text encoder")
    p.add_argument("--freeze-image", action="store_true", help="ablation: freeze the CLIP image encoder")
    p.add_argument("--leaf-nps-only", action="store_true", help="ablation: CC loss on leaf noun phrases only")
    p.add_argument("--np-backend", choices=["gold", "spacy", "stanza"], default="gold",
                   help="noun phrases: the triplets' own field when present (gold), or always a parser")
    p.add_argument("--precision", choices=precision.CHOICES, default="auto",
                   help="autocast dtype of the forward passes; auto (default) = bf16 on CUDA and on CPUs with native "
                        "bf16 (about 2x faster there), fp32 on other CPUs (where bf16 is emulated and ~15x slower)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image tower and the fusion in place (the first step compiles for about a minute)")
    p.add_argument("--val-every", type=int, default=500, help="validate every N steps (default 500; 0 = never)")
    p.add_argument("--val-limit", type=int, default=500, help="validation queries used (default 500)")
    p.add_argument("--save-every", type=int, default=100, help="write last.safetensors every N steps (default 100)")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (model init and data order)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: all cores; 1 is steadier on a machine shared with other work)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.safetensors (weights, optimizer, RNG)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="warm start: weights and step from any checkpoint (e.g. the shipped model-only one), "
                        "fresh optimizer moments; use when OUT/last.safetensors is gone")
    p.add_argument("--continue-from", default=None, metavar="CKPT",
                   help="continue a run whose folder is gone from an export of its last.safetensors: its weights, step, "
                        "data order and lr schedule, fresh optimizer moments ramped in over --warmup steps; the run's own flags")
    p.add_argument("--restart-schedule", action="store_true",
                   help="with --init-from: warm up again from the checkpoint's step and anneal to --steps (default: "
                        "the warm start sits at its step on the cosine of --steps, without warm-up)")
    p.add_argument("--prior-gain-scale", type=float, default=1.0, metavar="K",
                   help="with --init-from: multiply every fusion block's attention-prior gain by K at the warm start, "
                        "so the maps start K times sharper over the same token-patch cosines (default 1)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (after saving) once this step is reached, keeping the schedule of --steps")
    a = p.parse_args(argv)
    check_partners(p, a)
    a.schedule_start = 0  # the step the lr schedule begins at (main sets it for --restart-schedule and --resume)
    a.rewarm_at = None  # the step a run continued from an export ramps its lr from (main sets it)
    return a


def check_partners(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Exit with a usage error when a flag lacks the flag it works with, or conflicts with one."""
    if a.image_cache and not a.freeze_image:
        p.error("--image-cache needs --freeze-image (the cache holds the frozen image tower's outputs)")
    if a.cc_teacher and not a.image_cache:
        p.error("--cc-teacher needs --image-cache")
    if a.cc_sharpen != 1 and not a.cc_teacher:
        p.error("--cc-sharpen needs --cc-teacher")
    if a.cc_sharpen <= 0:
        p.error("--cc-sharpen must be positive")
    if a.prior_gain_scale != 1 and not (a.init_from or a.continue_from):
        p.error("--prior-gain-scale needs --init-from (or --continue-from, where it was applied when the run began)")
    if a.prior_gain_scale <= 0:
        p.error("--prior-gain-scale must be positive")
    if a.continue_from and (a.init_from or a.restart_schedule):
        p.error("--continue-from takes neither --init-from nor --restart-schedule")


def partials_count(value: str) -> int:
    """--partial-negatives N|all -> partial fulfilments per query (all = MAX_PARTIALS)."""
    if value == "all":
        return MAX_PARTIALS
    if not value.isdigit() or not 1 <= int(value) <= MAX_PARTIALS:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_PARTIALS} or 'all', got {value!r}")
    return int(value)


parse_first(__name__, parse_args)  # `python -m cir.train`: --help and argument errors before torch loads

import numpy as np
import torch
import torch.distributed as dist

from cir.atomic import sha256_file
from cir.checkpoint import load_checkpoint, load_weights, read_manifest, save_checkpoint
from cir.cc_teacher import run_cc_targets
from cir.data.datasets import TripletDataset
from cir.data.triplets import Triplet, read_gallery, read_triplets
from cir.errors import UserError
from cir.image_cache import ImageCache
from cir.models.base import ComposedRetrieval
from cir.models.factory import build_model, load_config
from cir.training.batches import epoch_batches, seen_token_ids, setup_distributed, shapes_partials
from cir.training.loop import LoopConfig, OptimConfig, make_optimizer, restore_optimizer, run_loop
from cir.training.objectives import LossConfig, TrainingObjective, train_step
from cir.training.validation import validate


def leaf_only(phrases: list[dict]) -> list[dict]:
    """Drop phrases that contain another phrase (keep the leaves)."""
    return [p for p in phrases if not any(q is not p and p["start"] <= q["start"] and q["end"] <= p["end"]
                                          and (q["start"], q["end"]) != (p["start"], p["end"]) for q in phrases)]


def training_phrases(triplets, data_file: Path, a) -> list[list[dict]]:
    if a.np_backend == "gold" and all(t.noun_phrases is not None for t in triplets):
        phrases = [t.noun_phrases for t in triplets]
        phrases = [leaf_only(p) if a.leaf_nps_only else p for p in phrases]
    else:
        from cir.text.phrases import noun_phrases_for, phrase_cache_path  # loads a parser only when spans must be extracted

        backend = "spacy" if a.np_backend == "gold" else a.np_backend
        cache = phrase_cache_path(data_file.parent, backend, MAX_PHRASES, a.leaf_nps_only)
        phrases = noun_phrases_for([t.caption for t in triplets], cache, backend, MAX_PHRASES, a.leaf_nps_only)
    return [p[:MAX_PHRASES] for p in phrases]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rank, world, device = setup_distributed(a.device)
    out = Path(a.out)
    train_file, val_file, val_gallery = run_files(a, out, rank, world)
    last = out / "last.safetensors"
    if a.resume and not last.is_file():
        raise UserError(f"--resume: no checkpoint at {last}")

    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    model, preprocess, manifest, tensors, start, log_metrics = starting_model(a, last, device)
    model.train()
    if a.freeze_text:
        for n, prm in model.clip.named_parameters():
            if not n.startswith("visual."):
                prm.requires_grad_(False)
    if a.freeze_image:
        model.clip.visual.requires_grad_(False)

    triplets, _ = read_triplets(train_file, check_images=False)
    phrases = training_phrases(triplets, train_file, a)
    val = read_triplets(val_file)[0][:a.val_limit] if val_file and a.val_every else None
    val_gal = read_gallery(val_gallery) if val else None

    opt = make_optimizer(model, a.lr, a.weight_decay)
    if tensors is not None:
        restore_optimizer(opt, tensors, manifest)
        torch.set_rng_state(tensors["rng.torch"])
    objective = TrainingObjective(model, LossConfig.from_args(a))
    if world > 1:  # unused open_clip parameters (its logit scale, text projection) get no gradient
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    if a.compile:  # the heavy tensor code; the objective's Python (tokenising isolated phrases) stays eager
        model.clip.visual.compile()
        model.fusion.compile(dynamic=True)  # text length varies per batch
    dtype = precision.resolve(a.precision, device)
    autocast = lambda: precision.autocast(device, dtype)

    dataset = training_dataset(a, model, preprocess, triplets, phrases, train_file, out, world)
    manifest_base = {"config": model.config.to_dict(),
                     "tokenizer": {"type": "clip-bpe", "context_length": model.config.context_length},
                     "data": {"train": str(train_file), "sha256": sha256_file(train_file), "triplets": len(triplets)},
                     "phrases": {"source": a.np_backend, "leaf_only": a.leaf_nps_only, "max": MAX_PHRASES},
                     "args": {k: v for k, v in vars(a).items() if k not in ("resume", "stop_after", "init_from", "continue_from")},
                     "token_ids_seen": seen_token_ids(model.tokenizer, triplets, phrases)}
    out.mkdir(parents=True, exist_ok=True)
    stop = min(a.steps, a.stop_after or a.steps)
    if rank == 0:
        print(startup_summary(a, model, device, dtype, world, train_file, len(triplets), len(val or []), start, stop),
              flush=True)
    metrics = {"latest": log_metrics}

    def on_step(step: int, record: dict) -> None:
        if val and a.val_every and (step % a.val_every == 0 or step == a.steps):
            metrics["latest"] = validate(model, preprocess, val, val_gal, device, step, out / "val.jsonl")
        if step % a.save_every == 0 or step == stop:
            save_checkpoint(last, model, dict(manifest_base, step=step, metrics=metrics["latest"]), optimizer=opt)

    @torch.no_grad()
    def clamp_temperature() -> None:
        model.logit_scale.clamp_(0, math.log(100))

    loop = LoopConfig(OptimConfig.from_args(a).schedule, stop, a.clip_grad, out / "log.jsonl", "train", main=rank == 0)
    batches = epoch_batches(dataset, a.batch_size, a.seed, start, rank, world, a.workers, device.type == "cuda")
    step = run_loop(batches, lambda batch: train_step(objective, batch, device, autocast), opt, loop, start,
                    clipped=list(model.parameters()), after_step=clamp_temperature, on_step=on_step)
    if rank == 0 and step == start and not a.resume:  # no step to run (--steps 0): the model as initialised
        save_checkpoint(last, model, dict(manifest_base, step=step, metrics=metrics["latest"]), optimizer=opt)
    if rank == 0:
        print(f"done at step {step}; checkpoint {last}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def run_files(a, out: Path, rank: int, world: int) -> tuple[Path, Path | None, str | None]:
    """(training triplets, validation triplets or None, validation gallery or None) from the flags."""
    data = benchmark_data(a, out, rank, world) if a.dataset else Path(a.data) if a.data else None
    train_file = Path(a.train) if a.train else (data / "train.jsonl" if data else None)
    if train_file is None:
        raise UserError("give --data DIR or --train FILE")
    val_file = Path(a.val) if a.val else (data / "val.jsonl" if data and (data / "val.jsonl").exists() else None)
    val_gallery = a.val_gallery or (str(data / "gallery_val.txt") if data and val_file else None)
    if a.batch_size % world:
        raise UserError(f"--batch-size {a.batch_size} is not divisible by the {world} processes")
    return train_file, val_file, val_gallery


def starting_model(a, last: Path, device):
    """The model a run starts from: its checkpoint (--resume, with the training state), a warm start
    or continuation (--init-from / --continue-from, in its own config or grown into --config), or a
    new one of --config; sets where the lr schedule starts (a.schedule_start, a.rewarm_at).
    -> (model, preprocess, manifest, training tensors or None, start step, latest validation metrics)."""
    if a.resume:
        model, preprocess, manifest, tensors = load_checkpoint(last, device, with_training_state=True)
        a.schedule_start = manifest.get("args", {}).get("schedule_start", 0)
        a.rewarm_at = manifest.get("args", {}).get("rewarm_at")
        return model, preprocess, manifest, tensors, manifest["step"], manifest.get("metrics", {})
    source = a.init_from or a.continue_from
    if not source:
        model, preprocess = build_model(_config(a), device)
        return model, preprocess, None, None, 0, {}
    if a.config is None:
        model, preprocess, manifest = load_checkpoint(source, device)
    else:
        model, preprocess, manifest = grown_model(_config(a), source, device)
    if a.init_from and a.prior_gain_scale != 1:
        scale_prior_gain(model, a.prior_gain_scale)
    start = manifest.get("step", 0)
    if a.restart_schedule:
        a.schedule_start = start
    if a.continue_from:
        check_continuation(a, manifest)
        a.schedule_start = manifest["args"].get("schedule_start", 0)  # a run that restarted its schedule
        a.prior_gain_scale = manifest["args"].get("prior_gain_scale", 1.0)  # applied when the run began
        a.rewarm_at = start
    return model, preprocess, manifest, None, start, manifest.get("metrics", {})


def scale_prior_gain(model, scale: float) -> None:
    """Multiply every fusion block's attention-prior gain [H] by `scale` (the model must have a prior)."""
    blocks = [b for b in getattr(getattr(model, "fusion", None), "blocks", []) if b.prior_gain is not None]
    if not blocks:
        raise UserError("--prior-gain-scale: the model has no attention prior (config attention_prior)")
    with torch.no_grad():
        for block in blocks:
            block.prior_gain.mul_(scale)
    print(f"attention-prior gains scaled by {scale:g}: {', '.join(f'{b.prior_gain.mean().item():.2f}' for b in blocks)}")


def _config(a):
    config = load_config(a.config or "context-cir-shapes")
    if a.pretrained is not None:
        config.pretrained = a.pretrained
    return config


def grown_model(config, source: str, device):
    """A model of `config` with the weights of checkpoint `source` (new modules as initialised; a new
    frozen prior as the loaded text tower). -> (model, preprocess, source's manifest)."""
    model, preprocess = build_model(config, device)
    new = load_weights(model, source)
    manifest = read_manifest(source)
    print(f"warm start from {source} (step {manifest.get('step', 0)}); {len(new)} tensors newly initialised"
          + (f": {', '.join(sorted({k.rsplit('.', 1)[0] for k in new}))}" if new else ""))
    if any(k.startswith("prior_text.") for k in new):  # the frozen prior starts as the loaded text tower
        model.prior_text.copy_from(model.clip)
        print("prior_text: a frozen copy of the loaded text tower")
    return model, preprocess, manifest


CONTINUATION_FLAGS = ("steps", "batch_size", "lr", "min_lr", "warmup", "weight_decay", "lambda_cc", "eps", "cc_maps",
                      "cc_sharpen", "partial_negatives", "freeze_text", "freeze_image", "no_query_negative", "seed")


def check_continuation(a, manifest: dict) -> None:
    """--continue-from: the export must come from a run with these flags (else its step would sit on
    another schedule and data order)."""
    trained = manifest.get("args")
    if trained is None or "step" not in manifest:
        raise UserError(f"--continue-from {a.continue_from}: not an export of a cir.train run (no flags or step in "
                        "its manifest); use --init-from for a warm start")
    differ = differing_flags(a, trained, CONTINUATION_FLAGS)
    if differ:
        raise UserError(f"--continue-from {a.continue_from}: its run had " + ", ".join(differ))


def training_dataset(a, model, preprocess, triplets: list[Triplet], phrases: list[list[dict]], train_file: Path,
                     out: Path, world: int) -> TripletDataset:
    """The training items: images decoded (or the image cache's tower outputs), partial fulfilments
    as hard negatives, and the teacher's CC targets, as the flags ask."""
    if a.partial_negatives and not any(has_partials(t.meta or {}) for t in triplets):
        raise UserError(f"--partial-negatives: no triplet in {train_file} has CIR-Shapes scenes with 2+ operations")
    cache = cc_targets = None
    if a.image_cache:
        cache = ImageCache.open(a.image_cache)
        cache.check(model, train_file)
    if a.cc_teacher and a.lambda_cc > 0:
        if world > 1:
            raise UserError("--cc-teacher runs in one process (no torchrun)")
        phrase_source = {"source": a.np_backend, "leaf_only": a.leaf_nps_only, "max": MAX_PHRASES}
        cc_targets = run_cc_targets(out, a.cc_teacher, cache, phrases, phrase_source, a.cc_maps, a.cc_sharpen)
    dataset = TripletDataset(triplets, phrases, preprocess, model.tokenizer,
                             hard_negatives=functools.partial(shapes_partials, count=a.partial_negatives)
                             if a.partial_negatives and cache is None else None, seed=a.seed,
                             cache=cache, cached_partials=a.partial_negatives or 0, cc_targets=cc_targets)
    if len(dataset) < a.batch_size:
        raise UserError(f"{len(dataset)} training triplets are fewer than one batch of {a.batch_size}")
    return dataset


def startup_summary(a, model: ComposedRetrieval, device: torch.device, dtype: str, world: int, train_file: Path,
                    n_train: int, n_val: int, start: int, stop: int) -> str:
    """What a run is about to do, printed before its first step: config, parameters, device and
    precision, data sizes, schedule and losses, run folder."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return "\n".join([
        f"model   {a.config or model.config.clip_model}: {total / 1e6:.2f} M parameters, {trained / 1e6:.2f} M trained"
        + (" (resumed)" if a.resume else f" (continued from {a.continue_from})" if a.continue_from
           else f" (from {a.init_from})" if a.init_from else ""),
        f"device  {device} x {world}, {dtype} precision" + (f", {torch.get_num_threads()} CPU threads"
                                                             if device.type == "cpu" else ""),
        f"data    {n_train:,} training triplets ({train_file})" + (f", {n_val:,} validation queries" if n_val else ""),
        f"steps   {start:,} -> {stop:,} of {a.steps:,}, batch {a.batch_size}, lr {a.lr:g} -> {a.min_lr:g} "
        f"(warm-up {a.warmup}), lambda_cc {a.lambda_cc:g}",
        f"out     {a.out}"])


def benchmark_data(a, out: Path, rank: int, world: int) -> Path:
    """OUT/data with train.jsonl, val.jsonl and gallery_val.txt of benchmark a.dataset under a.root,
    written by rank 0 the first time (a resumed run reuses them)."""
    from cir.data.benchmarks import export_benchmark
    if a.dataset == "circo":
        raise UserError("CIRCO has no training split (it is test-only): train on CIRR or other triplets and "
                        "evaluate with python -m cir.evaluate --dataset circo")
    if a.root is None or a.data or a.train:
        raise UserError("--dataset needs --root ROOT, and neither --data nor --train")
    data = out / "data"
    if rank == 0 and not (data / "gallery_val.txt").is_file():  # the last file written
        for split in ("train", "val"):
            export_benchmark(a.dataset, a.root, split, data, a.images)
    if world > 1:
        dist.barrier()
    return data


if __name__ == "__main__":
    run_cli(main)
