"""Training-step cost of the CC loss, and proof that it costs nothing at inference.

    python -m bench.train_bench [--config context-cir-shapes] [--batch-size 64] [--steps 10] [--rounds 3]

Runs each setting in a fresh process (so peak memory is its own): a training step with the
contrastive loss only (lambda 0) and with the CC loss (isolated phrases batched in one pass),
on real CIR-Shapes batches; then query-encoding latency of the two resulting models. The two
settings alternate for several rounds and the table gives medians over them: on a 2-core machine
one round's ratio varies by a few tenths.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cir import precision


def step_worker(a) -> dict:
    from torch.utils.data import DataLoader

    from cir.data.datasets import TripletDataset, collate_triplets
    from cir.data.shapes.dataset import generate
    from cir.data.triplets import read_triplets
    from cir.model import build_model
    from cir.train import LossConfig, TrainingObjective, parse_args, train_step

    torch.manual_seed(0)
    data = Path(a.tmp) / "data"
    if not (data / "train.jsonl").exists():
        generate(data, {"train": a.batch_size * (a.steps + 1)}, seed=11, progress=False)
    triplets, _ = read_triplets(data / "train.jsonl", check_images=False)
    model, preprocess = build_model(a.config)
    targs = parse_args(["--out", a.tmp, "--lambda-cc", str(a.lambda_cc), "--precision", a.precision])
    ds = TripletDataset(triplets, [t.noun_phrases for t in triplets], preprocess, model.tokenizer)
    batches = list(DataLoader(ds, batch_size=a.batch_size, collate_fn=collate_triplets))[: a.steps + 1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = TrainingObjective(model, LossConfig.from_args(targs))
    dtype = precision.resolve(a.precision, "cpu")
    autocast = lambda: precision.autocast("cpu", dtype)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss, parts = train_step(objective, batch, torch.device("cpu"), autocast)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    model.eval()
    images = torch.stack([preprocess(__import__("PIL.Image", fromlist=["Image"]).open(triplets[0].reference).convert("RGB"))])
    lat = []
    for _ in range(20):
        t0 = time.perf_counter()
        model.encode_query(images, [triplets[0].caption])
        lat.append(time.perf_counter() - t0)
    return {"lambda_cc": a.lambda_cc, "step_s": statistics.median(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "phrases_per_batch": statistics.mean(len(b["phrase_texts"]) for b in batches),
            "query_ms_p50": 1000 * statistics.median(lat)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.train_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="context-cir-shapes",
                   help="model config (default context-cir-shapes, the shipped design)")
    p.add_argument("--batch-size", type=int, default=64, help="triplets per step (default 64)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting and round, after one warm-up (default 10)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (contrastive only, contrastive + CC), each setting in a fresh process (default 3)")
    p.add_argument("--precision", choices=precision.CHOICES, default="auto",
                   help="autocast dtype (default auto: bf16 where the CPU has native bf16, else fp32)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lambda-cc", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(step_worker(a)))
        return 0
    lambdas = base, cc = (0.0, 0.08)  # contrastive only, contrastive + CC
    runs = {lam: [] for lam in lambdas}  # lambda -> one worker result per round
    with tempfile.TemporaryDirectory() as tmp:
        for _ in tqdm(range(a.rounds), desc="rounds", unit="round"):
            for lam in lambdas:
                cmd = [sys.executable, "-m", "bench.train_bench", "--worker", "--tmp", tmp, "--lambda-cc", str(lam),
                       "--config", a.config, "--batch-size", str(a.batch_size), "--steps", str(a.steps),
                       "--precision", a.precision]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[lam].append(json.loads(out.strip().splitlines()[-1]))
    med = lambda lam, key: statistics.median(r[key] for r in runs[lam])
    print(f"config {a.config}, batch {a.batch_size}, {precision.resolve(a.precision, 'cpu')}, {torch.get_num_threads()} threads, "
          f"medians of {a.rounds} round(s) of {a.steps} steps")
    print("| loss | step time (s) | peak RSS (MB) | phrases / batch | query encode p50 (ms) |")
    print("|---|---|---|---|---|")
    for lam in lambdas:
        name = "contrastive only (λ=0)" if lam == base else f"contrastive + CC (λ={lam})"
        print(f"| {name} | {med(lam, 'step_s'):.2f} | {max(r['peak_rss_mb'] for r in runs[lam]):.0f} | "
              f"{med(lam, 'phrases_per_batch'):.1f} | {med(lam, 'query_ms_p50'):.1f} |")
    ratios = [c["step_s"] / b["step_s"] for b, c in zip(runs[base], runs[cc])]
    print(f"CC step / contrastive step: {med(cc, 'step_s') / med(base, 'step_s'):.2f}x "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
