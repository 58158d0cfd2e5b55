"""Routing replay on the tiny MoE (CPU): the replayed router against HF's, routes from the
engines (in process and over HTTP) against the trainer's, the flags, and what replay does
to train/train_rollout_logprob_abs_diff when the engine and the trainer disagree.

The disagreement is made as in production: the engine computes in bfloat16, the trainer
in float32, so near-tied routers pick different experts (about 1% of routes here).
"""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from conftest import train_argv
from test_serve import ServerThread
from transformers import AutoTokenizer
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from furlong.config import ConfigError, load_config
from furlong.config.model_check import check_routing_replay, read_hf_config
from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.client import HTTPEngine, decode_routed_experts
from furlong.engine.http_error import EngineHTTPError
from furlong.engine.hf_engine import HFEngine
from furlong.engine.router import EngineRouter, RouterOptions
from furlong.engine.server.request_fields import encode_routed_experts
from furlong.model.loading import load_hf_model
from furlong.model.moe import RoutingReplay, replayed_routing
from furlong.rollout.context import HookArgs
from furlong.rollout.generate import generate
from furlong.sample import Sample
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.batch import TrainBatch, pack, packed_routes, split_routes
from furlong.train.policy import CausalLMPolicy
from furlong.train.rl_step import RLStep

PROMPTS = [[1, 5, 6, 7, 8, 9, 3], [3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15], [18, 19, 20]]


def _params(seed: int, max_new_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, sampling_seed=seed)


def _generate_all(engine, prompts, **kwargs):
    async def main():
        return await asyncio.gather(*[engine.generate(ids, _params(i), **kwargs)
                                      for i, ids in enumerate(prompts)])
    return asyncio.run(main())


def _batch(prompts, outputs) -> TrainBatch:
    return TrainBatch(tokens=[torch.tensor(p + o.output_ids) for p, o in zip(prompts, outputs)],
                      response_lengths=[len(o.output_ids) for o in outputs],
                      loss_masks=[torch.ones(len(o.output_ids)) for o in outputs],
                      rewards=torch.zeros(len(outputs)),
                      routed_experts=[o.routed_experts for o in outputs])


def _recorded(policy: CausalLMPolicy, micro) -> torch.Tensor:
    policy.routing_replay.record()
    with torch.no_grad():
        policy(micro)
    return policy.routing_replay.take_recorded()


# ---- the replayed router ------------------------------------------------------------------

@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_replaying_the_routers_own_choice_is_hfs_router(norm_topk_prob):
    config = Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=3,
                            norm_topk_prob=norm_topk_prob)
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(11, 16, generator=torch.Generator().manual_seed(1))
    logits, scores, experts = router(hidden)
    weights, replayed = replayed_routing(logits, experts.int(), experts, norm_topk_prob)
    torch.testing.assert_close(weights, scores, rtol=0, atol=1e-7)
    assert torch.equal(replayed, experts)


def test_replayed_experts_take_the_routers_probabilities_and_pass_gradients():
    config = Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=2)
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    logits, _, own = router(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))
    replay = torch.tensor([[7, 6], [0, 1], [-1, -1], [3, 5], [2, 4]], dtype=torch.int32)
    weights, experts = replayed_routing(logits, replay, own, norm_topk_prob=True)
    assert torch.equal(experts[2], own[2])  # a -1 row keeps the router's choice
    probs = logits.detach().double().softmax(-1)
    for t in (0, 1, 3, 4):
        picked = probs[t, replay[t].long()]
        torch.testing.assert_close(weights[t].double(), picked / picked.sum())
    weights[:, 0].sum().backward()
    assert router.weight.grad.abs().sum() > 0  # the training router still learns


# ---- routes from the engines -------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_tokenizer(tiny_moe):
    return AutoTokenizer.from_pretrained(tiny_moe / "model")


def test_hf_engine_routes_are_the_trainers_on_the_same_tokens(tiny_moe, moe_tokenizer):
    engine = HFEngine(load_hf_model(str(tiny_moe / "model")), moe_tokenizer)
    outputs = _generate_all(engine, PROMPTS, return_routed_experts=True)
    policy = CausalLMPolicy(load_hf_model(str(tiny_moe / "model"), packed=True)).eval()
    batch = _batch(PROMPTS, outputs)
    micro = pack(dataclasses.replace(batch, routed_experts=None), list(range(len(PROMPTS))),
                 "cpu")
    for prompt, output, trainer in zip(PROMPTS, outputs, split_routes(_recorded(policy, micro),
                                                                      micro), strict=True):
        assert output.routed_experts.dtype == torch.int32
        assert output.routed_experts.shape == (len(prompt) + len(output.output_ids) - 1, 2, 2)
        assert torch.equal(output.routed_experts, trainer)
    # A continued sample is sent whole: the new routes cover every token, old ones first.
    first = outputs[0]
    again = _generate_all(engine, [PROMPTS[0] + first.output_ids],
                          return_routed_experts=True)[0]
    assert len(again.routed_experts) == len(PROMPTS[0]) + len(first.output_ids) \
        + len(again.output_ids) - 1
    assert torch.equal(again.routed_experts[:len(first.routed_experts)], first.routed_experts)
    assert _generate_all(engine, PROMPTS[:1])[0].routed_experts is None  # not asked


def test_routes_travel_through_furlongs_server_and_http_engine(tiny_moe, moe_tokenizer):
    local = HFEngine(load_hf_model(str(tiny_moe / "model")), moe_tokenizer)
    expected = _generate_all(local, PROMPTS, return_routed_experts=True)
    server = ServerThread(tiny_moe / "model", moe_tokenizer, return_routed_experts=True)
    closed = ServerThread(tiny_moe / "model", moe_tokenizer)
    try:
        client = HTTPEngine(server.url, routed_experts_top_k=2)
        outputs = _generate_all(client, PROMPTS, return_routed_experts=True)
        for want, got in zip(expected, outputs, strict=True):
            assert got.output_ids == want.output_ids
            assert torch.equal(got.routed_experts, want.routed_experts)
            assert "routed_experts" not in got.meta
        router = EngineRouter([server.url], RouterOptions(routed_experts_top_k=2,
                                                          health_check_interval_s=None))
        routed = _generate_all(router, PROMPTS[:2], return_routed_experts=True)
        assert [torch.equal(o.routed_experts, e.routed_experts)
                for o, e in zip(routed, expected)] == [True, True]
        with pytest.raises(EngineHTTPError, match="--enable-return-routed-experts"):
            _generate_all(HTTPEngine(closed.url, routed_experts_top_k=2), PROMPTS[:1],
                          return_routed_experts=True)
    finally:
        server.stop()
        closed.stop()


def test_routed_experts_encoding_is_sglangs_int32_bytes():
    routes = torch.randint(0, 128, (9, 4, 8), dtype=torch.int32)
    encoded = encode_routed_experts(routes)
    assert torch.equal(decode_routed_experts(encoded, 9, 8), routes)
    with pytest.raises(ValueError, match="top-8"):
        decode_routed_experts(encoded, 10, 8)


# ---- packing and replay in the trainer ---------------------------------------------------

def test_packed_routes_put_a_filler_at_each_sample_end():
    routes = [torch.full((3, 2, 2), 1, dtype=torch.int32),
              torch.full((1, 2, 2), 2, dtype=torch.int32)]
    batch = TrainBatch([torch.arange(4), torch.arange(2)], [2, 1],
                       [torch.ones(2), torch.ones(1)], torch.zeros(2), routed_experts=routes)
    micro = pack(batch, [1, 0], "cpu")
    assert micro.routed_experts[:, 0, 0].tolist() == [2, -1, 1, 1, 1, -1]
    assert torch.equal(packed_routes([routes[1], routes[0]]), micro.routed_experts)
    split = split_routes(micro.routed_experts, micro)
    assert [torch.equal(a, b) for a, b in zip(split, [routes[1], routes[0]])] == [True, True]


def test_the_policy_routes_a_micro_batch_by_its_routes(tiny_moe):
    policy = CausalLMPolicy(load_hf_model(str(tiny_moe / "model"), packed=True))
    tokens = [torch.tensor(p) for p in PROMPTS]
    generator = torch.Generator().manual_seed(0)
    routes = [torch.randperm(8, generator=generator)[:2].repeat(len(t) - 1, 2, 1).int()
              for t in tokens]
    batch = TrainBatch(tokens, [1] * len(tokens), [torch.ones(1)] * len(tokens),
                       torch.zeros(len(tokens)), routed_experts=routes)
    micro = pack(batch, list(range(len(tokens))), "cpu")
    policy.routing_replay.record()
    log_probs, _ = policy(micro)
    used = policy.routing_replay.take_recorded()
    replayed = micro.routed_experts[:, 0, 0] >= 0
    assert torch.equal(used[replayed], micro.routed_experts[replayed])
    log_probs.sum().backward()
    gate = policy.hf_model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    own = _recorded(policy, pack(dataclasses.replace(batch, routed_experts=None),
                                 list(range(len(tokens))), "cpu"))
    assert not torch.equal(own, used)  # replay(None): the routers choose again


# ---- flags -------------------------------------------------------------------------------

def test_replay_flags_need_a_replayable_moe_model(tiny, tiny_moe):
    grpo = load_config(train_argv(tiny_moe, "--use-rollout-routing-replay"))[0].grpo
    assert grpo.use_rollout_routing_replay and not grpo.records_routes
    check_routing_replay(grpo, read_hf_config(str(tiny_moe / "model")), "moe")
    with pytest.raises(ConfigError, match="--use-rollout-routing-replay .* dense"):
        check_routing_replay(grpo, read_hf_config(str(tiny / "model")), "dense")
    with pytest.raises(ConfigError, match="supports the MoE families"):
        check_routing_replay(grpo, {"model_type": "deepseek_v3", "n_routed_experts": 8},
                             "ds")
    mixed = {**read_hf_config(str(tiny_moe / "model")), "mlp_only_layers": [0]}
    with pytest.raises(ConfigError, match="dense layers .*mlp_only_layers"):
        check_routing_replay(grpo, mixed, "mixed")  # SGLang's rows are per decoder layer


def test_tokens_without_routes_drop_the_samples_old_routes(tiny_moe):
    """An engine that returns new tokens without routes (aborted after a preemption)
    leaves the sample without routes, not with routes that miss those tokens."""
    class PreemptedEngine:
        async def generate(self, input_ids, params, return_routed_experts=False):
            return GenerateOutput(output_ids=[5, 6], output_log_probs=[-1.0, -1.0],
                                  finish_reason="abort")
    config = load_config(train_argv(tiny_moe, "--use-rollout-routing-replay"))[0]
    sample = Sample(group_index=0, index=0, tokens=[1, 2, 3],
                    rollout_routed_experts=torch.zeros(2, 2, 2, dtype=torch.int32))
    asyncio.run(generate(HookArgs(config, PreemptedEngine(), None), sample,
                         {"max_new_tokens": 4}))
    assert sample.tokens == [1, 2, 3, 5, 6] and sample.rollout_routed_experts is None


def test_load_config_refuses_replay_on_a_dense_model(tiny):
    with pytest.raises(ConfigError, match="--use-routing-replay"):
        load_config(train_argv(tiny, "--use-routing-replay"))


def test_recording_routes_needs_the_old_log_prob_forward(tiny_moe):
    config = load_config(train_argv(tiny_moe, "--use-routing-replay",
                                    "--use-rollout-logprobs"))[0]
    with pytest.raises(ValueError, match="--use-routing-replay records the routes"):
        RLStep(config.grpo, config.rollout, trainer=None)


# ---- what replay does in training --------------------------------------------------------

def _bf16_samples(tiny_moe, moe_tokenizer, config) -> list[Sample]:
    engine = HFEngine(load_hf_model(str(tiny_moe / "model"), torch.bfloat16), moe_tokenizer)
    args = HookArgs(config, engine, moe_tokenizer)
    samples = [Sample(group_index=i // 4, index=i, tokens=list(PROMPTS[i % 4]) + [i + 4],
                      reward=float(i % 3 == 0)) for i in range(12)]

    async def main():
        return await asyncio.gather(*[generate(args, s, {"temperature": 1.0, "sampling_seed": i,
                                                          "max_new_tokens": 8})
                                      for i, s in enumerate(samples)])
    return asyncio.run(main())


def _abs_diff(tiny_moe, samples, *flags) -> float:
    """The metric of one GRPO step on `samples`, one micro-batch, no reference."""
    config = load_config(train_argv(tiny_moe, *flags, apply_chat_template=False,
                                    rollout_batch_size=3, num_rollout=1,
                                    micro_batch_size=12))[0]
    actor = TrainActor(config, RankInfo(), str(tiny_moe / "model"), 1)
    groups = [samples[i:i + 4] for i in range(0, len(samples), 4)]
    return RLStep(config.grpo, config.rollout, actor)(0, groups).metrics[
        "train/train_rollout_logprob_abs_diff"]


def test_rollout_routing_replay_brings_the_trainer_closer_to_the_engine(tiny_moe,
                                                                      moe_tokenizer):
    config = load_config(train_argv(tiny_moe, "--use-rollout-routing-replay"))[0]
    samples = _bf16_samples(tiny_moe, moe_tokenizer, config)
    assert all(len(s.rollout_routed_experts) == len(s.tokens) - 1 for s in samples)
    replayed = _abs_diff(tiny_moe, samples, "--use-rollout-routing-replay")
    own = _abs_diff(tiny_moe, samples)
    assert replayed < 0.9 * own, (replayed, own)


def test_routing_replay_replays_the_old_forwards_routes_in_later_steps(tiny_moe, monkeypatch):
    config = load_config(train_argv(tiny_moe, "--use-routing-replay", apply_chat_template=False,
                                    rollout_batch_size=3, num_rollout=1, micro_batch_size=2,
                                    num_steps_per_rollout=2))[0]
    actor = TrainActor(config, RankInfo(), str(tiny_moe / "model"), 2)
    tokens = [torch.tensor(p + [16, 17]) for p in PROMPTS[:3]]
    samples = [Sample(group_index=0, index=i, tokens=t.tolist(), response_length=2,
                      reward=float(i), rollout_log_probs=[-1.0, -1.0])
               for i, t in enumerate(tokens)]
    batch = TrainBatch.from_samples(samples, None)
    expected = split_routes(_recorded(actor.policy, pack(batch, [0, 1, 2], "cpu")),
                            pack(batch, [0, 1, 2], "cpu"))
    replayed = []
    original = RoutingReplay.replay
    monkeypatch.setattr(RoutingReplay, "replay",
                        lambda self, routes: (replayed.append(routes),
                                              original(self, routes))[1])
    RLStep(config.grpo, config.rollout, actor)(0, [samples])
    assert any(r is None for r in replayed)          # the old forward: its own routes
    trained = [r for r in replayed if r is not None]  # the optimizer steps: replayed
    assert trained and sum(len(r) for r in trained) >= sum(len(t) for t in tokens)
    want = torch.cat([torch.cat([e, torch.full((1, 2, 2), -1, dtype=torch.int32)])
                      for e in expected])
    assert torch.equal(torch.cat(trained)[:len(want)].sort(-1).values, want.sort(-1).values)


def test_rollout_replay_starts_servers_that_return_routes(tiny_moe):
    """--use-rollout-routing-replay reaches the server argv and the router's decoder."""
    from furlong.engine.factory import _router_options, engine_options, server_spec
    from furlong.engine.launcher import server_command
    config, _ = load_config(train_argv(tiny_moe, "--use-rollout-routing-replay"))
    options = engine_options(config, shares_device=False)
    assert options.return_routed_experts and options.routed_experts_top_k == 2
    spec = server_spec(str(tiny_moe / "model"),
                       dataclasses.replace(options, server_module="furlong.engine.serve"),
                       torch.device("cpu"))
    assert server_command(spec, 30000).count("--enable-return-routed-experts") == 1
    router = _router_options(options, torch.device("cpu"), "value", "127.0.0.1")
    assert router.routed_experts_top_k == 2
    plain, _ = load_config(train_argv(tiny_moe))
    assert not engine_options(plain, shares_device=False).return_routed_experts


@pytest.mark.parametrize("flags,compiled", [((), True), (("--use-rollout-routing-replay",), False),
                                            (("--use-routing-replay",), False)])
def test_one_gpu_compiles_the_layers_unless_routes_are_replayed(tiny_moe, monkeypatch, flags,
                                                                compiled):
    """Replay hooks switch routes between forwards that a compiled layer would not retrace."""
    from furlong.train import actor as actor_module
    calls = []
    monkeypatch.setattr(actor_module.TrainActor, "_one_gpu", property(lambda self: True))
    monkeypatch.setattr(actor_module, "compile_decoder_layers", calls.append)
    config = load_config(train_argv(tiny_moe, *flags))[0]
    TrainActor(config, RankInfo(), str(tiny_moe / "model"), 1)
    assert bool(calls) == compiled
