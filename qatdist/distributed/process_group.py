"""Process groups and the few collectives the trainer needs.

World size 1 (plain `python -m qatdist.train`) runs through the same code: a one-rank gloo group
on an in-memory store, so every collective in the trainer is valid everywhere.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    restart_count: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read torchrun's environment; without it, a single process."""
    env = os.environ
    return DistEnv(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def init_process_group(env: DistEnv, timeout_s: int) -> None:
    """Start the gloo group. Under torchrun the store is the agent's TCPStore, namespaced by the
    attempt: a restarted worker otherwise can find the previous attempt's addresses in the store
    and fail in connectFullMesh (measured: 2 of 6 restarts on torch 2.14.1).

    The attempt is how many times this rank has started in this store, not torchrun's
    TORCHELASTIC_RESTART_COUNT: that count is per agent, and an agent whose workers are
    restarted because another host's failed does not count it (measured across two hosts:
    host 0 at attempt 0, host 1 at attempt 1, rank 1 waiting for rank 0's key until the store
    timeout). Every rank starts once per attempt, so the counts agree unless a worker died
    before reaching this point while others passed it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" not in os.environ:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timeout)
        return
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    base_store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=env.world_size,
        is_master=env.rank == 0 and not use_agent_store,
        timeout=timeout,
        wait_for_workers=False,
    )
    attempt = base_store.add(f"qatdist/starts/rank-{env.rank}", 1)
    store = dist.PrefixStore(f"qatdist/attempt-{attempt}", base_store)
    dist.init_process_group(
        "gloo", store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
    )


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_object(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
