"""perf/<phase>_peak_memory_gib (furlong/output/memory.py)."""
import pytest
import torch

from furlong.output.memory import GIB, PhaseMemory


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU machine's case")
def test_no_metric_without_a_gpu_in_this_process():
    metrics = {}
    with PhaseMemory(enabled=True).measure("train", metrics):
        torch.ones(1000)
    assert metrics == {}


def test_disabled_in_async_runs_even_on_a_gpu():
    metrics = {}
    with PhaseMemory(enabled=False).measure("rollout", metrics):
        pass
    assert metrics == {}


@pytest.mark.gpu
def test_peak_of_the_block_not_of_the_process():
    torch.cuda.init()
    big = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    del big
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved() / GIB  # what earlier tests of this process keep
    memory = PhaseMemory(enabled=True)
    metrics = {}
    with memory.measure("train", metrics):
        block = torch.empty(GIB // 2, dtype=torch.uint8, device="cuda")
        del block
    assert 0.5 <= metrics["perf/train_peak_memory_gib"] - held < 1.5
