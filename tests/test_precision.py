"""The autocast choice: `auto` never picks an emulated bf16 (50 s steps instead of 3.4 s on an AVX2 CPU)."""
from __future__ import annotations

import pytest
import torch

from cir import precision


def test_auto_follows_native_bf16_and_explicit_choices_are_kept(monkeypatch):
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    assert precision.resolve("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    assert precision.resolve("auto", "cpu") == "bf16"
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError):
        precision.resolve("fp16", "cpu")


def test_native_check_on_this_cpu_matches_onednn():
    assert precision.bf16_is_native("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_autocast_runs_in_the_resolved_dtype():
    a = torch.randn(4, 4)
    with precision.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with precision.autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
