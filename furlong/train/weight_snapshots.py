"""--keep-old-actor: host copies of a rank's changing weights as pushed at each weights
version (the two newest: a one-step-off-policy rollout needs the previous one), and a
block in which the policy computes with one of them, for the log-probs of samples that
an older version generated."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

KEPT = 2


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (the local shard of a DTensor), in place."""
    return param.to_local() if hasattr(param, "to_local") else param


def _host_copies(parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_local(p).detach().to("cpu", copy=True) for p in parameters]


def _copy_into(parameters: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(parameters, values, strict=True):
            _local(param).copy_(value)


class WeightSnapshots:
    """Snapshots of `parameters()` (what an optimizer step may change) by weights version."""

    def __init__(self, parameters: Callable[[], list[nn.Parameter]]):
        self._parameters = parameters
        self._saved: dict[int, list[torch.Tensor]] = {}

    def keep(self, version: int) -> None:
        self._saved[version] = _host_copies(self._parameters())
        for old in sorted(self._saved)[:-KEPT]:
            del self._saved[old]

    @property
    def versions(self) -> list[int]:
        return sorted(self._saved)

    def __getitem__(self, version: int) -> list[torch.Tensor]:
        return self._saved[version]

    @contextlib.contextmanager
    def applied(self, version: int) -> Iterator[None]:
        """The parameters hold the `version` snapshot inside the block, their own values
        after."""
        parameters = self._parameters()
        current = _host_copies(parameters)
        _copy_into(parameters, self._saved[version])
        try:
            yield
        finally:
            _copy_into(parameters, current)
