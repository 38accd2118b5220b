"""Model configs and the one factory: read a config by name or path, build the model it describes.

    config = load_config("context-cir-shapes")        # cir/models/configs/context-cir-shapes.json
    model, preprocess = build_model(config)            # ConTextCIR, or TMCIR for a "method": "tmcir" config

The project's open_clip tower configs (cir/models/configs/clip/, variants/clip/) are registered with
open_clip here, when a model or towers are built (`register_tower_configs`), not on import.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import fields
from pathlib import Path

import open_clip
import torch

from cir.errors import UserError
from cir.models.base import ComposedRetrieval, check_weights_file, create_towers
from cir.models.context_cir import ConTextCIR, ConTextCIRConfig
from cir.models.tmcir import TMCIR, TMCIRConfig

CONFIG_DIR = Path(__file__).parent / "configs"
METHODS = {"context-cir": (ConTextCIRConfig, ConTextCIR), "tmcir": (TMCIRConfig, TMCIR)}


def register_tower_configs() -> None:
    """Make the project's tower configs (configs/clip, configs/variants/clip) known to open_clip."""
    for folder in (CONFIG_DIR / "clip", CONFIG_DIR / "variants" / "clip"):
        open_clip.add_model_config(folder)


def config_names() -> list[str]:
    """Every model config by name: cir/models/configs/<name>.json and variants/<name>.json."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix(""))
                  for p in [*CONFIG_DIR.glob("*.json"), *CONFIG_DIR.glob("variants/*.json")])


def load_config(name_or_path: str):
    """A config by name (cir/models/configs/<name>.json; earlier designs and recipe stages as
    variants/<name>) or a JSON path: the config of the method its "method" key names."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise UserError(f"unknown model config {name_or_path!r}; known: {', '.join(config_names())} (or a .json path)")
    return config_from_dict(json.loads(path.read_text()))


def config_from_dict(d: dict):
    """The config of the method d["method"] names: a ConTextCIRConfig (no method, or "context-cir")
    or a TMCIRConfig ("tmcir")."""
    method = d.get("method", "context-cir")
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    config_class = METHODS[method][0]
    d = {k: v for k, v in d.items() if k != "method"}
    unknown = set(d) - {f.name for f in fields(config_class)}
    if unknown:
        raise UserError(f"unknown model config keys: {sorted(unknown)}")
    return config_class(**d)


def build_model(config, device: str | torch.device = "cpu"):
    """Build the model a config describes (a name, a path, a ConTextCIRConfig or a TMCIRConfig)
    and its image preprocessing: ConTextCIR, or TMCIR for a TMCIR config.

    The CLIP towers come from `open_clip.create_model_and_transforms(clip_model, pretrained=...)`
    where `pretrained` is an open_clip tag or a local weights file."""
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    register_tower_configs()
    if config.clip_model not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {config.clip_model!r}")
    check_weights_file(config.pretrained)
    # device "meta" builds the architecture without allocating weights (checks of large configs)
    with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
        try:
            clip, _, preprocess = create_towers(config.clip_model, config.pretrained, device)
        except UserError:
            raise
        except Exception as e:  # RuntimeError (shapes), UnpicklingError, OSError, ... from loading the weights
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot build CLIP model {config.clip_model!r} with pretrained={config.pretrained!r}: "
                            f"{first}") from None
        tower_ctx = getattr(clip, "context_length", config.context_length)
        if tower_ctx < config.context_length:
            raise UserError(f"context_length {config.context_length} exceeds the text tower's {tower_ctx}")
        return model_class(config)(config, clip).to(device), preprocess


def model_class(config) -> type[ComposedRetrieval]:
    """The model class of a config: ConTextCIR or TMCIR."""
    return next(cls for config_class, cls in METHODS.values() if isinstance(config, config_class))
