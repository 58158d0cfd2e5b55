"""The fast engine on the CPU: blocks, scheduling, forks, preemption, and equality with
the HF engine; its Triton kernels under the Triton interpreter; GPU checks marked gpu."""
from __future__ import annotations

import asyncio
import textwrap
import threading

import pytest
import torch
from transformers import AutoTokenizer

from furlong.engine.base import SamplingParams
from furlong.engine.fast import FastEngine
from furlong.engine.fast.block_manager import BlockManager
from furlong.engine.fast.scheduler import Scheduler
from furlong.engine.fast.sequence import Sequence
from furlong.engine.hf_engine import HFEngine
from furlong.model.loading import load_hf_model

from conftest import run_check


def seq(prompt: list[int], max_new: int = 8) -> Sequence:
    return Sequence(prompt, SamplingParams(max_new_tokens=max_new), seed=0,
                    max_new_tokens=max_new, on_finish=lambda s: None)


# ---- block manager and scheduler ------------------------------------------------------------
def test_fork_shares_blocks_and_copy_on_write_splits_them():
    blocks = BlockManager(num_blocks=10, block_size=4)
    parent, child = seq([1, 2, 3, 4, 5, 6]), seq([1, 2, 3, 4, 5, 6])
    blocks.allocate(parent)
    blocks.fork(parent, child)
    assert parent.block_table == child.block_table and 0 not in parent.block_table
    assert [blocks.ref_counts[b] for b in parent.block_table] == [2, 2]
    for s in (parent, child):  # the first token is sampled; its KV goes to position 6
        s.num_generated = 1
    copy = blocks.reserve(child, new_length=9)   # writes positions 6..8: shared block 1
    assert copy == (parent.block_table[1], child.block_table[1])
    assert child.block_table[0] == parent.block_table[0]   # full prompt block still shared
    assert len(child.block_table) == 3
    assert blocks.reserve(parent, new_length=9) is None    # now the only owner: no copy
    blocks.free(child)
    blocks.free(parent)
    assert blocks.num_free == 9 and all(count == 0 for count in blocks.ref_counts)


def test_blocks_needed_counts_copy_and_growth():
    blocks = BlockManager(num_blocks=10, block_size=4)
    a, b = seq([1, 2, 3, 4, 5]), seq([1, 2, 3, 4, 5])
    blocks.allocate(a)
    blocks.fork(a, b)
    a.num_generated = b.num_generated = 1  # next write at position 5, in the shared block
    assert blocks.blocks_needed(a, 5 + 4) == 1 + 1  # one copy, one new block


def test_scheduler_groups_identical_prompts_and_respects_budget():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_prefill_tokens=10)
    first = [seq([1, 2, 3]) for _ in range(3)]
    other = seq([9, 9, 9, 9, 9, 9, 9, 9])
    for s in (first[0], other, first[1], first[2]):
        scheduler.add(s)
    groups = scheduler.admit()
    assert groups == [first]  # the 8-token prompt would exceed the 10-token budget
    assert scheduler.admit() == [[other]]


def test_scheduler_preempts_newest_when_blocks_run_out():
    scheduler = Scheduler(BlockManager(5, 2), max_num_seqs=4, max_prefill_tokens=100)
    old, new = seq([1, 2, 3]), seq([4, 5, 6])
    scheduler.add(old)
    scheduler.add(new)
    scheduler.admit()
    for s in (old, new):
        s.num_generated = 1
    preempted = []
    scheduler.reserve_window(4, preempted.append)
    assert preempted == [new] and scheduler.running == [old]
    assert scheduler.waiting[0] is new and new.block_table == []


# ---- the engine against the HF engine ------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


def prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def requests(tokenizer) -> list[tuple[list[int], SamplingParams]]:
    prompts = [prompt_ids(tokenizer, p) for p in ("35+50=", "1+2=", "99+99=", "12+345=")]
    prompts.append(prompts[0][:5])  # a short, odd prompt
    # (temperature, seed, top_k, top_p): batches mix filtered and unfiltered rows
    settings = ((0.0, 1, -1, 1.0), (1.0, 7, -1, 1.0), (1.0, 8, 3, 1.0), (0.7, 9, -1, 0.8),
                (1.3, 10, 5, 0.9))
    return [(p, SamplingParams(temperature=t, max_new_tokens=10, sampling_seed=s, top_k=k,
                               top_p=top_p, ignore_eos=s == 10))
            for p in prompts for t, s, k, top_p in settings]


def run_all(engine, reqs):
    async def go():
        return await asyncio.gather(*(engine.generate(p, sp) for p, sp in reqs))
    return asyncio.run(go())


@pytest.fixture(scope="module")
def hf_outputs(tiny, tokenizer):
    return run_all(HFEngine(load_hf_model(str(tiny / "model")), tokenizer), requests(tokenizer))


@pytest.mark.parametrize("kv_tokens,block_size,window", [(4096, 4, 3), (64, 4, 5), (4096, 16, 1)])
def test_fast_engine_matches_hf_engine(tiny, tokenizer, hf_outputs, kv_tokens, block_size, window):
    """Same tokens, log-probs and finish reasons as the simple engine, with forks of
    identical prompts, copy-on-write, and (64-token cache) preemption."""
    engine = FastEngine(load_hf_model(str(tiny / "model")), tokenizer, kv_cache_tokens=kv_tokens,
                        block_size=block_size, window=window, max_num_seqs=16)
    outputs = run_all(engine, requests(tokenizer))
    for fast, simple in zip(outputs, hf_outputs, strict=True):
        assert fast.output_ids == simple.output_ids
        assert fast.finish_reason == simple.finish_reason
        assert fast.text == simple.text
        torch.testing.assert_close(torch.tensor(fast.output_log_probs),
                                   torch.tensor(simple.output_log_probs), atol=1e-5, rtol=0)
    assert (engine.scheduler.num_preempted > 0) == (kv_tokens == 64)
    asyncio.run(engine.close())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_whose_loop_died_still_closes(tiny, tokenizer):
    """A loop thread killed by an error its failure handling raised again: the request it
    held and any later one fail naming the death, and waiting for an abort (what close()
    does) ends, so a failed run shuts down instead of hanging."""
    engine = FastEngine(load_hf_model(str(tiny / "model")), tokenizer, kv_cache_tokens=256,
                        block_size=4)

    def broken(*_):
        raise RuntimeError("device lost")

    engine._step = engine._fail_everything = broken

    async def request_until_the_loop_dies():
        prompt, params = prompt_ids(tokenizer, "1+2="), SamplingParams(max_new_tokens=4)
        request = asyncio.ensure_future(engine.generate(prompt, params))
        await asyncio.to_thread(engine._thread.join, 60)
        with pytest.raises(RuntimeError, match="loop died.*device lost"):
            await asyncio.wait_for(request, 60)  # a hang guard: it has its answer already
        with pytest.raises(RuntimeError, match="loop died"):
            await engine.generate(prompt, params)

    asyncio.run(request_until_the_loop_dies())
    assert not engine._thread.is_alive()
    engine._abort_requested = True  # what abort_all() sets before it waits
    waiter = threading.Thread(target=engine._wait_abort, daemon=True)
    waiter.start()
    waiter.join(60)  # a hang guard, not a timing assertion: it ends at once
    assert not waiter.is_alive()
    asyncio.run(engine.close())


def test_scoring_is_refused_while_released_and_nothing_waits_on_a_closed_engine(tiny,
                                                                                 tokenizer):
    """A score request while the engine's memory is released is refused (it would run on
    the CPU and hold the engine), and after close() requests fail at once."""
    engine = FastEngine(load_hf_model(str(tiny / "model")), tokenizer, kv_cache_tokens=256,
                        block_size=4)
    prompt = prompt_ids(tokenizer, "1+2=")

    async def released_then_closed():
        await engine.release_memory()
        with pytest.raises(ValueError, match="memory is released"):
            await asyncio.wait_for(engine.score(prompt), 60)  # (hang guards)
        await engine.resume_memory()
        assert len(await asyncio.wait_for(engine.score(prompt), 60)) == len(prompt) - 1
        await engine.close()
        await asyncio.to_thread(engine._thread.join, 60)
        with pytest.raises(RuntimeError, match="the fast engine is closed"):
            await engine.score(prompt)
        with pytest.raises(RuntimeError, match="the fast engine is closed"):
            await engine.generate(prompt, SamplingParams(max_new_tokens=2))
    asyncio.run(released_then_closed())
    assert not engine._thread.is_alive()


def test_fast_engine_limits_and_stops(tiny, tokenizer):
    """Context limit, stop ids (more than the device table's first width), stop strings.
    Abort, weights and memory: test_engine.py and test_serve.py run those on both engines."""
    engine = FastEngine(load_hf_model(str(tiny / "model")), tokenizer, kv_cache_tokens=2048,
                        block_size=4, window=4, max_context_len=24)
    prompt = prompt_ids(tokenizer, "35+50=")
    run = lambda **kw: run_all(engine, [(prompt, SamplingParams(**kw))])[0]  # noqa: E731

    out = run(temperature=1.0, max_new_tokens=6, ignore_eos=True, sampling_seed=3)
    assert len(out.output_ids) == 6 and out.finish_reason == "length"
    out = run(temperature=1.0, max_new_tokens=100, ignore_eos=True, sampling_seed=3)
    assert len(out.output_ids) == 24 - len(prompt) and out.finish_reason == "length"
    out = run(temperature=1.0, max_new_tokens=100, ignore_eos=True, sampling_seed=3,
              stop_token_ids=(out.output_ids[2],))
    assert out.finish_reason == "stop" and len(out.output_ids) <= 3
    full = run(temperature=1.0, max_new_tokens=6, ignore_eos=True, sampling_seed=3)
    absent = [t for t in range(tokenizer.vocab_size) if t not in full.output_ids][:10]
    out = run(temperature=1.0, max_new_tokens=100, ignore_eos=True, sampling_seed=3,
              stop_token_ids=(*absent, full.output_ids[2]))  # the 11th id is the one hit
    assert out.finish_reason == "stop" and out.output_ids[-1] == full.output_ids[2]
    assert len(out.output_ids) <= 3
    text = tokenizer.decode(run(temperature=1.0, max_new_tokens=8, ignore_eos=True,
                                sampling_seed=3).output_ids)
    stop = text[2:4]
    out = run(temperature=1.0, max_new_tokens=8, ignore_eos=True, sampling_seed=3, stop=(stop,))
    assert out.finish_reason == "stop" and stop not in out.text

    asyncio.run(engine.close())


# ---- kernels under the Triton interpreter -----------------------------------------------------
KERNEL_CHECK = textwrap.dedent("""
    import torch
    TOLERANCE = 1e-5  # the GPU check raises it: tl.dot runs float32 as tf32 there
    from furlong.engine.fast import kernels as K
    from furlong.engine.sampling import sample_tokens
    torch.manual_seed(0)
    B, V = 7, 3000
    logits = torch.randn(B, V) * 4
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.5, 2.0])
    seeds, steps = torch.randint(0, 2**62, (B,)), torch.randint(0, 5000, (B,))
    tokens, log_probs = K.fused_sample(logits, temperature, seeds, steps)
    ref_tokens, ref_log_probs = sample_tokens(logits, temperature, torch.full((B,), -1),
                                              torch.ones(B), seeds, steps)
    assert torch.equal(tokens, ref_tokens), (tokens, ref_tokens)
    assert (log_probs - ref_log_probs).abs().max() < 1e-5
    for heads, kv_heads, splits in ((4, 2, 1), (8, 8, 3), (6, 1, 2)):
        kc, vc = torch.randn(30, 8, kv_heads, 32), torch.randn(30, 8, kv_heads, 32)
        tables = torch.randint(1, 30, (3, 16), dtype=torch.int32)
        context = torch.tensor([1, 37, 128], dtype=torch.int32)
        query = torch.randn(3, heads, 32)
        out = K.paged_decode_attention(query, kc, vc, tables, context, 0.2, splits)
        ref = K.paged_decode_attention_reference(query, kc, vc, tables, context, 0.2)
        assert (out - ref).abs().max() < TOLERANCE, (heads, kv_heads, splits)
        for tile in (8, 32):
            out = K.paged_decode_attention(query, kc, vc, tables, context, 0.2, splits, tile)
            assert (out - ref).abs().max() < TOLERANCE, (heads, kv_heads, splits, tile)

    from furlong.engine.fast import fused as F
    dtype = torch.get_default_dtype()
    x, residual, weight = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    for res in (None, residual):
        out, total = F.add_rms_norm(x, res, weight, 1e-6)
        expected_total = x if res is None else x + res
        assert torch.allclose(total, expected_total)
        assert torch.allclose(out, F.rms_norm_reference(expected_total, weight, 1e-6), atol=1e-5)
    gate_up = torch.randn(5, 2 * 70)
    assert torch.allclose(F.silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :70])
                          * gate_up[:, 70:], atol=1e-6)
    for heads, kv_heads, norm in ((4, 2, True), (6, 3, True), (4, 4, False)):
        dim, tokens = 16, 5
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
        positions = torch.tensor([0, 3, 7, 1, 2])
        cos, sin = torch.randn(10, dim), torch.randn(10, dim)
        weights = (torch.randn(dim), torch.randn(dim)) if norm else (None, None)
        slots = torch.tensor([3, 9, 4, 0, 11])
        results = []
        for interpret in (True, False):
            caches = (torch.zeros(4, 4, kv_heads, dim), torch.zeros(4, 4, kv_heads, dim))
            F.use_triton = (lambda t: True) if interpret else (lambda t: False)
            q, k, v = F.qk_norm_rope_store(qkv, positions, cos, sin, *weights, 1e-6, heads,
                                           kv_heads, *caches, slots, return_kv=True)
            results.append((q, k, v, *caches))
        for got, want in zip(*results):
            assert torch.allclose(got, want, atol=1e-5), (heads, kv_heads, norm)
    print("kernels ok")
""")


def test_triton_kernels_match_references_in_interpreter():
    pytest.importorskip("triton")
    run_check(KERNEL_CHECK, "kernels ok", {"TRITON_INTERPRET": "1"})


# ---- on the GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_kernels_match_references():
    check = KERNEL_CHECK.replace("TOLERANCE = 1e-5", "TOLERANCE = 5e-3").replace(
        "torch.manual_seed(0)", "torch.manual_seed(0); torch.set_default_device('cuda')")
    check = check.replace("for tile in (8, 32)", "for tile in (16, 32)").replace(
        "torch.randn(30, 8, kv_heads, 32)", "torch.randn(30, 16, kv_heads, 32)")
    run_check(check, "kernels ok", timeout=600)


@pytest.mark.gpu
def test_gpu_graphs_match_eager(tiny, tokenizer):
    outputs = []
    for graphs in (True, False):
        engine = FastEngine(load_hf_model(str(tiny / "model"), torch.float32, "cuda"), tokenizer,
                            cuda_graphs=graphs, max_num_seqs=32, kv_cache_tokens=8192)
        outputs.append([o.output_ids for o in run_all(engine, requests(tokenizer))])
        asyncio.run(engine.close())
    assert outputs[0] == outputs[1]


@pytest.mark.gpu
def test_gpu_scoring_equals_an_hf_forward_beside_generation(tiny, tokenizer):
    """`score` (a teacher server's input_token_logprobs) on the GPU, between the engine's
    CUDA-graph steps: the log-softmax of a plain HF forward."""
    model = load_hf_model(str(tiny / "model"), torch.float32, "cuda")
    engine = FastEngine(model, tokenizer, max_num_seqs=32, kv_cache_tokens=8192)
    ids = prompt_ids(tokenizer, "12+34=") + prompt_ids(tokenizer, "56+78=")

    async def generate_and_score():
        outputs = asyncio.gather(*(engine.generate(prompt, params)
                                   for prompt, params in requests(tokenizer)))
        scores = await engine.score(ids)
        await outputs
        return scores
    try:
        scores = asyncio.run(generate_and_score())
    finally:
        asyncio.run(engine.close())
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda")).logits[0, :-1].float()
    expected = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:], device="cuda")[:, None])
    torch.testing.assert_close(torch.tensor(scores), expected[:, 0].cpu(), rtol=0, atol=1e-4)
