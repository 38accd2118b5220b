"""Ranks of a build run by torchrun (WORLD_SIZE, RANK in the environment): rank 0 leads (lock,
gallery listing, the index write), every rank embeds the chunks it owns. One process is rank 0
of 1 and needs no process group."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from cir.errors import UserError

TIMEOUT = timedelta(hours=24)  # ranks wait for the lead's listing, hashing and index write


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        """Chunks go round-robin to ranks."""
        return chunk % self.world == self.rank

    def from_lead(self, fn):
        """fn() run on rank 0; its result, or its UserError, on every rank."""
        if self.world == 1:
            return fn()
        box = [None]
        if self.lead:
            try:
                box[0] = (True, fn())
            except UserError as e:
                box[0] = (False, str(e))
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise UserError(value)
        return value

    def close(self) -> None:
        """Wait for every rank, then end the process group: a rank that exits while others still talk
        to it over gloo makes them abort."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()

    def gather(self, value) -> list:
        """[value of rank 0, value of rank 1, ...] on every rank."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def current_shard() -> Shard:
    """This process's rank under torchrun (the gloo process group started on first call), else Shard()."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size())
