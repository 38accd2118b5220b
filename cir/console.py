"""Console scripts (`cir-train`, `cir-index`, ... from `pip install -e .`): each runs its tool's
module as `python -m` does, so its flags are parsed before its heavy imports."""
from __future__ import annotations

import runpy
from typing import Callable


def _tool(module: str) -> Callable[[], None]:
    def run() -> None:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    run.__doc__ = f"python -m {module}"
    return run


train = _tool("cir.train")
evaluate = _tool("cir.evaluate")
index = _tool("cir.index")
towers = _tool("cir.towers")
align = _tool("cir.align")
image_cache = _tool("cir.image_cache")
checkpoint = _tool("cir.checkpoint")
recipes = _tool("cir.recipes")
shapes = _tool("cir.data.shapes")
synth = _tool("cir.synth")
baselines = _tool("cir.baselines")
