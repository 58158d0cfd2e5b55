"""The command line of train.py: flags -> Config -> dry run, or the loop."""
from __future__ import annotations

import asyncio
import logging
import os
import sys

from furlong.config import ConfigError, load_config
from furlong.data import DataError


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None, prog: str = "train.py", overlap: bool = False) -> int:
    """`overlap`: train_async.py (generation of rollout k+1 overlaps training of rollout k)."""
    argv = sys.argv[1:] if argv is None else argv
    # RL steps change shapes every rollout; growable segments keep fragmentation down.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    setup_logging()
    log = logging.getLogger("furlong")
    try:
        config, warnings = load_config(argv, prog)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    if overlap and config.cluster.colocate:
        print(f"{prog}: error: --colocate: train_async.py overlaps generation with training, so "
              "engines and trainer need their own devices; drop --colocate (or use train.py)",
              file=sys.stderr)
        return 2
    for warning in warnings:
        log.warning(warning)
    try:
        if config.debug.dry_run:
            from furlong.dry_run import dry_run
            return dry_run(config)
        from furlong.build import build_run
        from furlong.loop import train
        asyncio.run(train(build_run(config, argv), overlap))
    except (ConfigError, DataError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
