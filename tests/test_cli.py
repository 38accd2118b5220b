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
                                  "cir.baselines", "cir.align"])
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
