"""Entry point of training.

`torchrun --nproc_per_node=N -m qatdist.train [--config FILE] [--section.key=value ...]`, or
`python -m qatdist.train ...` for a single process.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

from qatdist import config

USAGE = """usage: torchrun --nproc_per_node=N -m qatdist.train [--config FILE] [--section.key=value]

Distributed PT2E quantization-aware training. Without --config, configs/default.toml (the
built-in demo) is used. Precedence: command line > config file > defaults.

Config keys:
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE + config.help_text())
        return 0
    try:
        # Rejected before torch is even imported (seconds), let alone a process group started.
        cfg = config.load_from_argv(argv)
    except config.ConfigError as e:
        print(f"qatdist.train: config error: {e}", file=sys.stderr)
        return 2

    from qatdist import data  # heavy imports only once the config is valid
    from qatdist.data import demo, transforms
    from qatdist.distributed import env_from_torchrun, init_process_group, shutdown
    from qatdist.distributed.route import RouteError, gloo_network
    from qatdist.finish.finalize import FinalCheckFailed, QuantizationIncomplete
    from qatdist.guards import NonFiniteError
    from qatdist.monitor import setup_logging
    from qatdist.run.checkpoint import CheckpointError, find_complete
    from qatdist.run.folder import RunFolder
    from qatdist.tasks import build_task
    from qatdist.topology import place_this_rank
    from qatdist.trainer import Trainer

    env = env_from_torchrun()
    setup_logging(env.rank)
    # `kill -USR1 <pid>` prints where a rank stands (all threads), e.g. one that seems hung.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        network = gloo_network()  # a wrong GLOO_SOCKET_IFNAME stops here, naming it
    except RouteError as e:
        print(f"qatdist.train: {e}", file=sys.stderr)
        return 2
    _log_network(env, network)
    try:
        demo.ensure_demo_shards(cfg.data, cfg.train.seed)  # file-locked: one writer
        data.check_shards(cfg.data, env.world_size)
        transforms.check_transform(cfg.data)  # a bad data.transform stops here
        task = build_task(cfg.task, cfg.data)  # a user task that cannot load stops here
        if cfg.checkpoint.resume_from:  # an unusable folder stops here, before any set-up
            try:
                find_complete(RunFolder(cfg.run.out_dir).checkpoints, cfg.checkpoint.resume_from)
            except CheckpointError as e:
                raise config.ConfigError(f"checkpoint.resume_from: {e}") from None
    except config.ConfigError as e:
        print(f"qatdist.train: config error: {e}", file=sys.stderr)
        return 2
    # torchrun's "Setting OMP_NUM_THREADS ... to be 1" warning is harmless: the placement sets
    # this rank's torch threads itself (docs/monitoring.md lists every warning a run prints).
    placement = place_this_rank(cfg.runtime, env)
    init_process_group(env, cfg.runtime.timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, env, placement, network, task)
        trainer.train()
        trainer.finish()
    except config.ConfigError as e:
        logging.getLogger("qatdist").error("config error: %s", e)
        return 2
    except CheckpointError as e:  # e.g. a checkpoint refused on load; nothing in it ran
        logging.getLogger("qatdist").error("checkpoint error: %s", e)
        return 2
    except data.DataError as e:  # a bad shard or sample under data.on_error='raise'
        logging.getLogger("qatdist").error("data error: %s", _own_message(e))
        return 1
    except NonFiniteError as e:  # every rank stops at the same step; no final artifacts
        logging.getLogger("qatdist").error("training diverged: %s", e)
        return 1
    except QuantizationIncomplete as e:  # runtime.require_full_quantization; final/ untouched
        logging.getLogger("qatdist").error("quantization incomplete: %s", e)
        return 1
    except FinalCheckFailed as e:  # final/ untouched
        logging.getLogger("qatdist").error("final check failed: %s", e)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        # DDP's reducer holds the process group: release it before the group is destroyed,
        # not during interpreter exit, where the teardown order is not fixed.
        trainer = None
        shutdown()
    return 0


def _log_network(env, network: dict) -> None:
    """One line per rank, on every rank (the others log only warnings): where its gloo
    connections go from. A multi-host job bound to loopback cannot connect across hosts."""
    print(
        f"[rank{env.rank}] network: gloo interface {network['interface']} address "
        f"{network['address']} (from {network['source']}), MASTER_ADDR {network['master_addr']}",
        file=sys.stderr,
        flush=True,
    )
    address = network["address"]
    if env.world_size > env.local_world_size and (address is None or address.startswith("127.")):
        logging.getLogger("qatdist").warning(
            "gloo binds to %s (from %s) in a job spanning several hosts: ranks on other hosts "
            "cannot connect to it; set GLOO_SOCKET_IFNAME (launch/multinode.sh does)",
            address,
            network["source"],
        )


def _own_message(error: Exception) -> str:
    """The error's own message: one raised in a DataLoader worker comes back as 'Caught
    DataError in DataLoader worker process N.' followed by the worker's traceback, whose last
    line is the original message."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
