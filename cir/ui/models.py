"""The app's models: the first checkpoint's `Explorer`, whose index is the gallery, and the others,
each an `Explorer` over the same gallery images and example queries with its own embeddings.

    models = Models.load(["a.safetensors", "b.safetensors"], index="INDEX_DIR")  # b: only its manifest read
    models.names                        # ["ConText-CIR λ = 0.08", "TMCIR"]
    models["TMCIR"].retrieve(...)       # loads b and embeds the gallery with it, once

Another model is loaded, and embeds the gallery, the first time it is asked for, so starting the
app costs what one model costs.
"""
from __future__ import annotations

import threading
from pathlib import Path

from cir.checkpoint import DEFAULT_CHECKPOINT, DEFAULT_TMCIR, DEFAULT_TWIN, read_manifest
from cir.errors import UserError
from cir.ui.explorer import Explorer, model_name


def default_checkpoints() -> list[Path]:
    """The shipped model, then those shipped beside it (its lambda = 0 twin, TMCIR) whose files exist."""
    return [DEFAULT_CHECKPOINT, *(p for p in (DEFAULT_TWIN, DEFAULT_TMCIR) if p.is_file())]


def twin_of(manifest: dict, others: dict[str, dict]) -> str | None:
    """The name of the model among `others` ({name: manifest}) that is `manifest`'s lambda = 0 twin:
    the same config, data and steps, trained without the CC loss while it was trained with it (the
    page's "Compare with" opens on it); None when there is none."""
    args = manifest.get("args") or {}
    if not (isinstance(args.get("lambda_cc"), (int, float)) and args["lambda_cc"] > 0):
        return None
    same = lambda m: all(m.get(k) == manifest.get(k) for k in ("config", "data", "step"))
    return next((name for name, m in others.items()
                 if same(m) and (m.get("args") or {}).get("lambda_cc") == 0), None)


def model_names(checkpoints: list, manifests: list[dict]) -> list[str]:
    """One name per checkpoint (`model_name`), with the file's stem added where two names would be the
    same (its path where the stems are too); the same file twice is an error."""
    base = [model_name(m) for m in manifests]
    names = [f"{n} ({Path(c).stem})" if base.count(n) > 1 else n for n, c in zip(base, checkpoints)]
    names = [f"{b} ({c})" if names.count(n) > 1 else n for b, n, c in zip(base, names, checkpoints)]
    twice = [c for n, c in zip(names, checkpoints) if names.count(n) > 1]
    if twice:
        raise UserError(f"the checkpoint {twice[0]} is given twice")
    return names


class Models:
    """`models[name]` -> the Explorer of the model named `name` (`names`: the primary first)."""

    def __init__(self, primary: Explorer, others: dict[str, str | Path] | None = None):
        """`others`: {name: checkpoint} of the models offered besides `primary`."""
        self.primary = primary
        self.names = [primary.name, *(others or {})]
        self._checkpoints = dict(others or {})
        self.twin = twin_of(primary.manifest, {n: read_manifest(c) for n, c in self._checkpoints.items()})
        self._explorers = {primary.name: primary}
        self._building = threading.Lock()  # one model embeds the gallery at a time, once

    @classmethod
    def load(cls, checkpoints=None, index=None, gallery=None, examples=None, device=None) -> "Models":
        """The first of `checkpoints` (default: `default_checkpoints()`) as `Explorer.load` loads it with
        the gallery; every file's manifest is read now, to name it."""
        checkpoints = [Path(c) for c in checkpoints or default_checkpoints()]
        names = model_names(checkpoints, [read_manifest(c) for c in checkpoints])
        primary = Explorer.load(checkpoints[0], index, gallery, examples, device, names[0])
        return cls(primary, dict(zip(names[1:], checkpoints[1:])))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str | None) -> Explorer:
        """The model `name` (None: the primary), loaded and its gallery embedded on first use."""
        explorer = self._explorers.get(self.primary.name if name is None else name)
        if explorer is not None:
            return explorer
        if name not in self._checkpoints:
            raise UserError(f"no model named {name!r}; the models: {', '.join(self.names)}")
        with self._building:
            if name not in self._explorers:
                self._explorers[name] = self.primary.with_checkpoint(self._checkpoints[name], name)
            return self._explorers[name]
