"""The methods side by side: every model of a comparison evaluated under the same protocols, one table.

    python -m cir.compare [--rows ROWS.json] [--work runs/compare] [--out docs/compare.md]

Each row is a model with a command that trains it: a checkpoint (`cir.evaluate`) or a CLIP4Cir
Combiner on a towers file (`cir.baselines evaluate`), and the run folders (its training phases in
order) whose log.jsonl files time its training. For every row the tool runs, as subprocesses and each at most once per file content
(results kept in --work under the files' sha256):
  * the test split with the reference kept in the ranking (CIR-Shapes' protocol) and grounding;
  * the test split with the reference removed (`--reference remove`, as CIRR scores);
  * the held-out phrasing split, reference kept.
It prints (and with --out writes) a Markdown table per view: R@1/5 overall, by number of operations
and under both protocols, held-out R@1, grounding (pointing in context / isolated, energy,
distinctness) and training seconds per 1,000 steps (1,000 times each phase's median step, weighted by
the steps each phase logged);
R@1 per operation; and the ratio of R@1 of the first row to every other row, per
operation. ROWS.json is a list of {"name", "checkpoint"} or {"name", "clip", "combiner"}, each with
an optional "runs" list of run folders; the default rows are the comparison of the README (DEFAULT_ROWS).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cir.atomic import sha256_file, write_text
from cir.cli import run_cli
from cir.errors import UserError

STEP0 = "assets/context-cir-shapes-grid7-step0.safetensors"


@dataclass(frozen=True)
class Row:
    """A model of the comparison: `checkpoint`, or `combiner` on the towers of `clip`; `runs` are the
    run folders (training phases in order) whose log.jsonl files give its step time."""
    name: str
    checkpoint: str | None = None
    clip: str | None = None
    combiner: str | None = None
    runs: tuple[str, ...] = ()

    @property
    def files(self) -> list[str]:
        return [f for f in (self.checkpoint, self.clip, self.combiner) if f]


DEFAULT_ROWS = [
    Row("ConText-CIR λ = 0.08", checkpoint="assets/context-cir-shapes-grid7.safetensors",
        runs=("runs/grid7-cc", "runs/grid7-cc-partials")),
    Row("ConText-CIR λ = 0", checkpoint="assets/context-cir-shapes-grid7-lambda0.safetensors",
        runs=("runs/grid7-nocc", "runs/grid7-nocc-partials")),
    Row("TMCIR", checkpoint="assets/tmcir-shapes.safetensors", runs=("runs/tmcir", "runs/tmcir-partials")),
    Row("TMCIR without stage 1", checkpoint="runs/tmcir-no-align-partials/last.safetensors",
        runs=("runs/tmcir-no-align", "runs/tmcir-no-align-partials")),
    Row("CLIP4Cir-style Combiner", clip=STEP0, combiner="runs/combiner-grid7/combiner.safetensors",
        runs=("runs/combiner-grid7",)),
]

VIEWS = {  # view -> (split: --test or --heldout, extra evaluation flags)
    "test": ("test", ()),
    "test-removed": ("test", ("--reference", "remove", "--no-grounding")),
    "heldout": ("heldout", ("--no-grounding",)),
}
OPERATIONS = ("add", "remove", "recolor", "reshape", "resize", "move", "background")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None, help="JSON list of rows (default: the README's comparison)")
    p.add_argument("--work", default="runs/compare", help="folder of the evaluations' JSON results (default runs/compare)")
    p.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    p.add_argument("--test", default="data/shapes-test", help="test split folder (default data/shapes-test)")
    p.add_argument("--heldout", default="data/shapes-heldout", help="held-out phrasing folder (default data/shapes-heldout)")
    return p.parse_args(argv)


def read_rows(path: str | None) -> list[Row]:
    if path is None:
        return DEFAULT_ROWS
    try:
        spec = json.loads(Path(path).read_text())
        for r in spec:
            runs = r.get("runs", [])
            if not isinstance(runs, list) or not all(isinstance(run, str) for run in runs):
                raise UserError(f"--rows {path}: row {r.get('name')!r}: \"runs\" is a list of run folders")
        rows = [Row(**{**r, "runs": tuple(r.get("runs", ()))}) for r in spec]
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"--rows {path}: {' '.join(str(e).split())}") from None
    for r in rows:
        if bool(r.checkpoint) == bool(r.combiner) or bool(r.combiner) != bool(r.clip):
            raise UserError(f"--rows {path}: row {r.name!r} needs a \"checkpoint\", or a \"clip\" and a \"combiner\"")
    return rows


def command(row: Row, triplets: Path, gallery: Path, flags: tuple[str, ...], out: Path) -> list[str]:
    """The evaluation command of `row` on one split, writing its result to `out`."""
    data = ["--triplets", str(triplets), "--gallery", str(gallery), "--json", str(out), *flags]
    if row.checkpoint:
        return [sys.executable, "-m", "cir.evaluate", "--checkpoint", row.checkpoint, *data]
    data = [f for f in data if f != "--no-grounding"]  # the baselines draw no maps
    return [sys.executable, "-m", "cir.baselines", "evaluate", "--clip", row.clip, "--combiner", row.combiner, *data]


def result_path(row: Row, view: str, triplets: Path, work: Path) -> Path:
    """Where `row`'s result on `view` of `triplets` is kept: named by its files' and the triplets' sha256."""
    return work / ("-".join(sha256_file(f)[:16] for f in [*row.files, triplets]) + f".{view}.json")


def evaluated(row: Row, view: str, folder: Path, work: Path) -> dict:
    """cir.evaluate's result object of `row` on `view` of the split in `folder` (test.jsonl and
    gallery_test.txt), run once per content of the row's files and the triplet file."""
    missing = [f for f in row.files if not Path(f).is_file()]
    if missing:
        raise UserError(f"{row.name}: {missing[0]} does not exist (train it first: python -m cir.recipes --list)")
    triplets = folder / "test.jsonl"
    out = result_path(row, view, triplets, work)
    if not out.is_file():
        cmd = command(row, triplets, folder / "gallery_test.txt", VIEWS[view][1], out)
        print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode:
            raise UserError(f"{row.name}: its evaluation failed (its error is above): {' '.join(cmd[1:])}")
    result = json.loads(out.read_text())
    return result["combiner"] if row.combiner else result


def step_seconds(runs: tuple[str, ...]) -> float | None:
    """Seconds of a training step (forward, backward, optimizer and data): the median step of each
    run folder's log.jsonl, weighted by the steps it logged (None: no run has a log)."""
    phases = []
    for run in runs:
        log = Path(run) / "log.jsonl"
        steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
        times = [s["sec"] + s.get("data_sec", 0.0) for s in steps if "sec" in s]
        if times:
            phases.append((statistics.median(times), len(times)))
    return sum(t * n for t, n in phases) / sum(n for _, n in phases) if phases else None


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _recall(res: dict, k: str, ops: str | None = None) -> float | None:
    part = res if ops is None else res.get("by_num_modifications", {}).get(ops)
    return None if part is None else part["recall"][k]


def main_table(rows: list[Row], results: list[dict[str, dict]]) -> str:
    head = ("| model | R@1 | R@5 | R@1 by 1 / 2 / 3 mods | R@5 by 1 / 2 / 3 mods | reference removed R@1 / R@5 "
            "| reference first | held-out R@1 | pointing % (in context / isolated) | energy % | distinct % "
            "| s per 1,000 steps |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row, res in zip(rows, results):
        test, removed = res["test"], res["test-removed"]
        objects = test.get("grounding", {}).get("objects")
        ground = ["–"] * 3 if not objects else [
            f"{objects['pointing']['in_context']:.1f} / {objects['pointing']['isolated']:.1f}",
            _f(objects["energy"]["in_context"]), _f(objects["distinct"]["in_context"])]
        seconds = step_seconds(row.runs)
        lines.append("| " + " | ".join([
            row.name, _f(_recall(test, "1")), _f(_recall(test, "5")),
            " / ".join(_f(_recall(test, "1", n)) for n in "123"),
            " / ".join(_f(_recall(test, "5", n)) for n in "123"),
            f"{_f(_recall(removed, '1'))} / {_f(_recall(removed, '5'))}",
            str(test.get("top1", {}).get("reference", "–")), _f(_recall(res["heldout"], "1")), *ground,
            "–" if seconds is None else f"{1000 * seconds:,.0f}"]) + " |")
    return "\n".join(lines)


def operation_tables(rows: list[Row], results: list[dict[str, dict]]) -> str:
    """R@1 per operation (test split, reference kept), then the first row's R@1 over each other row's."""
    r1 = [{op: res["test"].get("by_operation", {}).get(op, {}).get("recall", {}).get("1") for op in OPERATIONS}
          for res in results]
    head = "| model | " + " | ".join(OPERATIONS) + " |"
    rule = "|" + "---|" * (len(OPERATIONS) + 1)
    lines = [head, rule] + ["| " + row.name + " | " + " | ".join(_f(v[op]) for op in OPERATIONS) + " |"
                            for row, v in zip(rows, r1)]
    ratio = [f"\nR@1 of {rows[0].name} over each other model's, per operation (> 1: {rows[0].name} leads):\n",
             head, rule]
    for row, v in zip(rows[1:], r1[1:]):
        cells = [_f(r1[0][op] / v[op], 2) if r1[0][op] is not None and v[op] else "–" for op in OPERATIONS]
        ratio.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ratio)


def main(argv=None) -> int:
    a = parse_args(argv)
    rows, work = read_rows(a.rows), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    splits = {"test": Path(a.test), "heldout": Path(a.heldout)}
    for folder in splits.values():
        if not (folder / "test.jsonl").is_file():
            raise UserError(f"{folder} holds no test.jsonl (python -m cir.recipes data writes it)")
    results = [{view: evaluated(row, view, splits[split], work) for view, (split, _) in VIEWS.items()}
               for row in rows]
    text = main_table(rows, results) + "\n\n" + operation_tables(rows, results) + "\n"
    print(text, end="")
    if a.out:
        write_text(a.out, text)
    return 0


if __name__ == "__main__":
    run_cli(main)
