"""Concurrent query encodings run through the model together.

Callers queue their (pixels, caption) and wait; one worker thread takes every queued query (up to
`MAX_BATCH`) and encodes them in one forward, holding the model lock, then hands each caller its
row. While a forward runs the next queries queue up, so the batch grows with the load and a lone
query is encoded alone, without waiting. (One thread runs every forward, so their activations
reuse one allocator arena instead of growing one per request thread.)"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from cir.precision import autocast

MAX_BATCH = 16  # queries per forward


@dataclass
class _Query:
    pixels: torch.Tensor  # [3, S, S] preprocessed
    caption: str
    done: threading.Event = field(default_factory=threading.Event)
    embedding: torch.Tensor | None = None
    error: BaseException | None = None


class QueryBatcher:
    """`batcher(pixels, caption)` -> the query embedding [1, E] float32, as
    `model.encode_query(pixels[None], [caption])` gives it; `model_lock` is held during forwards."""

    def __init__(self, model, device, model_lock: threading.Lock, max_batch: int = MAX_BATCH):
        self.model, self.device, self.model_lock, self.max_batch = model, device, model_lock, max_batch
        self._queue: list[_Query] = []
        self._queued = threading.Condition()
        self._worker: threading.Thread | None = None
        self.batch_sizes: Counter[int] = Counter()  # {queries in a forward: forwards run}

    def __call__(self, pixels: torch.Tensor, caption: str) -> torch.Tensor:
        query = _Query(pixels, caption)
        with self._queued:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="query-batcher", daemon=True)
                self._worker.start()
            self._queue.append(query)
            self._queued.notify()
        query.done.wait()
        if query.error is not None:
            raise query.error
        return query.embedding

    def _work(self) -> None:
        while True:
            with self._queued:
                while not self._queue:
                    self._queued.wait()
            with self.model_lock:
                with self._queued:
                    batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self._run(batch)

    def _run(self, batch: list[_Query]) -> None:
        """Encode `batch` in one forward; if that fails, each query alone, so an error is its own."""
        try:
            out = self._encode(batch)
            for i, q in enumerate(batch):
                q.embedding = out[i:i + 1].clone()
        except Exception:
            for q in batch:
                try:
                    q.embedding = self._encode([q])
                except Exception as e:
                    q.error = e
        self.batch_sizes[len(batch)] += 1
        for q in batch:
            q.done.set()

    def _encode(self, batch: list[_Query]) -> torch.Tensor:
        pixels = torch.stack([q.pixels for q in batch]).to(self.device)
        with torch.no_grad(), autocast(self.device):
            return self.model.encode_query(pixels, [q.caption for q in batch]).float()
