"""The named recipes (cir.recipes): every stage's command is one its tool accepts, stages that are
done are skipped, and training stages resume from their run folder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cir import recipes
from cir.train import parse_args

ROOT = Path(__file__).resolve().parent.parent
STAGES = {s.command: s for _, stages in recipes.RECIPES.values() for s in stages}


def touch(*files: str) -> None:
    """Empty files (and their folders) standing for a stage's output or checkpoint."""
    for f in files:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).write_bytes(b"")


@pytest.mark.parametrize("stage", [s for s in STAGES.values() if s.run_folder is not None], ids=lambda s: s.output)
def test_training_stages_parse_with_cir_train(stage):
    a = parse_args(list(stage.command[2:]))
    assert Path(a.out) == stage.run_folder and a.batch_size == 64


def test_other_stages_use_flags_their_tool_documents():
    helps: dict[tuple, str] = {}
    for stage in STAGES.values():
        if stage.run_folder is not None:
            continue
        if stage.command[0] != "-m":  # a script
            tool = stage.command[:1]
        else:  # a module, with its subcommand where it has one
            tool = stage.command[:3] if not stage.command[2].startswith("--") else stage.command[:2]
        if tool not in helps:
            helps[tool] = subprocess.run([sys.executable, *tool, "--help"], cwd=ROOT, capture_output=True,
                                         text=True, check=True).stdout
        flags = [w for w in stage.command if w.startswith("--")]
        assert flags and all(f in helps[tool] for f in flags), (tool, flags)


def test_recipe_chains_each_stage_on_the_previous_output():
    """Each stage reads only files that an earlier stage of its recipe writes (or the repository ships)."""
    for name, (_, stages) in recipes.RECIPES.items():
        made = set()
        for s in stages:
            for i, word in enumerate(s.command):
                if word in ("--pretrained", "--init-from", "--checkpoint", "--exclude-scenes", "--image-cache", "--cc-teacher"):
                    assert s.command[i + 1] in made or (ROOT / s.command[i + 1]).is_file() and \
                        s.command[i + 1].startswith("assets/"), (name, s.what, s.command[i + 1])
            made.add(s.output)
            if s.output.startswith("data/"):
                folder = Path(s.output).parent
                made |= {str(folder), f"{folder}/train.jsonl", f"{folder}/val.jsonl"}


def test_run_skips_done_stages_and_resumes_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("data/shapes").mkdir(parents=True)
    Path("data/shapes/manifest.json").write_text("{}")
    touch("runs/towers-grid7/clip.safetensors", "runs/grid7-step0/last.safetensors")
    recipes.run("context-cir-shapes-grid7-step0", dry_run=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[1/6] " + recipes.DATA[0].what + " - done, skipped"
    assert out[1].startswith("[2/6]") and "skipped" not in out[1]  # the test split is missing
    assert any(line.startswith("[4/6]") and line.endswith("done, skipped") for line in out)  # the towers
    train_line = out[out.index(next(line for line in out if line.startswith("[5/6]"))) + 1]
    assert train_line.endswith("--val-every 0 --resume")
    assert out[-1].endswith("--dtype fp16")  # the export still runs


def test_an_interrupted_alignment_resumes_and_a_finished_one_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    touch("runs/tmcir-align/last.safetensors")
    recipes.run("tmcir-shapes", dry_run=True)
    out = capsys.readouterr().out.splitlines()
    align = out[out.index(next(line for line in out if line.startswith("[4/9]"))) + 1]
    assert "-m cir.align" in align and align.endswith("--workers 0 --resume")
    touch("runs/tmcir-align/aligned.safetensors")
    recipes.run("tmcir-shapes", dry_run=True)
    assert "[4/9] " + recipes.TMCIR_SHAPES[0].what + " - done, skipped" in capsys.readouterr().out.splitlines()


def test_list_names_every_recipe():
    out = subprocess.run([sys.executable, "-m", "cir.recipes", "--list"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for name in recipes.RECIPES:
        assert out.count(f"\n{name}: ") + out.startswith(f"{name}: ") == 1


def test_a_run_whose_folder_is_gone_continues_from_its_shipped_file(tmp_path, monkeypatch, capsys):
    """No run folder: a training stage continues from the recipe's export when that is a part-way
    export of the same run, starts afresh when it is another run's, and is skipped (with its export)
    when the export is complete or a later stage has moved on from it; the stage warm-started from a
    complete run whose folder is gone starts from its export; a checkpoint in the run folder always
    wins (--resume)."""
    monkeypatch.chdir(tmp_path)
    for d in ("data/shapes", "data/shapes-test", "data/shapes-heldout", "data/shapes-cache-grid7", "assets"):
        Path(d).mkdir(parents=True)
        Path(d, "manifest.json").write_text("{}")
    shipped = "assets/context-cir-shapes-grid7.safetensors"

    def lines(step: int, out: str = "runs/grid7-cc", steps: int = 15000) -> dict[str, str]:
        """The dry run's stage lines (with their command, if any) by stage number."""
        Path(shipped).with_suffix(".json").write_text(json.dumps({"step": step, "args": {"out": out, "steps": steps}}))
        recipes.run("context-cir-shapes-grid7", dry_run=True)
        out_lines = capsys.readouterr().out.splitlines()
        stages = {}
        for i, line in enumerate(out_lines):
            if line.startswith("["):
                command = out_lines[i + 1] if i + 1 < len(out_lines) and not out_lines[i + 1].startswith("[") else ""
                stages[line[1:line.index("/")]] = line + "\n" + command
        return stages

    stages = lines(5000)
    assert stages["5"].endswith("--save-every 200 --continue-from " + shipped)
    assert "--init-from" not in stages["5"] and "--cc-teacher " + recipes.STEP0 in stages["5"]
    assert "--init-from runs/grid7-cc/last.safetensors --steps 21000" in stages["6"]
    assert lines(5000, out="runs/elsewhere")["5"].split().count("--init-from") == 1
    stages = lines(15000)
    assert stages["5"].endswith("done, skipped\n")
    assert f"--init-from {shipped} --steps 21000" in stages["6"] and "--restart-schedule" in stages["6"]
    assert not stages["7"].split("\n")[0].endswith("skipped")
    stages = lines(18000, out="runs/grid7-cc-partials", steps=21000)
    assert stages["5"].endswith("done, skipped\n")
    assert stages["6"].endswith("--continue-from " + shipped)
    assert "--init-from" not in stages["6"] and "--restart-schedule" not in stages["6"]
    stages = lines(21000, out="runs/grid7-cc-partials", steps=21000)
    assert all(stages[k].endswith("done, skipped\n") for k in ("5", "6", "7"))
    touch("runs/grid7-cc/last.safetensors")
    stages = lines(15000)
    assert stages["5"].endswith("--save-every 200 --resume")
    assert "--init-from runs/grid7-cc/last.safetensors" in stages["6"] and stages["7"].endswith("--dtype fp16")


def test_a_finished_chain_skips_every_stage_only_it_needed(tmp_path, monkeypatch, capsys):
    """The 3 x 3 chain with no run folder and its shipped file a complete export of its last phase:
    the towers, every phase and the export are skipped (each read only by skipped stages), the data
    splits nothing reads still run. A phase-1 checkpoint left beside a later phase's progress is not
    resumed; an interrupted towers run is."""
    monkeypatch.chdir(tmp_path)
    Path("assets").mkdir()
    Path("assets/context-cir-shapes.json").write_text(
        json.dumps({"step": 15400, "args": {"out": "runs/shapes-5-partials", "steps": 15400}}))
    recipes.run("context-cir-shapes", dry_run=True)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    skipped = [line.endswith("done, skipped") for line in out]
    assert skipped == [True, False, False, True, True, True, True, True, True, True, False], out
    Path("assets/context-cir-shapes.json").write_text(
        json.dumps({"step": 12000, "args": {"out": "runs/shapes-4-partials", "steps": 12400}}))
    touch("runs/shapes-3-bidir/last.safetensors", "runs/towers-cells/last.safetensors")
    recipes.run("context-cir-shapes", dry_run=True)
    out = capsys.readouterr().out.splitlines()
    stage = {line[1:line.index("/")]: line for line in out if line.startswith("[")}
    assert all(stage[k].endswith("done, skipped") for k in "4567")  # towers, phases 1-3: phase 4 moved on
    assert next(line for line in out if "-m cir.train" in line).endswith("--continue-from assets/context-cir-shapes.safetensors")
    Path("assets/context-cir-shapes.json").unlink()
    Path("runs/shapes-3-bidir/last.safetensors").unlink()
    recipes.run("context-cir-shapes", dry_run=True)
    towers = next(line for line in capsys.readouterr().out.splitlines() if "-m cir.towers" in line)
    assert towers.endswith("--token-weight 0 --resume")
