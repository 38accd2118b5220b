"""What a training run feeds its loop: the batches of each step in a resumable order, CIR-Shapes
partial fulfilments as hard negatives, the token ids a run's text sees, and its process group."""
from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from cir.data.datasets import TripletDataset, collate_triplets
from cir.data.shapes.partials import random_partials
from cir.data.triplets import Triplet
from cir.training.loop import epoch_order

def shapes_partials(t, rng, count: int):
    """`count` CIR-Shapes partial fulfilments of triplet t, rendered ([] for 1-operation queries)."""
    return random_partials(t.meta or {}, rng, count)


def seen_token_ids(tokenizer, triplets: list[Triplet], phrases: list[list[dict]]) -> list[int]:
    """Every token id of the captions and their phrases (and the empty text's): the token-embedding
    rows an exported checkpoint keeps."""
    token_ids = set(tokenizer([""])[0, :2].tolist())
    for t, ps in zip(triplets, phrases):
        token_ids.update(tokenizer.encode_with_offsets(t.caption)[0])
        for p in ps:
            token_ids.update(tokenizer.encode_with_offsets(p["text"])[0])
    return sorted(token_ids)


def epoch_batches(dataset: TripletDataset, batch_size: int, seed: int, start: int, rank: int = 0, world: int = 1,
                  workers: int = 0, pin: bool = False) -> Iterator[dict]:
    """The collated batches of steps start + 1, start + 2, ... without end: each epoch's order from
    `epoch_order`, this process's share (rank of world) of every batch, `dataset.epoch` set for its
    draws, so that a run resumed at `start` sees the batches of an uninterrupted one."""
    per_epoch, per_rank = len(dataset) // batch_size, batch_size // world
    step = start
    while True:
        epoch, offset = divmod(step, per_epoch)
        dataset.epoch = epoch
        order = epoch_order(len(dataset), batch_size, seed, epoch).view(per_epoch, batch_size)
        order = order[offset:, rank * per_rank:(rank + 1) * per_rank].flatten().tolist()
        yield from DataLoader(torch.utils.data.Subset(dataset, order), batch_size=per_rank, shuffle=False,
                              num_workers=workers, collate_fn=collate_triplets, pin_memory=pin)
        step = (epoch + 1) * per_epoch


def setup_distributed(device_arg):
    """(rank, world, device) — torchrun sets LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    if "LOCAL_RANK" not in os.environ:
        dev = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, dev
    local = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")
