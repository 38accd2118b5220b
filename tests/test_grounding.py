"""The grounding figures (cir.grounding) on small hand-made maps whose answers are known, and the
evaluation's grounding report on a tiny model."""
import pytest
import torch

from cir.grounding import box_energy, box_share, distinct_peaks, pointing_hits


def test_pointing_hits_by_hand():
    peak_top_right = torch.zeros(9)
    peak_top_right[2] = 1.0  # row 0, column 2 of a 3 x 3 grid
    uniform_but_centre = torch.full((9,), 0.1)
    uniform_but_centre[4] = 0.2
    maps = torch.stack([peak_top_right, uniform_but_centre])
    assert pointing_hits(maps, 3, (90, 90), (60, 0, 90, 30)).tolist() == [True, False]
    assert pointing_hits(maps, 3, (90, 90), (30, 30, 60, 60)).tolist() == [False, True]
    # a small object at the centre of the top-right cell: the peak patch's centre (75, 15) is inside
    assert pointing_hits(maps, 3, (90, 90), (70, 10, 80, 20)).tolist() == [True, False]
    # two equal top patches: the first (top left, centre (15, 15)) is the point, not a pixel between them
    two_peaks = torch.zeros(1, 9)
    two_peaks[0, [0, 2]] = 1.0
    assert pointing_hits(two_peaks, 3, (90, 90), (10, 10, 20, 20)).tolist() == [True]


def test_energy_by_hand():
    # 3 x 3 grid over 90 x 90: patch (r, c) covers [30c, 30c + 30) x [30r, 30r + 30)
    top_right = torch.zeros(1, 9)
    top_right[0, 2] = 1.0
    assert box_energy(top_right, 3, (90, 90), (60, 0, 90, 30)).item() == pytest.approx(1.0)
    assert box_energy(top_right, 3, (90, 90), (0, 0, 60, 90)).item() == pytest.approx(0.0)
    # a box over the right half of that patch: half its mass
    assert box_energy(top_right, 3, (90, 90), (75, 0, 90, 30)).item() == pytest.approx(0.5)
    # a box of a quarter patch at the meeting corner of four patches sharing the mass equally
    four = torch.zeros(1, 9)
    four[0, [0, 1, 3, 4]] = 0.25
    assert box_energy(four, 3, (90, 90), (15, 15, 45, 45)).item() == pytest.approx(4 * 0.25 * 0.25)
    # a uniform map scores the box's share of the image (chance), unnormalised maps are normalised
    uniform = torch.full((2, 9), 1.0)
    box = (10, 20, 55, 80)
    assert box_energy(uniform, 3, (90, 90), box).tolist() == pytest.approx([box_share((90, 90), box)] * 2)
    assert box_share((90, 90), box) == pytest.approx(45 * 60 / 8100)
    assert box_share((90, 90), (-10, -10, 30, 30)) == pytest.approx(900 / 8100)  # clipped to the image
    # a 7 x 7 grid over a 128-pixel canvas, all mass on the patch holding (64, 64): a box of that patch
    centre = torch.zeros(1, 49)
    centre[0, 24] = 1.0
    side = 128 / 7
    assert box_energy(centre, 7, (128, 128), (3 * side, 3 * side, 4 * side, 4 * side)).item() == pytest.approx(1.0)


def test_distinctness_by_hand():
    left, right, centre = (0, 0, 30, 30), (60, 0, 90, 30), (30, 30, 60, 60)
    assert distinct_peaks([0, 2], [left, right]) is True
    assert distinct_peaks([4, 4], [left, right]) is False  # both phrases peak on one patch
    assert distinct_peaks([0, 0], [left, left]) is None  # the same object twice: no disjoint pair
    assert distinct_peaks([0], [left]) is None
    # three objects: one pair collides
    assert distinct_peaks([0, 2, 2], [left, right, centre]) is False
    assert distinct_peaks([0, 2, 4], [left, right, centre]) is True
    # overlapping boxes (a phrase and the larger phrase that holds it) are not compared
    assert distinct_peaks([0, 0, 2], [left, (0, 0, 40, 40), right]) is True


def test_one_head_grounding_table_equals_the_averaged_number(shapes_data):
    """With one layer and one head, the per-head table and the averaged map are the same map; the
    reference-object figures are percentages over their own counts."""
    from cir.data.triplets import read_triplets
    from cir.retrieval.evaluate import format_results, grounding
    from cir.models.factory import build_model, config_from_dict, load_config
    torch.manual_seed(0)
    cfg = dict(load_config("context-cir-tiny").to_dict(), fusion_layers=1, fusion_heads=1)
    model, preprocess = build_model(config_from_dict(cfg))
    triplets = read_triplets(shapes_data / "test.jsonl")[0]
    g = grounding(model.eval(), preprocess, triplets, "cpu", batch_size=5)
    assert g["count"] > 20 and g["grid"] == model.grid
    for name in ("in_context", "isolated"):
        assert g["per_layer_head"][name] == [[pytest.approx(g[name])]]
    o = g["objects"]
    kinds = [x.get("kind", "object") for t in triplets for x in t.meta["grounding"]]
    assert 0 < o["count"] == kinds.count("object") < g["count"]
    assert 0 < o["energy"]["chance"] < 100 and all(0 <= o["energy"][k] <= 100 for k in ("in_context", "isolated"))
    assert o["distinct"]["captions"] > 0
    assert "energy" in format_results({"count": 1, "keep_reference": True, "recall": {"1": 0.0}, "grounding": g})
