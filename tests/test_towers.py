"""Tower pretraining (cir.towers) over several sittings: the data order of a shuffled DataLoader,
an interrupted run resumed bit for bit, and more pretraining of existing towers."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from cir import towers
from cir.errors import UserError

SMALL = ["--config", "cir-tiny", "--steps", "7", "--batch-size", "16", "--warmup", "1", "--workers", "0",
         "--token-weight", "1"]  # 96 images: 6 batches an epoch, so 7 steps cross into the second


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", [0, 1])
def test_the_order_is_the_shuffled_loaders(workers):
    loader = DataLoader(list(range(50)), batch_size=8, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(123))
    assert torch.cat(list(loader)).tolist() == towers.shuffled_order(50, 8, 123)


def test_an_interrupted_run_resumes_bit_for_bit(shapes_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    towers.main(SMALL + ["--data", str(shapes_data), "--out", str(full)])
    towers.main(SMALL + ["--data", str(shapes_data), "--out", str(split), "--save-every", "2", "--stop-after", "4"])
    assert not (split / "clip.safetensors").exists()
    assert json.loads((split / "last.json").read_text())["step"] == 4
    with pytest.raises(UserError, match=r"trained with --batch-size 16 \(not 8\)"):
        towers.main(SMALL + ["--data", str(shapes_data), "--out", str(split), "--resume", "--batch-size", "8"])
    towers.main(SMALL + ["--data", str(shapes_data), "--out", str(split), "--save-every", "2", "--resume"])
    assert losses(split) == losses(full) and len(losses(full)) == 7
    a, b = load_file(full / "clip.safetensors"), load_file(split / "clip.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("optimizer.", "rng.")) for k in b)  # the final file holds the towers alone


def test_more_pretraining_starts_from_the_given_towers(shapes_data, tmp_path, capsys):
    first, more = tmp_path / "first", tmp_path / "more"
    towers.main(SMALL + ["--data", str(shapes_data), "--out", str(first), "--steps", "2"])
    frozen = ["--lr", "0", "--min-lr", "0", "--weight-decay", "0", "--steps", "1"]  # a step that changes nothing
    towers.main(SMALL + ["--data", str(shapes_data), "--out", str(more), "--init-from", str(first / "clip.safetensors"),
                         *frozen])
    a, b = load_file(first / "clip.safetensors"), load_file(more / "clip.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((more / "clip.json").read_text())["args"]["init_from"] == str(first / "clip.safetensors")
    with pytest.raises(UserError, match="its towers are not of config 'cir-shapes-grid7'"):
        towers.main(SMALL + ["--data", str(shapes_data), "--out", str(more), "--config", "cir-shapes-grid7",
                             "--init-from", str(first / "clip.safetensors"), *frozen])
