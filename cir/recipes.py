"""Named recipes: each reproduces a shipped file from an empty folder with one command.

    python -m cir.recipes --list                  # the recipes, their stages and measured durations
    python -m cir.recipes NAME [--dry-run]        # run (or print) NAME's stages in order

A recipe is data: a list of stages, each one project command (`python -m cir.<tool> ...` or a
script) with the file it produces. A stage whose file exists is skipped (except the stages that write
the shipped files under assets/: they take seconds and are what the recipe is for), and a training
stage whose run folder holds a checkpoint continues it with `--resume`, so a recipe stopped
part-way (or run over several sittings) goes on where it stopped. Where the run folder is gone, a
training stage continues from the file its recipe exports, when that file is an export of the same run
part-way (`--continue-from`): a run's progress travels with the repository as its shipped file. Run it from the repository root; data goes to
data/, runs to runs/, shipped files to assets/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cir.errors import UserError


@dataclass(frozen=True)
class Stage:
    what: str  # one line: what the stage makes, with its measured duration on 2 CPU cores
    command: tuple[str, ...]  # argv after `python`
    output: str  # the file whose presence means the stage is done

    def flag(self, name: str) -> str:
        """The value of flag `name` (e.g. "--out") in the command."""
        return self.command[self.command.index(name) + 1]

    @property
    def init_from(self) -> str | None:
        """The checkpoint a training stage warm-starts from (--init-from), else None."""
        return self.flag("--init-from") if self.run_folder is not None and "--init-from" in self.command else None

    @property
    def run_folder(self) -> Path | None:
        """The --out folder of a cir.train stage (resumable), else None."""
        return Path(self.flag("--out")) if self.command[:2] == ("-m", "cir.train") else None

    @property
    def checkpoint(self) -> Path | None:
        """OUT/last.safetensors of a stage that resumes from it with --resume (cir.train, cir.align,
        cir.towers), else None."""
        if self.command[:2] not in (("-m", "cir.train"), ("-m", "cir.align"), ("-m", "cir.towers")):
            return None
        return Path(self.flag("--out")) / "last.safetensors"

    @property
    def steps(self) -> int:
        """The --steps of a cir.train stage."""
        return int(self.flag("--steps"))


def _train(what: str, out: str, *flags: str) -> Stage:
    return Stage(what, ("-m", "cir.train", "--data", "data/shapes", "--out", out, "--batch-size", "64", *flags),
                 f"{out}/last.safetensors")


STEP0 = "assets/context-cir-shapes-grid7-step0.safetensors"  # the grid-7 design before CIR training
_EXCLUDE = ("--exclude-scenes", "data/shapes/train.jsonl", "--exclude-scenes", "data/shapes/val.jsonl")

DATA = [
    Stage("CIR-Shapes: 100,000 training and 1,000 validation triplets (7 min)",
          ("-m", "cir.data.shapes", "--out", "data/shapes", "--train", "100000", "--val", "1000", "--seed", "1"),
          "data/shapes/manifest.json"),
    Stage("the test split: 1,000 queries on unseen scenes (1 min)",
          ("-m", "cir.data.shapes", "--out", "data/shapes-test", "--test", "1000", "--seed", "2", *_EXCLUDE),
          "data/shapes-test/manifest.json"),
    Stage("the held-out phrasing split: 500 queries in templates training never sees (1 min)",
          ("-m", "cir.data.shapes", "--out", "data/shapes-heldout", "--test", "500", "--seed", "3",
           "--phrasing", "heldout", *_EXCLUDE),
          "data/shapes-heldout/manifest.json"),
]

GRID7_TOWERS = Stage("grid-7 towers: 800 steps of 128, scene + patch + word losses (45 min)",
                     ("-m", "cir.towers", "--config", "cir-shapes-grid7", "--data", "data/shapes", "--out", "runs/towers-grid7",
                      "--steps", "800", "--token-weight", "1"),
                     "runs/towers-grid7/clip.safetensors")

SHAPES_3X3_CHAIN = [
    Stage("3 x 3 towers: 1,000 steps of 128, scene + patch losses (23 min)",
          ("-m", "cir.towers", "--config", "cir-shapes-cells", "--data", "data/shapes", "--out", "runs/towers-cells",
           "--steps", "1000", "--token-weight", "0"),
          "runs/towers-cells/clip.safetensors"),
    _train("text -> image fusion, 1,700 steps (60 min)", "runs/shapes-1-t2i",
           "--config", "variants/context-cir-shapes-cells-t2i", "--pretrained", "runs/towers-cells/clip.safetensors",
           "--steps", "1700", "--lr", "4e-4", "--min-lr", "4e-6", "--seed", "0", "--partial-negatives",
           "--val-every", "500"),
    _train("text -> image fusion continued to step 3,600 (66 min)", "runs/shapes-2-t2i",
           "--init-from", "runs/shapes-1-t2i/last.safetensors", "--steps", "3600", "--lr", "4e-4", "--min-lr", "4e-6",
           "--seed", "1", "--partial-negatives", "--val-every", "600"),
    _train("grown into both fusion directions, to step 9,200 (2 h 15 min)", "runs/shapes-3-bidir",
           "--config", "context-cir-shapes", "--init-from", "runs/shapes-2-t2i/last.safetensors",
           "--steps", "9200", "--lr", "2e-4", "--min-lr", "2e-6", "--warmup", "100", "--restart-schedule",
           "--seed", "2", "--partial-negatives", "--val-every", "800", "--val-limit", "1000"),
    _train("every partial fulfilment as a negative, to step 12,400 (about 2 h)", "runs/shapes-4-partials",
           "--init-from", "runs/shapes-3-bidir/last.safetensors", "--steps", "12400", "--lr", "1e-4",
           "--min-lr", "1e-6", "--warmup", "100", "--restart-schedule", "--seed", "3", "--partial-negatives", "all",
           "--val-every", "500", "--val-limit", "1000"),
    _train("the same at peak lr 5e-5, to step 15,400 (88 min)", "runs/shapes-5-partials",
           "--init-from", "runs/shapes-4-partials/last.safetensors", "--steps", "15400", "--lr", "5e-5",
           "--min-lr", "1e-6", "--warmup", "100", "--restart-schedule", "--seed", "4", "--partial-negatives", "all",
           "--val-every", "500", "--val-limit", "1000"),
    Stage("export fp16 (10 s)",
          ("-m", "cir.checkpoint", "export", "--checkpoint", "runs/shapes-5-partials/last.safetensors",
           "--out", "assets/context-cir-shapes.safetensors", "--dtype", "fp16"),
          "assets/context-cir-shapes.safetensors"),
]

def _tmcir_stage2(out: str, init: str, cache: str) -> list[Stage]:
    """TMCIR's stage 2 on the grid-7 pair's schedule: 15,000 steps from `init` with one partial
    fulfilment per query as a negative, then 6,000 with every one; image tower frozen (its outputs in
    `cache`), the paper's InfoNCE with the query's reference as an extra negative."""
    frozen = ("--lambda-cc", "0", "--freeze-image", "--image-cache", cache)
    steady = ("--workers", "0", "--threads", "1", "--val-every", "500", "--val-limit", "1000", "--save-every", "200")
    return [_train("stage 2: 15,000 steps, 1 thread (0.33 s/step at 2 threads alone)", out, "--init-from", init,
                   "--steps", "15000", "--lr", "4e-4", "--min-lr", "4e-6", *frozen, "--partial-negatives",
                   "--seed", "0", *steady),
            _train("stage 2 with every partial fulfilment as a negative, to step 21,000, 1 thread", f"{out}-partials",
                   "--init-from", f"{out}/last.safetensors", "--steps", "21000", "--lr", "1e-4", "--min-lr", "1e-6",
                   "--warmup", "100", "--restart-schedule", *frozen, "--partial-negatives", "all", "--seed", "1",
                   *steady)]


TMCIR_ALIGNED = "runs/tmcir-align/aligned-fp16.safetensors"  # stage 1's towers, fp16 as every shipped file
TMCIR_SHAPES = [
    Stage("stage 1: an oracle pseudo-target per training triplet (about 35 min), then 3,000 alignment steps of the "
          "grid-7 towers (0.36 s/step at 2 threads)",
          ("-m", "cir.align", "--data", "data/shapes", "--out", "runs/tmcir-align", "--towers-from", STEP0,
           "--steps", "3000", "--seed", "0", "--save-every", "200", "--threads", "1", "--workers", "0"),
          "runs/tmcir-align/aligned.safetensors"),
    Stage("stage 1's towers in fp16 (10 s)",
          ("-m", "cir.checkpoint", "export", "--checkpoint", "runs/tmcir-align/aligned.safetensors",
           "--out", TMCIR_ALIGNED, "--dtype", "fp16"),
          TMCIR_ALIGNED),
    Stage("the aligned image tower's outputs for every training image and partial fulfilment (15 min)",
          ("-m", "cir.image_cache", "--checkpoint", TMCIR_ALIGNED, "--train", "data/shapes/train.jsonl",
           "--out", "data/shapes-cache-tmcir"),
          "data/shapes-cache-tmcir/manifest.json"),
    *_tmcir_stage2("runs/tmcir", TMCIR_ALIGNED, "data/shapes-cache-tmcir"),
    Stage("export fp16 (10 s)",
          ("-m", "cir.checkpoint", "export", "--checkpoint", "runs/tmcir-partials/last.safetensors",
           "--out", "assets/tmcir-shapes.safetensors", "--dtype", "fp16"),
          "assets/tmcir-shapes.safetensors"),
]

GRID7_CACHE = Stage("the grid-7 image tower's outputs for every training image and partial fulfilment (15 min)",
                    ("-m", "cir.image_cache", "--checkpoint", STEP0, "--train", "data/shapes/train.jsonl",
                     "--out", "data/shapes-cache-grid7"),
                    "data/shapes-cache-grid7/manifest.json")


def _grid7_pair_member(name: str, out: str, lambda_cc: str, *flags: str) -> list[Stage]:
    """The grid-7 recipe: 15,000 steps from the step-0 file with one partial fulfilment per query as a
    negative, then 6,000 steps with every partial fulfilment as one (as the 3 x 3 chain ends) and the
    attention prior's gains tripled (its maps sharper over the same token-patch cosines); image tower
    frozen (its outputs cached), the attention prior from the frozen step-0 text tower, CC loss weight
    `lambda_cc`; then export."""
    common = ("--freeze-image", "--image-cache", "data/shapes-cache-grid7")
    steady = ("--workers", "0", "--threads", "1", "--val-every", "500", "--val-limit", "1000", "--save-every", "200")
    return [GRID7_CACHE,
            _train(f"15,000 steps, lambda {lambda_cc}, 1 thread (0.48 s/step at 2 threads alone; about 5 h with the two of the pair side by side)", out,
                   "--config", "context-cir-shapes-grid7", "--init-from", STEP0, "--steps", "15000", "--lr", "4e-4",
                   "--min-lr", "4e-6", "--lambda-cc", lambda_cc, *flags, "--partial-negatives", *common,
                   "--seed", "0", *steady),
            _train("every partial fulfilment as a negative and the attention prior 3x sharper, to step 21,000, "
                   "1 thread", f"{out}-partials",
                   "--init-from", f"{out}/last.safetensors", "--steps", "21000", "--lr", "1e-4", "--min-lr", "1e-6",
                   "--warmup", "100", "--restart-schedule", "--prior-gain-scale", "3", "--lambda-cc", lambda_cc, *flags,
                   "--partial-negatives", "all", *common, "--seed", "1", *steady),
            Stage("export fp16 (10 s)",
                  ("-m", "cir.checkpoint", "export", "--checkpoint", f"{out}-partials/last.safetensors",
                   "--out", f"assets/{name}.safetensors", "--dtype", "fp16"),
                  f"assets/{name}.safetensors")]


RECIPES: dict[str, tuple[str, list[Stage]]] = {
    "data": ("the CIR-Shapes training, validation, test and held-out phrasing data", DATA),
    "context-cir-shapes": (
        "assets/context-cir-shapes.safetensors, the default model, and the demo gallery built on it "
        "(about 8.5 h on 2 CPU cores, the sum of its stages' measured times)",
        [*DATA, *SHAPES_3X3_CHAIN,
         Stage("the demo gallery and its index, assets/demo (2 min)",
               ("scripts/build_demo_assets.py", *_EXCLUDE), "assets/demo/index/manifest.json")]),
    "context-cir-shapes-grid7-step0": (
        "assets/context-cir-shapes-grid7-step0.safetensors, the grid-7 design before CIR training, bit for bit "
        "(about 55 min on 2 CPU cores)",
        [*DATA, GRID7_TOWERS,
         _train("the grid-7 model as initialised on these towers (step 0, 1 min)", "runs/grid7-step0",
                "--config", "variants/context-cir-shapes-grid7-shared-prior", "--pretrained", "runs/towers-grid7/clip.safetensors", "--steps", "0",
                "--val-every", "0"),
         Stage("export fp16 (10 s)",
               ("-m", "cir.checkpoint", "export", "--checkpoint", "runs/grid7-step0/last.safetensors",
                "--out", "assets/context-cir-shapes-grid7-step0.safetensors", "--dtype", "fp16"),
               "assets/context-cir-shapes-grid7-step0.safetensors")]),
    "context-cir-shapes-grid7": (
        "assets/context-cir-shapes-grid7.safetensors, the grid-7 model with the CC loss (lambda 0.08, targets "
        "from the frozen step-0 model, sharpened with exponent 2)",
        [*DATA, *_grid7_pair_member("context-cir-shapes-grid7", "runs/grid7-cc", "0.08", "--cc-teacher", STEP0,
                                    "--cc-sharpen", "2")]),
    "context-cir-shapes-grid7-lambda0": (
        "assets/context-cir-shapes-grid7-lambda0.safetensors, its twin without the CC loss (lambda 0)",
        [*DATA, *_grid7_pair_member("context-cir-shapes-grid7-lambda0", "runs/grid7-nocc", "0")]),
    "tmcir-shapes": (
        "assets/tmcir-shapes.safetensors, TMCIR on the grid-7 towers of the step-0 file, stage 2 on the grid-7 "
        "pair's schedule", [*DATA, *TMCIR_SHAPES]),
    "tmcir-shapes-no-alignment": (
        "runs/tmcir-no-align-partials, TMCIR without stage 1 (the step-0 towers as they are), for the comparison table",
        [*DATA, GRID7_CACHE,
         Stage("the step-0 towers under TMCIR's pooling and head, untrained (10 s)",
               ("-m", "cir.align", "--data", "data/shapes", "--out", "runs/tmcir-align0", "--towers-from", STEP0,
                "--no-alignment"),
               "runs/tmcir-align0/aligned.safetensors"),
         *_tmcir_stage2("runs/tmcir-no-align", "runs/tmcir-align0/aligned.safetensors", "data/shapes-cache-grid7")]),
    "combiner-shapes-grid7": (
        "runs/combiner-grid7, the CLIP4Cir-style Combiner on the step-0 towers' frozen features, 21,000 steps of 64 "
        "as the other models of the comparison table",
        [*DATA,
         Stage("features of every training triplet, then 21,000 steps (15–30 min, estimated from the image cache's rate)",
               ("-m", "cir.baselines", "train-combiner", "--clip", STEP0, "--data", "data/shapes",
                "--out", "runs/combiner-grid7", "--steps", "21000", "--batch-size", "64", "--seed", "0"),
               "runs/combiner-grid7/combiner.safetensors")]),
}


def run_export(stages: list[Stage], stage: Stage) -> Path | None:
    """The file one of the recipe's export stages wrote from training stage `stage`'s run (its
    manifest names the run folder and step count), else None."""
    exports = (Path(s.output) for s in stages if s.command[:3] == ("-m", "cir.checkpoint", "export"))
    return next((e for e in exports if exported_step(e, stage) is not None), None)


def exported_step(export: Path, stage: Stage) -> int | None:
    """The step of `export` when it is an export of `stage`'s own run, else None."""
    if not export.with_suffix(".json").is_file():
        return None
    manifest = json.loads(export.with_suffix(".json").read_text())
    args = manifest.get("args", {})
    same_run = Path(args.get("out", "")) == stage.run_folder and args.get("steps") == stage.steps
    return manifest.get("step") if same_run else None


def _has_progress(stages: list[Stage], stage: Stage) -> bool:
    """Whether training stage `stage` has a checkpoint in its run folder or a shipped export of its run."""
    return (stage.run_folder / "last.safetensors").is_file() or run_export(stages, stage) is not None


def _finished_source(stages: list[Stage], stage: Stage) -> Path | None:
    """For a training stage warm-started from an earlier stage's run (--init-from RUN/last.safetensors)
    whose folder is gone: that run's complete export, to start from instead; else None."""
    if stage.init_from is None or Path(stage.init_from).is_file():
        return None
    source = next((s for s in stages if s.run_folder is not None
                   and stage.init_from == f"{s.run_folder}/last.safetensors"), None)
    export = run_export(stages, source) if source is not None else None
    return export if export is not None and exported_step(export, source) == source.steps else None


def stage_argv(stages: list[Stage], stage: Stage) -> list[str]:
    """The command line that runs `stage` now: a training or alignment stage with a checkpoint in its
    run folder resumes; a training stage without one continues from its run's shipped file when that
    is an export of this run part-way, and starts from the complete export of the run it warm-starts
    from when that run's folder is gone."""
    argv = [sys.executable, *stage.command]
    if stage.checkpoint is not None and stage.checkpoint.is_file():
        return argv + ["--resume"]
    if stage.run_folder is None:
        return argv
    export = run_export(stages, stage)
    if export is not None:
        if "--init-from" in argv:
            i = argv.index("--init-from")
            del argv[i:i + 2]
        if "--restart-schedule" in argv:
            argv.remove("--restart-schedule")
        return argv + ["--continue-from", str(export)]
    source = _finished_source(stages, stage)
    if source is not None:
        argv[argv.index("--init-from") + 1] = str(source)
    return argv


def is_done(stages: list[Stage], stage: Stage) -> bool:
    """Whether `stage` is skipped: its output exists (except a training stage, which resumes, and a
    stage writing under assets/, which is quick); a training stage whose run a later phase has moved
    on from (that phase has progress or is done), or whose run folder is gone while its run is over
    and exported (the training stage and its export); a stage whose output only skipped stages read."""
    if stage.run_folder is not None:
        last = f"{stage.run_folder}/last.safetensors"
        if any(s.init_from == last and (_has_progress(stages, s) or is_done(stages, s)) for s in stages):
            return True  # a later phase has moved on from this run
        if Path(last).is_file():
            return False
        export = run_export(stages, stage)
        return export is not None and exported_step(export, stage) == stage.steps
    if stage.command[:3] == ("-m", "cir.checkpoint", "export"):
        source = Path(stage.flag("--checkpoint"))
        trainer = next((s for s in stages if s.run_folder is not None and source == s.run_folder / "last.safetensors"), None)
        if trainer is not None and not source.is_file() and is_done(stages, trainer):
            return True
    if stage.output.startswith("assets/"):
        return False
    if Path(stage.output).is_file():
        return True
    users = _users(stages, stage)
    return bool(users) and all(is_done(stages, s) for s in users)


def _users(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The later stages whose command names `stage`'s output (or, for a FOLDER/manifest.json output,
    the folder)."""
    out = Path(stage.output)
    names = {stage.output} | ({str(out.parent)} if out.name == "manifest.json" else set())
    return [s for s in stages[stages.index(stage) + 1:] if names & set(s.command)]


def describe(name: str) -> str:
    summary, stages = RECIPES[name]
    lines = [f"{name}: {summary}"]
    lines += [f"  {i}. {s.what}\n     python {' '.join(s.command)}" for i, s in enumerate(stages, 1)]
    return "\n".join(lines)


def run(name: str, dry_run: bool = False) -> None:
    """Run recipe `name`'s stages in order, skipping those that are done (`is_done`; a training stage
    with a run folder always runs: with --resume it returns at once when its run is complete)."""
    stages = RECIPES[name][1]
    for i, stage in enumerate(stages, 1):
        done = is_done(stages, stage)
        argv = stage_argv(stages, stage)
        print(f"[{i}/{len(stages)}] {stage.what}" + (" - done, skipped" if done else ""), flush=True)
        if done:
            continue
        print("  " + " ".join(["python", *argv[1:]]), flush=True)
        if dry_run:
            continue
        t0 = time.perf_counter()
        if subprocess.call(argv) != 0:
            raise UserError(f"recipe {name}: stage {i} ({stage.what}) failed; fix it and run the recipe again "
                            "to continue from there")
        print(f"  stage {i} took {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.recipes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=sorted(RECIPES), help="the recipe to run")
    p.add_argument("--list", action="store_true", help="list the recipes with their stages, and exit")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    a = p.parse_args(argv)
    if a.list or a.name is None:
        print("\n\n".join(describe(n) for n in RECIPES))
        return 0
    run(a.name, a.dry_run)
    return 0


if __name__ == "__main__":
    from cir.cli import run_cli
    run_cli(main)
