"""The `python -m cir.<tool>` entry points parse their command line before importing torch:
--help and argument errors run without torch, open_clip or gradio ever loading."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "gradio", "faiss")
# runs a tool as `python -m` does, then prints which heavy modules were imported
RUN_AS_MAIN = f"""
import runpy, sys
tool, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(tool, run_name="__main__", alter_sys=True)
finally:
    print("heavy:", [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_AS_MAIN, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("tool", ["cir.train", "cir.towers", "cir.evaluate", "cir.index", "cir.checkpoint",
                                  "cir.baselines", "cir.align", "cir.image_cache"])
def test_help_does_not_import_torch(tool):
    r = run_tool(tool, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m {tool}")
    assert "heavy: []" in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["cir.train", "--out", "x", "--step", "2"], "unrecognized arguments: --step 2"),
    (["cir.towers", "--out", "x"], "give --data DIR or --train FILE"),
    (["cir.evaluate", "--triplets", "t.jsonl"], "error: give --triplets and --gallery"),
    (["cir.index", "build", "--gallery", "g", "--out", "o", "--workers", "-1"], "error: --workers must be 0 or more"),
    (["cir.checkpoint", "show"], "the following arguments are required: --checkpoint"),
    (["cir.baselines", "evaluate", "--clip", "c"], "the following arguments are required: --triplets, --gallery"),
])
def test_argument_errors_come_before_torch(argv, message):
    r = run_tool(*argv)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "heavy: []" in r.stderr and "Traceback" not in r.stderr


def test_console_scripts_run_their_tools_as_python_m_does():
    """pyproject's [project.scripts]: each names a cir.console function that runs an existing tool
    module as `python -m` does (flags parsed before torch loads)."""
    import tomllib

    from cir import console
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"cir-train", "cir-index", "cir-evaluate"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert module == "cir.console" and callable(getattr(console, function)), name
        tool = getattr(console, function).__doc__.removeprefix("python -m ")
        assert (ROOT / (tool.replace(".", "/") + ".py")).is_file() or (ROOT / tool.replace(".", "/") / "__main__.py").is_file()
    code = ("import sys; sys.argv = ['cir-train', '--help']\nfrom cir import console\ntry:\n    console.train()\n"
            "except SystemExit:\n    pass\nprint('heavy:', [m for m in %r if m in sys.modules])" % (HEAVY,))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "usage: python -m cir.train" in r.stdout and "heavy: []" in r.stdout
