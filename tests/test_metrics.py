"""Retrieval metrics against values computed by hand (in the comments)."""
import pytest

from cir.metrics import map_at_k, recall_at_k, recall_subset_at_k


def test_recall_at_k_hand_computed():
    rankings = [
        ["a", "b", "c", "d"],  # target c at rank 3
        ["b", "a", "d", "c"],  # targets a and d at ranks 2 and 3: one hit, counted once
        ["a", "b", "c", "d"],  # target z is not in the gallery: always a miss
        [],                    # empty ranking: a miss
        ["a", "b"],            # empty target set: a miss
    ]
    targets = [{"c"}, ["a", "d"], {"z"}, {"a"}, set()]
    # k=1: no hit -> 0/5; k=2: query 1 -> 1/5 = 20 %; k=3: queries 0, 1 -> 2/5 = 40 %;
    # k=10 (longer than every ranking): still 2/5 = 40 %.
    assert recall_at_k(rankings, targets, [1, 2, 3, 10]) == pytest.approx({1: 0.0, 2: 20.0, 3: 40.0, 10: 40.0})


def test_recall_counts_an_id_ranked_twice_at_its_first_position():
    # distinct ids: x, y, t -> the target t is at rank 3, not 4
    assert recall_at_k([["x", "y", "x", "t"]], [{"t"}], [3]) == {3: 100.0}


def test_recall_subset_removes_the_reference_and_keeps_the_order():
    rankings = [
        ["ref", "x", "t", "s1", "s2"],  # restricted to subset minus ref: [t, s1, s2] -> t at rank 1
        ["ref", "s1", "t"],             # restricted: [s1, t] -> t at rank 2
        ["ref", "t", "s1"],             # target t is outside this query's subset: a miss
    ]
    targets = [{"t"}, {"t"}, {"t"}]
    subsets = [["ref", "s1", "t", "s2", "s3"], ["ref", "s1", "t"], ["ref", "s1", "s2"]]
    references = ["ref", "ref", "ref"]
    # k=1: query 0 -> 1/3 = 33.33 %; k=2 and k=3: queries 0, 1 -> 2/3 = 66.67 %
    got = recall_subset_at_k(rankings, targets, subsets, references, [1, 2, 3])
    assert got == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 200 / 3})


def test_map_at_k_hand_computed():
    ranking = ["t1", "x", "t2", "y", "z", "t3", "w"]  # 3 targets at ranks 1, 3, 6
    targets = {"t1", "t2", "t3"}
    # K=1: (1/1) / min(1, 3) = 1 -> 100
    # K=2: (1/1) / min(2, 3) = 0.5 -> 50
    # K=5: (1/1 + 2/3) / min(5, 3) = 0.5556 -> 55.56
    # K=10: (1/1 + 2/3 + 3/6) / 3 = 0.7222 -> 72.22
    got = map_at_k([ranking], [targets], [1, 2, 5, 10])
    assert got == pytest.approx({1: 100.0, 2: 50.0, 5: 500 / 9, 10: 650 / 9})
    assert round(got[5], 2) == 55.56


def test_map_at_k_averages_over_queries_with_misses_and_duplicates():
    rankings = [
        ["t1", "x", "t2", "y", "z", "t3"],  # as above: AP@5 = 0.5556
        ["a", "b"],                          # target not in the gallery: AP = 0
        ["a", "b"],                          # no targets: AP = 0
        ["a", "a", "b"],                     # a ranked twice counts once: a at 1, b at 2 -> (1 + 2/2) / 2 = 1
    ]
    targets = [{"t1", "t2", "t3"}, {"q"}, set(), ["a", "b"]]
    # K=5: (0.5556 + 0 + 0 + 1) / 4 = 0.3889 -> 38.89
    assert map_at_k(rankings, targets, [5]) == pytest.approx({5: (500 / 9 + 100) / 4})


def test_map_at_k_more_targets_than_k():
    # 3 targets, K=2, the first two ranks relevant: (1/1 + 2/2) / min(2, 3) = 1 -> 100
    assert map_at_k([["a", "b", "c"]], [{"a", "b", "c"}], [2]) == {2: 100.0}


@pytest.mark.parametrize("call", [
    lambda: recall_at_k([["a"]], [{"a"}, {"b"}], [1]),
    lambda: map_at_k([["a"], ["b"]], [{"a"}], [1]),
    lambda: recall_subset_at_k([["a"]], [{"a"}], [["a"]], [], [1]),
])
def test_lengths_must_match(call):
    with pytest.raises(ValueError, match="differ in length"):
        call()


@pytest.mark.parametrize("ks", [[], [0], [1.5]])
def test_ks_must_be_positive_integers(ks):
    with pytest.raises(ValueError, match="ks must be positive integers"):
        recall_at_k([["a"]], [{"a"}], ks)


def test_no_queries_is_an_error():
    with pytest.raises(ValueError, match="no queries"):
        map_at_k([], [], [1])


def test_first_result_outcomes_of_cir_shapes_queries():
    from cir.data.triplets import Triplet
    from cir.retrieval.evaluate import top1_outcomes

    meta = {"partials": [{"path": "images/test/q-partial-0.png", "operations": [0]}]}
    t = Triplet("q", "/d/images/test/q-ref.png", "remove the red circle and add a star", ["/d/images/test/q-tgt.png"], meta=meta)
    other = Triplet("r", "/d/images/test/r-ref.png", "remove the star", ["/d/images/test/r-tgt.png"])
    rankings = [["/d/images/test/q-tgt.png"], ["/d/images/test/q-ref.png", "/d/images/test/q-tgt.png"],
                ["/d/images/test/q-partial-0.png"], ["/d/images/test/r-tgt.png"], [],
                ["/d/images/test/q-partial-0.png"]]  # the last row is r's: q's partial is "other" for it
    assert top1_outcomes(rankings, [t, t, t, t, t, other]) == {"target": 1, "partial": 1, "reference": 1, "other": 3}


def _circo(targets, qid="0"):
    from cir.data.triplets import Triplet
    return Triplet(qid, "ref", "caption", targets, meta={"dataset": "circo"})


def test_circo_recall_counts_the_target_only():
    from cir.retrieval.evaluate import protocol_metrics

    # the minimal case: ranking [2, 1, 3], ground truths [1, 2], target 1 -> a miss at rank 1
    assert recall_at_k([[2, 1, 3]], [[1]], [1]) == {1: 0.0}
    # CIRCO's Ks: ground truth 2 in the top 5, the target 1 at rank 6
    ranking = [2, 4, 5, 6, 7, 1, 8]
    got = protocol_metrics([_circo([1, 2])], [ranking], [[]])
    assert got["recall"] == {"5": 0.0, "10": 100.0, "25": 100.0, "50": 100.0}
    # AP@5 = (1/1) / min(5, 2) = 0.5; AP@10 = (1/1 + 2/6) / 2 = 0.6667
    assert got["map"] == pytest.approx({"5": 50.0, "10": 200 / 3, "25": 200 / 3, "50": 200 / 3})
    assert set(got) == {"recall", "map"}  # no Recall@1 and no subset metric for CIRCO


def test_protocol_metrics_refuses_queries_without_targets():
    from cir.errors import UserError
    from cir.retrieval.evaluate import protocol_metrics

    with pytest.raises(UserError, match="none of the 2 queries has a target"):
        protocol_metrics([_circo([]), _circo([], "1")], [[1], [1]], [[], []])


def _ranked(scores, gallery, reference, subset, k):
    """`cir.retrieval.evaluate.ranked` for one query whose scores against the gallery are `scores`."""
    import torch

    from cir.data.triplets import Triplet
    from cir.retrieval.evaluate import ranked

    query = torch.eye(len(gallery))[:1]            # [1, N]: scores = the first row of the gallery matrix
    gallery_emb = torch.tensor([scores]).T.expand(-1, len(gallery)).contiguous()  # [N, N], column 0 = scores
    t = Triplet("q", reference, "c", ["t"], subset=subset)
    (top,), (members,) = ranked(query, gallery_emb, gallery, [t], keep_reference=False, k=k)
    return top, members


def test_ranking_breaks_ties_by_gallery_position():
    top, members = _ranked([0.5, 0.9, 0.5, 0.9, 0.1], ["a", "b", "c", "d", "e"], "e", ["c", "a", "d"], 3)
    assert top == ["b", "d", "a"]   # 0.9 (b before d), then 0.5 (a before c)
    assert members == ["d", "a", "c"]


def test_equal_scores_rank_members_as_the_full_ranking():
    gallery = ["a", "b", "c", "d", "e", "f"]
    top, members = _ranked([0.3] * 6, gallery, "a", ["c", "b", "a", "d"], 50)
    assert top == ["b", "c", "d", "e", "f"] and members == ["b", "c", "d"]
    # the target b is first in both: R@1 and Rsubset@1 agree
    assert recall_at_k([top], [{"b"}], [1]) == {1: 100.0}
    assert recall_subset_at_k([members], [{"b"}], [["c", "b", "a", "d"]], ["a"], [1]) == {1: 100.0}


def test_k_at_least_the_gallery_drops_the_reference():
    top, _ = _ranked([0.9, 0.1, 0.5, 0.7], ["ref", "x", "y", "z"], "ref", None, 10)
    assert top == ["z", "y", "x"]   # 3 = N - 1 paths, the reference not among them
