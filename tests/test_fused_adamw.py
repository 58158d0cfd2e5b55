"""The fused master-weight AdamW kernel against torch's AdamW on the same masters.

The check runs in a subprocess: on the CPU under the Triton interpreter (the variable
must be set before triton is imported), on the GPU as compiled code."""
from __future__ import annotations

import pytest

from conftest import run_check

CHECK = """
import torch
from torch import nn
from furlong.config.groups import OptimizerArgs
from furlong.train import fused_adamw
from furlong.train.master_weights import MasterWeights
from furlong.train.optim import build_optimizer

DEVICE = "cpu"
ROUNDING_ULPS = 1  # the interpreter truncates to bfloat16; CUDA rounds to nearest, even
config = OptimizerArgs(lr=3e-2, weight_decay=0.1, adam_beta2=0.98)

def run(fused: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 24), nn.LayerNorm(24), nn.Linear(24, 40)).to(DEVICE)
    model[2].bias.requires_grad_(False)  # a frozen parameter keeps its value
    masters = MasterWeights(model)
    optimizer = build_optimizer(masters.parameters(), config)
    calls = []
    original = fused_adamw.adamw_step
    fused_adamw.adamw_step = lambda *a: (calls.append(1), original(*a))
    norms = []
    torch.manual_seed(1)
    for step, micro_batches in enumerate((1, 2, 1, 3)):
        for _ in range(micro_batches):  # linear in the weights: the same gradients
            loss = sum((param * torch.randn(param.shape, device=DEVICE)).sum()  # for both runs
                       for param in model.parameters())
            (loss / 8).backward()
        max_norm = 1.0 if step % 2 == 0 else float("inf")  # clipped, then not
        if fused:
            norms.append(masters.step(optimizer, max_norm))
            continue
        for master, grad in zip(masters.parameters(), masters.take_gradients(), strict=True):
            master.grad = grad.float()  # torch's own clipping and AdamW, as a reference
        norms.append(float(torch.nn.utils.clip_grad_norm_(masters.parameters(), max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.copy_to_model()
    fused_adamw.adamw_step = original
    assert bool(calls) == fused
    return masters, model, optimizer, norms

(ref_masters, ref_model, ref_opt, ref_norms), (masters, model, opt, norms) = run(False), run(True)
assert max(ref_norms) > 1.0, ref_norms  # clipping was exercised
torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
for got, want in zip(masters.parameters(), ref_masters.parameters(), strict=True):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    state, ref_state = opt.state[got], ref_opt.state[want]
    assert float(state["step"]) == float(ref_state["step"]) == 4.0
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-8)
trained = [param for param in model.parameters() if param.requires_grad]
for got, master in zip(trained, masters.parameters(), strict=True):
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, master.to(torch.bfloat16), atol=0,
                               rtol=ROUNDING_ULPS * 2.0 ** -7)
assert torch.equal(model[2].bias, ref_model[2].bias)
print("fused adamw ok")
"""


def _run(check: str, env: dict) -> None:
    run_check(check, "fused adamw ok", env)


def test_fused_adamw_matches_torch_adamw_in_the_interpreter():
    pytest.importorskip("triton")
    _run(CHECK, {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_gpu_fused_adamw_matches_torch_adamw():
    _run(CHECK.replace('DEVICE = "cpu"', 'DEVICE = "cuda"').replace(
        "ROUNDING_ULPS = 1", "ROUNDING_ULPS = 0"), {})
