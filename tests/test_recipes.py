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
    Path("runs/towers-grid7").mkdir(parents=True)
    Path("runs/towers-grid7/clip.safetensors").write_bytes(b"")
    Path("runs/grid7-step0").mkdir(parents=True)
    Path("runs/grid7-step0/last.safetensors").write_bytes(b"")
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
    Path("runs/tmcir-align").mkdir(parents=True)
    Path("runs/tmcir-align/last.safetensors").write_bytes(b"")
    recipes.run("tmcir-shapes", dry_run=True)
    out = capsys.readouterr().out.splitlines()
    align = out[out.index(next(line for line in out if line.startswith("[4/8]"))) + 1]
    assert "-m cir.align" in align and align.endswith("--workers 0 --resume")
    Path("runs/tmcir-align/aligned.safetensors").write_bytes(b"")
    recipes.run("tmcir-shapes", dry_run=True)
    assert "[4/8] " + recipes.TMCIR_SHAPES[0].what + " - done, skipped" in capsys.readouterr().out.splitlines()


def test_list_names_every_recipe():
    out = subprocess.run([sys.executable, "-m", "cir.recipes", "--list"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for name in recipes.RECIPES:
        assert out.count(f"\n{name}: ") + out.startswith(f"{name}: ") == 1


def test_a_run_whose_folder_is_gone_continues_from_its_shipped_file(tmp_path, monkeypatch, capsys):
    """No run folder: the training stage continues from the recipe's export when that is a part-way
    export of the same run, starts afresh when it is another run's, and is skipped (with its export)
    when the export is complete; a checkpoint in the run folder always wins (--resume)."""
    monkeypatch.chdir(tmp_path)
    for d in ("data/shapes", "data/shapes-test", "data/shapes-heldout", "data/shapes-cache-grid7", "assets"):
        Path(d).mkdir(parents=True)
        Path(d, "manifest.json").write_text("{}")
    export = Path("assets/context-cir-shapes-grid7.json")

    def commands(step: int, out: str = "runs/grid7-cc") -> list[str]:
        export.write_text(json.dumps({"step": step, "args": {"out": out, "steps": 15000}}))
        recipes.run("context-cir-shapes-grid7", dry_run=True)
        return capsys.readouterr().out.splitlines()

    out = commands(5000)
    train = next(line for line in out if "-m cir.train" in line)
    assert train.endswith("--continue-from assets/context-cir-shapes-grid7.safetensors")
    assert "--init-from" not in train and "--cc-teacher " + recipes.STEP0 in train
    out = commands(5000, out="runs/elsewhere")
    assert next(line for line in out if "-m cir.train" in line).split().count("--init-from") == 1
    out = commands(15000)
    assert out[-2].startswith("[5/6]") and out[-2].endswith("done, skipped")
    assert out[-1].startswith("[6/6]") and out[-1].endswith("done, skipped")
    Path("runs/grid7-cc").mkdir(parents=True)
    Path("runs/grid7-cc/last.safetensors").write_bytes(b"")
    out = commands(15000)
    assert next(line for line in out if "-m cir.train" in line).endswith("--save-every 200 --resume")
    assert out[-1].endswith("--dtype fp16")
