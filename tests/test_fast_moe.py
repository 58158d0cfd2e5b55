"""The fast engine on MoE models: the fused-MoE kernels under the Triton interpreter
against HF's Qwen3-MoE block, the engine on the tiny MoE against the HF engine (tokens,
log-probs, routed experts), expert weights pushed by fused and per-expert names; GPU
checks marked gpu."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from furlong.engine.base import SamplingParams
from furlong.engine.fast import FastEngine
from furlong.engine.hf_engine import HFEngine
from furlong.model.loading import load_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- kernels under the Triton interpreter -----------------------------------------------------
MOE_KERNEL_CHECK = textwrap.dedent("""
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    from furlong.engine.fast import fused_moe as M
    from furlong.engine.fast.moe import SparseMoE
    torch.manual_seed(0)
    # Alignment: every pair once, in pair order within its expert, blocks named right.
    for tokens, top_k, experts, block_m in ((5, 2, 8, 16), (40, 8, 16, 16), (3, 4, 64, 16),
                                            (70, 2, 4, 64)):
        ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).to(DEVICE)
        got = M.align_pairs(ids, experts, block_m)
        want = M.align_pairs_reference(ids, experts, block_m)
        used = int(want[2])
        assert int(got[2]) == used, (got[2], want[2])
        assert torch.equal(got[0][:used], want[0][:used]), (tokens, top_k, experts)
        assert torch.equal(got[1][:used // block_m], want[1][:used // block_m])
    # The experts against HF's block: decode tiles (few tokens) and prefill tiles (many).
    config = Qwen3MoeConfig(hidden_size=SHAPE[0], moe_intermediate_size=SHAPE[1],
                            num_experts=SHAPE[2], num_experts_per_tok=SHAPE[3],
                            norm_topk_prob=True)
    config._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(config).to(DEVICE, DTYPE)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    for tokens in TOKENS:
        hidden = torch.randn(tokens, SHAPE[0], device=DEVICE, dtype=DTYPE)
        with torch.no_grad():
            out, expert_ids = SparseMoE(block, config)(hidden)
            want = block(hidden[None])[0]
            weights, _ = SparseMoE(block, config).route(hidden)
            reference = M.fused_experts_reference(hidden, block.experts.gate_up_proj,
                                                  block.experts.down_proj, expert_ids, weights)
        scale = want.abs().max()
        assert (out - want).abs().max() <= TOLERANCE * scale, (tokens, (out - want).abs().max())
        assert (out - reference).abs().max() <= TOLERANCE * scale
    print("moe kernels ok")
""")


def check_moe_kernels(shape: tuple[int, int, int, int], tokens: tuple[int, ...], device: str,
                      dtype: str, tolerance: float, env: dict | None = None) -> None:
    """MOE_KERNEL_CHECK in a fresh process for SHAPE (hidden, expert width, experts, top-k)
    and each token count; `tolerance` is relative to the largest output."""
    settings = (f"SHAPE, TOKENS, DEVICE = {shape}, {tokens}, {device!r}\n"
                f"DTYPE, TOLERANCE = torch.{dtype}, {tolerance}\n")
    code = MOE_KERNEL_CHECK.replace("torch.manual_seed(0)\n", "torch.manual_seed(0)\n" + settings)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=600)
    assert "moe kernels ok" in result.stdout, result.stderr[-3000:]


def test_fused_moe_kernels_match_hf_block_in_interpreter():
    """Tiny shapes whose widths are not multiples of the tiles (masks); 7 tokens run the
    decode tiles, 70 (140 pairs over 8 experts) the prefill tiles."""
    pytest.importorskip("triton")
    check_moe_kernels((32, 48, 8, 2), (7, 70), "cpu", "float32", 1e-5,
                      env={**os.environ, "TRITON_INTERPRET": "1"})


# ---- the engine on the tiny MoE against the HF engine ----------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_moe):
    return AutoTokenizer.from_pretrained(tiny_moe / "model")


def requests(tokenizer) -> list[tuple[list[int], SamplingParams]]:
    """Two prompts, three samples each (forks, copy-on-write), greedy and sampled."""
    prompts = [tokenizer(text)["input_ids"] for text in ("35+50=", "12+345=99")]
    settings = ((0.0, 1, -1, 1.0), (1.0, 7, -1, 1.0), (0.8, 8, 3, 0.9))
    return [(p, SamplingParams(temperature=t, max_new_tokens=10, sampling_seed=s, top_k=k,
                               top_p=top_p, ignore_eos=True))
            for p in prompts for t, s, k, top_p in settings]


def run_all(engine, reqs, routes: bool = True):
    async def go():
        return await asyncio.gather(*(engine.generate(p, sp, return_routed_experts=routes)
                                      for p, sp in reqs))
    return asyncio.run(go())


def assert_same_outputs(fast_outputs, hf_outputs, reqs) -> None:
    for fast, simple, (prompt, _) in zip(fast_outputs, hf_outputs, reqs, strict=True):
        assert fast.output_ids == simple.output_ids
        torch.testing.assert_close(torch.tensor(fast.output_log_probs),
                                   torch.tensor(simple.output_log_probs), atol=1e-5, rtol=0)
        count = len(prompt) + len(fast.output_ids) - 1
        assert fast.routed_experts.shape == (count, 2, 2)  # 2 MoE layers, top-2
        assert fast.routed_experts.dtype == torch.int32
        assert torch.equal(fast.routed_experts, simple.routed_experts)


@pytest.fixture(scope="module")
def hf_outputs(tiny_moe, tokenizer):
    engine = HFEngine(load_hf_model(str(tiny_moe / "model")), tokenizer)
    return run_all(engine, requests(tokenizer))


@pytest.mark.parametrize("kv_tokens,window", [(4096, 3), (48, 5)])
def test_fast_engine_on_moe_matches_hf_engine(tiny_moe, tokenizer, hf_outputs, kv_tokens,
                                              window):
    """Same tokens, log-probs and routed experts (every prompt token and every generated
    token but the last) as the HF engine; the 48-token cache preempts, so some routes
    come from a re-prefill."""
    engine = FastEngine(load_hf_model(str(tiny_moe / "model")), tokenizer,
                        kv_cache_tokens=kv_tokens, block_size=4, window=window, max_num_seqs=8)
    reqs = requests(tokenizer)
    assert_same_outputs(run_all(engine, reqs), hf_outputs, reqs)
    assert (engine.scheduler.num_preempted > 0) == (kv_tokens == 48)
    assert run_all(engine, reqs[:1], routes=False)[0].routed_experts is None
    asyncio.run(engine.close())


def test_expert_weights_pushed_by_fused_and_per_expert_names(tiny_moe, tokenizer):
    """A push by HF's fused names and by per-expert checkpoint names lands in the fused
    parameters the kernels read (read back), and the engine then generates what the HF
    engine generates with the same new weights."""
    hf_model = load_hf_model(str(tiny_moe / "model"))
    engine = FastEngine(load_hf_model(str(tiny_moe / "model")), tokenizer,
                        kv_cache_tokens=1024, block_size=4, window=4)
    experts = "model.layers.{}.mlp.experts"
    generator = torch.Generator().manual_seed(1)
    fused = {f"{experts.format(1)}.{name}": torch.randn(shape, generator=generator) * 0.2
             for name, shape in (("gate_up_proj", (8, 256, 128)), ("down_proj", (8, 128, 128)))}
    per_expert = {f"{experts.format(0)}.{e}.{proj}.weight":
                  torch.randn(128, 128, generator=generator) * 0.2
                  for e in (2, 5) for proj in ("gate_proj", "up_proj", "down_proj")}
    asyncio.run(engine.update_weights(list(fused.items()) + list(per_expert.items()), 1))
    params = dict(engine.model.named_parameters())
    for name, tensor in fused.items():
        assert torch.equal(params[name], tensor)
    layer0 = experts.format(0)
    for e in (2, 5):
        gate_up, down = params[f"{layer0}.gate_up_proj"][e], params[f"{layer0}.down_proj"][e]
        assert torch.equal(gate_up[:128], per_expert[f"{layer0}.{e}.gate_proj.weight"])
        assert torch.equal(gate_up[128:], per_expert[f"{layer0}.{e}.up_proj.weight"])
        assert torch.equal(down, per_expert[f"{layer0}.{e}.down_proj.weight"])
    with pytest.raises(ValueError, match="shape"):
        asyncio.run(engine.update_weights([(f"{layer0}.1.up_proj.weight",
                                            torch.zeros(3, 3))], 2))
    hf_model.load_state_dict(dict(engine.model.state_dict()))
    reqs = requests(tokenizer)[:3]
    assert_same_outputs(run_all(engine, reqs), run_all(HFEngine(hf_model, tokenizer), reqs),
                        reqs)
    asyncio.run(engine.close())


# ---- on the GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_fused_moe_matches_reference_in_bf16():
    """Qwen3-30B-A3B's layer shape (H 2048, I 768, 128 experts, top-8) in bf16 at decode
    and prefill sizes, and the tiny shape in float32 (IEEE dot)."""
    check_moe_kernels((2048, 768, 128, 8), (1, 64, 256, 700), "cuda", "bfloat16", 2e-2)
    check_moe_kernels((32, 48, 8, 2), (7, 70), "cuda", "float32", 1e-5)


@pytest.mark.gpu
def test_gpu_moe_graphs_match_eager(tiny_moe, tokenizer):
    """The tiny MoE on CUDA in float32: decode captured in CUDA graphs (align, grouped
    GEMMs and route writes inside) gives the eager run's tokens and routed experts."""
    reqs = requests(tokenizer)
    runs = []
    for graphs in (True, False):
        engine = FastEngine(load_hf_model(str(tiny_moe / "model"), torch.float32, "cuda"),
                            tokenizer, cuda_graphs=graphs, max_num_seqs=16,
                            kv_cache_tokens=4096)
        if graphs:
            engine.runner.capture_graphs()
        runs.append(run_all(engine, reqs))
        asyncio.run(engine.close())
    for captured, eager, (prompt, _) in zip(*runs, reqs, strict=True):
        assert captured.output_ids == eager.output_ids
        assert captured.routed_experts.shape == (len(prompt) + len(eager.output_ids) - 1, 2, 2)
        assert torch.equal(captured.routed_experts, eager.routed_experts)
