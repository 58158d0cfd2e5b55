"""The process-wide settings of a trainer process: --train-env-vars and --deterministic-mode.

`prepare_trainer_process` runs first in every process that builds a trainer (the one-process
run in build.py, each Ray trainer rank in cluster/ray_trainer.py), before the model, CUDA's
libraries or the process group are set up. Ray ranks also get --train-env-vars from their
`runtime_env` (`train_env_vars`), so variables read when the process starts are there too.

--deterministic-mode is Megatron's switch as Miles applies it: deterministic kernels
(`torch.use_deterministic_algorithms`, an op without a deterministic kernel raises),
cuDNN deterministic and not autotuned; plus the environment Miles' deterministic runs pass
through --train-env-vars: cuBLAS with a fixed workspace (which the deterministic check needs)
and NCCL's ring algorithm. Those two are defaults: a value given in --train-env-vars or the
environment wins.
"""
from __future__ import annotations

import os

import torch

from furlong.config.groups import Config

DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring"}


def train_env_vars(config: Config) -> dict[str, str]:
    """--train-env-vars with every value a string (a JSON 1 is "1"), as Ray and os.environ
    take them."""
    return {str(name): str(value) for name, value in (config.cluster.train_env_vars or {}).items()}


def prepare_trainer_process(config: Config) -> None:
    """Set --train-env-vars in os.environ and, with --deterministic-mode, the deterministic
    kernels. Without the flag the kernel settings are left as they are (PyTorch's defaults)."""
    os.environ.update(train_env_vars(config))
    if not config.perf.deterministic_mode:
        return
    for name, value in DETERMINISTIC_ENV.items():
        os.environ.setdefault(name, value)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
