"""Entry point of training.

`torchrun --nproc_per_node=N -m qatdist.train [--config FILE] [--section.key=value ...]`, or
`python -m qatdist.train ...` for a single process.
"""

from __future__ import annotations

import logging
import sys

from qatdist import config
from qatdist.distributed import env_from_torchrun, init_process_group, shutdown
from qatdist.monitor import setup_logging

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
    env = env_from_torchrun()
    setup_logging(env.rank)
    try:
        cfg = config.load_from_argv(argv)  # rejected before any process group starts
    except config.ConfigError as e:
        print(f"qatdist.train: config error: {e}", file=sys.stderr)
        return 2

    from qatdist import data  # heavy imports only once the config is valid
    from qatdist.trainer import Trainer, place_this_rank

    try:
        data.ensure_demo_shards(cfg.data, cfg.train.seed)  # file-locked: one writer per folder
        data.check_shards(cfg.data, env.world_size)
    except config.ConfigError as e:
        print(f"qatdist.train: config error: {e}", file=sys.stderr)
        return 2
    placement = place_this_rank(cfg.runtime, env)
    init_process_group(env, cfg.runtime.timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, env, placement)
        trainer.train()
        trainer.finish()
    except config.ConfigError as e:
        logging.getLogger("qatdist").error("config error: %s", e)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
