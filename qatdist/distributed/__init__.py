"""Everything torch.distributed: process groups and collectives (`process_group`), DDP wrapping
with its one comm hook (`ddp`), and the network route to another host (`route`)."""

from qatdist.distributed.ddp import wrap_ddp
from qatdist.distributed.process_group import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    env_from_torchrun,
    init_process_group,
    shutdown,
)

__all__ = [
    "DistEnv",
    "all_gather_object",
    "all_reduce_sum",
    "broadcast_object",
    "env_from_torchrun",
    "init_process_group",
    "shutdown",
    "wrap_ddp",
]
