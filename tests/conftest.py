"""Shared fixtures: small CIR-Shapes datasets and a tiny random checkpoint, built once per session."""
from __future__ import annotations

import pytest
import torch

from cir.checkpoint import save_checkpoint
from cir.data.shapes.dataset import generate
from cir.models.factory import build_model, load_config


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A rendered CIR-Shapes dataset: 48 train, 12 val, 16 test triplets."""
    out = tmp_path_factory.mktemp("shapes")
    generate(out, {"train": 48, "val": 12, "test": 16}, seed=1, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny model saved as a checkpoint."""
    torch.manual_seed(0)
    model, _ = build_model("context-cir-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, {"config": model.config.to_dict(), "step": 0})
    return path


@pytest.fixture(scope="session")
def tiny_tmcir_checkpoint(tmp_path_factory):
    """A randomly initialised tiny TMCIR model saved as a checkpoint, its weight matrices scaled up so
    that its scores have no near-ties."""
    torch.manual_seed(0)
    model, _ = build_model("tmcir-tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3)
    path = tmp_path_factory.mktemp("tmcir") / "tmcir-tiny.safetensors"
    save_checkpoint(path, model, {"config": model.config.to_dict(), "step": 0})
    return path


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    model, preprocess = build_model(load_config("context-cir-tiny"))
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def ex(tiny_checkpoint, shapes_data):
    """An Explorer on the tiny checkpoint with the test split as in-memory gallery and examples."""
    from cir.ui.explorer import Explorer
    return Explorer.load(tiny_checkpoint, gallery=shapes_data / "gallery_test.txt",
                         examples=shapes_data / "test.jsonl", device="cpu")
