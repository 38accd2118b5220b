"""Retrieval metrics on rankings: Recall@K, CIRR's Recall_subset@K and CIRCO's mAP@K.

`rankings` holds one list of gallery ids (any hashable, e.g. image paths) per query, best first;
`targets` one set or list of correct ids per query. Each function returns {k: percent} (float).
An id ranked twice counts at its first position only. A query whose targets are absent from its
ranking, or whose target set is empty, scores 0 (a miss), so the mean is over all queries.
"""
from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Sequence


def recall_at_k(rankings: Sequence[Iterable[Hashable]], targets: Sequence[Collection[Hashable]],
                ks: Iterable[int]) -> dict[int, float]:
    """Percent of queries with any target among their top k."""
    ks = _check(ks, rankings=rankings, targets=targets)
    tops = [_top(r, max(ks)) for r in rankings]
    return {k: _mean([_hit(top[:k], t) for top, t in zip(tops, targets)]) for k in ks}


def recall_subset_at_k(rankings: Sequence[Iterable[Hashable]], targets: Sequence[Collection[Hashable]],
                       subsets: Sequence[Collection[Hashable]], references: Sequence[Hashable],
                       ks: Iterable[int]) -> dict[int, float]:
    """CIRR's Recall_subset@K: Recall@K on each ranking restricted to its query's subset (order kept),
    the reference image removed."""
    ks = _check(ks, rankings=rankings, targets=targets, subsets=subsets, references=references)
    tops = [_top(r, max(ks), keep=set(s) - {ref}) for r, s, ref in zip(rankings, subsets, references)]
    return {k: _mean([_hit(top[:k], t) for top, t in zip(tops, targets)]) for k in ks}


def map_at_k(rankings: Sequence[Iterable[Hashable]], targets: Sequence[Collection[Hashable]],
             ks: Iterable[int]) -> dict[int, float]:
    """CIRCO's mAP@K: per query sum_{r<=K} P@r * rel(r) / min(K, |targets|), averaged over queries
    (0 for a query with no targets)."""
    ks = _check(ks, rankings=rankings, targets=targets)
    tops = [_top(r, max(ks)) for r in rankings]
    return {k: _mean([_average_precision(top[:k], set(t), k) for top, t in zip(tops, targets)]) for k in ks}


def _check(ks: Iterable[int], **lists: Sequence) -> list[int]:
    """`ks` as a list after checking it and that the per-query lists have one length; else ValueError."""
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("per-query lists differ in length: "
                         + ", ".join(f"{name}={n}" for name, n in lengths.items()))
    if not lengths["rankings"]:
        raise ValueError("no queries to evaluate")
    return ks


def _top(ranking: Iterable[Hashable], n: int, keep: Collection[Hashable] | None = None) -> list[Hashable]:
    """The first `n` distinct ids of `ranking`, only those in `keep` when given."""
    top: dict[Hashable, None] = {}
    for x in ranking:
        if len(top) == n:
            break
        if keep is None or x in keep:
            top.setdefault(x)
    return list(top)


def _hit(top: list[Hashable], targets: Collection[Hashable]) -> float:
    return float(any(x in targets for x in top))


def _average_precision(top: list[Hashable], targets: set[Hashable], k: int) -> float:
    hits, total = 0, 0.0
    for rank, x in enumerate(top, start=1):
        if x in targets:
            hits += 1
            total += hits / rank
    return total / min(k, len(targets)) if targets else 0.0


def _mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)
