"""Training-step cost of the grid-7 recipe, part by part: what the image cache, the teacher's fixed
CC targets and the frozen prior tower each change, and what the CC loss costs.

    python -m bench.train_bench [--batch-size 64] [--steps 12] [--rounds 3] [--threads 2]

Each setting is a real `python -m cir.train` run (in its own process) from the grid-7 step-0 file,
image tower frozen, one partial fulfilment per multi-operation query, on CIR-Shapes data rendered
for the bench; a step's time is its log's `sec` (forward, backward, optimizer) plus `data_sec`
(waiting for the batch: decoding and rendering in the loader's worker, which shares the cores).
The settings run in turn for several rounds; the table gives medians over every step after the
first of each run. Settings, each adding one change to the one above it:

1. today's step: images decoded and partial fulfilments rendered per step (1 loader worker), the
   image tower run, CC targets from the model's own isolated maps, the prior from the trained text tower;
2. + image cache (`--image-cache`, no loader worker);
3. + the teacher's fixed CC targets (`--cc-teacher`);
4. + the frozen prior tower (config context-cir-shapes-grid7): the recipe of the shipped pair;
5. the same with lambda = 0 (the twin's step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEP0 = "assets/context-cir-shapes-grid7-step0.safetensors"
SHARED_PRIOR = "variants/context-cir-shapes-grid7-shared-prior"


def settings(cache: Path) -> list[tuple[str, list[str]]]:
    """(name, cir.train flags) of the five settings, in order."""
    cached = ["--image-cache", str(cache), "--workers", "0"]
    teacher = ["--cc-teacher", STEP0]
    return [("today's step", ["--config", SHARED_PRIOR, "--workers", "1"]),
            ("+ image cache", ["--config", SHARED_PRIOR, *cached]),
            ("+ teacher CC targets", ["--config", SHARED_PRIOR, *cached, *teacher]),
            ("+ frozen prior tower (the recipe)", ["--config", "context-cir-shapes-grid7", *cached, *teacher]),
            ("the recipe, lambda = 0", ["--config", "context-cir-shapes-grid7", *cached, "--lambda-cc", "0"])]


def run_steps(data: Path, out: Path, flags: list[str], a) -> list[float]:
    """Step times (s, sec + data_sec) of one cir.train run after its first step."""
    cmd = [sys.executable, "-m", "cir.train", "--init-from", STEP0, "--data", str(data), "--out", str(out),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--freeze-image", "--partial-negatives",
           "--val-every", "0", "--save-every", str(10 * a.steps), "--threads", str(a.threads), *flags]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["sec"] + r["data_sec"] for r in log[1:]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.train_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64, help="triplets per step (default 64)")
    p.add_argument("--steps", type=int, default=12, help="steps per run; the first is not timed (default 12)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the five settings (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each run (default 2)")
    a = p.parse_args(argv)

    from tqdm import tqdm

    from cir.data.shapes.dataset import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, cache = tmp / "data", tmp / "cache"
        generate(data, {"train": a.batch_size * a.steps * 2}, seed=11, progress=False)
        subprocess.run([sys.executable, "-m", "cir.image_cache", "--checkpoint", STEP0, "--train",
                        str(data / "train.jsonl"), "--out", str(cache), "--workers", "0"],
                       capture_output=True, text=True, check=True)
        times: dict[str, list[float]] = {name: [] for name, _ in settings(cache)}
        for r in tqdm(range(a.rounds), desc="rounds", unit="round"):
            for k, (name, flags) in enumerate(settings(cache)):
                times[name] += run_steps(data, tmp / f"run-{r}-{k}", flags, a)
    print(f"grid-7, batch {a.batch_size}, {a.threads} threads, medians over {a.rounds} rounds x {a.steps - 1} timed steps")
    print("| setting | step (s) | vs today's |")
    print("|---|---|---|")
    base = statistics.median(times["today's step"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
