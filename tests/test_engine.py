"""The engines on the tiny Qwen3 model (float32, CPU): the SGLang request semantics they
promise. Tests taking the `engine` fixture run on HFEngine and on FastEngine (on the
CPU its torch paths), so both are held to the same independent references.

The tiny model is randomly initialised and nearly uniform, so every test here runs on a
copy whose matrices get seeded noise (`sharpened_state`): its greedy continuations vary
from prompt to prompt and reach EOS at different steps, which exercises left padding,
per-row stopping and the stop rules. Expected values come from HF `generate`, from
`tokenizer.decode` and from the trainer's `CausalLMPolicy`, never from the engine itself.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import slowed
from transformers import AutoTokenizer

from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.fast import FastEngine
from furlong.engine.hf_engine import HFEngine
from furlong.engine.sampling import sample_tokens
from furlong.model.loading import load_hf_model, load_named_tensors
from furlong.sample import Sample
from furlong.tiny import sharpened_state as tiny_sharpened_state
from furlong.train.batch import TrainBatch, pack, split_tokens
from furlong.train.policy import CausalLMPolicy

# Mixed lengths (12 to 16 prompt tokens); greedy from "1+2=" and "5" reaches EOS early.
PROMPTS = ["1+2=", "37+48=", "99+11=12", "5", "10+10=", "42+17=", "88+99="]
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture(scope="module")
def sharpened_state(tiny) -> dict[str, torch.Tensor]:
    return tiny_sharpened_state(tiny / "model")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [render(tokenizer, text) for text in PROMPTS]


def render(tokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def sharpened_model(tiny, state, packed: bool = False):
    model = load_hf_model(str(tiny / "model"), packed=packed)
    load_named_tensors(model, state.items())
    return model


@pytest.fixture(params=["hf", "fast"])
def engine(request, tiny, tokenizer, sharpened_state):
    model = sharpened_model(tiny, sharpened_state)
    if request.param == "hf":
        yield HFEngine(model, tokenizer)
        return
    # Small blocks and an odd window: block boundaries and window ends fall mid-response.
    engine = FastEngine(model, tokenizer, kv_cache_tokens=4096, block_size=4, window=3,
                        max_num_seqs=16)
    yield engine
    asyncio.run(engine.close())


def run(engine: HFEngine, requests: list[tuple[list[int], SamplingParams]]
        ) -> list[GenerateOutput]:
    """Submit all requests concurrently, in order; outputs in the same order."""
    async def main():
        return await asyncio.gather(*(engine.generate(ids, params) for ids, params in requests))
    return asyncio.run(main())


def greedy(max_new_tokens: int = 20, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **extra)


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF generate, one prompt at a time (no padding), cut after the first EOS."""
    output = model.generate(torch.tensor([ids], device=model.device),
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                      device=model.device),
                            do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return output[0, len(ids):].tolist()


# ---- greedy and log-probs against HF and the trainer ---------------------------------------

def test_greedy_batch_equals_hf_generate(engine, prompt_ids):
    """Left padding, position ids and the KV cache of a mixed-length batch change no token."""
    outputs = run(engine, [(ids, greedy(20)) for ids in prompt_ids])
    expected = [hf_greedy(engine.model, ids, 20) for ids in prompt_ids]
    for ids, output, reference in zip(prompt_ids, outputs, expected, strict=True):
        assert output.output_ids == reference
        assert output.finish_reason == ("stop" if reference[-1] == EOS else "length")
        assert output.prompt_tokens == len(ids)
    # The fixture is meant to be interesting: some rows stop early, outputs are varied.
    assert {o.finish_reason for o in outputs} == {"stop", "length"}
    assert len({tuple(o.output_ids) for o in outputs}) == len(outputs)


@pytest.mark.gpu
def test_bf16_fast_engine_greedy_is_float32_greedy_up_to_bf16_rounding(
        tiny, tokenizer, sharpened_state, prompt_ids):
    """bf16 on the GPU (kernels, graphs), judged against float32, not against HF's bf16.

    HF `generate` in bf16 is no reference for greedy tokens: it rounds logits to bf16
    (the engine keeps the float32 accumulator, furlong/model/logits.py), and where two tokens
    are within bf16 rounding of each other either may win. On an H200 the engine and HF
    parted at 25% of the positions, each time at a float32 near-tie (margin 0.014) that
    the engine resolved as float32 does (bench/greedy_divergence.py). So: teacher-forced
    on the engine's own tokens, every token it chose is within HF bf16's own logit error
    of the float32 maximum (nearly always the maximum itself), and its log-probs are
    no further from float32 than HF's bf16 forward of the same tokens.
    """
    model = sharpened_model(tiny, sharpened_state).to("cuda", torch.bfloat16)
    reference = sharpened_model(tiny, sharpened_state).to("cuda")  # float32
    engine = FastEngine(model, tokenizer, kv_cache_tokens=8192, max_num_seqs=16)
    outputs = run(engine, [(ids, greedy(40)) for ids in prompt_ids])
    asyncio.run(engine.close())
    gaps, rounding, engine_error, hf_error = [], [], [], []
    with torch.no_grad():
        for ids, output in zip(prompt_ids, outputs, strict=True):
            full = torch.tensor([ids + output.output_ids], device="cuda")
            rows = slice(len(ids) - 1, full.shape[1] - 1)  # positions predicting the output
            float32 = reference(full).logits[0, rows].float()  # (R, V)
            bf16 = model(full).logits[0, rows].float()
            chosen = torch.tensor(output.output_ids, device="cuda")[:, None]  # (R, 1)
            gaps.append(float32.max(-1).values - float32.gather(1, chosen)[:, 0])
            rounding.append((bf16 - float32).abs().max(-1).values)
            exact = float32.log_softmax(-1).gather(1, chosen)[:, 0]
            engine_error.append((torch.tensor(output.output_log_probs, device="cuda")
                                 - exact).abs())
            hf_error.append((bf16.log_softmax(-1).gather(1, chosen)[:, 0] - exact).abs())
    gaps, rounding = torch.cat(gaps), torch.cat(rounding)
    assert len(gaps) > 100
    assert (gaps <= rounding).all(), (gaps.max(), rounding.min())
    assert (gaps == 0).float().mean() >= 0.95
    assert torch.cat(engine_error).mean() <= 1.5 * torch.cat(hf_error).mean()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, -1, 1.0), (0.7, 5, 0.9)])
def test_log_probs_agree_with_the_trainer(tiny, tokenizer, sharpened_state, prompt_ids,
                                          temperature, top_k, top_p):
    """The engine's log-probs are what the trainer recomputes at logits / T (full vocab)."""
    engine = HFEngine(sharpened_model(tiny, sharpened_state), tokenizer)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                             max_new_tokens=16, sampling_seed=100 + i)
              for i in range(len(prompt_ids))]
    outputs = run(engine, list(zip(prompt_ids, params, strict=True)))
    samples = [Sample(tokens=ids + o.output_ids, response_length=len(o.output_ids), reward=0.0)
               for ids, o in zip(prompt_ids, outputs, strict=True)]
    assert sum(s.response_length for s in samples) > 3 * len(samples)

    policy = CausalLMPolicy(sharpened_model(tiny, sharpened_state, packed=True))
    micro = pack(TrainBatch.from_samples(samples, None), list(range(len(samples))), "cpu")
    with torch.no_grad():
        log_probs, _ = policy(micro, temperature=temperature)
    engine_log_probs = torch.tensor([lp for o in outputs for lp in o.output_log_probs])
    difference = (engine_log_probs - log_probs).abs()
    assert difference.mean().item() < 1e-4
    assert difference.max().item() < 1e-3
    for output, trainer in zip(outputs, split_tokens(log_probs, micro), strict=True):
        assert len(output.output_log_probs) == len(trainer) == len(output.output_ids)


# ---- seeds --------------------------------------------------------------------------------

def test_a_seeded_request_is_reproducible_whatever_else_is_in_the_batch(engine, prompt_ids):
    target = (prompt_ids[1], SamplingParams(temperature=1.0, max_new_tokens=16,
                                            sampling_seed=1234, ignore_eos=True))
    alone = run(engine, [target])[0]
    others = [(ids, SamplingParams(temperature=1.0, max_new_tokens=8, sampling_seed=7 + i))
              for i, ids in enumerate(prompt_ids)]
    first = run(engine, [target] + others)[0]
    last = run(engine, others[::-1] + [target])[-1]
    assert first.output_ids == alone.output_ids == last.output_ids
    torch.testing.assert_close(torch.tensor(first.output_log_probs),
                               torch.tensor(alone.output_log_probs), rtol=0, atol=1e-5)
    # The seed matters: other seeds give other responses.
    variants = run(engine, [(target[0], SamplingParams(temperature=1.0, max_new_tokens=16,
                                                       sampling_seed=s, ignore_eos=True))
                            for s in range(5)])
    assert len({tuple(v.output_ids) for v in variants} | {tuple(alone.output_ids)}) > 3


def test_each_token_is_the_documented_draw_for_its_seed_and_response_position(engine,
                                                                              prompt_ids):
    """Token t is sample_tokens(logits_t, ..., seed, step=t): the contract that lets another
    engine (or a restart) reproduce a response. Guards e.g. passing the same step every time."""
    ids = prompt_ids[4]
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95, max_new_tokens=16,
                            sampling_seed=99, ignore_eos=True)
    output = run(engine, [(ids, params)])[0]
    context = torch.tensor([ids + output.output_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=context).logits[0, len(ids) - 1:-1]  # (16, V)
    num = len(output.output_ids)
    tokens, log_probs = sample_tokens(logits, torch.full((num,), 0.8), torch.full((num,), 6),
                                      torch.full((num,), 0.95), torch.full((num,), 99),
                                      torch.arange(num))
    assert tokens.tolist() == output.output_ids
    torch.testing.assert_close(log_probs, torch.tensor(output.output_log_probs), rtol=0,
                               atol=1e-4)


def test_requests_without_a_seed_follow_the_engine_default_seed(tiny, tokenizer,
                                                                sharpened_state, prompt_ids):
    def outputs(default_seed: int) -> list[list[int]]:
        engine = HFEngine(sharpened_model(tiny, sharpened_state), tokenizer,
                          default_seed=default_seed)
        params = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
        return [o.output_ids for o in run(engine, [(ids, params) for ids in prompt_ids])]
    assert outputs(5) == outputs(5)
    assert outputs(5) != outputs(6)


# ---- stop rules -----------------------------------------------------------------------------

def test_max_new_tokens_ends_with_length(engine, prompt_ids):
    outputs = run(engine, [(ids, greedy(n, ignore_eos=True))
                           for ids, n in zip(prompt_ids, [1, 3, 7, 0], strict=False)])
    assert [len(o.output_ids) for o in outputs] == [1, 3, 7, 0]
    assert [len(o.output_log_probs) for o in outputs] == [1, 3, 7, 0]
    assert {o.finish_reason for o in outputs} == {"length"}


def test_max_context_bounds_prompt_plus_response(tiny, tokenizer, sharpened_state, prompt_ids):
    engine = HFEngine(sharpened_model(tiny, sharpened_state), tokenizer, max_context_len=20)
    outputs = run(engine, [(ids, greedy(100, ignore_eos=True)) for ids in prompt_ids])
    for ids, output in zip(prompt_ids, outputs, strict=True):
        assert len(ids) + len(output.output_ids) == 20
        assert output.finish_reason == "length"
    full = run(engine, [(list(range(4, 24)), greedy(5))])[0]  # prompt fills the context
    assert (full.output_ids, full.finish_reason) == ([], "length")


def test_default_max_context_is_the_models_max_position_embeddings(engine, prompt_ids):
    output = run(engine, [(prompt_ids[0], greedy(500, ignore_eos=True))])[0]
    assert len(prompt_ids[0]) + len(output.output_ids) == 128
    assert output.finish_reason == "length"


def test_eos_stops_is_kept_in_output_ids_and_left_out_of_the_text(engine, tokenizer, prompt_ids):
    """Regression: the text used to end with '<|im_end|>' (skip_special_tokens is off by
    default); SGLang leaves the matched stop token out of the text unless no_stop_trim."""
    ids = prompt_ids[0]
    output = run(engine, [(ids, greedy(20, skip_special_tokens=False))])[0]
    reference = hf_greedy(engine.model, ids, 20)
    assert EOS in reference[:-1] or reference[-1] == EOS, "fixture: greedy should reach EOS"
    assert output.output_ids == reference[:reference.index(EOS) + 1]
    assert output.finish_reason == "stop"
    assert output.text == tokenizer.decode(output.output_ids[:-1])
    assert "<|im_end|>" not in output.text
    kept = run(engine, [(ids, greedy(20, skip_special_tokens=False, no_stop_trim=True))])[0]
    assert kept.output_ids == output.output_ids
    assert kept.text == tokenizer.decode(output.output_ids)


def test_ignore_eos_generates_through_eos(engine, prompt_ids):
    stopped = run(engine, [(prompt_ids[0], greedy(20))])[0]
    through = run(engine, [(prompt_ids[0], greedy(20, ignore_eos=True))])[0]
    assert stopped.finish_reason == "stop" and len(stopped.output_ids) < 20
    assert through.output_ids[:len(stopped.output_ids)] == stopped.output_ids
    assert len(through.output_ids) == 20 and through.finish_reason == "length"


def test_stop_token_ids(engine, tokenizer, prompt_ids):
    """Ends at the first listed id, kept in output_ids; the text leaves it out (SGLang) unless
    no_stop_trim. Regression: the text used to include the stop token."""
    ids = prompt_ids[5]
    reference = run(engine, [(ids, greedy(20, ignore_eos=True))])[0].output_ids
    position = next(i for i in range(2, 20) if reference[i] not in reference[:i])
    stop_id = reference[position]
    output = run(engine, [(ids, greedy(20, ignore_eos=True, stop_token_ids=(stop_id,)))])[0]
    assert output.output_ids == reference[:position + 1]
    assert output.finish_reason == "stop"
    assert output.text == tokenizer.decode(reference[:position])
    kept = run(engine, [(ids, greedy(20, ignore_eos=True, stop_token_ids=(stop_id,),
                                     no_stop_trim=True))])[0]
    assert kept.text == tokenizer.decode(reference[:position + 1])


def test_stop_strings_end_the_request_and_are_trimmed_from_the_text(engine, tokenizer,
                                                                    prompt_ids):
    ids = prompt_ids[5]  # greedy: \boxed{ x5, "2", "}", "+", "2", "2", "system", ...
    reference = run(engine, [(ids, greedy(20, ignore_eos=True))])[0].output_ids
    stop = tokenizer.decode(reference[6:8])  # spans two tokens
    end = next(n for n in range(1, 21) if stop in tokenizer.decode(reference[:n]))
    assert end == 8, "fixture: the stop string should first appear at tokens 6..7"
    full_text = tokenizer.decode(reference[:end])

    output = run(engine, [(ids, greedy(20, ignore_eos=True, stop=("never", stop)))])[0]
    assert output.output_ids == reference[:end]
    assert output.finish_reason == "stop"
    assert output.text == full_text[:full_text.find(stop)]
    assert len(output.output_log_probs) == end
    kept = run(engine, [(ids, greedy(20, ignore_eos=True, stop=(stop,), no_stop_trim=True))])[0]
    assert kept.output_ids == reference[:end] and kept.text == full_text


@pytest.mark.parametrize("limit", [8, 9, 10])
def test_a_stop_string_wins_over_a_length_limit_reached_in_the_same_step_window(
        engine, tokenizer, prompt_ids, limit):
    """Regression (fast engine): when the device ended a sequence by its token limit in
    the decode window where a stop string completed, the stop string was never searched."""
    ids = prompt_ids[5]
    reference = run(engine, [(ids, greedy(20, ignore_eos=True))])[0].output_ids
    stop = tokenizer.decode(reference[6:8])  # first complete at 8 tokens (test above)
    output = run(engine, [(ids, greedy(limit, ignore_eos=True, stop=(stop,)))])[0]
    assert (output.finish_reason, output.output_ids) == ("stop", reference[:8])


def test_a_stop_string_that_skip_special_tokens_hides_does_not_cut_the_text(engine, tokenizer,
                                                                           prompt_ids):
    """Regression: trimming at text.rfind(stop) == -1 dropped the last character."""
    ids = prompt_ids[0]
    params = greedy(20, ignore_eos=True, stop=("<|im_end|>",), skip_special_tokens=True)
    output = run(engine, [(ids, params)])[0]
    assert output.output_ids[-1] == EOS and output.finish_reason == "stop"
    assert output.text == tokenizer.decode(output.output_ids, skip_special_tokens=True)
    assert output.text.endswith("3")


def test_skip_special_tokens_changes_the_text_only(engine, tokenizer, prompt_ids):
    ids = prompt_ids[6]  # greedy passes EOS three times within 12 tokens under ignore_eos
    shown, hidden = run(engine, [
        (ids, SamplingParams(temperature=0.9, max_new_tokens=12, ignore_eos=True,
                             sampling_seed=3, skip_special_tokens=skip))
        for skip in (False, True)])
    assert shown.output_ids == hidden.output_ids
    torch.testing.assert_close(torch.tensor(shown.output_log_probs),
                               torch.tensor(hidden.output_log_probs), rtol=0, atol=1e-5)
    assert shown.finish_reason == hidden.finish_reason
    assert shown.text == tokenizer.decode(shown.output_ids, skip_special_tokens=False)
    assert hidden.text == tokenizer.decode(shown.output_ids, skip_special_tokens=True)
    assert "<|im_end|>" in shown.text and "<|im_end|>" not in hidden.text


# ---- abort, weights, concurrency ------------------------------------------------------------

def test_abort_all_finishes_running_and_queued_requests_with_abort(engine, prompt_ids):
    steps = []
    decoding = threading.Event()

    def count_step():
        steps.append(1)
        if len(steps) >= 3:
            decoding.set()

    params = greedy(100, ignore_eos=True)

    async def main():
        running = [asyncio.ensure_future(engine.generate(ids, params)) for ids in prompt_ids[:2]]
        assert await asyncio.to_thread(decoding.wait, 300)
        queued = asyncio.ensure_future(engine.generate(prompt_ids[2], params))
        await asyncio.sleep(0)  # the queued request reaches the engine's pending list
        await engine.abort_all()
        results = await asyncio.wait_for(asyncio.gather(*running, queued), 300)
        after = await engine.generate(prompt_ids[3], greedy(3, ignore_eos=True))
        return results, after

    with slowed(engine, count_step):
        (first, second, queued), after = asyncio.run(main())
    for output in (first, second):
        assert output.finish_reason == "abort"
        assert 0 < len(output.output_ids) < 100
        assert len(output.output_log_probs) == len(output.output_ids)
    # Queued: the HF engine never ran it; the fast engine may have admitted it meanwhile.
    assert queued.finish_reason == "abort" and len(queued.output_ids) < 100
    assert after.finish_reason == "length" and len(after.output_ids) == 3


def engine_idle(engine) -> bool:
    """No request queued or running: the fast engine's scheduler is empty; the HF
    engine has nothing pending and no batch in its decode loop (which holds the lock)."""
    if isinstance(engine, FastEngine):
        return engine.scheduler.idle
    return not engine._pending and not engine._model_lock.locked()


def test_cancelling_a_request_aborts_it_alone(engine, prompt_ids):
    """Cancelling `generate` aborts that request: the others finish whole, and the
    engine stops working on it (it goes idle once the others are done)."""
    steps = []
    long = greedy(10_000, ignore_eos=True)

    async def main():
        kept = asyncio.ensure_future(engine.generate(prompt_ids[0], greedy(40, ignore_eos=True)))
        dropped = asyncio.ensure_future(engine.generate(prompt_ids[1], long))
        while len(steps) < 3:
            await asyncio.sleep(0.005)
        dropped.cancel()
        output = await asyncio.wait_for(kept, 300)
        # The engine goes idle: it would keep stepping if it still ran the dropped request.
        deadline = time.monotonic() + 300
        while not engine_idle(engine):
            assert time.monotonic() < deadline, "the engine still works on the dropped request"
            await asyncio.sleep(0.01)
        return output, dropped

    with slowed(engine, lambda: steps.append(1)):
        output, dropped = asyncio.run(main())
    assert dropped.cancelled()
    assert output.finish_reason == "length" and len(output.output_ids) == 40
    assert output.output_ids == run(engine, [(prompt_ids[0], greedy(40, ignore_eos=True))])[0] \
        .output_ids  # unaffected by its batch-mate's abort
    if isinstance(engine, FastEngine):
        assert engine.scheduler.idle
        assert engine.scheduler.blocks.num_free == len(engine.scheduler.blocks.ref_counts) - 1


def test_update_weights_by_hf_name_changes_outputs_and_the_version(tiny, engine, prompt_ids):
    before = run(engine, [(ids, greedy(12)) for ids in prompt_ids])
    assert {o.weight_version for o in before} == {0}
    original = load_hf_model(str(tiny / "model"))
    named = ((name, param.detach().double()) for name, param in original.named_parameters())
    asyncio.run(engine.update_weights(named, version=7))  # a generator, other dtype
    after = run(engine, [(ids, greedy(12)) for ids in prompt_ids])
    assert {o.weight_version for o in after} == {7}
    assert [o.output_ids for o in after] == [hf_greedy(original, ids, 12) for ids in prompt_ids]
    assert [o.output_ids for o in after] != [o.output_ids for o in before]
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())


def test_load_named_tensors_rejects_unknown_names_and_wrong_shapes(tiny):
    model = load_hf_model(str(tiny / "model"))
    norm = model.get_parameter("model.norm.weight").detach().clone()
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        load_named_tensors(model, [("model.layers.9.mlp.up_proj.weight", torch.zeros(3))])
    # Regression: copy_ broadcast a (1,) tensor over the whole weight without a word.
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(1,\).*\(128,\)"):
        load_named_tensors(model, [("model.norm.weight", torch.zeros(1))])
    assert torch.equal(model.get_parameter("model.norm.weight"), norm)
    assert load_named_tensors(model, [("model.norm.weight", norm * 2)]) == 1
    assert torch.equal(model.get_parameter("model.norm.weight"), norm * 2)


def test_concurrent_requests_are_batched_and_all_resolve(tiny, tokenizer, sharpened_state):
    engine = HFEngine(sharpened_model(tiny, sharpened_state), tokenizer, max_batch_size=5)
    prefill_sizes = []

    def record(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefill_sizes.append(kwargs["input_ids"].shape[0])

    requests = [(render(tokenizer, f"{a}+{a + 3}="),
                 SamplingParams(temperature=1.0, max_new_tokens=6, sampling_seed=a))
                for a in range(10, 33)]  # 23 requests
    handle = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        outputs = run(engine, requests)
    finally:
        handle.remove()
    assert len(outputs) == len(requests)
    assert all(o.finish_reason in ("stop", "length") and o.output_ids for o in outputs)
    assert sum(prefill_sizes) == len(requests)
    assert max(prefill_sizes) == 5 and len(prefill_sizes) == 5  # 5 + 5 + 5 + 5 + 3
    # Each output is what its request gives alone.
    alone = [run(engine, [request])[0] for request in requests[::4]]
    assert [o.output_ids for o in alone] == [o.output_ids for o in outputs[::4]]
