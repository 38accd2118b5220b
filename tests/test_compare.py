"""cir.compare: every row evaluated by the real commands under both protocols, the tables built from
their results, each evaluation run once per file content."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cir import compare
from cir.baselines import main as baselines
from cir.errors import UserError


@pytest.fixture(scope="module")
def rows(tiny_checkpoint, shapes_data, tmp_path_factory):
    """A tiny ConText-CIR checkpoint with a run log of known step times, and a Combiner on its towers."""
    tmp = tmp_path_factory.mktemp("compare")
    runs = [tmp / "run", tmp / "run-2", tmp / "run-unlogged"]
    for run in runs:
        run.mkdir()
    runs[0].joinpath("log.jsonl").write_text("".join(json.dumps({"step": i, "sec": s, "data_sec": 0.1}) + "\n"
                                                     for i, s in enumerate([0.5, 0.7, 0.9], 1)))
    runs[1].joinpath("log.jsonl").write_text(json.dumps({"step": 4, "sec": 1.9, "data_sec": 0.1}) + "\n")
    baselines(["train-combiner", "--clip", str(tiny_checkpoint), "--data", str(shapes_data), "--out", str(tmp / "comb"),
               "--steps", "2", "--batch-size", "16", "--warmup", "1", "--workers", "0"])
    spec = [{"name": "tiny", "checkpoint": str(tiny_checkpoint), "runs": [str(r) for r in runs]},
            {"name": "combiner", "clip": str(tiny_checkpoint), "combiner": str(tmp / "comb" / "combiner.safetensors")}]
    path = tmp / "rows.json"
    path.write_text(json.dumps(spec))
    return path


def test_the_tables_hold_each_rows_evaluations(rows, shapes_data, tmp_path):
    work, out = tmp_path / "work", tmp_path / "table.md"
    argv = [sys.executable, "-m", "cir.compare", "--rows", str(rows), "--work", str(work), "--out", str(out),
            "--test", str(shapes_data), "--heldout", str(shapes_data)]
    first = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert first.stderr.count("$ -m cir.evaluate") == 3 and first.stderr.count("$ -m cir.baselines evaluate") == 3
    assert len(list(work.glob("*.json"))) == 6
    tiny = compare.read_rows(str(rows))[0]
    tiny = {v: json.loads(compare.result_path(tiny, v, shapes_data / "test.jsonl", work).read_text())
            for v in compare.VIEWS}
    assert tiny["test"]["keep_reference"] is True and tiny["test-removed"]["keep_reference"] is False
    assert "grounding" in tiny["test"] and "grounding" not in tiny["heldout"]
    table = out.read_text()
    assert table == first.stdout
    line = next(row for row in table.splitlines() if row.startswith("| tiny |")).split(" | ")
    assert line[1] == f"{tiny['test']['recall']['1']:.1f}" and line[2] == f"{tiny['test']['recall']['5']:.1f}"
    assert line[5] == f"{tiny['test-removed']['recall']['1']:.1f} / {tiny['test-removed']['recall']['5']:.1f}"
    assert line[7] == f"{tiny['heldout']['recall']['1']:.1f}"
    assert line[-1] == "1,100 |"  # 1,000 x (3 steps at the median 0.8 s + 1 at 2.0 s) / 4
    combiner = next(row for row in table.splitlines() if row.startswith("| combiner |")).split(" | ")
    assert combiner[8:11] == ["–", "–", "–"] and combiner[-1] == "– |"  # no maps, no run log

    again = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert again.stdout == first.stdout and "$ " not in again.stderr  # nothing evaluated twice


def test_the_ratio_is_the_first_rows_r1_over_each_others():
    res = [{"test": {"by_operation": {"add": {"recall": {"1": 60.0}}, "move": {"recall": {"1": 30.0}}}}},
           {"test": {"by_operation": {"add": {"recall": {"1": 20.0}}, "move": {"recall": {"1": 0.0}}}}}]
    text = compare.operation_tables([compare.Row("a", "x"), compare.Row("b", "y")], res)
    ratio = text.splitlines()[-1].split(" | ")
    assert ratio[0] == "| b" and ratio[1] == "3.00" and ratio[compare.OPERATIONS.index("move") + 1] == "–"


def test_a_row_without_a_model_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "rows.json"
    bad.write_text(json.dumps([{"name": "half", "clip": "towers.safetensors"}]))
    with pytest.raises(UserError, match="needs a \"checkpoint\""):
        compare.read_rows(str(bad))


def test_rows_name_their_run_folders_as_a_list(tmp_path):
    from cir.compare import read_rows
    from cir.errors import UserError
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"name": "a", "checkpoint": "x.safetensors", "runs": "runs/a"}]))
    with pytest.raises(UserError, match="\"runs\" is a list of run folders"):
        read_rows(str(path))
    path.write_text(json.dumps([{"name": "a", "checkpoint": "x.safetensors", "runs": ["runs/a", "runs/a-partials"]}]))
    assert read_rows(str(path))[0].runs == ("runs/a", "runs/a-partials")
